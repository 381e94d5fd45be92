"""Shared fixtures: where the real data lives, and small synthetic face folders."""

from __future__ import annotations

import io
import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # one torch thread per worker: 2 workers on 2 cores, not 4 threads
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KD_SHARED_DATA", REPO / ".." / "shared" / "data")).resolve()
TEACHER_DIR = SHARED_DATA / "teachers" / "mobilefacenet_ms1m"
CPU_HARNESS = (REPO / ".." / "shared" / "tools" / "arcface_torch_cpu").resolve()  # runs upstream's train_v2 on CPU
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The real arcface_torch: ARCFACE_TORCH_ROOT / ARCFACE_TORCH_PYTHON when set, else what `.ci/upstream-env` built in
# this clone (set here, before the test modules read them, so their subprocesses inherit them too)
for _variable, _local in (("ARCFACE_TORCH_ROOT", REPO / "upstream" / "arcface_torch"),
                          ("ARCFACE_TORCH_PYTHON", REPO / ".venv-upstream" / "bin" / "python")):
    if not os.environ.get(_variable) and _local.exists():
        os.environ[_variable] = str(_local)
if os.environ.get("KD_TEST_RECORD_SPAWNS"):  # list the tests that start 2+ processes (docs/development.md)
    import sys as _sys

    import torch.multiprocessing  # noqa: F401 (loads torch.multiprocessing.spawn)

    from processes import record_spawn as _record_spawn
    _spawn_module = _sys.modules["torch.multiprocessing.spawn"]
    _start_processes = _spawn_module.start_processes

    def _recorded_start_processes(fn, args=(), nprocs=1, *rest, **kwargs):
        _record_spawn(nprocs)
        return _start_processes(fn, args, nprocs, *rest, **kwargs)
    _spawn_module.start_processes = _recorded_start_processes
UPSTREAM_ROOT = os.environ.get("ARCFACE_TORCH_ROOT", "")
UPSTREAM_PYTHON = os.environ.get("ARCFACE_TORCH_PYTHON", "")


def pytest_collection_modifyitems(config, items):
    """The upstream train_v2 runs (one xdist group, the longest tests: minutes each) first, so one worker starts on
    them while the other takes the rest; collected late they used to finish alone, minutes after everything else."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)  # stable: the order otherwise kept


def missing(reason: str) -> None:
    """A test's input is absent: skip with the reason, but fail under CI=true, where ../shared and the upstream
    environment (.ci/run builds it) are always meant to be there."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing ../shared item or upstream environment fails the run)")
    pytest.skip(reason)


def shared(*parts: str) -> Path:
    """Path of a file under ../shared/data; skips the test with the reason when it is absent (fails under CI)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        missing(f"real test data not available: {path} is missing (tests read ../shared/data in place)")
    return path


@pytest.fixture
def needs_upstream_source() -> str:
    """arcface_torch's source folder (recognition/arcface_torch)."""
    if not os.path.isfile(os.path.join(UPSTREAM_ROOT, "partial_fc_v2.py")):
        missing("no arcface_torch checkout: run `bash .ci/upstream-env` (a copy of ../shared's), or set "
                "ARCFACE_TORCH_ROOT to recognition/arcface_torch of an insightface clone")
    return UPSTREAM_ROOT


@pytest.fixture
def needs_cpu_harness() -> Path:
    """../shared/tools/arcface_torch_cpu, which runs train_v2.py on CPU in strict device mode."""
    if not (CPU_HARNESS / "sitecustomize.py").is_file():
        missing(f"needs the CPU harness {CPU_HARNESS} (../shared/tools beside the repository)")
    return CPU_HARNESS


@pytest.fixture
def needs_upstream(needs_upstream_source, needs_cpu_harness) -> tuple[str, str]:
    """(arcface_torch's folder, a python that runs it: mxnet, numpy <= 1.23.5, kd_plugin installed)."""
    if not (os.path.isfile(os.path.join(UPSTREAM_ROOT, "train_v2.py")) and os.path.isfile(UPSTREAM_PYTHON)):
        missing("needs a python able to run arcface_torch: run `bash .ci/upstream-env`, or set ARCFACE_TORCH_PYTHON "
                "(e.g. the venv of ../shared/tools/arcface_torch_cpu/make_env.sh, kd_plugin installed in it)")
    return UPSTREAM_ROOT, UPSTREAM_PYTHON


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
