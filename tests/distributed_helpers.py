"""Run a function on N gloo processes on this machine and collect each rank's return value."""

from __future__ import annotations

import gc
import os
import socket
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd_plugin.distributed import settle_gloo_workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple, timeout: float | None) -> None:
    import datetime

    torch.set_num_threads(1)
    extra = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **extra)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        del result
        gc.collect()  # DDP wrappers and loaders of `fn` go before the group does
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        settle_gloo_workers()  # gloo's threads done with their works before the interpreter ends
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float | None = None,
              deadline: float = 600.0) -> list[Any]:
    """`fn(rank, world, *args)` on `world` processes inside a gloo process group; returns the results in rank order.
    `timeout`: the process group's (seconds), so a rank left waiting in a collective fails instead of hanging.
    `deadline`: seconds for the whole run; past it every rank is killed and the test fails naming the ranks still
    running. A rank that raises or dies fails the test with its rank, its exit code or its traceback (torch's
    ProcessRaisedException / ProcessExitedException)."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.spawn(_entry, args=(world, _free_port(), out_dir, fn, args, timeout), nprocs=world, join=False)
        ends = time.monotonic() + deadline
        while not context.join(timeout=1.0):
            if time.monotonic() > ends:
                running = [r for r, p in enumerate(context.processes) if p.is_alive()]
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise AssertionError(f"run_ranks({getattr(fn, '__name__', fn)}, world={world}): ranks {running} "
                                     f"still running after {deadline:.0f}s; killed")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
