"""The KD objective: one gather of the global batch, the margin-softmax head's loss plus a weighted sum of
distillation terms, with named scalars for logging.

Gradient scaling per kind of term: the head and sharded terms (logit KD) are split across ranks and already give each
rank its exact gradient; replicated terms (EKD, L2, CCKD, ...) go through `replicated_loss`. So the whole objective
gives every rank the gradient one process would compute on the concatenated batch (under DDP, scale by the world size
once, see kd_plugin.distributed); `reference_scaling=True` keeps TFace's W-times-larger gradient for replicated terms."""

from __future__ import annotations

import torch
from torch import nn

from kd_plugin.data.sampler import random_part_rows
from kd_plugin.distributed import gather_no_grad, gather_sizes, replicated_loss
from kd_plugin.embeddings import check_same_dims
from kd_plugin.methods.heads import PartialFCHead
from kd_plugin.step_parts import NO_PARTS


class KDObjective(nn.Module):
    """`forward(local_student, local_labels, local_teacher=None) -> (loss, {name: scalar})`.

    `terms` maps a name to `(module, weight)`. `margin_random_rows`: when set (the sampler's random-part size R), the
    head's loss sees only each rank's first R rows — the reference EKD recipe — while the terms see the whole batch."""

    def __init__(self, head: PartialFCHead, terms: dict[str, tuple[nn.Module, float]] | None = None,
                 reference_scaling: bool = False, margin_random_rows: int | None = None,
                 needs_teacher: bool | None = None, equal_dims: tuple[str, ...] = (),
                 unlabeled_rows: bool = False, label_free: tuple[str, ...] = (), mixed_labels: bool = False) -> None:
        super().__init__()
        self.head = head
        self.terms = nn.ModuleDict({name: module for name, (module, _) in (terms or {}).items()})
        self.weights = {name: float(weight) for name, (_, weight) in (terms or {}).items()}
        self.reference_scaling, self.margin_random_rows = reference_scaling, margin_random_rows
        self.needs_teacher = (bool(self.terms) or head.reads_teacher) if needs_teacher is None \
            else bool(needs_teacher)
        self.equal_dims = tuple(equal_dims)  # terms that compare embeddings directly (their declared need)
        # batches may hold images without identity (label < 0): the head and the terms that need labels skip them,
        # the `label_free` terms see every row
        self.unlabeled_rows, self.label_free = bool(unlabeled_rows), tuple(label_free)
        # kd.views.mixed_labels = "mix": forward takes `mix` (each row's partner label and lam) and the head's loss of
        # a mixed row is lam x its own identity's plus (1 - lam) x its partner's
        self.mixed_labels = bool(mixed_labels)
        self.parts = NO_PARTS  # the step's parts a caller may time (kd_plugin.step_parts): "head", "term_<name>"

    def forward(self, local_student: torch.Tensor, local_labels: torch.Tensor,
                local_teacher: torch.Tensor | None = None, sizes: list[int] | None = None,
                mix: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of the global batch and its scalars (device tensors). `sizes`: every rank's batch size in rank
        order, when the caller knows them (kd-plugin train's sampler and train_v2's drop_last loader give every rank
        the same size): otherwise they are exchanged, which reads them on the host. `mix` (with `mixed_labels`): each
        local row's mixup partner label (-1: none known) and lam (1: not mixed), kd_plugin.data.views.mix_partners."""
        if self.mixed_labels != (mix is not None):
            raise ValueError(f"the objective was built with mixed_labels = {self.mixed_labels}: pass `mix` exactly then")
        if self.needs_teacher and local_teacher is None:
            raise ValueError(f"the KD terms {sorted(self.terms) or ['adadistill']} need teacher embeddings")
        if self.equal_dims and local_teacher is not None:
            check_same_dims(local_student, local_teacher, ", ".join(self.equal_dims))
        sizes = sizes or gather_sizes(len(local_labels), local_student.device)
        student, labels = self.head.gather(local_student, local_labels, sizes)
        teacher = None if local_teacher is None else gather_no_grad(local_teacher.float(), sizes)
        everything = (student, teacher, labels)
        labeled, head_rows = everything, None
        if mix is not None:
            pure, head_rows = _mixed_rows(labels, *(gather_no_grad(part, sizes) for part in mix))
            labeled = (student[pure], None if teacher is None else teacher[pure], labels[pure])
        elif self.unlabeled_rows:
            keep = labels >= 0
            labeled = (student[keep], None if teacher is None else teacher[keep], labels[keep])
        # a batch may hold no labelled row at all (mixed views, unlabelled images): what needs labels then adds 0
        # (the gathered labels are the same on every rank, so every rank skips alike)
        no_labels = len(labeled[2]) == 0
        if not no_labels:  # a head that learns from the teacher (AdaDistill) sees the unmixed labelled rows
            self.head.observe(labeled[0], labeled[1], labeled[2])
        with self.parts.span("head"):
            head_loss = self._head_loss(student, labels, labeled, head_rows, no_labels, sizes)
        total = head_loss
        stats = {"loss_head": head_loss.detach()}
        for name, term in self.terms.items():
            rows = everything if name in self.label_free else labeled
            if no_labels and name not in self.label_free:
                continue
            with self.parts.span(f"term_{name}"):
                if getattr(term, "sharded", False):
                    loss, term_stats = term(*rows, self.head)
                else:
                    loss, term_stats = term(*rows)
                    loss = replicated_loss(loss, self.reference_scaling)
            total = total + self.weights[name] * loss
            stats[f"loss_{name}"] = loss.detach()
            stats.update({k: v for k, v in term_stats.items()})
        stats["loss"] = total.detach()
        return total, stats

    def _head_loss(self, student, labels, labeled, head_rows, no_labels: bool, sizes) -> torch.Tensor:
        """The head's loss over the rows it trains on: the mixed rows' weighted labels, nothing (no labelled row),
        the random part of each rank's batch (kd.margin_on_random_part) or every labelled row."""
        if head_rows is not None:
            rows, head_labels, weights = head_rows
            return self.head.global_loss(student[rows], head_labels, weights) if len(rows) else student.sum() * 0.0
        if no_labels:
            return student.sum() * 0.0
        if self.margin_random_rows is not None:
            rows = random_part_rows(sizes, self.margin_random_rows, student.device)
            return self.head.global_loss(student[rows], labels[rows])  # the random part is always labelled
        return self.head.global_loss(labeled[0], labeled[2])


def _mixed_rows(labels: torch.Tensor, partners: torch.Tensor,
                lam: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Mixup with labels, over the global batch: the rows of unmixed labelled images (for EKD and AdaDistill's update)
    and the head's rows — each labelled row at weight lam, and again with its partner's label at weight 1 - lam when
    the partner has one — as (row index, label, weight). One host read: the three counts."""
    n = len(labels)
    mixed = lam < 1.0
    candidate_labels = torch.cat([labels, labels, partners])
    rows = torch.arange(n, device=labels.device).repeat(3)
    weights = torch.cat([torch.ones_like(lam), lam, 1.0 - lam])
    # segment 0: unmixed labelled rows; 1: every labelled row (own label); 2: a mixed row's partner label; 3: none
    none = torch.full_like(labels, 3)
    segment = torch.cat([torch.where((labels >= 0) & ~mixed, 0, none), torch.where(labels >= 0, 1, none),
                         torch.where(mixed & (partners >= 0), 2, none)])
    pure, own, other = torch.bincount(segment, minlength=4)[:3].tolist()  # the host read
    order = torch.argsort(segment, stable=True)
    head = order[pure:pure + own + other]
    return rows[order[:pure]], (rows[head], candidate_labels[head], weights[head])
