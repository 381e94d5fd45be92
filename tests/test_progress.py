"""Long commands show progress when their output is not a terminal (CI, nohup): plain lines, flushed."""

from __future__ import annotations

import subprocess
import sys

import torch

from test_train import TinyStudent, make_faces


def test_centres_progress_reaches_a_pipe(tmp_path):
    data = make_faces(tmp_path / "faces", identities=4, per_identity=3)
    torch.save(TinyStudent(16).state_dict(), tmp_path / "t.pth")
    code = ("import sys; sys.path.insert(0, " + repr(str(__import__('pathlib').Path(__file__).parent)) + ")\n"
            "import test_train; test_train.ensure_registered()\n"
            "from kd_plugin.cli import main\n"
            f"sys.exit(main(['centers', '--teacher', 'test_tiny:{tmp_path / 't.pth'}', '--data', '{data}', "
            f"'--out', '{tmp_path / 'c.pt'}', '--batch-size', '4']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)  # pipes
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("estimating centres")]
    assert lines and lines[-1].split(": ", 1)[1].startswith("12/12 (100%)") and "img/s" in lines[-1]
