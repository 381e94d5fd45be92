"""Writes that are all or nothing: a crash (or a SIGKILL) leaves the old file or the new one, never half of one. The
temporary file sits beside the target (same file system, so the final `os.replace` is atomic) and carries the process
id, so ranks writing the same file at once do not write into each other's temporary."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """`with replacing(path) as tmp: write tmp` — then tmp replaces path; on an error tmp is removed, path untouched."""
    with replacing_all([path]) as tmp:
        yield tmp[path]


@contextlib.contextmanager
def replacing_all(paths: list[str]) -> Iterator[dict[str, str]]:
    """`replacing` for files written together: {path: tmp}; once all are written they replace their paths in the
    given order; on an error every tmp is removed and no path is touched."""
    tmp = {path: f"{path}.{os.getpid()}.tmp" for path in paths}
    try:
        yield tmp
    except BaseException:
        for name in tmp.values():
            with contextlib.suppress(OSError):
                os.remove(name)
        raise
    for path in paths:
        os.replace(tmp[path], path)


def save_torch(obj: Any, path: str) -> None:
    """`torch.save(obj, path)`, atomically."""
    import torch

    with replacing(path) as tmp:
        torch.save(obj, tmp)


def write_json(obj: Any, path: str, **dump_options) -> None:
    """`json.dump(obj)` to `path`, atomically."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, **dump_options)
