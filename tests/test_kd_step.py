"""One KD step for both ways in: the same method run by `kd-plugin train`'s Trainer and by the train_v2 hook's head
(each with its own loader, sampler, teacher and objective, built from the same settings) sees the same batches —
their flips and cached rows included — and gives the same losses and the same student gradients at its first
steps."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from easydict import EasyDict

from kd_plugin import distill
from kd_plugin.run.config import resolve
from test_train import TinyStudent, _registered_for_this_module, make_faces  # noqa: F401  (test_tiny, this module only)

STEPS = 3


def _cache(tmp_path, faces, teacher):
    from kd_plugin.data.datasets import open_dataset
    from kd_plugin.teachers import build_cache, load_embedder

    folder = str(tmp_path / "cache")
    build_cache(load_embedder(teacher), open_dataset(str(faces)), folder, teacher, progress=False)
    return folder


def _settings(tmp_path, method):
    faces = make_faces(tmp_path / "faces")
    torch.manual_seed(7)
    torch.save(TinyStudent(16).state_dict(), tmp_path / "teacher.pth")
    teacher = f"test_tiny:{tmp_path / 'teacher.pth'}"
    kd = {"teacher": teacher, "sampler": {"identities_per_batch": 1, "images_per_identity": 2}}
    if method == "cosine (cached)":
        method, kd["cache"] = "cosine", _cache(tmp_path, faces, teacher)
    if method.startswith("proxyless"):
        kd["proxyless"] = {"centres": "estimate"}
    # lr 0: the student stays as it was, so each step's loss depends on the KD step alone (the objective's own
    # state, EKD's thresholds and memory, moves on in both)
    top = {"rec": str(faces), "num_classes": 8, "embedding_size": 16, "batch_size": 6, "lr": 0.0, "frequent": 2,
           "num_workers": 0, "margin_list": (1.0, 0.4, 0.0)}
    return top, method, kd


def _hook_head(monkeypatch, tmp_path, top, method, kd):
    """The hook's loader and head as train_v2 gets them (the loader on this CPU instead of cuda:local_rank)."""
    from kd_plugin.run.hook import HookLoader

    names = {}
    fake = types.ModuleType("__main__")
    fake.__file__ = str(tmp_path / "train_v2.py")
    fake.get_model, fake.get_dataloader, fake.PartialFC_V2 = object(), object(), object()
    monkeypatch.setitem(sys.modules, "__main__", fake)
    config = EasyDict(top, network="r50", num_image=0, output=str(tmp_path / "hook"))
    distill(config, method=method, **kd)
    names.update(vars(fake))
    head_factory = names["PartialFC_V2"]
    loader = names["get_dataloader"](config.rec, 0, config.batch_size, seed=config.get("seed", 2048), num_workers=0)
    shared = loader.shared
    loader = HookLoader(shared, torch.device("cpu"), 0)  # the same loader, on the device this test has
    head = head_factory(None, 16, 8, 1.0, False)
    return loader, head


@pytest.mark.parametrize("method", ["ekd", "proxyless+ekd", "cosine (cached)", "proxyless+l2"])
def test_one_method_through_both_ways_in_gives_the_same_first_steps(monkeypatch, tmp_path, method):
    from kd_plugin.run.train import Trainer

    top, name, kd = _settings(tmp_path, method)
    trainer = Trainer(resolve({**top, "network": "test_tiny", "num_epoch": 1, "warmup_epoch": 0,
                               "output": str(tmp_path / "train"), "kd": {**kd, "method": name}}))
    loader, head = _hook_head(monkeypatch, tmp_path, top, name, kd)
    backbone = copy.deepcopy(trainer.student)  # train_v2's backbone, from the trainer's student's weights
    grads = {"train": [], "hook": []}
    trainer.student.fc.weight.register_hook(lambda g: grads["train"].append(g.clone()))

    trainer.sampler.set_epoch(0)
    loader.sampler.set_epoch(0)
    seen = 0
    for step, (batch, (images, labels)) in enumerate(zip(trainer.loader, loader)):
        if step == STEPS:
            break
        hooked = loader.shared.batch
        assert torch.equal(hooked.indices, batch.indices) and torch.equal(hooked.flips, batch.flips)
        assert (hooked.rows is None) == (batch.rows is None) == ("cache" not in kd)
        if batch.rows is not None:
            assert torch.equal(hooked.rows, batch.rows)  # read by the loader, on both paths
        assert torch.allclose(images, (batch.images.float() - 127.5) / 127.5)

        stats, loss = trainer.step(batch)
        head.shared.images = images  # what the hook's forward pre-hook on train_v2's backbone keeps
        embeddings = backbone(images)
        hook_loss = head(embeddings, labels)
        hook_loss.backward()
        grads["hook"].append(backbone.fc.weight.grad.clone())
        backbone.zero_grad(set_to_none=True)
        assert torch.allclose(hook_loss.detach(), loss.detach(), rtol=1e-5, atol=1e-6), (step, hook_loss, loss)
        assert torch.allclose(grads["hook"][-1], grads["train"][-1], rtol=1e-4, atol=1e-7)
        seen += 1
    assert seen == STEPS
    assert float(loss.detach()) > 0 and set(stats) >= {"loss", "loss_head"}
