"""torch.distributed helpers: rank/world with or without a process group, the class-range sharding math, and gathers
of per-rank batches (sizes may differ between ranks) with and without gradient.

Gradient convention: `gather_with_grad`'s backward sums, over ranks, the gradients each rank computed for a row and
hands the row's owner that sum. For a loss that is split across ranks (the class-sharded softmax) this gives every
rank exactly the gradient one process would compute on the concatenated batch. DDP then averages parameter gradients
over ranks, so a trainer running under DDP multiplies by the world size once (arcface_torch's PartialFC_V2 folds that
factor into its gather instead).
"""

from __future__ import annotations

import atexit
import math
import os
import time

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(class_start, num_local) of a rank: contiguous slices, the first C % W ranks one class larger (PartialFC_V2's)."""
    base, extra = divmod(int(num_classes), int(world_size))
    return base * rank + min(rank, extra), base + int(rank < extra)


def class_owners(labels: torch.Tensor, num_classes: int, world_size: int) -> torch.Tensor:
    """The rank whose class range (`class_range`) holds each label."""
    starts = torch.tensor([class_range(num_classes, r, world_size)[0] for r in range(world_size)],
                          device=labels.device)
    return torch.searchsorted(starts, labels, right=True) - 1


def collective_device() -> torch.device:
    """Where a tensor must be for a collective: NCCL reduces CUDA tensors only; gloo and no process group use the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":  # this rank's GPU, even before train_v2 calls set_device
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_distributed():
        dist.barrier()


def gather_sizes(local_size: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's batch size, in rank order."""
    if not is_distributed():
        return [int(local_size)]
    mine = torch.tensor([int(local_size)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(s.item()) for s in sizes]


def _padded(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad])


def gather_no_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's `tensor` (first dimensions may differ) in rank order, without gradient."""
    if not is_distributed():
        return tensor.detach()
    sizes = sizes or gather_sizes(tensor.shape[0], tensor.device)
    rows = max(sizes)
    parts = [tensor.new_empty((rows, *tensor.shape[1:])) for _ in sizes]
    dist.all_gather(parts, _padded(tensor.detach(), rows))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


# torch 2.13 renamed reduce_scatter_tensor (same signature); older releases only have the old name
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes = sizes
        return gather_no_grad(tensor, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        sizes = ctx.sizes
        rows, rank = max(sizes), get_rank()
        segments = torch.split(grad.contiguous(), sizes)
        stacked = torch.cat([_padded(s, rows) for s in segments])
        mine = grad.new_empty((rows, *grad.shape[1:]))
        _reduce_scatter(mine, stacked, op=dist.ReduceOp.SUM)
        return mine[:sizes[rank]], None


def gather_with_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's `tensor` in rank order; gradients flow back to each row's owner, summed over ranks."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor, sizes or gather_sizes(tensor.shape[0], tensor.device))


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (`sum`, `max` or `min`); a no-op without a process group."""
    if is_distributed():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor


def sharded_exp_sum(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pieces of a softmax over columns split across ranks (each rank holds a class slice of every row), without
    gradient: `(top, exp(z - top), total)` with `top` the row maximum over every rank's columns and `total` the sum of
    exp(z - top) over them, both (N, 1); log-sum-exp = top + log(total). A rank may hold no column."""
    top = z.max(dim=1, keepdim=True).values if z.shape[1] else z.new_full((len(z), 1), -math.inf)
    all_reduce_(top, "max")
    shifted = torch.exp(z - top)
    return top, shifted, all_reduce_(shifted.sum(dim=1, keepdim=True), "sum")


def training_device() -> torch.device:
    """The device this process trains on: its GPU under torchrun (the current CUDA device, which init_from_env sets
    from LOCAL_RANK), else the CPU. The trainer, the hook and the CLI's teacher commands all take it from here."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL with GPUs, gloo without. True if it did."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    settle_at_exit()
    return True


# --- a clean exit with gloo ---------------------------------------------------------------------------------------
# Why: torch (2.13, the version tested here) stashes a Python object (the autograd engine's contextvars.Context)
# in the thread's state for the length of every backward pass, and each gloo collective launched meanwhile (DDP's
# gradient all-reduce, kd_plugin's reduce-scatter in gather_with_grad's backward) copies that state into its work
# object. A gloo worker thread ("pt_gloo_runloop") drops its reference to a work only after the work completed, so
# the caller may already have moved on; when the thread drops the last reference after the interpreter began to
# finalise, the Python decref must take the GIL, CPython ends the thread with a forced unwind inside a noexcept C++
# destructor, and the process dies with "terminate called without an active exception" (SIGABRT). Seen by chance at
# exit under torchrun with 2 and 4 gloo ranks on a loaded machine (a starved worker thread); destroy_process_group
# does not help, since it neither waits for nor stops those threads while DDP still holds the group.
# The remedy: at exit, while the interpreter is whole, wait (GIL released) until every gloo worker thread of this
# process sleeps, i.e. has finished with its last work. Local only: no collective, so a rank that exits on an error
# never waits for the others; bounded, so a thread blocked inside a collective on a dead peer costs the timeout only.
# Without gloo threads (NCCL, one process) it returns after `quiet_polls * interval` (10 ms). Proved by
# tests/test_clean_exit.py, which holds a worker busy after its work completed and aborts without this wait.

GLOO_WORKER_THREAD = "pt_gloo_runloop"  # the name torch gives gloo's worker threads
_SETTLE_REGISTERED = False


def _gloo_worker_states() -> list[str] | None:
    """The scheduler state ('R', 'S', ...) of each gloo worker thread of this process; None where /proc is absent."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return None
    states = []
    for tid in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, tid, "stat"), encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        if name == GLOO_WORKER_THREAD:
            states.append(stat[stat.rfind(")") + 2:][:1])
    return states


def settle_gloo_workers(timeout: float = 10.0, quiet_polls: int = 5, interval: float = 0.002) -> bool:
    """Wait until every gloo worker thread of this process has slept at `quiet_polls` consecutive polls,
    `interval` seconds apart with the GIL released (a thread waiting for the GIL gets it in between, a starved one
    shows as runnable). True when they settled (or there are none), False after `timeout` seconds. Without /proc
    (not Linux) it waits `quiet_polls * interval` seconds."""
    deadline, quiet = time.monotonic() + timeout, 0
    while quiet < quiet_polls:
        time.sleep(interval)
        states = _gloo_worker_states()
        if states is None:
            quiet += 1
            continue
        quiet = quiet + 1 if all(s == "S" for s in states) else 0
        if quiet < quiet_polls and time.monotonic() > deadline:
            return False
    return True


def settle_at_exit() -> None:
    """Register, once per process, the wait for gloo's worker threads at interpreter exit (atexit runs before the
    interpreter finalises). Called where kd_plugin joins or meets a process group: init_from_env and the train_v2
    hook (upstream's train_v2 exits without destroy_process_group)."""
    global _SETTLE_REGISTERED
    if not _SETTLE_REGISTERED:
        atexit.register(settle_gloo_workers)  # also after destroy_process_group: the threads outlive the group
        _SETTLE_REGISTERED = True


def replicated_loss(loss: torch.Tensor, reference_scaling: bool = False) -> torch.Tensor:
    """A loss computed identically on every rank from gathered tensors: same value, gradient divided by the world size.

    `gather_with_grad` sums every rank's gradient for a row; for a replicated loss that sum is W times the one-process
    gradient, and this brings it back. `reference_scaling=True` keeps the W factor (what TFace's EKD does)."""
    world = get_world_size()
    if world == 1 or reference_scaling:
        return loss
    return loss / world + loss.detach() * (1.0 - 1.0 / world)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by `factor` (the trainer's one W factor for DDP's averaging)."""
    return x if factor == 1 else _ScaleGrad.apply(x, factor)
