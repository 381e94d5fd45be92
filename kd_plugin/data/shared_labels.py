"""One reader of a dataset's labels per job: rank 0 derives them (identity ranges, a label index or every record's
header) and the other ranks receive them through the process group, so a WebFace42M start reads the headers once
per job, not once per rank, and no rank depends on seeing a file another node wrote.

Why every rank then holds all N labels: the identity-balanced sampler draws each rank's batches from every class,
seeded the same on all ranks, so it needs the whole label array (4 bytes per image here, 170 MB at WebFace42M).

While rank 0 reads, the others wait in small broadcasts that rank 0 answers every 65,536 records (seconds apart), so a
12-minute first read never runs into the process group's timeout. Budget: start-up only; 2 broadcasts per beat, then
the keys' range (or the keys) and the labels once."""

from __future__ import annotations

from typing import Callable

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


def _send(array: np.ndarray | None, dtype: torch.dtype) -> np.ndarray:
    """`array` of rank 0 on every rank."""
    import torch.distributed as dist

    device = collective_device()
    size = torch.tensor([0 if array is None else len(array)], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    data = (torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype) if get_rank() == 0 else
            torch.empty(int(size.item()), dtype=dtype, device=device))
    dist.broadcast(data, 0)
    return data.cpu().numpy().astype(np.int64)


def labels_from_rank0(derive: Callable[..., tuple[np.ndarray, np.ndarray]],
                      source: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys, labels) that `derive(beat)` returns on rank 0, on every rank (collective)."""
    from kd_plugin.job_files import broadcast_text

    keys = labels = None
    if get_rank() == 0:
        error: Exception | None = None
        try:
            keys, labels = derive(lambda: _state(_WORKING))
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
    contiguous = keys is not None and len(keys) > 0 and bool((np.diff(keys) == 1).all())
    span = _send(np.asarray([keys[0], len(keys)]) if contiguous else np.zeros(0, np.int64), torch.int64)
    keys = np.arange(span[0], span[0] + span[1], dtype=np.int64) if len(span) else _send(keys, torch.int64)
    big = labels is not None and len(labels) and int(np.max(labels)) >= 2 ** 31
    wide = bool(_send(np.asarray([1 if big else 0]), torch.int64)[0])
    return keys, _send(labels, torch.int64 if wide else torch.int32)
