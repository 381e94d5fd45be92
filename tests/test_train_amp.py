"""`kd-plugin train` as arcface_torch trains on GPUs, run on CPU: autocast + GradScaler (unscale before clip), bf16,
gradient accumulation (exact resume mid-accumulation), and settings refused rather than ignored."""

from __future__ import annotations

import pytest
import torch

from kd_plugin.run.config import resolve
from kd_plugin.errors import KDPluginError
from test_train import KD, _config, _losses, _registered_for_this_module, _teacher, make_faces  # noqa: F401 (autouse: test_tiny)


def _trainer(config):
    from kd_plugin.run.train import Trainer
    return Trainer(resolve(config))


def _clip_norms(monkeypatch, clip: bool = True):
    """Record the gradient norm clip_grad_norm_ sees at each optimizer step (clip=False: record without clipping)."""
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        norm = real(params, max_norm if clip else float("inf"), *args, **kwargs)
        seen.append(float(norm))
        return norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return seen


def _forward_dtypes(trainer):
    dtypes = []
    trainer.student.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    return dtypes


def test_fp16_runs_under_autocast_with_a_grad_scaler_unscaled_before_the_clip(tmp_path, monkeypatch):
    data = make_faces(tmp_path / "faces")
    kd = dict(KD, teacher=_teacher(tmp_path))
    norms = {}
    for name, fp16 in (("fp32", False), ("fp16", True)):
        seen = _clip_norms(monkeypatch)
        trainer = _trainer(_config(data, tmp_path / name, fp16=fp16, max_steps=1, kd=kd))
        if fp16:  # arcface_torch's scaler, started at a scale whose first step does not overflow this tiny model
            assert trainer.scaler.is_enabled() and trainer.scaler._growth_interval == 100
            trainer.scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=100)
        dtypes = _forward_dtypes(trainer)
        trainer.run()
        norms[name] = seen
        assert dtypes == [torch.float16 if fp16 else torch.float32]
    # a clip before unscaling would see 256 times the fp32 norm
    assert norms["fp16"][0] == pytest.approx(norms["fp32"][0], rel=0.02)
    assert "grad_scale" in _losses(tmp_path / "fp16")[0]


def test_the_grad_scaler_state_is_checkpointed_and_resumed(tmp_path):
    """From arcface_torch's initial scale 2^16 this model overflows: steps are skipped and the scale halves; a resumed
    run continues from the saved scale, as the uninterrupted one does."""
    data = make_faces(tmp_path / "faces")
    straight = _trainer(_config(data, tmp_path / "straight", fp16=True, max_steps=6))
    straight.run()
    _trainer(_config(data, tmp_path / "cut", fp16=True, max_steps=3)).run()
    saved = torch.load(tmp_path / "cut" / "checkpoint_gpu_0.pt", weights_only=True)["state_kd"]["scaler"]
    assert saved["scale"] < 65536.0 and saved["growth_interval"] == 100
    resumed = _trainer(_config(data, tmp_path / "cut", fp16=True, max_steps=6, resume=True))
    resumed.run()
    assert resumed.scaler.get_scale() == straight.scaler.get_scale()
    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path, monkeypatch):
    data = make_faces(tmp_path / "faces")
    trainer = _trainer(_config(data, tmp_path / "out", fp16=True, max_steps=1))
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    real_backward = torch.Tensor.backward

    def poisoned_backward(self, *args, **kwargs):  # an fp16 gradient that overflowed
        real_backward(self, *args, **kwargs)
        trainer.student.fc.weight.grad[0, 0] = float("inf")
    monkeypatch.setattr(torch.Tensor, "backward", poisoned_backward)
    trainer.run()
    after = trainer.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the optimizer step was skipped
    assert trainer.scaler.get_scale() == 32768.0


def test_bf16_autocast_without_a_scaler(tmp_path):
    data = make_faces(tmp_path / "faces")
    trainer = _trainer(_config(data, tmp_path / "out", fp16=True, amp_dtype="bfloat16", max_steps=2))
    dtypes = _forward_dtypes(trainer)
    trainer.run()
    assert dtypes == [torch.bfloat16] * 2 and not trainer.scaler.is_enabled()
    assert "grad_scale" not in _losses(tmp_path / "out")[0]


def _weights_after(tmp_path, name, monkeypatch, **overrides):
    import kd_plugin.run.train
    monkeypatch.setattr(kd_plugin.run.train, "poly_warmup_factor", lambda step, warmup, total: 1.0)  # constant LR
    data = tmp_path / "faces"
    if not data.exists():
        make_faces(data)
    trainer = _trainer(_config(data, tmp_path / name, momentum=0.0, weight_decay=0.0, num_epoch=1, **overrides))
    trainer.run()
    return trainer.student.state_dict()


def test_gradient_acc_sums_the_gradients_of_its_steps_like_arcface_torch(tmp_path, monkeypatch):
    """gradient_acc=2 at batch 4 and lr 0.05 sums two half-batch gradients: the same update as batch 8 at lr 0.1
    (the sampler's random part covers the same images in the same order either way)."""
    norms = _clip_norms(monkeypatch, clip=False)  # the sum of two half-batch gradients is twice as large: no clip
    full = _weights_after(tmp_path, "full", monkeypatch, batch_size=8, lr=0.1, max_steps=3)
    acc = _weights_after(tmp_path, "acc", monkeypatch, batch_size=4, lr=0.05, gradient_acc=2, max_steps=6)
    assert len(norms) == 6  # 3 optimizer steps each
    plain = _weights_after(tmp_path, "plain", monkeypatch, batch_size=4, lr=0.05, max_steps=6)
    for key in full:
        assert torch.allclose(acc[key], full[key], atol=1e-6), key
    assert not all(torch.allclose(plain[key], full[key], atol=1e-4) for key in full)


def test_resume_in_the_middle_of_an_accumulation_is_exact(tmp_path, monkeypatch):
    straight = _weights_after(tmp_path, "straight", monkeypatch, batch_size=4, lr=0.05, gradient_acc=2, max_steps=6)
    _weights_after(tmp_path, "cut", monkeypatch, batch_size=4, lr=0.05, gradient_acc=2, max_steps=3)
    state = torch.load(tmp_path / "cut" / "checkpoint_gpu_0.pt", weights_only=True)
    assert state["state_kd"]["accumulated_grads"] is not None  # step 3 of 6: one half-summed gradient pending
    resumed = _weights_after(tmp_path, "cut", monkeypatch, batch_size=4, lr=0.05, gradient_acc=2, max_steps=6,
                             resume=True)
    for key in straight:
        assert torch.allclose(resumed[key], straight[key], atol=1e-7), key


@pytest.mark.parametrize("overrides, message", [
    ({"dali": True}, r"config.dali = True: kd_plugin reads train.rec itself .* set dali = False"),
    ({"gradient_acc": 0}, r"config.gradient_acc = 0: expected an integer >= 1"),
    ({"amp_dtype": "float8"}, r"config.amp_dtype = 'float8': allowed: float16, bfloat16"),
    ({"amp_dtype": "bfloat16"}, r"config.amp_dtype = 'bfloat16': applies only with fp16 = True"),
    ({"kd": {"method": "ekd", "teacher": "t.onnx", "weights": {"ekdd": 2.0}}},
     r"config.kd.weights.ekdd = 2.0: no term 'ekdd' in method 'ekd' \(its terms: ekd;"),
    ({"kd": {"method": "proxyless", "proxyless": {"centres": "c.pt"}, "weights": {"ekd": 2.0}}},
     r"config.kd.weights.ekd = 2.0: no term 'ekd' in method 'proxyless'"),
    ({"kd": {"method": "logit", "teacher": "t.onnx"}},
     r"config.kd.method = 'logit': logit KD compares .* inherited class centres: add proxyless"),
])
def test_settings_that_would_be_ignored_are_refused(overrides, message):
    with pytest.raises(KDPluginError, match=message):
        resolve(dict({"rec": "x", "num_classes": 2}, **overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"using_wandb": True}, r"config.using_wandb = True: kd-plugin train does not log to wandb"),
    ({"batchsize": 64}, r"config.batchsize = 64: unknown key: kd-plugin train reads .*batch_size"),
    ({"num_image": 5179510}, r"config.num_image = 5179510 but .* has 48 images"),
])
def test_the_trainer_refuses_keys_it_would_not_honour(tmp_path, overrides, message):
    data = make_faces(tmp_path / "faces")
    with pytest.raises(KDPluginError, match=message):
        _trainer(_config(data, tmp_path / "out", **overrides))
    _trainer(_config(data, tmp_path / "ok", using_wandb=False, wandb_key="x", num_image=48))  # inert values pass


def test_a_run_leaves_arcface_torchs_training_log_with_the_kd_terms(tmp_path):
    import logging
    data = make_faces(tmp_path / "faces")
    kd = dict(KD, teacher=_teacher(tmp_path))
    for name in ("first", "second"):
        _trainer(_config(data, tmp_path / name, frequent=2, max_steps=4, fp16=True, kd=kd)).run()
    log = (tmp_path / "first" / "training.log").read_text().splitlines()
    speed = [line for line in log if "Speed " in line]
    assert len(speed) == 2 and all(line.startswith("Training: ") for line in speed)
    assert "samples/sec   Loss " in speed[0] and "Global Step: 2   Fp16 Grad Scale: " in speed[0]
    assert "Required: " in speed[0] and "loss_head=" in speed[0] and "loss_ekd=" in speed[0]
    assert "ekd_" in speed[0].split("loss_ekd=")[1]  # the EKD diagnostics follow the loss terms
    assert "ekd_threshold" not in speed[0]  # the twelve per-FPR thresholds: JSONL and tensorboard only
    with open(tmp_path / "first" / "train_log.jsonl") as f:
        assert any("ekd_threshold_student@1e-03" in line for line in f)
    assert any("epoch 1/2 done" in line for line in log)
    assert len((tmp_path / "second" / "training.log").read_text().splitlines()) == len(log)  # no cross-talk
    assert not logging.getLogger("kd_plugin").handlers  # the handlers are taken off after each run
