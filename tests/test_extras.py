"""onnxruntime and matplotlib are extras (kd_plugin[onnx], kd_plugin[bench]): the core install does not pull them,
nothing imports them until a path needs one, and that path names the extra to install."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys

import pytest

from conftest import shared
from kd_plugin.extras import MissingExtra

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_core_install_leaves_them_to_their_extras():
    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, "setup.cfg"))
    core = setup["options"]["install_requires"].split()
    extras = setup["options.extras_require"]
    assert "onnxruntime" not in core and "matplotlib" not in core and "onnx" in core
    assert extras["onnx"].split() == ["onnxruntime"] and extras["bench"].split() == ["matplotlib"]


def test_training_and_the_check_import_without_them():
    code = ("import sys\nsys.modules['onnxruntime'] = None\nsys.modules['matplotlib'] = None\n"
            "import kd_plugin.cli, kd_plugin.check, kd_plugin.demo, kd_plugin.run.train, kd_plugin.run.hook\n"
            "import kd_plugin.benchmarks.celeba, kd_plugin.export, kd_plugin.teachers.onnx_embedder\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_each_path_that_needs_one_names_its_extra(monkeypatch, tmp_path):
    from kd_plugin.benchmarks import budget
    from kd_plugin.export import export_onnx
    from kd_plugin.networks import create_network
    from kd_plugin.teachers import load_embedder

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    teacher = str(shared("teachers", "mobilefacenet_ms1m", "mobilefacenet_dynamic.onnx"))
    with pytest.raises(MissingExtra, match=r"the ONNX teacher .*mobilefacenet_dynamic.onnx needs onnxruntime, which is "
                                           r"not installed: pip install 'kd_plugin\[onnx\]'"):
        load_embedder(teacher, onnx_on_cpu="onnxruntime")
    with pytest.raises(MissingExtra, match=r"kd-plugin export .*needs onnxruntime.*kd_plugin\[onnx\]"):
        export_onnx(create_network("cpu_r8", 32).eval(), str(tmp_path / "student.onnx"))
    assert not (tmp_path / "student.onnx").exists()
    with pytest.raises(MissingExtra, match=r"the benchmark's plot needs matplotlib.*kd_plugin\[bench\]"):
        budget.plot({"rows": {}}, str(tmp_path / "budget.png"))
    from kd_plugin.benchmarks import celeba

    with pytest.raises(MissingExtra, match=r"kd-plugin bench celeba \(its plots, drawn at the end\) needs matplotlib"):
        celeba.main(["--out", str(tmp_path / "bench")])  # before any training
    assert not (tmp_path / "bench").exists()
