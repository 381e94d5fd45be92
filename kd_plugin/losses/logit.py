"""Hinton logit distillation on the logits over the inherited class centres (T = 4), with the classes sharded across
ranks like the head: KL(softmax(z_t / T) || softmax(z_s / T)) * T^2, averaged over the global batch. The logits are
s * cos(embedding, centre) without margin. Because the loss is split across ranks (each holds a class slice), it is
not a replicated term: the gathered student embeddings receive their exact gradient without any rescaling."""

from __future__ import annotations

import torch
from torch import nn

from kd_plugin.distributed import all_reduce_, sharded_exp_sum
from kd_plugin.registry import register_term


def _distributed_log_softmax(z: torch.Tensor) -> torch.Tensor:
    top, _, total = sharded_exp_sum(z)
    return z - top - torch.log(total)


class _DistributedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_s, log_t = _distributed_log_softmax(student), _distributed_log_softmax(teacher)
        p_t = log_t.exp()
        per_row = all_reduce_((p_t * (log_t - log_s)).sum(dim=1), "sum")
        ctx.save_for_backward(log_s.exp() - p_t)
        return per_row.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (diff,) = ctx.saved_tensors
        return diff * (grad / len(diff)), None


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
        factor = self.scale / self.temperature
        with torch.no_grad():
            teacher_logits = head.cosines(teacher) * factor
        loss = _DistributedKL.apply(head.cosines(student) * factor, teacher_logits) * self.temperature ** 2
        return loss, {"logit_kd": loss.detach()}
