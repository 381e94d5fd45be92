"""A new head and a new teacher format are each one module of their own (tests/extensions/), with no edit to kd_plugin:
importing the module registers it, and `kd-plugin train` then runs it from config.kd alone."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from kd_plugin.run.config import resolve
from kd_plugin.methods.registry import restored
from test_train import TinyStudent, _config, _registered_for_this_module, make_faces  # noqa: F401


def _losses(output):
    with open(os.path.join(output, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_a_head_in_its_own_module_trains_from_config_kd_and_sees_the_teacher(tmp_path):
    from kd_plugin.methods import methods
    from kd_plugin.run.train import Trainer

    torch.manual_seed(7)
    torch.save(TinyStudent(16).state_dict(), tmp_path / "teacher.pth")
    with restored():
        module = importlib.reload(importlib.import_module("extensions.teacher_pull_head"))
        assert methods()["teacher_pull"].kind == "head"
        cfg = resolve(_config(make_faces(tmp_path / "faces"), tmp_path / "run", max_steps=3, num_epoch=1,
                              kd={"method": "teacher_pull+cosine", "teacher": f"test_tiny:{tmp_path / 'teacher.pth'}",
                                  "teacher_pull": {"pull": 0.5}}))
        trainer = Trainer(cfg)
        head = trainer.objective.head
        assert isinstance(head, module.TeacherPullHead) and head.pull == 0.5  # its block reached its builder
        before = head.weight.detach().clone()
        result = trainer.run()
    assert result["global_step"] == 3
    assert head.observed == [(8, (8, 16))] * 3  # every step, the labelled rows and their teacher embeddings
    assert not torch.equal(before, head.weight.detach())
    assert [e["step"] for e in _losses(tmp_path / "run")] == [1, 2, 3]
    assert "teacher_pull" not in methods()  # restored() put the registry back


def test_a_teacher_format_in_its_own_module_serves_every_spec_consumer(tmp_path):
    from kd_plugin.teachers import load_embedder, parse_model_spec
    from kd_plugin.teachers.formats import teacher_formats, unregister_teacher_format
    from kd_plugin.run.train import Trainer

    folder = tmp_path / "teacher"
    folder.mkdir()
    torch.manual_seed(7)
    torch.save(TinyStudent(16).state_dict(), folder / "weights.pt")
    (folder / "normalization.json").write_text(json.dumps({"mean": 127.5, "std": 64.0}))
    spec = f"folder:{folder}"
    module = importlib.import_module("extensions.folder_teacher")
    try:
        assert parse_model_spec(spec).kind == "folder" and str(parse_model_spec(spec)) == spec
        teacher = load_embedder(spec)
        assert isinstance(teacher, module.FolderEmbedder) and teacher.normalization.std == (64.0, 64.0, 64.0)
        cfg = resolve(_config(make_faces(tmp_path / "faces"), tmp_path / "run", max_steps=2, num_epoch=1,
                              kd={"method": "cosine", "teacher": spec}))
        trainer = Trainer(cfg)
        assert isinstance(trainer.teacher.embedder, module.FolderEmbedder)
        assert trainer.teacher.embedder.checked > 0  # the run called its check once, before any step
        trainer.run()
        assert [e["step"] for e in _losses(tmp_path / "run")] == [1, 2]
        assert trainer.teacher.teacher_rows == 2 * 8  # it embedded every row of both steps
        with pytest.raises(ValueError, match="float32 only"):  # a setting it does not honour is refused by it
            load_embedder(spec, amp_dtype=torch.float16)
    finally:
        unregister_teacher_format("folder")
    assert "folder" not in teacher_formats()
