"""One reader of a dataset's index and labels per job: rank 0 reads the .idx and derives the labels (identity ranges, a
label index or every record's header) and the other ranks receive both through the process group, so a WebFace42M
start reads the index and the headers once per job, not once per rank, and no rank depends on seeing a file another
node wrote.

Why every rank then holds all N labels and offsets: the identity-balanced sampler draws each rank's batches from every
class, seeded the same on all ranks, so it needs the whole label array (int64: 340 MB at WebFace42M's 42.5M images),
and a rank's loader reads any image by its byte offset (16 bytes per record for keys and offsets). They travel as
int32 where the values fit, and a run of consecutive keys as two numbers.

While rank 0 reads, the others wait in one-number broadcasts that rank 0 answers every 65,536 records (seconds apart),
so a 12-minute first read of every header never runs into the process group's timeout. Budget: start-up only; one
broadcast per beat, then the .idx's keys and offsets, the image keys and the labels once."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kd_plugin.distributed import collective_device, get_rank
from kd_plugin.errors import DataFormatError, KDPluginError

_WORKING, _DONE, _FAILED = 0, 1, 2


def _state(value: int) -> int:
    import torch.distributed as dist

    state = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.broadcast(state, 0)
    return int(state.item())


def _send(array: np.ndarray | None) -> np.ndarray:
    """Rank 0's int64 `array` on every rank: a run of consecutive integers as its first value and length, values
    that fit int32 as int32 (half the bytes), else int64."""
    import torch.distributed as dist

    device = collective_device()
    head = torch.zeros(3, dtype=torch.int64, device=device)  # kind (0 run, 1 int32, 2 int64), length, first
    if get_rank() == 0:
        n = len(array)
        run = n > 0 and int(array[-1]) - int(array[0]) == n - 1 and bool((np.diff(array) == 1).all())
        narrow = n == 0 or (int(array.min()) >= -2 ** 31 and int(array.max()) < 2 ** 31)
        head = torch.tensor([0 if run else 1 if narrow else 2, n, int(array[0]) if run else 0], device=device)
    dist.broadcast(head, 0)
    kind, n, first = (int(v) for v in head.cpu())
    if kind == 0:
        return np.arange(first, first + n, dtype=np.int64)
    dtype = torch.int32 if kind == 1 else torch.int64
    data = (torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype) if get_rank() == 0 else
            torch.empty(n, dtype=dtype, device=device))
    dist.broadcast(data, 0)
    return data.cpu().numpy().astype(np.int64)


def from_rank0(derive: Callable[..., dict[str, np.ndarray]], names: tuple[str, ...],
               source: str) -> dict[str, np.ndarray]:
    """The int arrays `names` of the dict `derive(beat)` returns on rank 0, on every rank (collective); `beat()`
    keeps the others waiting in step while rank 0 works."""
    from kd_plugin.job_files import broadcast_text

    arrays: dict[str, np.ndarray] = {}
    if get_rank() == 0:
        error: Exception | None = None
        try:
            arrays = derive(lambda: _state(_WORKING))
        except (DataFormatError, KDPluginError, OSError) as exc:
            error = exc
        _state(_FAILED if error is not None else _DONE)
        if error is not None:
            broadcast_text(str(error), 0)
            raise error
    else:
        state = _state(_WORKING)
        while state == _WORKING:
            state = _state(_WORKING)
        if state == _FAILED:
            raise DataFormatError(f"rank 0 could not read the labels of {source}: {broadcast_text('', 0)}")
    return {name: _send(np.asarray(arrays[name], dtype=np.int64) if arrays else None) for name in names}
