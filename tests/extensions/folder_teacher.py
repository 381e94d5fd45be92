"""A teacher format added by one module: `folder:<dir>` names a folder holding `weights.pt` (a state_dict of the
tests' tiny network) and `normalization.json` (its input mean and std), declared with register_teacher_format."""

from __future__ import annotations

import json
import os

import torch

from kd_plugin.normalization import InputNormalization
from kd_plugin.teachers.formats import Embedder, register_teacher_format


class FolderEmbedder(Embedder):
    def __init__(self, folder: str, normalization: InputNormalization, device, batch_size: int) -> None:
        from test_train import TinyStudent

        state = torch.load(os.path.join(folder, "weights.pt"), map_location="cpu", weights_only=True)
        self.module = TinyStudent(state["fc.weight"].shape[0]).eval().requires_grad_(False).to(device)
        self.module.load_state_dict(state)
        self.spec, self.normalization = f"folder:{folder}", normalization
        self.device, self.batch_size = device, batch_size
        self.checked = 0

    def check(self, images) -> None:
        self.checked += len(images() if callable(images) else images)

    @torch.inference_mode()
    def embed(self, images):
        return self.module(self.normalization.torch(torch.as_tensor(images).to(self.device))).float()


def _normalization(spec) -> InputNormalization:
    with open(os.path.join(spec.name, "normalization.json")) as f:
        given = json.load(f)
    return InputNormalization(given["mean"], given["std"])


def _load(spec, normalization, *, device, amp_dtype, batch_size, embedding_size, onnx_on_cpu):
    if amp_dtype is not None:
        raise ValueError(f"{spec}: the folder format runs in float32 only (kd.teacher_amp = {amp_dtype})")
    return FolderEmbedder(spec.name, normalization, device, batch_size)


register_teacher_format("folder", claims=lambda spec: spec.startswith("folder:"), load=_load,
                        normalization=_normalization, describe="'folder:<dir>'")
