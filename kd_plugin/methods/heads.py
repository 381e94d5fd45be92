"""The margin-softmax classifier: arcface_torch's combined margin, a class-sharded distributed cross-entropy and the
partial-FC head in two modes — *inherited* (ProxylessKD: the teacher's class centres, frozen buffers) and *trainable*
(the no-distillation baseline, PartialFC_V2's behaviour).

Differences from arcface_torch, on purpose:
- the margin's gradient is the true derivative of cos(m1*theta + m2) - m3 (upstream modifies the logits in place under
  no_grad, so its gradient passes the margin as if it were the identity), and past theta = (pi - m2) / m1, where that
  curve turns back up, a continuous line of slope 1 takes over (upstream: a shifted line with a jump), so every
  sample is pulled towards its own centre for every cosine; a combined margin with m3 > 0 keeps m1 and m2 (upstream
  applies only m3 then);
- with sample_rate < 1 each negative centre is kept with probability sample_rate, decided by one random number per
  class drawn from (seed, step), so the same classes are sampled whatever the number of GPUs (PartialFC_V2 keeps a
  fixed int(sample_rate * num_local) centres per rank, which depends on the sharding);
- the per-rank batch may change from step to step and differ between ranks;
- gradients are exact (see kd_plugin.distributed): under DDP, scale by the world size once.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from kd_plugin.distributed import (all_reduce_, class_range, gather_no_grad, gather_sizes, gather_with_grad, get_rank,
                                   get_world_size, sharded_exp_sum)
from kd_plugin.errors import KDPluginError
from kd_plugin.embeddings import check_same_dims
from kd_plugin.methods.registry import register_head
from kd_plugin.teachers.classifier import ClassSlice, copy_rows, read_classifier_rows

_SIN_FLOOR = 1e-6  # below this sin(theta) the margin's derivative is capped; only cos = +-1 exactly reaches it


class _AngularMargin(torch.autograd.Function):
    """cos(m1 * acos(c) + m2) while m1 * theta + m2 <= pi, continued past it by the line -1 + (c - c_turn) (slope 1,
    continuous at c_turn = cos((pi - m2) / m1)); backward is the exact derivative of that function.

    Why the continuation: past theta_turn = (pi - m2) / m1 the cosine of the margined angle rises again, so its true
    derivative in c turns negative and the loss would push a sample that is far from its own centre further away
    (with frozen inherited centres it would never come back). arcface_torch switches to c - m2 sin(m2) there (slope 1,
    but a jump in the loss); the line here has the same slope and no jump. Where the curve is monotone the derivative
    is the exact one, which vanishes only at theta_turn itself."""

    @staticmethod
    def forward(ctx, cos: torch.Tensor, m1: float, m2: float) -> torch.Tensor:
        cos = cos.clamp(-1.0, 1.0)
        theta = torch.acos(cos)
        theta_turn = (math.pi - m2) / m1
        past = theta > theta_turn
        ctx.save_for_backward(cos, theta, past)
        ctx.m1, ctx.m2 = m1, m2
        return torch.where(past, cos - math.cos(theta_turn) - 1.0, torch.cos(m1 * theta + m2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, theta, past = ctx.saved_tensors
        sin_theta = torch.sqrt((1.0 - cos * cos).clamp_min(0.0)).clamp_min(_SIN_FLOOR)
        # sin(m1 theta + m2) >= 0 before the turn; the clamp removes rounding just below it
        exact = grad * ctx.m1 * torch.sin(ctx.m1 * theta + ctx.m2).clamp_min(0.0) / sin_theta
        return torch.where(past, grad, exact), None, None


class CombinedMarginLoss(nn.Module):
    """arcface_torch's margin: target logit cos(m1*theta + m2) - m3, every logit times s.

    `margin_list=(1.0, 0.5, 0.0)` is ArcFace m=0.5, `(1.0, 0.0, 0.4)` CosFace m=0.4. With
    `interclass_filtering_threshold > 0`, non-target cosines above it are set to 0 (noisy-label filtering)."""

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 interclass_filtering_threshold: float = 0.0) -> None:
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        if self.m1 <= 0 or self.m2 < 0:
            raise ValueError(f"margin_list = ({m1}, {m2}, {m3}): m1 must be positive and m2 >= 0 (with m2 < 0 the "
                             f"target logit falls as a sample nears its centre); use e.g. (1.0, 0.5, 0.0) for ArcFace")

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        """The margin applied to target cosines (before scaling)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos - self.m3
        return _AngularMargin.apply(cos, self.m1, self.m2) - self.m3

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`logits`: cosines (N, K); `labels`: (N,) column of each row's class, -1 where its class is not in K."""
        labels = labels.view(-1)
        if logits.shape[1] == 0:  # this rank holds none of the (sampled) classes
            return logits * self.s
        # rows whose class is elsewhere (-1) read and write their column 0 unchanged: no row selection on the host
        valid, cols = (labels >= 0)[:, None], labels.clamp_min(0)[:, None]
        if self.interclass_filtering_threshold > 0:
            dirty = logits > self.interclass_filtering_threshold
            dirty = dirty.scatter(1, cols, dirty.gather(1, cols) & ~valid)  # a row's own class is never filtered
            logits = logits.masked_fill(dirty, 0.0)
        cos = logits.gather(1, cols)
        return logits.scatter(1, cols, torch.where(valid, self.target_logit(cos), cos)) * self.s


class _DistributedCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over classes sharded across ranks; mean over the (global) rows, or with `weights` (one per
    row, the same on every rank) the weighted mean sum(w * loss) / sum(w)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        top, prob, total = sharded_exp_sum(logits)
        prob /= total
        # each row's target logit from the rank that holds its class (label -1 elsewhere): a masked gather, so no
        # row selection is read on the host
        valid, cols = labels >= 0, labels.clamp_min(0)[:, None]
        target = (torch.where(valid, logits.gather(1, cols).squeeze(1), 0.0) if logits.shape[1]
                  else logits.new_zeros(len(logits)))
        all_reduce_(target, "sum")
        # log-sum-exp form: exact even where the target probability underflows (upstream clamps it at 1e-30)
        losses = torch.log(total.squeeze(1)) + top.squeeze(1) - target
        if weights is None:
            ctx.save_for_backward(prob, labels)
            return losses.mean()
        share = weights.float() / weights.float().sum()  # each row's share of the mean
        ctx.save_for_backward(prob, labels, share)
        return (losses * share).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        prob, labels, *share = ctx.saved_tensors
        if prob.shape[1]:  # the saved buffer is ours alone: reuse it as the gradient
            prob.scatter_add_(1, labels.clamp_min(0)[:, None], -(labels >= 0).to(prob.dtype)[:, None])
        scale = grad / len(prob) if not share else grad * share[0][:, None]
        return prob * scale, None, None


CENTRE_CHUNK = 1 << 16  # classes upcast at a time from fp16/bf16 centres
LOW_PRECISION = (torch.float16, torch.bfloat16)


def centre_products(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """x @ centres^T in fp32 for centres of any dtype: low-precision centres are upcast CENTRE_CHUNK classes at a time
    (no full fp32 copy, and no fp16 product), the same path on every device."""
    if centres.dtype not in LOW_PRECISION:
        return x @ centres.T
    return torch.cat([x @ centres[a:a + CENTRE_CHUNK].to(x.dtype).T for a in range(0, len(centres), CENTRE_CHUNK)],
                     dim=1)


def centre_products_grad(grad: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """grad @ centres in fp32 (the embedding gradient of `centre_products`), upcasting chunk by chunk as it does: a
    gradient cast down to fp16 would lose its small entries (the negative classes' are 1e-8 and below)."""
    if centres.dtype not in LOW_PRECISION:
        return grad @ centres
    out = grad.new_zeros((grad.shape[0], centres.shape[1]))
    for a in range(0, len(centres), CENTRE_CHUNK):
        out += grad[:, a:a + CENTRE_CHUNK] @ centres[a:a + CENTRE_CHUNK].to(grad.dtype)
    return out


class _FrozenCosine(torch.autograd.Function):
    """normalized embeddings @ frozen centres^T: backward gives the embedding gradient only (no weight-gradient
    product); low-precision centres through `centre_products`."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(centres)
        return centre_products(emb if emb.dtype == torch.float64 else emb.float(), centres)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (centres,) = ctx.saved_tensors
        return centre_products_grad(grad if grad.dtype == torch.float64 else grad.float(), centres), None


def _normal_rows(generator: torch.Generator, total: int, dim: int, lo: int, hi: int, out: torch.Tensor,
                 piece: int = 4096) -> None:
    """out[:] = rows lo..hi of `torch.normal(0, 0.01, (total, dim), generator=generator)`, drawn in pieces of rows
    (the same sequence: torch fills normals 16 at a time, so every piece but the last holds a multiple of 16 numbers
    and the last ends where the whole draw ends), keeping only the wanted rows: memory beside `out` is one piece."""
    bounds = list(range(0, total, piece)) + [total]
    if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * dim < 16:  # torch draws fewer than 16 numbers another way
        del bounds[-2]
    scratch = torch.empty(0, dim)
    for p, q in zip(bounds[:-1], bounds[1:]):
        if p >= hi:
            break
        if lo <= p and q <= hi:
            out[p - lo:q - lo].normal_(0.0, 0.01, generator=generator)
            continue
        if len(scratch) < q - p:
            scratch = torch.empty(q - p, dim)
        drawn = scratch[:q - p].normal_(0.0, 0.01, generator=generator)
        a, z = max(p, lo), min(q, hi)
        if a < z:
            out[a - lo:z - lo] = drawn[a - p:z - p]


def _sharding_free_normal(rows: int, dim: int, start: int, count: int, seed: int, block: int = 1 << 16) -> torch.Tensor:
    """Rows start..start+count of an N(0, 0.01) (rows, dim) matrix drawn block by block from `seed`: the same values
    whatever the sharding, without ever drawing the full matrix (or a whole block beside the output) on one rank."""
    out = torch.empty(count, dim)
    for b in range(start // block, (start + count + block - 1) // block):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + b)
        size = min(block, rows - b * block)
        lo, hi = max(start, b * block) - b * block, min(start + count, b * block + size) - b * block
        _normal_rows(generator, size, dim, lo, hi, out[lo + b * block - start:hi + b * block - start])
    return out


def class_draw(seed: int, step: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One uniform number per class for negative sampling at `step`: the same on every rank, whatever the sharding."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 0x9E3779B1 + step) % (1 << 63))
    return torch.rand(num_classes, generator=generator, device=device)


class PartialFCHead(nn.Module):
    """Class-sharded margin-softmax classifier, a drop-in for arcface_torch's `PartialFC_V2`.

    `centres` (a (C, d) tensor, this rank's `ClassSlice` — whose rows the head then owns —, or any classifier layout
    `read_classifier` reads) makes it *inherited*: each rank keeps its class slice, L2-normalised once, as a buffer
    (never a Parameter, no gradient, nothing for the optimizer, optionally fp16/bf16 via `centre_dtype`). A classifier
    file is read for this rank's class range only (memory-mapped) and converted chunk by chunk, so a rank holds C/W
    rows, never C.
    Without centres it is *trainable* like PartialFC_V2 (weights drawn from N(0, 0.01), from `seed`, the same values
    whatever the number of ranks). `forward(local_embeddings,
    local_labels)` gathers the global batch across ranks and returns the mean loss over it (the same on every rank)."""

    def __init__(self, margin_loss: nn.Module, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 fp16: bool = False, centres: torch.Tensor | str | None = None, *,
                 centre_dtype: torch.dtype = torch.float32, trainable: bool | None = None, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, normalize_centres: bool = True) -> None:
        super().__init__()
        self.margin_softmax = margin_loss
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.sample_rate, self.fp16, self.seed = float(sample_rate), bool(fp16), int(seed)
        self.rank = get_rank() if rank is None else int(rank)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        self.class_start, self.num_local = class_range(self.num_classes, self.rank, self.world_size)
        self.trainable = centres is None if trainable is None else bool(trainable)
        if centres is None:
            if not self.trainable:
                raise ValueError("an inherited (frozen) head needs `centres`")
            local = _sharding_free_normal(self.num_classes, self.embedding_size, self.class_start, self.num_local, seed)
        else:
            dtype = torch.float32 if self.trainable else centre_dtype
            local = self._local_slice(centres, dtype, normalize=normalize_centres and not self.trainable)
        if self.trainable:
            self.weight = nn.Parameter(local)
        else:
            self.register_buffer("weight", local)
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64))

    # What the KD objective asks of a head (kd_plugin.methods.objective), so that no code outside this module asks which head
    # it holds: whether it reads the teacher's embeddings of each batch, and `observe`, called each step with the
    # global batch's labelled, unmixed rows before the loss (a head whose centres follow the teacher updates them)
    reads_teacher = False

    def observe(self, student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Nothing for a frozen or trainable head (see AdaDistillHead)."""

    def _local_slice(self, centres: torch.Tensor | ClassSlice | str, dtype: torch.dtype,
                     normalize: bool) -> torch.Tensor:
        """This rank's rows of the centres, in `dtype`, normalised or not, without a full-size temporary."""
        if isinstance(centres, (str, os.PathLike)):
            return read_classifier_rows(os.fspath(centres), self.class_start, self.num_local, dtype, normalize,
                                        self.num_classes, self.embedding_size)
        if isinstance(centres, ClassSlice):
            if (centres.start, tuple(centres.rows.shape)) != (self.class_start, (self.num_local, self.embedding_size)):
                raise KDPluginError(f"centres for classes {centres.start}..{centres.start + len(centres.rows) - 1} "
                                    f"(x {centres.rows.shape[1]}) given to rank {self.rank}, which holds classes "
                                    f"{self.class_start}..{self.class_start + self.num_local - 1} (x "
                                    f"{self.embedding_size}) of {self.num_classes}")
            if centres.rows.dtype == dtype:  # the head takes the slice over: converted in place, no second copy
                return copy_rows(centres.rows.detach(), centres.rows.detach(), normalize)
            rows = centres.rows
        else:
            if tuple(centres.shape) != (self.num_classes, self.embedding_size):
                raise KDPluginError(f"the centres tensor: class centres are {tuple(centres.shape)} (classes x dim) but "
                                    f"the head expects ({self.num_classes}, {self.embedding_size}) (num_classes, "
                                    f"embedding_size); check config.num_classes / config.embedding_size, or "
                                    f"re-estimate the centres for this dataset")
            rows = centres[self.class_start:self.class_start + self.num_local]
        return copy_rows(rows.detach(), torch.empty(self.num_local, self.embedding_size, dtype=dtype), normalize)

    def extra_repr(self) -> str:
        mode = "trainable" if self.trainable else f"inherited ({self.weight.dtype})"
        return (f"{mode}, classes {self.class_start}..{self.class_start + self.num_local - 1} of {self.num_classes}, "
                f"embedding_size={self.embedding_size}, sample_rate={self.sample_rate}")

    def _sample(self, labels: torch.Tensor, owned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep every positive centre and each negative with probability sample_rate; remap labels to the subset."""
        draw = class_draw(self.seed, int(self.sample_step), self.num_classes, self.weight.device)
        keep = draw[self.class_start:self.class_start + self.num_local] < self.sample_rate
        keep[labels[owned]] = True
        index = torch.nonzero(keep).squeeze(1)
        labels = labels.clone()
        labels[owned] = torch.searchsorted(index, labels[owned])
        self.sample_step += 1
        return index, labels

    def gather(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
               sizes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch: embeddings (gradient flows back to each row's owner) and labels, in rank order."""
        local_labels = local_labels.reshape(-1).long()
        if local_embeddings.shape != (len(local_labels), self.embedding_size):
            raise ValueError(f"embeddings {tuple(local_embeddings.shape)} do not match {len(local_labels)} labels x "
                             f"embedding_size {self.embedding_size}")
        sizes = sizes or gather_sizes(len(local_labels), local_embeddings.device)
        return gather_with_grad(local_embeddings, sizes), gather_no_grad(local_labels, sizes)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Mean margin-softmax loss over the global batch; gradients reach only the embeddings in inherited mode."""
        return self.global_loss(*self.gather(local_embeddings, local_labels))

    def centres_for_logits(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's centres as the logits use them, and the factor per class that makes their products cosines
        (None: inherited centres are stored normalised already)."""
        return self.weight, None

    def _frozen_cosines(self, norm_emb: torch.Tensor, weight: torch.Tensor,
                        inverse_norms: torch.Tensor | None) -> torch.Tensor:
        logits = _FrozenCosine.apply(norm_emb, weight)
        return logits if inverse_norms is None else logits * inverse_norms

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosines of the global batch against this rank's class slice (no margin, no sampling): (N, num_local)."""
        norm_emb = F.normalize(embeddings.float(), dim=1)
        if self.trainable:
            return F.linear(norm_emb, F.normalize(self.weight, dim=1))
        return self._frozen_cosines(norm_emb, *self.centres_for_logits())

    def global_loss(self, embeddings: torch.Tensor, global_labels: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of an already gathered global batch (global class ids); the same value on every rank. `weights`:
        one per row, for the weighted mean (mixup's lam and 1 - lam, kd_plugin.methods.objective)."""
        labels = global_labels - self.class_start
        owned = (labels >= 0) & (labels < self.num_local)
        labels[~owned] = -1
        weight, inverse_norms = self.centres_for_logits()
        if self.sample_rate < 1.0:
            index, labels = self._sample(labels, owned)
            weight = weight[index]
            inverse_norms = None if inverse_norms is None else inverse_norms[index]
        norm_emb = F.normalize(embeddings.float(), dim=1)
        if self.trainable:
            with torch.autocast("cuda", enabled=self.fp16 and norm_emb.is_cuda):
                logits = F.linear(norm_emb, F.normalize(weight, dim=1)).float()
        else:
            logits = self._frozen_cosines(norm_emb.half() if self.fp16 and norm_emb.is_cuda else norm_emb, weight,
                                          inverse_norms)
        logits = self.margin_softmax(logits.clamp(-1.0, 1.0), labels)
        return _DistributedCrossEntropy.apply(logits, labels, weights)


class AdaDistillHead(PartialFCHead):
    """AdaDistill (Boutros et al., ECCV 2024): class centres distilled from teacher embeddings, updated every step
    before the logits, never by the optimizer.

    For each sample i of class y (global batch, batch order): c = cos(f_s, f_t), lambda = clip(cos(W_y, f_t), 1e-6, 1),
    alpha = clip(c * lambda, 1e-6, 1) (the weighted alpha', the default) or clip(c, 0, 1); then
    W_y <- alpha W_y + (1 - alpha) f̂_t. The rank that owns class y updates it, from the gathered batch, so the
    sharded centres stay exactly those of one process. A class seen several times in a batch is updated once per
    occurrence, in batch order. Centres start as the trainable head's N(0, 0.01) weights from `seed` (each rank draws
    only its class range: the same values whatever the number of ranks, memory C/W)."""

    def __init__(self, margin_loss: nn.Module, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 fp16: bool = False, *, weighted_alpha: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, centres: torch.Tensor | ClassSlice | str | None = None) -> None:
        rank = get_rank() if rank is None else int(rank)
        world_size = get_world_size() if world_size is None else int(world_size)
        if centres is None:  # the trainable head's starting centres: the same values whatever the number of ranks
            first, count = class_range(int(num_classes), rank, world_size)
            centres = ClassSlice(first, _sharding_free_normal(int(num_classes), embedding_size, first, count, seed))
            normalize = False  # raw, as AdaDistill starts
        else:  # the teacher's centres (ProxylessKD's, then adapted): unit rows, on the scale of the teacher's f̂_t
            normalize = True
        super().__init__(margin_loss, embedding_size, num_classes, sample_rate, fp16, centres, trainable=False,
                         seed=seed, rank=rank, world_size=world_size, normalize_centres=normalize)
        self.weighted_alpha = bool(weighted_alpha)

    reads_teacher = True

    def observe(self, student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor) -> None:
        """The adaptive update from the step's labelled rows (a class's own images: no mixed views)."""
        self.update_centres(student.detach(), teacher, labels)

    def centres_for_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw adaptive centres and the inverse of their norms: cosines without a normalised copy of C/W rows."""
        return self.weight, torch.linalg.vector_norm(self.weight.float(), dim=1).clamp_min(1e-12).reciprocal()

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                local_teacher: torch.Tensor | None = None) -> torch.Tensor:
        """Update the owned centres from the global batch's teacher embeddings, then the margin-softmax loss."""
        if local_teacher is None:
            raise ValueError("AdaDistillHead needs the teacher embeddings: head(student, labels, teacher)")
        sizes = gather_sizes(len(local_labels), local_embeddings.device)
        embeddings, labels = self.gather(local_embeddings, local_labels, sizes)
        self.update_centres(embeddings.detach(), gather_no_grad(local_teacher.float(), sizes), labels)
        return self.global_loss(embeddings, labels)

    @torch.no_grad()
    def update_centres(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> None:
        """The adaptive update of this rank's centres, one wave per repeated occurrence of a class."""
        check_same_dims(student, teacher, "adadistill")
        t_unit = F.normalize(teacher.float(), dim=1)
        agreement = (F.normalize(student.float(), dim=1) * t_unit).sum(1)
        local = labels - self.class_start
        n = len(labels)
        owned = (local >= 0) & (local < self.num_local)
        # rows grouped by class (batch order inside a class), the other ranks' rows last; a row's occurrence is its
        # place among its class's rows: wave w updates each class with its w-th row, so waves run one after another
        order = torch.argsort(torch.where(owned, local, self.num_local), stable=True)
        grouped = local[order]
        group_start = torch.ones_like(order, dtype=torch.bool)
        group_start[1:] = grouped[1:] != grouped[:-1]
        positions = torch.arange(n, device=order.device)
        first = torch.cummax(torch.where(group_start, positions, torch.zeros_like(order)), 0).values
        occurrence = torch.where(owned[order], positions - first, n)  # the other ranks' rows: wave n, never run
        by_wave = order[torch.argsort(occurrence, stable=True)]  # each wave one contiguous block
        wave_sizes = torch.zeros(n + 1, dtype=torch.int64, device=order.device).scatter_add_(
            0, occurrence, torch.ones_like(occurrence))
        start = 0
        for size in wave_sizes[:n].tolist():  # the one host read of the update (the waves' sizes)
            if size == 0:  # waves are consecutive: after an empty one there is none
                break
            r = by_wave[start:start + size]
            start += size
            cls = local[r]
            centre = self.weight[cls].float()
            lam = F.cosine_similarity(centre, t_unit[r], dim=1).clamp(1e-6, 1.0)
            alpha = (agreement[r] * lam).clamp(1e-6, 1.0) if self.weighted_alpha else agreement[r].clamp(0.0, 1.0)
            self.weight[cls] = (alpha[:, None] * centre + (1 - alpha[:, None]) * t_unit[r]).to(self.weight.dtype)


DERIVED_CENTRES = ("estimate", "fit")  # centres values that derive the inherited centres from the teacher's embeddings
CENTRE_DTYPES = ("float32", "float16", "bfloat16")
# centres = "fit": the fit's passes over the cached embeddings, global batch and learning rate (kd_plugin.centres.fit)
CENTRE_FIT = {"epochs": 20, "batch_size": 256, "lr": 0.1}
# The block of each head that inherits the teacher's class centres (needs "centres"): config.kd.<head>.centres is the
# teacher's checkpoint_gpu_*.pt / rank_*_softmax_weight.pt folder, one classifier file, "estimate" or "fit", and
# config.kd.<head>.fit the fit's settings. The run's builders read them through `centre_settings`.
CENTRE_BLOCK = {"centres": None, "fit": CENTRE_FIT}


def centre_settings(kd) -> dict | None:
    """The block of the run's head when it inherits the teacher's centres (its `centres` and `fit`), else None;
    `kd`: a resolved config.kd (its plan names the head)."""
    plan = kd["plan"]
    return kd[plan.head] if plan.centres else None


def derives_centres(kd) -> bool:
    """Whether the run's inherited centres are derived from its teacher's embeddings ("estimate" or "fit")."""
    block = centre_settings(kd)
    return block is not None and block["centres"] in DERIVED_CENTRES


def head_arguments(cfg) -> tuple:
    """The positional arguments every head takes, from a resolved config: arcface_torch's margin (s = 64), the
    embedding size, the classes, the sample rate and fp16."""
    margin = CombinedMarginLoss(64, *cfg.margin_list, cfg.interclass_filtering_threshold)
    return margin, cfg.embedding_size, cfg.num_classes, cfg.sample_rate, cfg.fp16


def trainable_head(cfg) -> PartialFCHead:
    """The classifier without distillation of the centres: PartialFC_V2's trainable weights."""
    return PartialFCHead(*head_arguments(cfg), seed=cfg.seed)


def _proxyless_head(cfg, centres) -> PartialFCHead:
    return PartialFCHead(*head_arguments(cfg), centres=centres, centre_dtype=getattr(torch, cfg.kd.proxyless.dtype),
                         seed=cfg.seed)


def _adadistill_head(cfg, centres) -> AdaDistillHead:
    return AdaDistillHead(*head_arguments(cfg), weighted_alpha=cfg.kd.adadistill.weighted_alpha, seed=cfg.seed)


def _adaptive_proxyless_head(cfg, centres) -> AdaDistillHead:
    return AdaDistillHead(*head_arguments(cfg), weighted_alpha=cfg.kd.proxyless_adaptive.weighted_alpha, seed=cfg.seed,
                          centres=centres)


def _check_proxyless(kd: dict) -> None:
    dtype = kd["proxyless"]["dtype"]
    if dtype not in CENTRE_DTYPES:
        raise KDPluginError(f"config.kd.proxyless.dtype = {dtype!r}: the inherited centres are held in one of "
                            f"{', '.join(CENTRE_DTYPES)}")


register_head("proxyless", _proxyless_head, title="ProxylessKD", needs=("centres", "labels"), baseline=False,
              defaults={**CENTRE_BLOCK, "dtype": "float32"}, check=_check_proxyless,
              summary="the student trains with the margin softmax against the teacher's frozen class centres",
              _builtin=True)
register_head("adadistill", _adadistill_head, title="AdaDistill", defaults={"weighted_alpha": True},
              needs=("teacher", "labels", "equal_dims"),
              summary="class centres moved towards the teacher's embeddings every step (ECCV 2024)", _builtin=True)
register_head("proxyless_adaptive", _adaptive_proxyless_head, title="ProxylessKD, adaptive centres",
              defaults={**CENTRE_BLOCK, "weighted_alpha": True}, needs=("centres", "teacher", "labels", "equal_dims"),
              baseline=False,
              summary="kd_plugin's extension: ProxylessKD's inherited centres (kd.proxyless_adaptive.centres) then "
                      "follow the teacher's embeddings of each batch as AdaDistill's do", _builtin=True)
