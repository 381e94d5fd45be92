"""Run under torchrun with 2+ gloo ranks by test_clean_exit.py: a collective launched during backward (as DDP's
gradient all-reduce and kd_plugin's reduce-scatter are) whose gloo worker thread is still busy after the work
completed (a completion callback spins for a second, as a starved thread would lag) when the program ends. Rank 0's
callback is attached before its all-reduce can complete: rank 1 joins the all-reduce only once rank 0 has written
`<argv[1]>/attached` (so rank 0's callback surely runs in its gloo worker; rank 1's may find its work done already).

Without kd_plugin's exit settle the worker needs the GIL while the interpreter finalises and the rank dies with
"terminate called without an active exception" (SIGABRT); with it every rank exits 0."""
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from kd_plugin.distributed import init_from_env

assert init_from_env(), "run me under torchrun with WORLD_SIZE >= 2"


MAIN = threading.get_ident()
FLAG = os.path.join(sys.argv[1], "attached")
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
        if dist.get_rank() == 1:
            while not os.path.exists(FLAG):  # rank 0's work cannot complete before this rank launches its own
                time.sleep(0.01)
        done = dist.all_reduce(grad, async_op=True).get_future()
        done.then(busy_after_completion)
        if dist.get_rank() == 0:
            open(FLAG, "w").close()
        done.wait()
        return grad


x = torch.ones(4, requires_grad=True)
ReducedInBackward.apply(x).sum().backward()
assert torch.equal(x.grad, torch.full((4,), float(dist.get_world_size())))
if dist.get_rank() == 0:  # its callback starts in the worker once the work is complete: wait for that start
    deadline = time.monotonic() + 60
    while not ran_in and time.monotonic() < deadline:
        time.sleep(0.001)
    assert ran_in and ran_in[0] != MAIN, f"rank 0's callback did not start in a gloo worker thread: {ran_in}"
print(f"rank {dist.get_rank()}: backward done, exiting", flush=True)
