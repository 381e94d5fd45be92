"""`kd-plugin train`: 2 gloo processes equal 1 process, exact resume after SIGTERM and SIGKILL, clear stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from conftest import jpeg_bytes
from distributed_helpers import run_ranks
from kd_plugin.run.config import resolve
from kd_plugin.errors import KDPluginError
from kd_plugin.networks import network_names, register_network, unregister_network


class TinyStudent(nn.Module):
    """Without batch norm, so a global batch split over ranks computes exactly what one process computes."""

    def __init__(self, embedding_size: int = 16, fp16: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, embedding_size)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))


def ensure_registered() -> None:
    """Make `test_tiny` a network name (in this process: spawned ranks and CLI subprocesses call it too)."""
    if "test_tiny" not in network_names():
        register_network("test_tiny", TinyStudent)


@pytest.fixture(autouse=True, scope="module")
def _registered_for_this_module():
    """Register for these tests only, leaving the registry as the other test modules expect it."""
    ensure_registered()
    yield
    unregister_network("test_tiny")


def make_faces(root, identities=8, per_identity=6):
    for i in range(identities):
        os.makedirs(root / f"id{i:02d}", exist_ok=True)
        for k in range(per_identity):
            (root / f"id{i:02d}" / f"{k}.jpg").write_bytes(jpeg_bytes(i * 100 + k))
    return root


def _config(data, output, **overrides):
    config = {"rec": str(data), "num_classes": 8, "network": "test_tiny", "embedding_size": 16, "batch_size": 8,
              "lr": 0.1, "num_epoch": 2, "warmup_epoch": 1, "num_workers": 0, "output": str(output), "frequent": 1,
              "margin_list": (1.0, 0.4, 0.0), "kd": {}}
    config.update(overrides)
    return config


def _teacher(tmp_path):
    torch.manual_seed(7)
    path = tmp_path / "teacher.pth"
    torch.save(TinyStudent(16).state_dict(), path)
    return f"test_tiny:{path}"


def _log(output):
    with open(os.path.join(output, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(output):
    return [entry for entry in _log(output) if "loss" in entry]


def _train_in_group(rank, world, config):
    from kd_plugin.run.train import train
    ensure_registered()
    return train(resolve(config))


KD = {"method": "proxyless+ekd", "proxyless": {"centres": "estimate"}, "sampler": {"identities_per_batch": 1, "images_per_identity": 2}}


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    data = make_faces(tmp_path / "faces")
    teacher = _teacher(tmp_path)
    kd = dict(KD, teacher=teacher)
    one_process = dict(kd, sampler={"identities_per_batch": 2, "images_per_identity": 2})
    # the reference runs in a child process as well: same thread settings, no state left by earlier tests
    run_ranks(_train_in_group, 1, _config(data, tmp_path / "one", batch_size=8, max_steps=6, kd=one_process))
    run_ranks(_train_in_group, 2, _config(data, tmp_path / "two", batch_size=4, max_steps=6,
                                          kd=dict(kd, sampler={"identities_per_batch": 1, "images_per_identity": 2})))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    # the one-process run draws 4 random + 2 x 2 balanced per step; each rank 2 + 1 x 2: together the same images
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):  # tolerance: float32 reductions in a different order
        for key in ("loss", "loss_head", "loss_ekd"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_config_validation_names_key_value_and_allowed():
    with pytest.raises(KDPluginError, match=r"config.kd.method = 'ekd\+foo': unknown \['foo'\]"):
        resolve({"rec": "x", "num_classes": 2, "kd": {"method": "ekd+foo"}})
    with pytest.raises(KDPluginError, match="config.kd.proxyless.centres = None: ProxylessKD needs"):
        resolve({"rec": "x", "num_classes": 2, "kd": {"method": "proxyless"}})
    with pytest.raises(KDPluginError, match="config.kd.teacher = None: method 'l2' needs the teacher"):
        resolve({"rec": "x", "num_classes": 2, "kd": {"method": "l2"}})
    with pytest.raises(KDPluginError, match="config.kd.sampler.image_per_identity"):
        resolve({"rec": "x", "num_classes": 2, "kd": {"sampler": {"image_per_identity": 4}}})
    cfg = resolve({"rec": "x", "num_classes": 2, "kd": {"method": "proxyless+ekd+l2", "teacher": "t.onnx",
                                                        "proxyless": {"centres": "c.pt"}, "weights": {"l2": 10}}})
    assert cfg.kd.terms == {"ekd": 1.0, "l2": 10.0} and cfg.kd.head == "proxyless" and cfg.kd.sampler.balanced


def _run_cli(config_path, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "kd_plugin", "train", str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _write_config(path, config):
    path.write_text("from easydict import EasyDict\nconfig = EasyDict(" + repr(config) + ")\n"
                    "import sys; sys.path.insert(0, " + repr(os.path.dirname(__file__)) + ")\n"
                    "import test_train; test_train.ensure_registered()\n")
    return path


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path, kill):
    data = make_faces(tmp_path / "faces", identities=8, per_identity=10)
    kd = dict(KD, teacher=_teacher(tmp_path))
    base = _config(data, tmp_path / "full", batch_size=8, num_epoch=2, checkpoint_every=3, kd=kd)
    from kd_plugin.run.train import train
    train(resolve(base))
    full = _losses(tmp_path / "full")
    assert len(full) == 28  # 2 epochs x ceil(80 images / 6 random samples per step)
    cfg = _write_config(tmp_path / "job.py", dict(base, output=str(tmp_path / "cut")))
    proc = _run_cli(cfg)
    log = tmp_path / "cut" / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 8):
        time.sleep(0.05)
    proc.send_signal(kill)
    out, _ = proc.communicate(timeout=120)
    done = _losses(tmp_path / "cut")
    assert 8 <= len(done) < 28, out
    if kill == signal.SIGTERM:
        assert proc.returncode == 0 and "SIGTERM: checkpoint written" in out
    resumed_cfg = _write_config(tmp_path / "job.py", dict(base, output=str(tmp_path / "cut"), resume=True))
    proc = _run_cli(resumed_cfg)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    steps = {}
    for entry in _losses(tmp_path / "cut"):
        steps[entry["step"]] = entry  # a step replayed after SIGKILL overwrites its first record
    assert sorted(steps) == list(range(1, 29))
    for a in full:
        assert steps[a["step"]]["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), a["step"]


def test_verification_every_verbose_steps_and_model_pt(tmp_path):
    import pickle
    data = make_faces(tmp_path / "faces")
    pairs = []
    for i in range(8):  # 8 same-identity pairs, then 8 different-identity pairs, as arcface_torch's .bin files
        pairs += [jpeg_bytes(i * 100), jpeg_bytes(i * 100 + 1)]
    for i in range(8):
        pairs += [jpeg_bytes(i * 100 + 2), jpeg_bytes((i + 1) % 8 * 100 + 3)]
    (tmp_path / "val.bin").write_bytes(pickle.dumps((pairs, [True] * 8 + [False] * 8)))
    from kd_plugin.run.train import train
    train(resolve(_config(data, tmp_path / "out", max_steps=4, verbose=2,
                          val_targets=[str(tmp_path / "val.bin"), str(data)])))
    checks = [e["verification"] for e in _log(tmp_path / "out") if "verification" in e]
    assert len(checks) == 2 and "val/val/accuracy" in checks[0] and "val/faces/tpr@1e-01" in checks[0]
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    TinyStudent(16).load_state_dict(state)  # the student backbone alone, strict


def test_multistep_switches_to_the_teacher_of_each_epoch(tmp_path):
    """PocketNet's multi-step KD: epoch e learns from the teacher after its epoch e + 1. With checkpoints [A, A] and
    [A, B] the first epoch is identical and the second differs; the switch is logged."""
    from kd_plugin.run.train import train

    data = make_faces(tmp_path / "faces")
    torch.manual_seed(1)
    a, b = tmp_path / "teacher_e1.pth", tmp_path / "teacher_e2.pth"
    torch.save(TinyStudent(16).state_dict(), a)
    torch.save(TinyStudent(16).state_dict(), b)
    runs = {}
    for name, checkpoints in (("same", [str(a), str(a)]), ("switch", str(tmp_path / "teacher_e{epoch}.pth"))):
        kd = {"method": "multistep", "teacher": "test_tiny", "multistep": {"checkpoints": checkpoints}}
        train(resolve(_config(data, tmp_path / name, kd=kd)))
        runs[name] = _log(tmp_path / name)
    switches = [(e["epoch"], e["teacher"]) for e in runs["switch"] if "teacher" in e]
    assert switches == [(0, f"test_tiny:{a}"), (1, f"test_tiny:{b}")]
    losses = {name: [(e["epoch"], e["loss_multistep"]) for e in log if "loss" in e] for name, log in runs.items()}
    first = [(x, y) for x, y in zip(losses["same"], losses["switch"]) if x[0] == 0]
    second = [(x, y) for x, y in zip(losses["same"], losses["switch"]) if x[0] == 1]
    assert first and second
    assert all(x == pytest.approx(y, rel=1e-6) for x, y in first)
    assert all(abs(x[1] - y[1]) > 1e-6 for x, y in second)


def test_multistep_stops_at_a_missing_teacher_epoch_with_a_checkpoint_kept(tmp_path):
    from kd_plugin.run.train import train

    data = make_faces(tmp_path / "faces")
    a = tmp_path / "teacher_e1.pth"
    torch.save(TinyStudent(16).state_dict(), a)
    kd = {"method": "multistep", "teacher": "test_tiny", "multistep": {"checkpoints": [str(a)]}}
    with pytest.raises(KDPluginError, match="student epoch 1 needs the teacher after its epoch 2"):
        train(resolve(_config(data, tmp_path / "out", kd=kd)))
    assert (tmp_path / "out" / "checkpoint_gpu_0.pt").is_file()  # epoch 0 was saved before the switch
    with pytest.raises(KDPluginError, match="kd.teacher = 'test_tiny:x.pth': with multistep"):
        resolve({"rec": "x", "num_classes": 2, "kd": {"method": "multistep", "teacher": "test_tiny:x.pth",
                                                      "multistep": {"checkpoints": ["a"]}}})
    with pytest.raises(KDPluginError, match="kd.cache"):
        resolve({"rec": "x", "num_classes": 2, "kd": {"method": "multistep", "teacher": "test_tiny", "cache": "c",
                                                      "multistep": {"checkpoints": ["a"]}}})
