"""Run under torchrun with 2+ gloo ranks by test_clean_exit.py: a collective launched during backward (as DDP's
gradient all-reduce and kd_plugin's reduce-scatter are) whose gloo worker thread is still busy after the work
completed (a completion callback spins for a second, as a starved thread would lag) when the program ends.

Without kd_plugin's exit settle the worker needs the GIL while the interpreter finalises and the rank dies with
"terminate called without an active exception" (SIGABRT); with it every rank exits 0."""
import time

import torch
import torch.distributed as dist

from kd_plugin.distributed import init_from_env

assert init_from_env(), "run me under torchrun with WORLD_SIZE >= 2"


def busy_after_completion(fut):  # runs in the gloo worker thread, after the all-reduce completed
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        pass


class ReducedInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        done = dist.all_reduce(grad, async_op=True).get_future()
        done.then(busy_after_completion)
        done.wait()
        return grad


x = torch.ones(4, requires_grad=True)
ReducedInBackward.apply(x).sum().backward()
assert torch.equal(x.grad, torch.full((4,), float(dist.get_world_size())))
print(f"rank {dist.get_rank()}: backward done, exiting", flush=True)
