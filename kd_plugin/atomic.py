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
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_torch(obj: Any, path: str) -> None:
    """`torch.save(obj, path)`, atomically."""
    import torch

    with replacing(path) as tmp:
        torch.save(obj, tmp)


def write_json(obj: Any, path: str, **dump_options) -> None:
    """`json.dump(obj)` to `path`, atomically."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, **dump_options)
