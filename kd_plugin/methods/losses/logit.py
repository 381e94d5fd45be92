"""Hinton logit distillation on the logits over the inherited class centres (T = 4), with the classes sharded across
ranks like the head: KL(softmax(z_t / T) || softmax(z_s / T)) * T^2, averaged over the global batch. The logits are
s * cos(embedding, centre) without margin, over every class (the head's class sampling does not apply to this term).
Because the loss is split across ranks (each holds a class slice), it is not a replicated term: the gathered student
embeddings receive their exact gradient without any rescaling.

Memory: the rows are processed in blocks of at most LOGIT_BLOCK_ELEMENTS logits per model, and the backward recomputes
a block's logits from the embeddings and the frozen centres, keeping only each row's log-sum-exp: O(block x C/W), not
the several N x C/W matrices a plain autograd graph keeps (about 6 GB at N = 1024, C/W = 257k). Each block makes two
small all-reduces per model (the row maxima and sums of the sharded softmax)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_plugin.distributed import all_reduce_, sharded_exp_sum
from kd_plugin.methods.heads import centre_products, centre_products_grad
from kd_plugin.methods.registry import register_term

LOGIT_BLOCK_ELEMENTS = 1 << 24  # logits per model and block: 64 MB in fp32


def _logits(unit, centres, inverse_norms, factor):
    z = centre_products(unit, centres)
    return (z if inverse_norms is None else z * inverse_norms) * factor


class _BlockedLogitKL(torch.autograd.Function):
    """mean over rows of KL(p_t || p_s) for p = the sharded softmax of factor * cos(unit, centres), block by block."""

    @staticmethod
    def forward(ctx, student_unit, teacher_unit, centres, inverse_norms, factor, rows_per_block):
        per_row, lse = [], []
        for a in range(0, len(student_unit), rows_per_block):
            z_s = _logits(student_unit[a:a + rows_per_block], centres, inverse_norms, factor)
            z_t = _logits(teacher_unit[a:a + rows_per_block], centres, inverse_norms, factor)
            top_s, _, total_s = sharded_exp_sum(z_s)
            top_t, _, total_t = sharded_exp_sum(z_t)
            lse_s, lse_t = top_s + torch.log(total_s), top_t + torch.log(total_t)
            log_t = z_t - lse_t
            per_row.append((log_t.exp() * (log_t - (z_s - lse_s))).sum(dim=1))
            lse.append(torch.cat([lse_s, lse_t], dim=1))
        per_row = all_reduce_(torch.cat(per_row), "sum")
        ctx.save_for_backward(student_unit, teacher_unit, centres, inverse_norms, torch.cat(lse))
        ctx.factor, ctx.rows_per_block = factor, rows_per_block
        return per_row.mean()

    @staticmethod
    def backward(ctx, grad):
        student_unit, teacher_unit, centres, inverse_norms, lse = ctx.saved_tensors
        out = torch.empty_like(student_unit)
        scale = grad / len(student_unit) * ctx.factor
        for a in range(0, len(student_unit), ctx.rows_per_block):
            rows = slice(a, a + ctx.rows_per_block)
            p_s = torch.exp(_logits(student_unit[rows], centres, inverse_norms, ctx.factor) - lse[rows, :1])
            p_t = torch.exp(_logits(teacher_unit[rows], centres, inverse_norms, ctx.factor) - lse[rows, 1:])
            d = (p_s - p_t) * scale
            out[rows] = centre_products_grad(d if inverse_norms is None else d * inverse_norms, centres)
        return out, None, None, None, None, None


@register_term("logit", title="logit KD", needs=("teacher",),
               summary="Hinton's KD (T = 4) on the logits over the inherited class centres; with proxyless",
               _builtin=True)
class LogitKDLoss(nn.Module):
    """`forward(student, teacher, labels, head)`: KD between the two models' logits over `head`'s class centres."""

    sharded = True  # split across ranks like the head: no replicated-loss rescaling

    def __init__(self, temperature: float = 4.0, scale: float = 64.0) -> None:
        super().__init__()
        self.temperature, self.scale = float(temperature), float(scale)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, head):
        centres, inverse_norms = head.centres_for_logits()
        if getattr(head, "trainable", False):  # raw trainable weights: their directions, held fixed by this term
            centres, inverse_norms = F.normalize(centres.float(), dim=1), None
        centres = centres.detach()
        classes = max(1, centres.shape[0])
        rows = max(1, LOGIT_BLOCK_ELEMENTS // classes)
        with torch.autocast(student.device.type, enabled=False):
            s_unit = F.normalize(student.float(), dim=1)
            t_unit = F.normalize(teacher.detach().float(), dim=1)
            loss = _BlockedLogitKL.apply(s_unit, t_unit, centres, inverse_norms, self.scale / self.temperature, rows)
            loss = loss * self.temperature ** 2
        return loss, {"logit_kd": loss.detach()}
