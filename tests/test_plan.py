"""One plan per run (kd_plugin.methods.plan): `config.resolve` reads the registry once, and the config checks, the builders,
the objective and the train_v2 hook read the plan."""

from __future__ import annotations

import pathlib
import pickle
import re

import torch
from easydict import EasyDict

import kd_plugin
from kd_plugin.run.config import resolve
from kd_plugin.run.hook import distill
from test_hook import _fake_train_v2
from test_train import TinyStudent, _registered_for_this_module, make_faces  # noqa: F401 (autouse: test_tiny)

PACKAGE = pathlib.Path(kd_plugin.__file__).parent


def test_resolve_attaches_the_plan_of_the_chosen_methods():
    cfg = resolve({"rec": "x", "num_classes": 5, "embedding_size": 128,
                   "kd": {"method": "proxyless_adaptive+ekd+logit+cosine", "teacher": "t.onnx",
                          "proxyless_adaptive": {"centres": "estimate"},
                          "weights": {"cosine": 3.0}}})
    plan = cfg.kd.plan
    assert plan.head == "proxyless_adaptive" and plan.terms == (("ekd", 1.0), ("logit", 1.0), ("cosine", 3.0))
    assert plan.names == ("proxyless_adaptive", "ekd", "logit", "cosine")
    assert plan.teacher and plan.centres and plan.balanced and plan.logits == ("logit",)
    assert plan.equal_dims == ("proxyless_adaptive", "cosine") and plan.label_free == ("logit", "cosine")
    assert plan.own_teacher == () and plan.title("ekd") == "EKD"
    assert cfg.kd.terms == plan.weights and cfg.kd.head == plan.head  # the public spelling of the same plan
    assert pickle.loads(pickle.dumps(cfg)).kd.plan == plan  # names and flags only: it travels with the config
    trainable = resolve({"rec": "x", "num_classes": 5, "kd": {"method": "none"}}).kd.plan
    assert (trainable.head, trainable.terms, trainable.teacher, trainable.centres) == ("trainable", (), False, False)


def test_only_the_registry_and_the_plan_read_what_a_method_needs():
    readers = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                     if re.search(r"\.needs\b", path.read_text(encoding="utf-8")))
    assert readers == ["methods/plan.py", "methods/registry.py"]


def test_the_hook_resolves_its_config_once(monkeypatch, tmp_path):
    import kd_plugin.run.config

    calls = []
    real = kd_plugin.run.config.resolve
    monkeypatch.setattr(kd_plugin.run.config, "resolve", lambda config: (calls.append(1), real(config))[1])
    fake = _fake_train_v2(monkeypatch, tmp_path / "train_v2.py")
    torch.save(TinyStudent(16).state_dict(), tmp_path / "teacher.pth")
    config = EasyDict(rec=str(make_faces(tmp_path / "faces")), num_classes=8, embedding_size=16, batch_size=6,
                      num_image=0, output=str(tmp_path / "out"))
    distill(config, teacher=f"test_tiny:{tmp_path / 'teacher.pth'}", method="proxyless+ekd", centres="estimate",
            sampler=dict(identities_per_batch=1, images_per_identity=2))
    fake.get_dataloader(config.rec, 0, 6, seed=config.get("seed", 2048))
    head = fake.PartialFC_V2(None, 16, 8, 1.0, False)
    assert head.objective.needs_teacher and len(calls) == 1
