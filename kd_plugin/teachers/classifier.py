"""The teacher's classifier (class centres) assembled from any layout it was released in, checked, and sliced per rank.

Layouts: arcface_torch runs write `checkpoint_gpu_{r}.pt` (the shard in `state_dict_softmax_fc["weight"]`); older
model-zoo releases hold `rank_{r}_softmax_weight.pt` (one (num_local, d) tensor per rank; the `_mom` files beside them
are optimizer momentum and are ignored); a single file may hold the full (C, d) tensor (bare, or under "weight" as
this plugin writes it); forks (PocketNet, AdaDistill) keep one unsharded `kernel` of shape (d, C), transposed.
Shards are concatenated in rank order, whatever the teacher's GPU count; the student's ranks then take their own
class range of the full matrix. `read_classifier_rows` reads only such a range: the files are memory-mapped, only the
shards that overlap it are touched, and rows are converted chunk by chunk into the output (the mapped pages released
after each chunk), so a rank's memory grows with C/W, never with C.
"""

from __future__ import annotations

import ctypes
import glob
import json
import mmap
import os
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kd_plugin.atomic import save_torch, write_json
from kd_plugin.errors import KDPluginError
from kd_plugin.checkpoints import mapped_torch_load, safe_torch_load


class ClassSlice(NamedTuple):
    """Rows `start .. start + len(rows)` of a (num_classes, d) centre matrix: what one rank holds."""

    start: int
    rows: torch.Tensor


_SHARD_PATTERNS = (
    ("checkpoint_gpu_{}.pt", re.compile(r"checkpoint_gpu_(\d+)\.pt$")),
    ("rank_{}_softmax_weight.pt", re.compile(r"rank_(\d+)_softmax_weight\.pt$")),
)


def _shard_files(path: str) -> tuple[list[str], str] | None:
    """All shards of the layout `path` belongs to (a directory, or one shard file), in rank order."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    for template, pattern in _SHARD_PATTERNS:
        if os.path.isfile(path) and not pattern.search(os.path.basename(path)):
            continue
        found = {int(m.group(1)): f for f in glob.glob(os.path.join(folder, template.format("*")))
                 if (m := pattern.search(os.path.basename(f)))}
        if not found:
            continue
        ranks = sorted(found)
        if ranks != list(range(len(ranks))):
            missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
            raise KDPluginError(f"{folder}: classifier shards {template.format('{r}')} found for ranks {ranks}, "
                                f"missing rank(s) {missing}; every shard of the teacher's run is needed, in rank order")
        return [found[r] for r in ranks], template
    return None


def _load(path: str, mapped: bool) -> tuple[object, bool]:
    """The file's content, and whether it is memory-mapped (asked for, and the file's format allows it)."""
    return mapped_torch_load(path) if mapped else (safe_torch_load(path), False)


def _shard_weight(path: str, obj: object) -> torch.Tensor:
    if isinstance(obj, dict) and "state_dict_softmax_fc" in obj:
        obj = obj["state_dict_softmax_fc"].get("weight")
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2:
        raise KDPluginError(f"{path}: expected a 2-D classifier shard (num_local x embedding_size) in "
                            f"state_dict_softmax_fc['weight'] or as the file's tensor; found {type(obj).__name__}. "
                            f"Was the teacher trained with save_all_states=True?")
    return obj


def _single_file_weight(path: str, obj: object) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        weight = obj
    elif isinstance(obj, dict) and isinstance(obj.get("weight"), torch.Tensor):
        weight = obj["weight"]
    elif isinstance(obj, dict) and isinstance(obj.get("kernel"), torch.Tensor):
        weight = obj["kernel"].T  # fdbtrs-style heads store (d, C)
    elif isinstance(obj, dict) and "state_dict_softmax_fc" in obj:
        weight = _shard_weight(path, obj)
    else:
        keys = list(obj)[:8] if isinstance(obj, dict) else "-"
        raise KDPluginError(f"{path}: no classifier found: expected a (C, d) tensor, a dict with 'weight' (C, d) or "
                            f"'kernel' (d, C), or checkpoint_gpu_*.pt shards; found {type(obj).__name__} (keys {keys})")
    if weight.dim() != 2:
        raise KDPluginError(f"{path}: the classifier must be 2-D, found shape {tuple(weight.shape)}")
    return weight


def _sources(path: str, mapped: bool) -> tuple[list[tuple[torch.Tensor, bool]], str]:
    """The classifier's parts in class order (one per shard, or the single matrix), each with whether it is
    memory-mapped, and a description of them."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher classifier not found: {path}")
    shards = _shard_files(path)
    if shards is not None:
        files, template = shards
        parts = []
        for f in files:
            obj, is_mapped = _load(f, mapped)
            parts.append((_shard_weight(f, obj), is_mapped))
        dims = {p.shape[1] for p, _ in parts}
        if len(dims) != 1:
            raise KDPluginError(f"{path}: shards disagree on the embedding size: {[tuple(p.shape) for p, _ in parts]}")
        return parts, f"{len(files)} shards {template.format('{r}')} of " + "+".join(str(len(p)) for p, _ in parts) \
            + " classes"
    if os.path.isfile(path):
        obj, is_mapped = _load(path, mapped)
        return [(_single_file_weight(path, obj), is_mapped)], "a single file"
    raise KDPluginError(f"{path}: no classifier shards (checkpoint_gpu_{{r}}.pt or rank_{{r}}_softmax_weight.pt) "
                        f"in this folder; pass the folder of the teacher's run or a single classifier file")


def _check_shape(path: str, shape: tuple[int, int], what: str, num_classes: int | None,
                 embedding_size: int | None) -> None:
    if num_classes is not None and shape[0] != num_classes:
        raise KDPluginError(f"{path}: the teacher classifier has {shape[0]} classes ({what}) but the dataset "
                            f"has {num_classes} (num_classes): the shards do not cover this dataset (insightface issue "
                            f"#2056). Use the matching dataset, or estimate the centres from the teacher instead: "
                            f"kd-plugin centres --teacher SPEC --data train.rec --out centres.pt")
    if embedding_size is not None and shape[1] != embedding_size:
        raise KDPluginError(f"{path}: the teacher classifier has embedding size {shape[1]} but the student's "
                            f"is {embedding_size} (embedding_size); ProxylessKD needs them equal")


def read_classifier(path: str, num_classes: int | None = None, embedding_size: int | None = None) -> torch.Tensor:
    """The teacher's full (num_classes, embedding_size) float32 class-centre matrix from any supported layout;
    checks the class count and dimension when given and says exactly what disagrees."""
    path = os.fspath(path)
    parts, what = _sources(path, mapped=False)
    weight = torch.cat([p for p, _ in parts]).float() if len(parts) > 1 else parts[0][0].float()
    _check_shape(path, tuple(weight.shape), what, num_classes, embedding_size)
    return weight.contiguous()


_ROWS_PER_CHUNK = 1024
_libc = None


def _release(rows: torch.Tensor) -> None:
    """Drop the file pages behind memory-mapped `rows` from this process (they are re-read if touched again):
    without it a mapped read leaves every page it touched resident. Whole pages inside the rows' span only; a no-op
    where madvise is unavailable. Only for tensors mapped read-only from a file: on ordinary memory it would zero it."""
    global _libc
    if rows.numel() == 0:
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        first = rows.data_ptr()
        span = rows.element_size() * (1 + sum((n - 1) * st for n, st in zip(rows.shape, rows.stride())))
        start, end = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE, (first + span) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def copy_rows(source: torch.Tensor, out: torch.Tensor, normalize: bool, mapped: bool = False) -> torch.Tensor:
    """`out[:] = source` (optionally each row L2-normalised in float32), a chunk of rows at a time, so no full-size
    float32 copy exists beside `out`; a `mapped` source (memory-mapped from a file) gives its pages back after each
    chunk."""
    for a in range(0, len(source), _ROWS_PER_CHUNK):
        rows = source[a:a + _ROWS_PER_CHUNK]
        chunk = rows.float()
        out[a:a + len(chunk)] = F.normalize(chunk, dim=1) if normalize else chunk
        if mapped:
            _release(rows)
    return out


def read_classifier_rows(path: str, start: int, count: int, dtype: torch.dtype = torch.float32,
                         normalize: bool = False, num_classes: int | None = None,
                         embedding_size: int | None = None) -> torch.Tensor:
    """Rows start..start+count of the teacher's classifier, in `dtype` (each row L2-normalised with `normalize`),
    read without holding the rest: the files are memory-mapped and only the shards overlapping the range are read."""
    path = os.fspath(path)
    parts, what = _sources(path, mapped=True)
    total, dim = sum(len(p) for p, _ in parts), parts[0][0].shape[1]
    _check_shape(path, (total, dim), what, num_classes, embedding_size)
    if not 0 <= start <= start + count <= total:
        raise KDPluginError(f"{path}: rows {start}..{start + count} asked of a classifier with {total} classes")
    out = torch.empty(count, dim, dtype=dtype)
    first = 0
    for part, is_mapped in parts:
        lo, hi = max(start, first), min(start + count, first + len(part))
        if lo < hi:
            copy_rows(part[lo - first:hi - first], out[lo - start:hi - start], normalize, is_mapped)
        first += len(part)
    return out


def save_classifier(weight: torch.Tensor, out: str, **metadata: object) -> None:
    """Write a (C, d) classifier as `{"weight": float32 (C, d), "num_classes", "embedding_size", ...}`, atomically."""
    weight = weight.detach().float().cpu().contiguous()
    payload = {"weight": weight, "num_classes": int(weight.shape[0]), "embedding_size": int(weight.shape[1])}
    payload.update({k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool))})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_torch(payload, out)


def _slice_paths(folder: str, rank: int) -> tuple[str, str]:
    return (os.path.join(folder, f"rank_{rank}_softmax_weight.pt"),
            os.path.join(folder, f"rank_{rank}_softmax_weight.json"))


def save_class_slices(part: ClassSlice, folder: str, rank: int, world_size: int, meta: dict) -> None:
    """Each rank writes its rows as `rank_{r}_softmax_weight.pt` (the model zoo's shard layout, which
    `read_classifier_rows` reads for any number of ranks) and then `rank_{r}_softmax_weight.json`: `meta` plus the
    part's rank, class range and byte size, the mark of a complete part. Each rank writes and later reads only its own
    part, so the folder may be node-local (call it on every rank: it ends with a barrier)."""
    from kd_plugin.distributed import barrier

    os.makedirs(folder, exist_ok=True)
    shard, part_meta = _slice_paths(folder, rank)
    save_torch(part.rows.detach().contiguous(), shard)
    write_json({**meta, "rank": rank, "start": int(part.start), "rows": len(part.rows),
                "bytes": os.path.getsize(shard)}, part_meta)
    barrier()
    if rank == 0:
        for stale in glob.glob(os.path.join(folder, "rank_*_softmax_weight.*")):  # left by a run with more ranks
            if int(re.search(r"rank_(\d+)_", os.path.basename(stale)).group(1)) >= world_size:
                os.remove(stale)
    barrier()


def saved_class_slice(folder: str, rank: int, meta: dict) -> ClassSlice | None:
    """This rank's part written by `save_class_slices` with this `meta` (which names the world size), when it is
    complete (its meta and byte size match); else None."""
    shard, part_meta = _slice_paths(folder, rank)
    try:
        with open(part_meta, encoding="utf-8") as f:
            saved = json.load(f)
        recorded = {k: saved.pop(k) for k in ("rank", "start", "rows", "bytes")}
        if saved != json.loads(json.dumps(meta)) or recorded["rank"] != rank or \
                os.path.getsize(shard) != recorded["bytes"]:
            return None
        rows = safe_torch_load(shard)
    except (OSError, ValueError, KeyError, KDPluginError):
        return None
    if not isinstance(rows, torch.Tensor) or tuple(rows.shape[:1]) != (recorded["rows"],):
        return None
    return ClassSlice(int(recorded["start"]), rows)
