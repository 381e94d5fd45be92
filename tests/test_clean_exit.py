"""A rank exits cleanly while gloo's worker threads are still busy with a work launched during backward (the cause
of the SIGABRTs of the multi-process hook tests: kd_plugin.distributed, 'a clean exit with gloo'), and the test
helpers report a failing rank with its exit code and last lines."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from processes import assert_every_rank_ok, exit_codes, rank_output, torchrun

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("world", [2])
def test_a_rank_exits_0_while_a_gloo_worker_is_still_busy_with_a_backward_work(tmp_path, world):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = torchrun(world, tmp_path / "logs", os.path.join(HERE, "programs", "exit_while_gloo_works.py"), env=env,
                    timeout=300)
    assert_every_rank_ok(proc, tmp_path / "logs", world)
    for rank in range(world):
        assert f"rank {rank}: backward done" in rank_output(tmp_path / "logs", rank)
        assert "terminate called" not in rank_output(tmp_path / "logs", rank, "stderr")


def test_settle_returns_at_once_without_gloo_threads_and_waits_for_a_busy_one():
    """In a fresh process: no gloo thread -> settled; a 1-rank gloo group whose worker spins 0.5 s in a completion
    callback -> settle_gloo_workers waits for it (and returns True)."""
    script = (
        "import time, torch, torch.distributed as dist\n"
        "from kd_plugin.distributed import settle_gloo_workers, _gloo_worker_states\n"
        "t = time.monotonic(); assert settle_gloo_workers() and time.monotonic() - t < 1.0\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
        "def spin(f):\n    end = time.monotonic() + 0.5\n    while time.monotonic() < end: pass\n"
        "x = torch.ones(2); f = dist.all_reduce(x, async_op=True).get_future(); f.then(spin); f.wait()\n"
        "t = time.monotonic(); assert settle_gloo_workers(timeout=10)\n"
        "waited = time.monotonic() - t\n"
        "assert len(_gloo_worker_states()) >= 1 and all(s == 'S' for s in _gloo_worker_states())\n"
        "print('waited', waited)\n"
        "dist.destroy_process_group()\n")
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("thread states come from /proc (Linux only); elsewhere settle waits a fixed 10 ms")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    waited = float(proc.stdout.split()[-1])
    assert waited > 0.2, f"settle returned after {waited:.3f}s while the worker was still spinning"


def test_a_failing_rank_is_reported_with_its_exit_code_and_last_lines(tmp_path):
    program = tmp_path / "fails_on_rank_1.py"
    program.write_text("import os, sys\nrank = int(os.environ['RANK'])\nprint(f'rank {rank} says hello', flush=True)\n"
                       "if rank == 1:\n    print('the reason rank 1 stops', file=sys.stderr, flush=True)\n"
                       "    os.abort()\n")
    proc = torchrun(2, tmp_path / "logs", str(program), timeout=120)
    assert exit_codes(proc.stdout + proc.stderr).get(1) == -6
    with pytest.raises(AssertionError) as failure:
        assert_every_rank_ok(proc, tmp_path / "logs", 2)
    message = str(failure.value)
    assert "rank 1: exit code -6 (SIGABRT)" in message and "the reason rank 1 stops" in message
    assert "rank 1 says hello" in message
