"""kd-plugin check: the preflight on the shared real faces, alone and on 2 gloo ranks; each failure names its key or
file."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import shared
from kd_plugin.check import describe
from kd_plugin.cli import main
from kd_plugin.errors import KDPluginError
from kd_plugin.networks import create_network
from processes import assert_every_rank_ok, rank_output, torchrun

MEAN, STD = "123.675,116.28,103.53", "58.395,57.12,57.375"


def _config(tmp_path, name="job", **changes) -> str:
    """A small job on the shared CelebA training set (249 identities, 5,206 images): cpu_r8 student, batch 32."""
    settings = dict(margin_list=(1.0, 0.5, 0.0), network="cpu_r8", embedding_size=128, batch_size=32, lr=0.1,
                    num_workers=0, rec=str(shared("celeba", "train.rec")), num_classes=249, num_image=5206,
                    num_epoch=4, warmup_epoch=0, output=str(tmp_path / name))
    kd = dict(method="proxyless+ekd", teacher=str(shared("teachers", "mobilefacenet_ms1m", "mobilefacenet_dynamic.onnx")),
              teacher_mean=MEAN, teacher_std=STD, proxyless=dict(centres="estimate"),
              sampler=dict(identities_per_batch=4, images_per_identity=4))
    kd.update(changes.pop("kd", {}))
    if "proxyless" not in kd["method"]:
        kd.pop("proxyless")  # a block of a method that does not run is refused
    settings.update(changes)
    path = tmp_path / f"{name}.py"
    path.write_text(f"config = {settings!r}\nconfig['kd'] = {kd!r}\n")
    return str(path)


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_good_job_passes_with_every_figure_of_the_report(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["check", config, "--steps", "2", "--json"]) == 0
    result = _json(capsys)
    assert result["ok"] and len(result["ranks"]) == 1
    report = result["ranks"][0]
    teacher = report["teacher"]
    assert teacher["device"] == "cpu" and teacher["on_training_device"]
    assert 0 <= teacher["onnx_relative_error"] < 1e-3  # the converted ONNX teacher against onnxruntime
    assert teacher["normalization"]["mean"] == [123.675, 116.28, 103.53]
    classifier = report["classifier"]
    assert (classifier["source"], classifier["stand_in"], classifier["num_classes"], classifier["embedding_size"],
            classifier["rank_rows"]) == ("estimate", True, 249, 128, [0, 249])
    steps = report["steps"]
    assert {"data", "teacher", "student_forward", "head", "term_ekd", "backward", "optimizer"} <= set(steps["parts"])
    assert steps["host_syncs_per_step"] <= steps["host_sync_budget"] == 0
    assert steps["peak_memory_bytes"] > steps["memory_model_bytes"]["classifier"] == 249 * 128 * 4
    assert steps["images_per_second"] > 0 and steps["measured"] == 2
    job = report["job"]
    assert job["steps_per_epoch"] > 0 and job["eta_seconds"] > 0
    cache = job["cache"]
    assert cache["bytes"] == 2 * 5206 * 128 * 2 and cache["build_seconds"] > 0 and 0 < cache["teacher_share_of_step"] < 1
    assert f"--mean {MEAN}" in cache["command"]
    assert not (tmp_path / "job" / "checkpoint_gpu_0.pt").exists()  # only <output>/kd_check is written
    assert 0 <= teacher["onnx_relative_error_batches"] < 1e-3  # and on the measured steps' batches
    text = describe(result["ranks"])  # the human report, from the same figures
    assert "PASSED" in text and "ONNX vs onnxruntime: max relative error" in text and "ETA" in text


@pytest.fixture
def torch_teacher(tmp_path):
    """A 64-d cpu_r8 teacher checkpoint (untrained: the failures below come before any figure matters)."""
    torch.manual_seed(0)
    path = tmp_path / "teacher64.pth"
    torch.save(create_network("cpu_r8", 64).state_dict(), path)
    return f"cpu_r8:{path}"


def test_each_failure_names_its_key_or_file(tmp_path, capsys, torch_teacher):
    cases = {
        "refused": (dict(kd=dict(ekd=dict(nonsense=1))), "config", "nonsense"),
        "classes": (dict(num_classes=250), "build", "num_classes"),
        "shard": (dict(kd=dict(proxyless=dict(centres=str(tmp_path / "shards")), teacher=torch_teacher,
                               teacher_mean=None, teacher_std=None), embedding_size=64), "build",
                  f"{tmp_path / 'shards'}: classifier shards checkpoint_gpu_{{r}}.pt found for ranks [0, 2], missing rank(s) [1]"),
        "dims": (dict(kd=dict(method="cosine", teacher=torch_teacher, teacher_mean=None, teacher_std=None)),
                 "steps", "embedding_size = 64"),
    }
    shards = tmp_path / "shards"
    shards.mkdir()
    for rank in (0, 2):  # shard 1 of 3 is missing
        torch.save({"state_dict_softmax_fc": {"weight": torch.randn(83, 64)}}, shards / f"checkpoint_gpu_{rank}.pt")
    for name, (changes, stage, named) in cases.items():
        assert main(["check", _config(tmp_path, name, **changes), "--steps", "1", "--json"]) == 1, name
        failed = _json(capsys)["ranks"][0]["failed"]
        assert failed["stage"] == stage and named in failed["error"], (name, failed)


def test_two_gloo_ranks_check_their_own_class_ranges(tmp_path, torch_teacher):
    config = _config(tmp_path, kd=dict(teacher=torch_teacher, teacher_mean=None, teacher_std=None,
                                       method="proxyless+ekd"), embedding_size=64)
    logs = tmp_path / "logs"
    proc = torchrun(2, logs, "-m", "kd_plugin", "check", config, "--steps", "1", "--json",
                    env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_every_rank_ok(proc, logs, 2)
    result = json.loads(rank_output(logs, 0).strip().splitlines()[-1])
    assert result["ok"] and [r["rank"] for r in result["ranks"]] == [0, 1]
    assert [r["classifier"]["rank_rows"] for r in result["ranks"]] == [[0, 125], [125, 249]]
    assert all(r["world_size"] == 2 and r["steps"]["host_syncs_per_step"] == 0 for r in result["ranks"])
    assert rank_output(logs, 1).strip() == ""  # rank 1 prints nothing: rank 0 reports for both


def test_the_hook_line_and_the_train_v2_it_runs_under(tmp_path, needs_upstream_source):
    from kd_plugin.check import hook_report

    config = tmp_path / "configs" / "job.py"
    config.parent.mkdir()
    config.write_text("from easydict import EasyDict as edict\nconfig = edict(network='r50')\n"
                      "from kd_plugin import distill; distill(config, teacher='r100:t.pth', method='proxyless+ekd')\n")
    upstream = os.path.join(needs_upstream_source, "train_v2.py")
    report = hook_report(str(config), upstream)
    assert report["config_calls_distill"] and report["names_found"] == ["get_dataloader", "get_model", "PartialFC_V2"]
    assert hook_report(str(config), None)["train_v2"] is None  # none beside configs/: not checked, and said so
    (tmp_path / "train_v2.py").write_text("from backbones import get_model\n")  # beside configs/: found and read
    with pytest.raises(KDPluginError, match=r"train_v2.py: does not name get_dataloader, PartialFC_V2"):
        hook_report(str(config), None)


def test_the_cache_line_names_every_training_set_and_the_unlabelled_faces():
    from easydict import EasyDict

    from kd_plugin.check import _cache_command

    kd = EasyDict(teacher="t.onnx", teacher_mean=MEAN, teacher_std=STD, teacher_bgr=True,
                  unlabeled=EasyDict(data=["u1", "u2"]))
    assert _cache_command(EasyDict(rec=["a.rec", "b.rec"], kd=kd)) == (
        f"kd-plugin cache --teacher t.onnx --mean {MEAN} --std {STD} --bgr --data a.rec b.rec --unlabeled u1 u2 "
        f"--out DIR, then config.kd.cache = DIR")
    kd.update(teacher_mean=None, teacher_std=None, teacher_bgr=False, unlabeled=EasyDict(data=None))
    assert _cache_command(EasyDict(rec="a.rec", kd=kd)) == (
        "kd-plugin cache --teacher t.onnx --data a.rec --out DIR, then config.kd.cache = DIR")
