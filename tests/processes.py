"""Start a program under torchrun for a test and check every rank's exit: the one place the tests launch torchrun.

`torchrun(...)` runs `python -m torch.distributed.run --standalone` (its own free port: no two tests race for one)
with each rank's stdout and stderr written to `<log_dir>/.../<rank>/{stdout,stderr}.log` (`rank_output` reads
them); `assert_every_rank_ok` fails with each failing rank's exit code (and the signal that killed it) and the last
lines that rank wrote."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys

TAIL_LINES = 40


def record_spawn(world: int) -> None:
    """With KD_TEST_RECORD_SPAWNS=<file>, append the running test's id when it starts 2+ processes (the list the
    stress loop of docs/development.md reruns)."""
    record, test = os.environ.get("KD_TEST_RECORD_SPAWNS"), os.environ.get("PYTEST_CURRENT_TEST", "")
    if record and world >= 2 and test:
        with open(record, "a", encoding="utf-8") as f:
            f.write(test.rsplit(" (", 1)[0] + "\n")


def torchrun_command(world: int, log_dir: str, *program: str, python: str = sys.executable) -> list[str]:
    """The launcher's command line: `program` (a script and its arguments) on `world` local processes."""
    record_spawn(world)
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
            "--log-dir", str(log_dir), "--redirects", "3", *program]


def torchrun(world: int, log_dir, *program: str, cwd=None, env=None, timeout: float = 600,
             ) -> subprocess.CompletedProcess:
    """Run `program` on `world` processes; returns the launcher's completed process (output captured)."""
    os.makedirs(log_dir, exist_ok=True)
    return subprocess.run(torchrun_command(world, str(log_dir), *program), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _rank_logs(log_dir) -> dict[int, dict[str, str]]:
    """{rank: {"stdout": path, "stderr": path}} of the newest attempt under `log_dir`."""
    logs: dict[int, dict[str, str]] = {}
    for path in sorted(glob.glob(os.path.join(str(log_dir), "**", "*.log"), recursive=True), key=os.path.getmtime):
        rank, stream = os.path.basename(os.path.dirname(path)), os.path.splitext(os.path.basename(path))[0]
        if rank.isdigit() and stream in ("stdout", "stderr"):
            logs.setdefault(int(rank), {})[stream] = path
    return logs


def rank_output(log_dir, rank: int, stream: str = "stdout") -> str:
    """What `rank` wrote to `stream` in the newest run under `log_dir` ("" when it wrote nothing)."""
    path = _rank_logs(log_dir).get(rank, {}).get(stream)
    if path is None:
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _tail(path: str, lines: int = TAIL_LINES) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        kept = [line for line in f.read().splitlines() if "Warning" not in line and line.strip()]
    return "\n".join(kept[-lines:])


def exit_codes(output: str) -> dict[int, int]:
    """Each failed rank's exit code, read from torchrun's failure summary (`rank : N ...` then `exitcode : X`)."""
    found = re.findall(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", output)
    return {int(rank): int(code) for rank, code in found}


def _signal_name(code: int) -> str:
    if code >= 0:
        return ""
    try:
        return f" ({signal.Signals(-code).name})"
    except ValueError:
        return ""


def assert_every_rank_ok(proc: subprocess.CompletedProcess, log_dir, world: int) -> None:
    """The launcher and every one of the `world` ranks exited 0; otherwise fail with each failing rank's exit code
    and its last lines (the root cause first, as torchrun orders its summary)."""
    if proc.returncode == 0:
        return
    output = (proc.stdout or "") + (proc.stderr or "")
    codes, logs = exit_codes(output), _rank_logs(log_dir)
    report = [f"torchrun exited {proc.returncode} ({world} ranks)"]
    for rank in sorted(codes, key=lambda r: (codes[r] == -signal.SIGTERM, r)):  # ranks torchrun stopped go last
        report.append(f"--- rank {rank}: exit code {codes[rank]}{_signal_name(codes[rank])}; its last lines:")
        for stream in ("stderr", "stdout"):
            if stream in logs.get(rank, {}):
                report.append(f"[{stream}]\n" + _tail(logs[rank][stream]))
    if not codes:  # the launcher itself failed (bad arguments, rendezvous): its own output
        report.append(output[-6000:])
    raise AssertionError("\n".join(report))
