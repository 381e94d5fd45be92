"""Verification under train_v2: upstream's `CallBackVerification` and the one kd_plugin puts in its place.

Upstream's verification (`eval/verification.py`) finds the threshold of FAR 1e-3 with scipy's `interp1d` over FARs
that repeat, which current scipy refuses ("Expect x to not have duplicates"): with `val_targets` set, train_v2 then
stops at its first verification step (`verbose`). With `kd.verifier = "kd_plugin"` the hook replaces train_v2's
`CallBackVerification` with `KDPluginVerification`: the same constructor and call, the same log lines
(`[name][step]Accuracy-Flip: a+-s`, `Accuracy-Highest`) and tensorboard scalar, from kd_plugin's 10-fold .bin
accuracy (kd_plugin.evaluation.evaluate_bin, image and flip)."""

from __future__ import annotations

import os

from kd_plugin.normalization import InputNormalization
from kd_plugin.training_log import LOG


def upstream_verification_fails() -> bool:
    """Whether this scipy refuses what upstream's verification asks of it (interp1d over repeated FARs)."""
    try:
        import numpy as np
        from scipy import interpolate
    except ImportError:
        return False
    try:
        interpolate.interp1d(np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 2.0]), kind="slinear")
    except ValueError:
        return True
    return False


VERIFICATION_WILL_FAIL = (
    "kd_plugin: config.val_targets is set, and upstream's verification will fail with this scipy (its "
    "eval/verification.py calls interpolate.interp1d on FARs that repeat: 'Expect x to not have duplicates'), "
    "stopping train_v2 at its first verification step. Set kd.verifier = 'kd_plugin' (distill(..., "
    "verifier='kd_plugin')) to verify with kd_plugin's .bin accuracy in its place, or val_targets = []")


class KDPluginVerification:
    """train_v2's `CallBackVerification(val_targets, rec_prefix, summary_writer, image_size, wandb_logger)` with
    kd_plugin's evaluation; rank 0 verifies, as upstream's does. `<rec_prefix>/<name>.bin` targets that do not exist
    are skipped, as upstream skips them."""

    def __init__(self, val_targets, rec_prefix, summary_writer=None, image_size=(112, 112), wandb_logger=None) -> None:
        from kd_plugin.distributed import get_rank

        self.rank = get_rank()
        found = [(name, os.path.join(rec_prefix, f"{name}.bin")) for name in val_targets]
        self.targets = [(name, path) for name, path in found if os.path.isfile(path)]
        self.highest = {name: 0.0 for name, _ in self.targets}
        self.summary_writer = summary_writer

    def __call__(self, num_update: int, backbone) -> None:
        if self.rank != 0 or num_update <= 0:
            return
        from kd_plugin.evaluation import evaluate_bin
        from kd_plugin.teachers.torch_embedder import TorchEmbedder

        module = getattr(backbone, "module", backbone)  # DDP's inner module
        device = next(module.parameters()).device
        embedder = TorchEmbedder(module, InputNormalization(127.5, 127.5), device, spec="student", freeze=False)
        for name, path in self.targets:
            result = evaluate_bin(path, embedder)
            accuracy, std = result["accuracy"], result["accuracy_std"]
            self.highest[name] = max(self.highest[name], accuracy)
            LOG.info(f"[{name}][{num_update}]Accuracy-Flip: {accuracy:1.5f}+-{std:1.5f}")
            LOG.info(f"[{name}][{num_update}]Accuracy-Highest: {self.highest[name]:1.5f}")
            if self.summary_writer is not None:
                self.summary_writer.add_scalar(tag=name, scalar_value=accuracy, global_step=num_update)
