"""Built-in networks: they build, embed, and match arcface_torch's get_model key for key and output for output.

The upstream comparisons need an arcface_torch checkout (set ARCFACE_TORCH_ROOT to recognition/arcface_torch).
"""

from __future__ import annotations

import hashlib
import sys
import warnings

import pytest
import torch
from torch import nn

from conftest import missing

from kd_plugin.networks import UnknownNetworkError, create_network, load_upstream_get_model, network_names

NAMES = ["r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large", "vit_t", "vit_s", "vit_b"]
FORWARD_NAMES = ["r18", "mbf", "vit_t"]  # the deep ones take seconds per forward on a small CPU

# Measured from arcface_torch's backbones.get_model(name, num_features=size) (its vit.py with timm's parameter-free
# helpers stubbed, timm not being installed): number of parameters (the frozen BN weight included) for embedding
# sizes 512 and 128, number of state_dict entries, and sha1 of its "key:shape" lines at size 512 (see _layout_digest)
UPSTREAM_LAYOUT = {
    "r18": (24025600, 14390656, 187, "6302630ef00f2211"),
    "r34": (34139328, 24504384, 331, "9efc01c389416935"),
    "r50": (43590848, 33955904, 475, "547f3c62bb723fd1"),
    "r100": (65156160, 55521216, 925, "85599283c14f8b86"),
    "r200": (118833920, 109198976, 1807, "535f109a42b97f6c"),
    "mbf": (2059520, 1862144, 333, "84b4d033606a2a93"),
    "mbf_large": (6314880, 6117504, 606, "fd57ca6d90f5c61a"),
    "vit_t": (19137792, 19038720, 150, "b42be15092df9a05"),
    "vit_s": (76023296, 75825920, 150, "d709dc27303acce6"),
    "vit_b": (113833472, 113636096, 282, "57938ed3ef30fb5c"),
}


def _layout_digest(model: nn.Module) -> str:
    text = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in model.state_dict().items())
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_network():
    # arcface_torch's names, then kd_plugin's CPU benchmark student and the demo's networks, each declared in its module
    assert network_names() == NAMES + ["cpu_r8", "demo_teacher", "demo_student"]


def test_unknown_name_is_a_value_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="r50.*mbf.*vit_b") as info:
        create_network("resnet50")
    assert isinstance(info.value, UnknownNetworkError)
    assert "resnet50" in str(info.value)


@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_bad_embedding_size_is_refused(bad):
    with pytest.raises(ValueError, match="embedding_size"):
        create_network("mbf", bad)


@pytest.mark.parametrize("size", [128, 512])
@pytest.mark.parametrize("name", NAMES)
def test_builds_with_upstream_layout(name, size):
    model = create_network(name, embedding_size=size)
    params_512, params_128, entries, digest = UPSTREAM_LAYOUT[name]
    assert _param_count(model) == (params_512 if size == 512 else params_128)
    state = model.state_dict()
    assert len(state) == entries
    if size == 512:
        assert _layout_digest(model) == digest
    last_key = next(reversed([k for k in state if k.endswith(".weight")]))
    assert state[last_key].shape == (size,)  # every family ends on a BatchNorm1d over the embedding


@pytest.mark.parametrize("size", [128, 512])
@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_forward_gives_finite_embeddings(name, size):
    torch.manual_seed(0)
    model = create_network(name, embedding_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, size) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_fp16_is_a_no_op_on_cpu(name):
    torch.manual_seed(0)
    plain = create_network(name, 64).eval()
    mixed = create_network(name, 64, fp16=True).eval()
    mixed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected, got = plain(x), mixed(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_iresnet_embedding_bn_scale_is_frozen_at_one():
    model = create_network("r18", 128, dropout=0.2)
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(128))
    assert model.dropout.p == 0.2


def test_dropout_is_ignored_with_a_warning_where_upstream_ignores_it():
    with pytest.warns(UserWarning, match="ignored"):
        create_network("mbf", 128, dropout=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_network("mbf", 128)


def test_vit_trains_with_token_masking():
    torch.manual_seed(0)
    model = create_network("vit_t", 32).train()
    out = model(torch.randn(3, 3, 112, 112))
    assert out.shape == (3, 32)
    out.square().mean().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_vit_refuses_other_image_sizes():
    with pytest.raises(ValueError, match="112"):
        create_network("vit_t", 32).eval()(torch.randn(1, 3, 96, 96))


def test_no_checkout_gives_none(tmp_path, monkeypatch):
    monkeypatch.delenv("ARCFACE_TORCH_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_upstream_get_model(None) is None
    assert load_upstream_get_model(str(tmp_path)) is None


# --- against arcface_torch itself -------------------------------------------------------------------------------------


def _timm_importable() -> bool:
    from kd_plugin.networks.timm_network import import_timm
    try:
        import_timm()  # also works around a CUDA torchvision wheel beside a CPU torch
    except Exception:
        return False
    return True


HAVE_TIMM = _timm_importable()


@pytest.fixture(scope="module")
def upstream_get_model():
    had_backbones = "backbones" in sys.modules
    get_model = load_upstream_get_model()
    if get_model is None:
        missing("no arcface_torch checkout: run `bash .ci/upstream-env`, or set ARCFACE_TORCH_ROOT")
    assert had_backbones or "backbones" not in sys.modules  # imported under a private name only
    return get_model


def _calibrate(model: nn.Module, seed: int) -> None:
    """Realistic then perturbed BatchNorm statistics, so the eval-mode comparison exercises every BN buffer."""
    torch.manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        # a cumulative average over one batch: statistics the data really has, so activations stay in range
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream's torch.cuda.amp.autocast deprecation / no-CUDA warnings
        model(torch.randn(4, 3, 112, 112))
        for norm in norms:
            norm.running_var.mul_(torch.empty_like(norm.running_var).uniform_(0.5, 2.0))
            norm.running_mean.add_(0.1 * norm.running_var.sqrt() * torch.randn_like(norm.running_mean))
            norm.num_batches_tracked.fill_(7)
            if norm.affine:
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.1)
    model.eval()


UPSTREAM_NAMES = ["r18", "r50", "mbf", "mbf_large",
                  pytest.param("vit_t", marks=pytest.mark.skipif(
                      not HAVE_TIMM, reason="`import timm` fails: arcface_torch's vit.py needs it"))]


@pytest.mark.parametrize("size", [128, 512])
@pytest.mark.parametrize("name", UPSTREAM_NAMES)
def test_same_as_upstream(upstream_get_model, name, size):
    torch.manual_seed(0)
    upstream = upstream_get_model(name, num_features=size, fp16=False, dropout=0.0)
    ours = create_network(name, embedding_size=size)
    theirs_state, our_state = upstream.state_dict(), ours.state_dict()
    assert list(our_state) == list(theirs_state)
    assert [tuple(v.shape) for v in our_state.values()] == [tuple(v.shape) for v in theirs_state.values()]
    assert ([k for k, p in ours.named_parameters() if not p.requires_grad]
            == [k for k, p in upstream.named_parameters() if not p.requires_grad])

    _calibrate(upstream, seed=size)
    ours.load_state_dict(upstream.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream's torch.cuda.amp.autocast deprecation / no-CUDA warnings
        expected = upstream(x)
        got = ours(x)
    scale = expected.abs().max().item()
    assert torch.isfinite(expected).all() and scale > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * scale)


def test_cpu_student_takes_arcface_input_and_embeds():
    torch.manual_seed(0)
    net = create_network("cpu_r8", 128).eval()
    out = net(torch.randn(3, 3, 112, 112))
    assert out.shape == (3, 128) and torch.isfinite(out).all()
    assert 1.5e6 < sum(p.numel() for p in net.parameters()) < 2e6
