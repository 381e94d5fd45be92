"""Shared fixtures: where the real data lives, and small synthetic face folders."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(os.environ.get("KD_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()
TEACHER_DIR = SHARED_DATA / "teachers" / "mobilefacenet_ms1m"


def shared(*parts: str) -> Path:
    """Path of a file under ../shared/data; skips the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data not available: {path} is missing (tests read ../shared/data in place)")
    return path


def assert_within_one_float16_unit(a, b) -> None:
    """Equal up to one float16 unit in the last place: what a teacher's fp16 output guarantees when the same image is
    embedded in batches of different composition (another rank count, batch size or thread count)."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape
    unit = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
    worst = np.abs(a - b) - unit
    assert (worst <= 0).all(), f"{int((worst > 0).sum())} values differ by more than one float16 unit"


def jpeg_bytes(seed: int, size: int = 112) -> bytes:
    """A deterministic random-looking JPEG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ImageFolder tree with 3 identities of 2, 3 and 4 images."""
    root = tmp_path / "faces"
    seed = 0
    for ident, count in (("alice", 2), ("bob", 3), ("carol", 4)):
        (root / ident).mkdir(parents=True)
        for k in range(count):
            (root / ident / f"{k:03d}.jpg").write_bytes(jpeg_bytes(seed))
            seed += 1
    return root
