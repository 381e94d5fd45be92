"""The one-line hook: `from kd_plugin import distill; distill(config, teacher="r100:...", method="proxyless+ekd")` at
the end of an arcface_torch job config makes the UNCHANGED `train_v2.py` distil.

train_v2.py imports its job config inside `main()`, after its own imports, and looks up `get_dataloader`, `get_model`
and `PartialFC_V2` in its module globals at call time. When the config is imported under train_v2.py, `distill`
replaces those three names there:
- `get_dataloader`: kd_plugin's dataset and identity-balanced sampler (when EKD is on), same batch size per rank,
  images normalised as arcface_torch's loader does; it remembers each batch's sample indices and flips;
- `get_model`: upstream's network with a forward pre-hook that keeps the batch it was given, so the teacher embeds
  the very same images (the teacher stays outside the backbone: not in model.pt, not in the optimizer);
- `PartialFC_V2`: a module holding kd_plugin's KD objective (the inherited head and the configured terms); its
  state_dict (the head's centres and the EKD thresholds) lands in `checkpoint_gpu_{rank}.pt` and is restored on resume.
Under any other program (e.g. `kd-plugin train`) `distill` only fills in `config.kd`.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from kd_plugin.errors import KDPluginError

PATCHED_NAMES = ("get_dataloader", "get_model", "PartialFC_V2")
SUPPORTED = ("insightface's recognition/arcface_torch train_v2.py with PartialFC_V2 (checked against insightface "
             "commit 7fadd42, 2026-07)")


class _Shared:
    """What the patched functions pass to each other within one training process."""

    def __init__(self) -> None:
        self.images: torch.Tensor | None = None  # the backbone's last input (arcface_torch-normalised)
        self.indices: torch.Tensor | None = None
        self.flips: list[bool] | None = None
        self.epoch = 0  # the loader's epoch (multi-step KD switches teachers on it)


class HookLoader:
    """An iterable like arcface_torch's loader: `(images normalised to [-1, 1], labels)`; `.sampler.set_epoch`."""

    def __init__(self, dataset, sampler, num_workers: int, shared: _Shared) -> None:
        self.sampler, self.shared = sampler, shared
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        position = self.sampler._start() if hasattr(self.sampler, "_start") else 0
        self.shared.epoch = self.sampler.epoch
        for images, labels, indices in self.loader:
            self.shared.indices = indices
            self.shared.flips = [f for _, f in self.sampler.batch(self.sampler.epoch, position)]
            position += 1
            yield (images.float() - 127.5) / 127.5, labels


class HookHead(nn.Module):
    """Stands where PartialFC_V2 stood: `forward(local_embeddings, local_labels) -> loss`."""

    def __init__(self, cfg, shared: _Shared) -> None:
        super().__init__()
        from kd_plugin.data.datasets import open_dataset
        from kd_plugin.distributed import get_rank
        from kd_plugin.objective import KDObjective
        from kd_plugin.train import build_head, build_teacher, build_terms

        self.shared = shared
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        dataset = open_dataset(cfg.rec)
        self._teacher, self._cache = build_teacher(cfg, dataset, device)  # plain attributes: not in the state_dict
        head = build_head(cfg, dataset, self._teacher, self._cache, get_rank())
        self.objective = KDObjective(head, build_terms(cfg), cfg.kd.reference_gradient_scaling)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        from kd_plugin.distributed import get_world_size, scale_grad

        teacher = None
        if self.objective.needs_teacher:
            if self._cache is not None:
                teacher = self._cache.get(self.shared.indices, self.shared.flips).to(local_embeddings.device)
            else:
                if hasattr(self._teacher, "set_epoch"):  # multi-step KD: the teacher of this epoch
                    self._teacher.set_epoch(self.shared.epoch)
                images = (self.shared.images.detach().float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
                teacher = torch.as_tensor(self._teacher.embed(images)).float().to(local_embeddings.device)
        # train_v2 wraps the backbone in DDP, which averages: the exact per-rank gradient times W, once
        loss, stats = self.objective(scale_grad(local_embeddings.float(), get_world_size()), local_labels.view(-1),
                                     teacher)
        self.last_stats = {k: float(v) for k, v in stats.items()}
        return loss


def _align_epoch_length(config) -> None:
    """train_v2 derives its LR schedule from num_image // (batch_size * W) steps per epoch; with the balanced
    sampler an epoch has ceil(N / (W * R)) steps (R = the random part), so num_image is set to match."""
    import math

    from kd_plugin.config import resolve
    from kd_plugin.data.datasets import open_dataset

    cfg = resolve(config)
    if not cfg.kd.sampler.balanced:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    random_part = cfg.batch_size - cfg.kd.sampler.identities_per_batch * cfg.kd.sampler.images_per_identity
    steps = math.ceil(len(open_dataset(cfg.rec)) / (world * random_part))
    config.num_image = steps * cfg.batch_size * world


def distill(config, teacher: str | None = None, method: str = "proxyless", **kd) -> None:
    """Make the unchanged arcface_torch `train_v2.py` distil with `method` from `teacher` (see the module docstring)."""
    block = dict(config.get("kd") or {})
    block.update(kd, method=method)
    if teacher is not None:
        block["teacher"] = teacher
    config.kd = block
    main = sys.modules.get("__main__")
    if main is None or os.path.basename(getattr(main, "__file__", "") or "") != "train_v2.py":
        return  # kd-plugin train (or any other reader) uses config.kd directly
    names = vars(main)
    missing = [n for n in PATCHED_NAMES if n not in names]
    if missing:
        raise KDPluginError(f"kd_plugin.distill: {main.__file__} has no {missing[0]!r} to replace; the hook supports "
                            f"{SUPPORTED}. Update kd_plugin, or train with `kd-plugin train CONFIG` instead")
    _align_epoch_length(config)
    shared = _Shared()
    original_get_model = names["get_model"]

    def _resolved():
        from kd_plugin.config import resolve
        return resolve(config)  # the job config over arcface_torch's base defaults

    def get_model(*args, **kwargs):
        model = original_get_model(*args, **kwargs)

        def tap(module, inputs):
            shared.images = inputs[0]
        model.register_forward_pre_hook(tap)
        return model

    def get_dataloader(root_dir, local_rank, batch_size, dali=False, dali_aug=False, seed=2048, num_workers=2):
        from kd_plugin.data.datasets import open_dataset
        from kd_plugin.data.sampler import IdentityBalancedBatchSampler

        cfg = _resolved()
        dataset = open_dataset(root_dir)
        per_rank = cfg.kd.sampler.identities_per_batch if cfg.kd.sampler.balanced else 0
        sampler = IdentityBalancedBatchSampler(dataset.labels, batch_size, per_rank,
                                               cfg.kd.sampler.images_per_identity, seed=seed)
        return HookLoader(dataset, sampler, num_workers, shared)

    def partial_fc(margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False):
        cfg = _resolved()
        if (embedding_size, num_classes) != (cfg.embedding_size, cfg.num_classes):
            raise KDPluginError(f"kd_plugin.distill: train_v2 asks for a classifier of {num_classes} classes x "
                                f"{embedding_size}, the config says {cfg.num_classes} x {cfg.embedding_size}")
        return HookHead(cfg, shared)

    names.update(get_model=get_model, get_dataloader=get_dataloader, PartialFC_V2=partial_fc)
