"""Files a whole job shares, made safe for any node layout (one machine, several nodes with node-local disks, NFS).

Three rules, each with its helper here:
- **One decision per job.** A "reuse or build" choice that each rank makes from what it sees on disk is agreed before
  anyone acts on it (`agree`): two nodes that see a folder differently then both rebuild, instead of taking different
  branches and hanging in different collectives. An error one rank meets while opening a job-wide file stops every
  rank with that rank's message (`agree_or_raise`), instead of leaving the others waiting in the next collective.
- **A shared folder is checked before it is relied on** (`require_shared_folder`): rank 0 writes a token, every rank
  looks for it; a folder some ranks cannot see (a node-local disk) stops the run at start-up with what to do.
- **One writer per part** (`PartSet`): each rank writes its own part file whole (temporary name, then rename); rank 0
  lists the parts with their byte sizes in the set's meta once it has seen every one complete; a reader checks every
  listed part and refuses a torn set naming the part. No file is written by two processes.

Budget: each helper is one or two small collectives (a flag per rank, a message only when something failed), for
start-up decisions only — never inside a training step."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable

import numpy as np
import torch

from kd_plugin.distributed import collective_device, get_rank, get_world_size, is_distributed
from kd_plugin.errors import KDPluginError

SHARED_WAIT_ENV = "KD_PLUGIN_SHARED_WAIT"  # seconds a rank waits for a file another rank wrote (NFS caches lookups)
SHARED_WAIT_DEFAULT = 60.0
TOKEN_NAME = ".kd_plugin_shared_check"


def _shared_wait() -> float:
    raw = os.environ.get(SHARED_WAIT_ENV, "")
    try:
        return float(raw) if raw else SHARED_WAIT_DEFAULT
    except ValueError:
        raise KDPluginError(f"{SHARED_WAIT_ENV} = {raw!r}: expected a number of seconds (e.g. 60)") from None


def _flags(flag: bool) -> list[bool]:
    """Every rank's flag, in rank order (one all_gather of one byte per rank)."""
    import torch.distributed as dist

    if not is_distributed():
        return [bool(flag)]
    mine = torch.tensor([1 if flag else 0], dtype=torch.uint8, device=collective_device())
    every = [torch.zeros_like(mine) for _ in range(get_world_size())]
    dist.all_gather(every, mine)
    return [bool(f.item()) for f in every]


def agree(flag: bool) -> bool:
    """True only if `flag` is true on every rank (collective): the one answer every rank acts on."""
    return all(_flags(flag))


def broadcast_text(text: str, source: int) -> str:
    """`text` of rank `source` on every rank, as UTF-8 bytes in a tensor (no pickle)."""
    import torch.distributed as dist

    if not is_distributed():
        return text
    device = collective_device()
    data = text.encode("utf-8") if get_rank() == source else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, source)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if get_rank() == source:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, source)
    return bytes(buffer.cpu().numpy()).decode("utf-8")


def agree_or_raise(action: Callable[[], object]) -> object:
    """`action()` on every rank; if it raised a KDPluginError (or OSError) on any rank, every rank raises the first
    failing rank's message, so no rank is left waiting for the others (collective)."""
    error: Exception | None = None
    result = None
    try:
        result = action()
    except (KDPluginError, OSError) as exc:
        error = exc
    flags = _flags(error is None)
    if all(flags):
        return result
    first = flags.index(False)
    message = broadcast_text(str(error) if error is not None else "", first)
    if get_world_size() > 1:
        message = f"rank {first}: {message}"
    raise KDPluginError(message) from error


def require_shared_folder(folder: str, purpose: str) -> None:
    """Stop every rank with a clear message unless every rank sees files rank 0 writes in `folder` (collective; a
    no-op in one process). Rank 0 writes a fresh token; each rank waits up to KD_PLUGIN_SHARED_WAIT seconds (60) to
    read it back."""
    import torch.distributed as dist

    if not is_distributed():
        return
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    token_path = os.path.join(folder, TOKEN_NAME)
    nonce = torch.tensor([secrets.randbits(62) if get_rank() == 0 else 0], dtype=torch.int64,
                         device=collective_device())
    if get_rank() == 0:
        from kd_plugin.atomic import replacing

        with replacing(token_path) as tmp, open(tmp, "w", encoding="ascii") as f:
            f.write(str(int(nonce.item())))
    dist.broadcast(nonce, 0)
    expected, deadline, seen = str(int(nonce.item())), time.monotonic() + _shared_wait(), False
    while True:
        try:
            with open(token_path, encoding="ascii") as f:
                seen = f.read().strip() == expected
        except OSError:
            seen = False
        if seen or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    flags = _flags(seen)
    if get_rank() == 0:  # every rank has looked: the token has done its job
        os.remove(token_path)
    if not all(flags):
        blind = [r for r, ok in enumerate(flags) if not ok]
        raise KDPluginError(
            f"{folder}: {purpose} must be one folder every rank reads and writes, but rank(s) {blind} do not see the "
            f"file rank 0 wrote there ({TOKEN_NAME}) after {_shared_wait():.0f} s: the folder is not shared between "
            f"this job's nodes (a node-local disk?). Put it on a file system every node mounts (NFS, Lustre, ...), or "
            f"run on one node; if the folder is shared but slow to show new files, raise {SHARED_WAIT_ENV}")


class PartSet:
    """A set of `world` numpy part files `DIR/STEM.part{r}-of-{world}.npy` written by one process each, and read
    together; the set's meta (its writer's) records which rows of the whole each part holds."""

    def __init__(self, directory: str, stem: str, world: int) -> None:
        self.directory, self.stem, self.world = directory, stem, int(world)

    def path(self, part: int) -> str:
        """Where part `part` lives."""
        return os.path.join(self.directory, f"{self.stem}.part{part:05d}-of-{self.world:05d}.npy")

    def stale(self) -> list[str]:
        """Part files of this stem written for another number of parts (a run with another world size)."""
        prefix = f"{self.stem}.part"
        mine = {os.path.basename(self.path(r)) for r in range(self.world)}
        return [os.path.join(self.directory, f) for f in sorted(os.listdir(self.directory))
                if f.startswith(prefix) and f.endswith(".npy") and f not in mine]

    def listing(self) -> list[dict]:
        """`[{"file", "bytes"}]` of every part, checked complete (waiting up to KD_PLUGIN_SHARED_WAIT for parts
        other processes wrote); raises naming the first missing part."""
        deadline = time.monotonic() + _shared_wait()
        for part in range(self.world):
            path = self.path(part)
            while not os.path.isfile(path) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not os.path.isfile(path):
                raise KDPluginError(f"{path}: part {part} of {self.world} is missing (the process that writes it "
                                    f"did not finish, or cannot write into {self.directory}); every part is needed")
        return [{"file": os.path.basename(self.path(r)), "bytes": os.path.getsize(self.path(r))}
                for r in range(self.world)]

    @staticmethod
    def open(directory: str, listing: list[dict], where: str, hint: str) -> list[np.ndarray]:
        """Every listed part, memory-mapped read-only, after checking each is present with its recorded size."""
        arrays = []
        for number, entry in enumerate(listing):
            path = os.path.join(directory, entry["file"])
            if not os.path.isfile(path):
                raise KDPluginError(f"{path}: part {number} of {len(listing)} listed in {where} is missing; the set "
                                    f"is torn: {hint}")
            size = os.path.getsize(path)
            if size != int(entry["bytes"]):
                raise KDPluginError(f"{path}: part {number} of {len(listing)} holds {size} bytes, {where} records "
                                    f"{entry['bytes']} (cut short or overwritten); the set is torn: {hint}")
            arrays.append(np.load(path, mmap_mode="r"))
        return arrays
