"""Run under torchrun with 2+ gloo ranks by test_clean_exit.py: a collective launched during backward (as DDP's
gradient all-reduce and kd_plugin's reduce-scatter are) whose gloo worker thread is still busy after the work
completed (a completion callback spins for a second, as a starved thread would lag) when the program ends.

Without kd_plugin's exit settle the worker needs the GIL while the interpreter finalises and the rank dies with
"terminate called without an active exception" (SIGABRT); with it every rank exits 0."""
import threading
import time

import torch
import torch.distributed as dist

from kd_plugin.distributed import init_from_env

assert init_from_env(), "run me under torchrun with WORLD_SIZE >= 2"


MAIN = threading.get_ident()
ran_in = []


def busy_after_completion(fut):  # in the gloo worker thread when the all-reduce completes after this is attached
    ran_in.append(threading.get_ident())
    if ran_in[-1] == MAIN:  # it had completed already: the callback ran at once, in the main thread
        return
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


# until every rank's callback ran in its gloo worker (an all-reduce may complete before the callback is attached)
for attempt in range(20):
    ran_in.clear()
    x = torch.ones(4, requires_grad=True)
    ReducedInBackward.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((4,), float(dist.get_world_size())))
    everywhere = torch.tensor([float(bool(ran_in) and ran_in[0] != MAIN)])
    dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)  # gloo's other worker thread takes it
    if everywhere.item() == 1.0:
        break
else:
    raise SystemExit("no attempt had every rank's callback in a gloo worker thread")
print(f"rank {dist.get_rank()}: backward done after {attempt + 1} attempt(s), exiting", flush=True)
