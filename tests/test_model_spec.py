"""One model spec string for teachers and students: parsing, checkpoints in every arcface_torch form, embedders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shared
from kd_plugin.errors import KDPluginError
from kd_plugin.networks import create_network
from kd_plugin.normalization import IMAGENET_MEAN, IMAGENET_STD, InputNormalization
from kd_plugin.networks import build_network
from kd_plugin.teachers import load_embedder, parse_model_spec
from kd_plugin.teachers.onnx_embedder import insightface_normalization


def test_parse_specs():
    assert parse_model_spec("r100:work_dirs/ms1mv3_r100/model.pt") == \
        parse_model_spec("r100:work_dirs/ms1mv3_r100/model.pt")
    spec = parse_model_spec("r100:work_dirs/ms1mv3_r100/model.pt")
    assert (spec.kind, spec.name, spec.checkpoint) == ("arcface", "r100", "work_dirs/ms1mv3_r100/model.pt")
    assert parse_model_spec("mbf").checkpoint is None
    assert parse_model_spec("timm:resnet18").kind == "timm"
    assert parse_model_spec("packs/buffalo_l/w600k_r50.onnx").kind == "onnx"
    assert str(parse_model_spec("timm:resnet18:x.pth")) == "timm:resnet18:x.pth"
    with pytest.raises(KDPluginError, match="unknown network 'r101'.*r18"):
        parse_model_spec("r101:x.pth")


def test_students_are_built_by_networks_and_a_teacher_only_spec_is_refused():
    from kd_plugin.networks import network_family, parse_network_spec

    for text in ("r100:work_dirs/ms1mv3_r100/model.pt", "mbf", "timm:resnet18:x.pth"):
        network, model = parse_network_spec(text), parse_model_spec(text)
        assert str(network) == str(model) == text
        assert (network.family, network.name, network.checkpoint) == (model.kind, model.name, model.checkpoint)
    assert network_family("packs/buffalo_l/w600k_r50.onnx") is None and network_family("r101:x.pth") is None
    with pytest.raises(KDPluginError, match="builds no network 'packs/w600k_r50.onnx'.*can teach a student but "
                                            "cannot be trained"):
        build_network("packs/w600k_r50.onnx")


@pytest.fixture
def mbf_checkpoints(tmp_path):
    torch.manual_seed(0)
    net = create_network("mbf", 128).eval()
    state = net.state_dict()
    torch.save(state, tmp_path / "backbone.pth")  # model zoo
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "model.pt")  # saved from a DDP wrapper
    torch.save({"epoch": 1, "global_step": 5, "state_dict_backbone": state, "state_dict_softmax_fc": {},
                "state_optimizer": {}, "state_lr_scheduler": {}}, tmp_path / "checkpoint_gpu_0.pt")
    return net, tmp_path


def test_every_checkpoint_form_loads_strictly_with_its_embedding_size(mbf_checkpoints):
    net, folder = mbf_checkpoints
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = net(x)
    for name in ("backbone.pth", "model.pt", "checkpoint_gpu_0.pt"):
        loaded = build_network(f"mbf:{folder / name}").eval()  # embedding size read from the checkpoint
        with torch.no_grad():
            assert torch.allclose(loaded(x), expected, atol=1e-5), name
    with pytest.raises(KDPluginError, match="embedding size is 128, the config asks for 512"):
        build_network(f"mbf:{folder / 'backbone.pth'}", embedding_size=512)
    with pytest.raises(KDPluginError, match="does not fit network 'r18'"):
        build_network(f"r18:{folder / 'backbone.pth'}")


def test_torch_teacher_is_frozen_and_normalizes_its_own_input(mbf_checkpoints):
    net, folder = mbf_checkpoints
    teacher = load_embedder(f"mbf:{folder / 'backbone.pth'}")
    assert not any(p.requires_grad for p in teacher.module.parameters()) and not teacher.module.training
    images = torch.randint(0, 256, (3, 3, 112, 112), dtype=torch.uint8)
    with torch.no_grad():
        expected = net((images.float() - 127.5) / 127.5)  # arcface_torch's convention by default
    out = teacher.embed(images)
    assert not out.requires_grad and torch.allclose(out, expected, atol=1e-5)
    assert np.allclose(teacher.embed(images.numpy()), expected.numpy(), atol=1e-5)  # numpy in, numpy out
    bgr = load_embedder(f"mbf:{folder / 'backbone.pth'}", InputNormalization(bgr=True))
    with torch.no_grad():
        assert torch.allclose(bgr.embed(images), net((images.flip(1).float() - 127.5) / 127.5), atol=1e-5)


def test_teacher_amp_reaches_the_body_of_the_network(mbf_checkpoints):
    """arcface_torch's networks switch CUDA autocast off inside their body unless built with fp16=True, and enter
    float16 autocast when it is: a teacher with kd.teacher_amp is built with the flag, a bfloat16 one from
    kd_plugin's definitions (which keep the caller's dtype), a float32 one without it."""
    net, folder = mbf_checkpoints
    spec = f"mbf:{folder / 'backbone.pth'}"
    plain, half, brain = (load_embedder(spec, amp_dtype=dtype).module for dtype in (None, torch.float16, torch.bfloat16))
    assert not plain.fp16 and half.fp16 and brain.fp16
    assert type(brain).__module__.startswith("kd_plugin.networks")
    images = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    assert torch.allclose(load_embedder(spec, amp_dtype=torch.bfloat16).embed(images),
                          load_embedder(spec).embed(images), atol=0.05)  # the same weights, in bf16


def test_a_teacher_needs_weights():
    with pytest.raises(KDPluginError, match="a teacher needs weights"):
        load_embedder("r50")


def test_fixed_batch_and_dynamic_onnx_give_the_same_embeddings():
    norm = InputNormalization(IMAGENET_MEAN, IMAGENET_STD)
    images = torch.randint(0, 256, (5, 3, 112, 112), dtype=torch.uint8)
    out = [load_embedder(str(shared("teachers", "mobilefacenet_ms1m", name)), norm).embed(images)
           for name in ("mobilefacenet_dynamic.onnx", "mobilefacenet_b1.onnx")]
    assert out[0].shape == (5, 128) and torch.allclose(out[0], out[1], atol=1e-4)


def test_insightface_pack_convention_without_insightface(tmp_path):
    """insightface's rule: graphs starting with Sub and Mul normalise inside (mean 0, std 1), others 127.5."""
    import onnx
    from onnx import TensorProto, helper

    def graph(first_ops):
        nodes, prev = [], "input"
        for i, op in enumerate(first_ops):
            const = helper.make_tensor(f"c{i}", TensorProto.FLOAT, [1], [1.0])
            nodes.append(helper.make_node("Constant", [], [f"k{i}"], value=const, name=f"Const_{i}"))
            nodes.append(helper.make_node(op, [prev, f"k{i}"], [f"t{i}"], name=f"{op}_{i}"))
            prev = f"t{i}"
        nodes.append(helper.make_node("Flatten", [prev], ["output"], name="Flatten_9"))
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 112, 112])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, None])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])

    onnx.save(graph(["Sub", "Mul"]), tmp_path / "mxnet_export.onnx")
    onnx.save(graph(["Add"]), tmp_path / "plain.onnx")
    inside, plain = (insightface_normalization(str(tmp_path / f)) for f in ("mxnet_export.onnx", "plain.onnx"))
    assert (inside.mean, inside.std) == ((0.0,) * 3, (1.0,) * 3)
    assert (plain.mean, plain.std) == ((127.5,) * 3, (127.5,) * 3)


def test_timm_body_with_embedding_neck(tmp_path):
    from kd_plugin.networks.timm_network import import_timm
    try:
        import_timm()
    except ImportError:
        pytest.skip("timm is an optional extra (pip install timm) and is not installed")
    student = build_network("timm:resnet18", embedding_size=64).eval()
    x = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    torch.save(student.state_dict(), tmp_path / "student.pth")
    teacher = load_embedder(f"timm:resnet18:{tmp_path / 'student.pth'}")  # ImageNet normalisation by default
    with torch.no_grad():
        expected = student(InputNormalization(IMAGENET_MEAN, IMAGENET_STD).torch(x))
    assert expected.shape == (2, 64) and torch.allclose(teacher.embed(x), expected, atol=1e-5)
