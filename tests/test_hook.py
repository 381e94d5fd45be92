"""The one-line hook: what `distill` does outside and inside train_v2.py, and a real upstream run when available."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from easydict import EasyDict

from conftest import shared
from kd_plugin import distill
from kd_plugin.errors import KDPluginError

ROOT = os.environ.get("ARCFACE_TORCH_ROOT", "")
PYTHON = os.environ.get("ARCFACE_TORCH_PYTHON", "")  # a python that runs upstream (mxnet, numpy<=1.23.5)
SHIM = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tools", "arcface_torch_cpu")


def test_outside_train_v2_it_only_fills_config_kd():
    config = EasyDict(rec="x", num_classes=3)
    distill(config, teacher="r100:t.pth", method="proxyless+ekd", centres="estimate")
    assert config.kd == {"method": "proxyless+ekd", "teacher": "r100:t.pth", "centres": "estimate"}


def test_a_train_v2_without_the_names_it_patches_stops_clearly(monkeypatch, tmp_path):
    fake = types.ModuleType("__main__")
    fake.__file__ = str(tmp_path / "train_v2.py")
    fake.get_model, fake.get_dataloader = object(), object()  # PartialFC_V2 renamed upstream, say
    monkeypatch.setitem(sys.modules, "__main__", fake)
    with pytest.raises(KDPluginError, match="has no 'PartialFC_V2' to replace; the hook supports insightface"):
        distill(EasyDict(rec="x", num_classes=3), teacher="t.onnx", method="ekd")


@pytest.mark.skipif(not (os.path.isfile(os.path.join(ROOT, "train_v2.py")) and os.path.isfile(PYTHON)),
                    reason="needs an arcface_torch checkout (ARCFACE_TORCH_ROOT) and a python able to run it "
                           "(ARCFACE_TORCH_PYTHON, e.g. the venv of ../shared/tools/arcface_torch_cpu/make_env.sh)")
@pytest.mark.parametrize("world", [1, 2], ids=["1process", "2processes"])
def test_unchanged_upstream_train_v2_distils_with_one_line(tmp_path, world):
    teacher = shared("teachers", "mobilefacenet_ms1m", "mobilefacenet_dynamic.onnx")
    data = shared("celeba", "train.rec")
    subset = tmp_path / "celeba_sub"
    script = ("import os\nfrom kd_plugin.data import open_dataset\nfrom kd_plugin.data.pack import pack_dataset\n"
              f"ds = open_dataset({str(data)!r})\nroot = {str(tmp_path / 'images')!r}\n"
              "for i in range(len(ds)):\n    c = int(ds.labels[i])\n    if c < 12:\n"
              "        os.makedirs(f'{root}/{c:03d}', exist_ok=True)\n"
              "        open(f'{root}/{c:03d}/{i}.jpg', 'wb').write(ds.read_bytes(i))\n"
              f"pack_dataset(open_dataset(root), {str(subset)!r}, progress=False)\n")
    subprocess.run([PYTHON, "-c", script], check=True)
    name = f"_kd_plugin_hook_test_{os.getpid()}"
    config_path = os.path.join(ROOT, "configs", f"{name}.py")
    with open(config_path, "w") as f:
        f.write(f"""from easydict import EasyDict as edict
config = edict(margin_list=(1.0, 0.5, 0.0), network="mbf", resume=False, output={str(tmp_path / 'run')!r},
               embedding_size=128, sample_rate=1.0, fp16=False, batch_size=32, lr=0.1, verbose=2000, dali=False,
               rec={str(subset)!r}, num_classes=12, num_image=0, num_epoch=1, warmup_epoch=0, val_targets=[],
               num_workers=1, save_all_states=True)
from kd_plugin import distill; distill(config, teacher={str(teacher)!r}, method="proxyless+ekd",
    teacher_mean="123.675,116.28,103.53", teacher_std="58.395,57.12,57.375", centres="estimate",
    sampler=dict(identities_per_batch=4, images_per_identity=4))
""")
    try:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(SHIM))
        launcher = [] if world == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={world}",
                                          "--master_port", str(29500 + os.getpid() % 1000)]
        proc = subprocess.run([PYTHON, *launcher, "train_v2.py", f"configs/{name}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
    finally:
        os.remove(config_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = ("import torch, sys\nsys.path.insert(0, '.')\nfrom backbones import get_model\n"
             f"sd = torch.load({str(tmp_path / 'run' / 'model.pt')!r}, weights_only=True)\n"
             "get_model('mbf', fp16=False, num_features=128).load_state_dict(sd, strict=True)\n"
             f"ck = torch.load({str(tmp_path / 'run' / 'checkpoint_gpu_0.pt')!r}, weights_only=True)\n"
             "assert 'objective.terms.ekd.miner.student_anchors' in ck['state_dict_softmax_fc']\n"
             "assert int(ck['state_dict_softmax_fc']['objective.terms.ekd.miner.steps']) == ck['global_step']\n"
             # the balanced sampler's epoch: ceil(N / (W * R)) steps, R = 32 - 4 x 4 random images per rank
             f"n = len(__import__('kd_plugin.data', fromlist=['x']).open_dataset({str(subset)!r}))\n"
             f"assert ck['global_step'] == -(-n // ({world} * 16)), (ck['global_step'], n)\n"
             # every rank holds the same EKD thresholds (the miner runs on the gathered global batch)
             f"for r in range(1, {world}):\n"
             f"    other = torch.load({str(tmp_path / 'run')!r} + f'/checkpoint_gpu_{{r}}.pt', weights_only=True)\n"
             "    for key in ('student_anchors', 'teacher_anchors'):\n"
             "        k = 'objective.terms.ekd.miner.' + key\n"
             "        assert torch.equal(other['state_dict_softmax_fc'][k], ck['state_dict_softmax_fc'][k]), key\n"
             "print('ok', ck['global_step'])\n")
    out = subprocess.run([PYTHON, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]


SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def _count_syncs(patch):
    """Count the calls that make the host wait for the device (a tensor read back), by name."""
    counts = {name: 0 for name in SYNCS}
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(self, *args, **kwargs)
        patch.setattr(torch.Tensor, name, spy)
    return counts


def _hook_head_under_a_fake_train_v2(monkeypatch, tmp_path, **kd):
    from test_train import TinyStudent, ensure_registered, make_faces

    ensure_registered()
    fake = types.ModuleType("__main__")
    fake.__file__ = str(tmp_path / "train_v2.py")
    fake.get_model, fake.get_dataloader, fake.PartialFC_V2 = object(), object(), object()
    monkeypatch.setitem(sys.modules, "__main__", fake)
    torch.save(TinyStudent(16).state_dict(), tmp_path / "teacher.pth")
    config = EasyDict(rec=str(make_faces(tmp_path / "faces")), num_classes=8, embedding_size=16, batch_size=6,
                      frequent=3, num_image=0, output=str(tmp_path / "out"))
    distill(config, teacher=f"test_tiny:{tmp_path / 'teacher.pth'}", method="ekd",
            sampler=dict(identities_per_batch=1, images_per_identity=2), **kd)
    return config, fake.PartialFC_V2(None, 16, 8, 1.0, False)


def test_the_hook_honours_margin_on_random_part(monkeypatch, tmp_path):
    _, head = _hook_head_under_a_fake_train_v2(monkeypatch, tmp_path, margin_on_random_part=True)
    assert head.objective.margin_random_rows == 4  # batch 6 - 1 identity x 2 images
    _, head = _hook_head_under_a_fake_train_v2(monkeypatch, tmp_path)
    assert head.objective.margin_random_rows is None


def test_the_hook_logs_its_scalars_every_frequent_steps_with_one_sync(monkeypatch, tmp_path):
    config, head = _hook_head_under_a_fake_train_v2(monkeypatch, tmp_path)
    torch.manual_seed(0)
    images = torch.rand(6, 3, 112, 112) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, 4])
    head.shared.images = images

    def steps(n, direct=False):
        with pytest.MonkeyPatch.context() as patch:
            counts = _count_syncs(patch)
            for _ in range(n):
                emb = torch.randn(6, 16, requires_grad=True)
                if direct:
                    teacher = torch.as_tensor(head._teacher.embed(
                        (images * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8))).float()
                    head.objective(emb, labels, teacher)
                else:
                    head(emb, labels)
        return counts

    objective_alone = steps(1, direct=True)  # what the objective and the teacher need by themselves
    steps(1)  # step 1 (frequent = 3) reads the resumable step count once
    assert steps(1) == objective_alone  # step 2: nothing more than the objective's own
    at_log = steps(1)  # step 3: the means are read back once
    assert at_log == dict(objective_alone, tolist=objective_alone["tolist"] + 1)
    log = [json.loads(line) for line in open(os.path.join(config.output, "train_log.jsonl"))]
    assert [e["step"] for e in log] == [3] and {"loss", "loss_head", "loss_ekd"} <= set(log[0])
