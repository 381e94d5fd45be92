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
    proc = torchrun(world, tmp_path / "logs", os.path.join(HERE, "programs", "exit_while_gloo_works.py"),
                    str(tmp_path), env=env, timeout=300)
    assert_every_rank_ok(proc, tmp_path / "logs", world)
    for rank in range(world):
        assert f"rank {rank}: backward done" in rank_output(tmp_path / "logs", rank)
        assert "terminate called" not in rank_output(tmp_path / "logs", rank, "stderr")


def test_settle_waits_for_consecutive_quiet_polls_and_gives_up_at_its_timeout(monkeypatch):
    """The wait's rule on scripted thread states: settled after `quiet_polls` polls in a row with every gloo worker
    asleep ('S'); a runnable one ('R') starts the count again; never quiet -> False after the timeout."""
    from kd_plugin import distributed

    def scripted(states):
        polls = iter(states)
        seen = []

        def states_now():
            seen.append(1)
            return next(polls, ["S", "S"])
        return states_now, seen

    fake, seen = scripted([[], []])  # no gloo thread at all: quiet from the start
    monkeypatch.setattr(distributed, "_gloo_worker_states", fake)
    assert distributed.settle_gloo_workers(quiet_polls=5, interval=0) and len(seen) == 5
    fake, seen = scripted([["S", "S"], ["S", "R"], ["S", "S"], ["R", "S"]])  # busy at polls 2 and 4
    monkeypatch.setattr(distributed, "_gloo_worker_states", fake)
    assert distributed.settle_gloo_workers(quiet_polls=5, interval=0) and len(seen) == 4 + 5
    monkeypatch.setattr(distributed, "_gloo_worker_states", lambda: ["R"])
    assert distributed.settle_gloo_workers(timeout=0.05, quiet_polls=5, interval=0.001) is False


def test_the_gloo_worker_threads_are_found_by_name_in_this_process():
    """The real /proc reading: a 1-rank gloo group in a fresh process shows its worker threads, asleep when idle."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("thread states come from /proc (Linux only); elsewhere the wait is a fixed 10 ms")
    script = ("import torch, torch.distributed as dist\n"
              "from kd_plugin.distributed import _gloo_worker_states, settle_gloo_workers\n"
              "assert _gloo_worker_states() == []\n"
              "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
              "x = torch.ones(2); dist.all_reduce(x)\n"
              "assert settle_gloo_workers(timeout=30)\n"
              "states = _gloo_worker_states()\n"
              "assert len(states) >= 1 and set(states) == {'S'}, states\n"
              "print('workers', len(states))\n"
              "dist.destroy_process_group()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "workers" in proc.stdout, proc.stderr[-3000:]


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
