"""The hook's contract with train_v2, in CI: a stand-in train_v2.py making upstream's calls (tests/emulated_upstream)
runs under the CPU harness's strict device mode with 2 gloo processes, for 2 epochs, then resumes for a third.
Strict mode raises where a GPU would raise a device mismatch; the real upstream run is in test_hook.py (local only)."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

from conftest import CPU_HARNESS
from processes import assert_every_rank_ok, rank_output, torchrun
from test_train import TinyStudent, make_faces

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = str(CPU_HARNESS)
STAND_IN = os.path.join(HERE, "emulated_upstream", "train_v2.py")


def _config(path, data, output, teachers, **overrides):
    settings = dict(network="stand_in", embedding_size=16, batch_size=6, lr=0.1, rec=str(data), num_classes=8,
                    num_image=0, num_epoch=2, num_workers=1, frequent=2, output=str(output), resume=False)
    settings.update(overrides)
    path.write_text(
        "import sys\nsys.path.insert(0, " + repr(HERE) + ")\n"
        "from easydict import EasyDict\n"
        "from kd_plugin.networks import network_names, register_network\n"
        "from test_train import TinyStudent\n"
        "if 'test_tiny' not in network_names():\n    register_network('test_tiny', TinyStudent)\n"
        f"config = EasyDict({settings!r})\n"
        "from kd_plugin import distill\n"
        "distill(config, teacher='test_tiny', method='multistep+ekd', margin_on_random_part=True,\n"
        f"        multistep=dict(checkpoints={teachers!r}),\n"
        "        sampler=dict(identities_per_batch=1, images_per_identity=2))\n")
    return path


def _run(config, world, script=STAND_IN, **extra_env):
    """`script config` on `world` processes under the CPU harness (strict device mode); fails naming each failing
    rank's exit code and last lines (tests/processes.py). Returns the folder of the ranks' logs."""
    env = dict(os.environ, PYTHONPATH=SHIM, OMP_NUM_THREADS="1", **extra_env)
    env.pop("KD_CPU_SHIM_LAX", None)  # strict device mode
    logs = tempfile.mkdtemp(prefix="torchrun_", dir=os.path.dirname(str(config)))
    proc = torchrun(world, logs, script, str(config), cwd=os.path.dirname(STAND_IN), env=env, timeout=600)
    assert_every_rank_ok(proc, logs, world)
    return logs


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.usefixtures("needs_cpu_harness")
def test_the_hook_meets_train_v2s_loader_and_device_contract_over_epochs_ranks_and_resume(tmp_path):
    data = make_faces(tmp_path / "faces")  # 8 identities x 6 images
    for epoch in (1, 2, 3):  # multi-step KD: a different teacher after each of its epochs
        torch.manual_seed(epoch)
        torch.save(TinyStudent(16).state_dict(), tmp_path / f"teacher_e{epoch}.pth")
    teachers = str(tmp_path / "teacher_e{epoch}.pth")
    out = tmp_path / "run"
    _run(_config(tmp_path / "job.py", data, out, teachers), world=2)
    _run(_config(tmp_path / "job.py", data, out, teachers, num_epoch=3, resume=True), world=2)

    # every rank: a DataLoader of float images and int64 labels; 48 images / (2 ranks x 4 random rows) = 6 steps
    for rank in (0, 1):
        steps = _jsonl(out / f"emulated_rank{rank}.jsonl")
        assert [s["step"] for s in steps] == list(range(1, 19))
        assert all(s["is_dataloader"] and s["image_dtype"] == "torch.float32" and s["label_dtype"] == "torch.int64"
                   and s["steps_per_epoch"] == 6 and s["num_image"] == 6 * 6 * 2 for s in steps)
        by_epoch = [[s["image_sum"] for s in steps if s["epoch"] == e] for e in range(3)]
        assert by_epoch[0] != by_epoch[1] != by_epoch[2]  # set_epoch reached the sampler: new batches each epoch
    # the KD scalars: rank 0, every `frequent` (2) steps, continued after the resume; the teacher of each epoch
    log = _jsonl(out / "train_log.jsonl")
    figures = [e for e in log if "loss" in e]
    assert [e["step"] for e in figures] == list(range(2, 19, 2))
    assert all({"loss_head", "loss_ekd", "loss_multistep"} <= set(e) for e in figures)
    switches = [(e["epoch"], e["teacher"]) for e in log if "teacher" in e]
    assert switches == [(e, f"test_tiny:{tmp_path / f'teacher_e{e + 1}.pth'}") for e in range(3)]
    training_log = (out / "training.log").read_text()
    assert "KD step 18 epoch 2: loss_head=" in training_log and "multi-step KD: epoch 1 learns from" in training_log
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))
    # the EKD thresholds are the same on both ranks (the miner sees the gathered global batch) and were resumed
    states = [torch.load(out / f"checkpoint_gpu_{r}.pt", weights_only=True)["state_dict_softmax_fc"] for r in (0, 1)]
    assert int(states[0]["kd_step"]) == int(states[1]["kd_step"]) == 18
    key = "objective.terms.ekd.miner.student_anchors"
    assert torch.equal(states[0][key], states[1][key])


@pytest.mark.usefixtures("needs_cpu_harness")
def test_a_renamed_copy_of_train_v2_distils(tmp_path):
    import shutil

    data = make_faces(tmp_path / "faces")
    torch.manual_seed(1)
    torch.save(TinyStudent(16).state_dict(), tmp_path / "teacher_e1.pth")
    renamed = tmp_path / "train_v2_kd.py"
    shutil.copy(STAND_IN, renamed)
    out = tmp_path / "run"
    logs = _run(_config(tmp_path / "job.py", data, out, str(tmp_path / "teacher_e{epoch}.pth"), num_epoch=1),
                world=1, script=str(renamed))
    figures = [e for e in _jsonl(out / "train_log.jsonl") if "loss" in e]
    assert figures and all({"loss_head", "loss_ekd", "loss_multistep"} <= set(e) for e in figures)
    stderr = rank_output(logs, 0, "stderr")
    assert stderr and "distillation is NOT active" not in stderr  # the rank's log was read (DDP's warnings are in it)
