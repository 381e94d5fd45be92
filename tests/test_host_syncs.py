"""The host-synchronisation budget of a training step (kd_plugin.host_syncs), counted by a spy at 1, 2 and 4 gloo
ranks, in `kd-plugin train` and under the train_v2 hook: 0 at a step that does not log, 1 at a logging step, and 1
more per step for AdaDistill's update waves — whatever the number of ranks."""

from __future__ import annotations

import json
import os
import sys

import pytest

from distributed_helpers import run_ranks
from test_train import _config, _teacher, ensure_registered, make_faces

@pytest.fixture(autouse=True, scope="module")
def _tiny_network_for_this_module():
    """`test_tiny` is registered in this process by some tests here: leave the registry as other modules expect."""
    yield
    from kd_plugin.networks import network_names, unregister_network
    if "test_tiny" in network_names():
        unregister_network("test_tiny")


KD_EKD_LOGIT = {"method": "proxyless+ekd+logit", "proxyless": {"centres": "estimate"}, "ekd": {"memory": 32},
                "sampler": {"identities_per_batch": 1, "images_per_identity": 2}}
KD_ADADISTILL = {"method": "adadistill", "sampler": {"identities_per_batch": 1, "images_per_identity": 2}}


def _count_trainer_steps(rank, world, configs):
    return [_count_one_run(config) for config in configs]


def _count_one_run(config):
    from kd_plugin.run.config import resolve
    from kd_plugin.host_syncs import count_host_syncs
    from kd_plugin.run.train import Trainer

    ensure_registered()
    trainer = Trainer(resolve(config))
    counts, logging = [], []
    step, log = Trainer.step, Trainer._logging_step

    def counted_step(self, *args):
        with count_host_syncs() as seen:
            out = step(self, *args)
        counts.append(dict(seen.by_call))
        return out

    def counted_log(self, *args):
        with count_host_syncs() as seen:
            out = log(self, *args)
        logging.append((self.global_step, dict(seen.by_call)))
        return out

    Trainer.step, Trainer._logging_step = counted_step, counted_log
    try:
        trainer.run()
    finally:
        Trainer.step, Trainer._logging_step = step, log
    return counts, logging


@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_trainer_keeps_the_host_sync_budget_at_every_world_size(tmp_path, world):
    data = make_faces(tmp_path / "faces", identities=8, per_identity=12)  # 96 images
    teacher = _teacher(tmp_path)
    per_rank = 16 // world
    runs = ((KD_EKD_LOGIT, {}), (KD_ADADISTILL, {"tolist": 1}))
    configs = [_config(data, tmp_path / f"{kd['method']}_{world}", batch_size=per_rank, max_steps=6, frequent=3,
                       num_epoch=1, kd=dict(kd, teacher=teacher)) for kd, _ in runs]
    for rank_result in run_ranks(_count_trainer_steps, world, configs):  # both runs in one group of processes
        for (kd, budget), (counts, logging) in zip(runs, rank_result):
            assert len(counts) == 6 and all(c == budget for c in counts), (kd["method"], counts)
            # the logging steps: one read (tolist) after one all-reduce, and nothing else
            assert [s for s, _ in logging] == [3, 6] and all(c == {"tolist": 1} for _, c in logging), logging


def _job(path, data, output, kd_call, **overrides):
    settings = dict(network="stand_in", embedding_size=16, batch_size=8, lr=0.1, rec=str(data), num_classes=8,
                    num_image=0, num_epoch=1, num_workers=0, frequent=3, output=str(output), resume=False)
    settings.update(overrides)
    here = os.path.dirname(os.path.abspath(__file__))
    path.write_text(
        "import sys\nsys.path.insert(0, " + repr(here) + ")\n"
        "from easydict import EasyDict\n"
        "import test_train\ntest_train.ensure_registered()\n"
        f"config = EasyDict({settings!r})\n"
        "from kd_plugin import distill\n"
        f"distill(config, {kd_call})\n")
    return path


def _run_stand_in(config, world):
    """The stand-in train_v2 on `world` ranks with the host-sync spy on; fails naming each failing rank."""
    from test_hook_contract import _run
    return _run(config, world, KD_TEST_COUNT_SYNCS="1")


@pytest.mark.usefixtures("needs_cpu_harness")
@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_hook_keeps_the_host_sync_budget_at_every_world_size(tmp_path, world):
    """Counted around train_v2's `module_partial_fc(embeddings, labels)` and `loss.backward()` (train_v2's own
    `loss.item()` is upstream's). Every rank reads the scalars' means over the ranks at logging steps (one all-reduce,
    as the trainer); rank 0 writes them."""
    data = make_faces(tmp_path / "faces", identities=8, per_identity=8)
    teacher = _teacher(tmp_path)
    sampler = "sampler=dict(identities_per_batch=1, images_per_identity=2)"
    for method, extra, waves in (("proxyless+ekd+logit", "proxyless=dict(centres='estimate'), ekd=dict(memory=32), ", 0),
                                 ("adadistill", "", 1)):
        out = tmp_path / f"{method}_{world}"
        job = _job(tmp_path / f"job_{world}.py", data, out,
                   f"teacher={teacher!r}, method={method!r}, {extra}{sampler}", batch_size=16 // world)
        _run_stand_in(job, world)
        for rank in range(world):
            with open(out / f"emulated_rank{rank}.jsonl") as f:
                steps = [json.loads(line) for line in f]
            assert steps and all(s["host_syncs"] is not None for s in steps)
            for s in steps:
                logs = s["step"] % 3 == 0
                expected = waves + int(logs)
                assert sum(s["host_syncs"].values()) == expected, (method, rank, s["step"], s["host_syncs"])


def _cached(tmp_path, data, teacher):
    from kd_plugin.data.datasets import open_dataset
    from kd_plugin.teachers import build_cache, load_embedder

    ensure_registered()
    folder = str(tmp_path / "cache")
    build_cache(load_embedder(teacher), open_dataset(str(data)), folder, teacher, progress=False)
    return folder


def test_cached_teacher_rows_come_from_the_loader_workers_with_the_same_losses(tmp_path, monkeypatch):
    """kd.cache: the rows are read by the DataLoader's worker (never by the training process during a step), the step
    makes no host sync, and the losses are those of reading the cache in the step."""
    from kd_plugin.run.build import build_loader
    from kd_plugin.run.config import resolve
    from kd_plugin.host_syncs import count_host_syncs
    from kd_plugin.teachers.cache import TeacherCache
    from kd_plugin.run.train import Trainer

    ensure_registered()
    data = make_faces(tmp_path / "faces", identities=8, per_identity=6)
    teacher = _teacher(tmp_path)
    kd = {"method": "cosine", "teacher": teacher, "cache": _cached(tmp_path, data, teacher)}
    losses = {}
    for name in ("loader", "in_step"):
        trainer = Trainer(resolve(_config(data, tmp_path / name, batch_size=8, max_steps=5, frequent=1,
                                          num_workers=1, kd=kd)))
        if name == "in_step":  # the rows read in the step, as before they came with the batch
            trainer.loader = build_loader(trainer.cfg, trainer.dataset, trainer.sampler, pin_memory=False)
        reads, syncs, real_get, real_step = [], [], TeacherCache.get, Trainer.step

        def get(self, *args, _reads=reads, _get=real_get):
            _reads.append(1)
            return _get(self, *args)

        def step(self, *args, _syncs=syncs, _step=real_step):
            with count_host_syncs() as seen:
                out = _step(self, *args)
            _syncs.append(seen.total)
            return out
        monkeypatch.setattr(TeacherCache, "get", get)
        monkeypatch.setattr(Trainer, "step", step)
        trainer.run()
        monkeypatch.undo()
        with open(tmp_path / name / "train_log.jsonl") as f:
            losses[name] = [json.loads(line)["loss"] for line in f if '"loss"' in line]
        if name == "loader":
            assert reads == [] and syncs == [0] * 5  # the worker read them; the step only copies
        else:
            assert len(reads) == 5 and min(syncs) > 0
    assert losses["loader"] == losses["in_step"] and len(losses["loader"]) == 5


@pytest.mark.usefixtures("needs_cpu_harness")
def test_under_the_hook_cached_rows_come_with_the_batch_and_the_step_makes_no_host_sync(tmp_path):
    data = make_faces(tmp_path / "faces", identities=8, per_identity=12)
    teacher = _teacher(tmp_path)
    cache = _cached(tmp_path, data, teacher)
    out = tmp_path / "run"
    job = _job(tmp_path / "job.py", data, out, f"teacher={teacher!r}, method='cosine', cache={cache!r}",
               batch_size=8, num_workers=1)
    _run_stand_in(job, 2)
    for rank in range(2):
        with open(out / f"emulated_rank{rank}.jsonl") as f:
            steps = [json.loads(line) for line in f]
        assert steps and all(sum(s["host_syncs"].values()) == int(s["step"] % 3 == 0) for s in steps)
    with open(out / "train_log.jsonl") as f:
        assert any("loss_cosine" in json.loads(line) for line in f)


def test_the_step_benchmark_reports_parts_syncs_and_ratios(capsys):
    """Structure at a small size (the figures come from `kd-plugin bench step --json`)."""
    from kd_plugin.cli import main

    assert main(["bench", "step", "--json", "--network", "cpu_r8", "--steps", "2", "--warmup", "1", "--batch-size",
                 "8", "--identities", "4", "--per-identity", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["device"] == "cpu" and set(result["steps"]) == {"student", "cached", "torch_teacher", "onnx_teacher"}
    for name, figures in result["steps"].items():
        assert figures["seconds"] > 0 and figures["host_syncs"] <= 2, (name, figures)
        assert {"loader_wait", "student_forward", "backward", "head", "optimizer"} <= set(figures)
    assert "teacher" in result["steps"]["onnx_teacher"] and "term_cosine" in result["steps"]["cached"]
    assert set(result["ratios"]) >= {"cached/student", "onnx_teacher/torch_teacher"}
