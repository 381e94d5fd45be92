"""Consistent augmented views (`config.kd.views`): the student and the teacher see exactly the same augmented image of
each sample — a horizontal flip, a mild random-resized crop and, for a share of the samples, mixup with another
training image — with the teacher run on that very view (Beyer et al., CVPR 2022, "function matching": a teacher
that sees what the student sees, on ever-new views, does not overfit as a pre-computed teacher does).

A view is a pure function of (views seed, epoch, sample index): every draw comes from a generator seeded with those
three, never from the batch the sample landed in. That is what lets the teacher's embedding of a view be cached under
(sample, epoch) (kd_plugin.teachers.view_cache) and shared by every run that repeats the views — other methods, other
training seeds (the views have their own seed), another number of ranks. The mixup partner is therefore drawn from
the whole training set (labelled and unlabelled images alike) by the same generator, rather than from the sample's
batch; with random batches both are a uniform draw of another training image. A sample presented twice in one epoch
(its random-part and balanced-part draws) gets the same view both times.

A mixed image has no single identity. With `kd.views.mixed_labels = "drop"` it is served with label -1 (as the
unlabelled images are), so the head and the terms that need labels skip it and only the label-free terms see it. With
"mix" (the default) it keeps its own label and the head takes it as standard mixup does: lam x the loss at its own identity plus
(1 - lam) x the loss at its partner's (`mix_partners` gives the partner's label and lam, from the same pure function);
the pair terms (EKD) still skip it, as a pair of a mixed image has no known identity. Flip, crop and the small
translation of `kd.views.shift` keep the identity."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kd_plugin.data.datasets import UNLABELED, FaceDataset

ASPECT = (3 / 4, 4 / 3)  # the crop's aspect ratio is log-uniform in this range, as torchvision's RandomResizedCrop


@dataclass(frozen=True)
class Box:
    """A crop (top, left, height, width) in pixels, whether to flip afterwards, then a translation by (down, right)
    pixels (the uncovered border black)."""
    top: int
    left: int
    height: int
    width: int
    flip: bool
    down: int = 0
    right: int = 0


@dataclass(frozen=True)
class View:
    """One sample's view: its crop, and the partner it is mixed with (`partner` -1: not mixed) at weight `lam`."""
    box: Box
    partner: int = -1
    partner_box: Box | None = None
    lam: float = 1.0


@dataclass(frozen=True)
class ViewSettings:
    crop: float
    mixup: float
    seed: int
    shift: int = 0  # the largest translation in pixels, each axis uniform in [-shift, shift] (0: none)

    @classmethod
    def from_config(cls, block) -> ViewSettings:
        return cls(crop=float(block["crop"]), mixup=float(block["mixup"]), seed=int(block["seed"]),
                   shift=int(block.get("shift", 0)))

    def as_dict(self) -> dict:
        """What makes the views (a view cache's settings); `shift` only when set, so caches made before it stay valid."""
        out = {"crop": self.crop, "mixup": self.mixup, "seed": self.seed}
        return out | ({"shift": self.shift} if self.shift else {})


def _box(rng: np.random.Generator, crop: float, size: tuple[int, int], shift: int = 0) -> Box:
    height, width = size
    area = rng.uniform(crop, 1.0) * height * width
    ratio = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
    h = min(height, max(1, round(math.sqrt(area / ratio))))
    w = min(width, max(1, round(math.sqrt(area * ratio))))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    flip = bool(rng.random() < 0.5)
    down, right = (int(v) for v in rng.integers(-shift, shift + 1, size=2)) if shift else (0, 0)
    return Box(top, left, h, w, flip, down, right) if crop < 1 else Box(0, 0, height, width, flip, down, right)


def draw_view(settings: ViewSettings, epoch: int, index: int, num_images: int,
              size: tuple[int, int] = (112, 112)) -> View:
    """The view of sample `index` at `epoch`: the same arguments always give the same view."""
    rng = np.random.default_rng([settings.seed, int(epoch), int(index)])
    box = _box(rng, settings.crop, size, settings.shift)
    if rng.random() >= settings.mixup or num_images < 2:
        return View(box)
    partner = int(rng.integers(0, num_images - 1))
    partner += partner >= index  # another image than the sample itself
    return View(box, partner, _box(rng, settings.crop, size, settings.shift), float(rng.uniform(0.0, 1.0)))


def _render(image: torch.Tensor, box: Box) -> torch.Tensor:
    """uint8 CHW -> float CHW: the crop resized back to the image size (bilinear), then the flip."""
    size = image.shape[1:]
    part = image[:, box.top:box.top + box.height, box.left:box.left + box.width].float()
    if part.shape[1:] != size:
        part = F.interpolate(part[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    part = part.flip(2) if box.flip else part
    if not (box.down or box.right):
        return part
    (to_rows, from_rows), (to_cols, from_cols) = _overlap(box.down, size[0]), _overlap(box.right, size[1])
    moved = torch.zeros_like(part)
    moved[:, to_rows, to_cols] = part[:, from_rows, from_cols]
    return moved


def _overlap(offset: int, length: int) -> tuple[slice, slice]:
    """Along one axis of `length` pixels moved by `offset`: where the kept pixels land, and where they come from."""
    return slice(max(offset, 0), length + min(offset, 0)), slice(max(-offset, 0), length - max(offset, 0))


def render_view(image: torch.Tensor, view: View, partner: torch.Tensor | None = None) -> torch.Tensor:
    """The view as the uint8 image both networks are given (`partner`: the partner's stored image when mixed)."""
    out = _render(image, view.box)
    if view.partner >= 0:
        out = view.lam * out + (1.0 - view.lam) * _render(partner, view.partner_box)
    return out.round().clamp_(0, 255).to(torch.uint8)


class ViewDataset(torch.utils.data.Dataset):
    """`dataset` seen through the views: item `(index, epoch)` -> (the view's uint8 image, the label — or -1 when
    mixed, unless `keep_labels` (kd.views.mixed_labels = "mix") —, index)."""

    def __init__(self, dataset: FaceDataset, settings: ViewSettings, keep_labels: bool = False) -> None:
        self.dataset, self.settings, self.keep_labels = dataset, settings, bool(keep_labels)

    def __len__(self) -> int:
        return len(self.dataset)

    def view(self, index: int, epoch: int) -> View:
        return draw_view(self.settings, epoch, index, len(self.dataset), self.dataset.image_size)

    def __getitem__(self, item: tuple[int, int]):
        index, epoch = int(item[0]), int(item[1])
        image, label, _ = self.dataset[(index, False)]
        view = self.view(index, epoch)
        partner = self.dataset[(view.partner, False)][0] if view.partner >= 0 else None
        if view.partner >= 0 and not self.keep_labels:
            label = torch.tensor(UNLABELED, dtype=torch.int64)
        return render_view(image, view, partner), label, torch.tensor(index, dtype=torch.int64)


def mix_partners(settings: ViewSettings, dataset: FaceDataset, indices: torch.Tensor,
                 epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample of a batch at `epoch`: its mixup partner's label (-1: not mixed, or the partner has no identity)
    and lam, its own image's share (1.0: not mixed). Host tensors, computed from the views' pure function on the host
    (no device work: about 20 microseconds a sample), which is what the data workers drew."""
    partners, lams = [], []
    for index in indices.tolist():
        view = draw_view(settings, epoch, index, len(dataset), dataset.image_size)
        partners.append(int(dataset.labels[view.partner]) if view.partner >= 0 else UNLABELED)
        lams.append(view.lam)
    return torch.tensor(partners, dtype=torch.int64), torch.tensor(lams, dtype=torch.float32)


class EpochItems:
    """A batch sampler that hands the dataset `(index, epoch)` items: the batches of `sampler` (its flips unused: the
    view decides), with the epoch the sampler is on."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            yield [(index, self.sampler.epoch) for index, _ in batch]
