"""onnxruntime and matplotlib are extras (kd_plugin[onnx], kd_plugin[bench]): the core install does not pull them,
nothing imports them until a path needs one, and that path names the extra to install."""

from __future__ import annotations

import configparser
import os
import shutil
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


def _stand_in_torch_wheel(folder) -> str:
    """A metadata-only `torch 2.5.0` wheel: what pip sees of a user's own (CUDA) torch that meets the floor."""
    import base64
    import hashlib
    import zipfile

    files = {"torch/__init__.py": "__version__ = '2.5.0'\n",
             "torch-2.5.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: torch\nVersion: 2.5.0\n",
             "torch-2.5.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: kd_plugin tests\nRoot-Is-Purelib: true\n"
                                            "Tag: py3-none-any\n"}

    def digest(text: str) -> str:
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
    path = os.path.join(folder, "torch-2.5.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        wheel.writestr("torch-2.5.0.dist-info/RECORD", "".join(f"{n},{digest(t)},{len(t.encode())}\n"
                                                               for n, t in files.items())
                       + "torch-2.5.0.dist-info/RECORD,,\n")
    return path


def test_installing_kd_plugin_keeps_the_torch_already_there(tmp_path):
    """pip's plan for `pip install .[onnx]` into a venv that holds another torch meeting the floor: torch is kept."""
    import json

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", _stand_in_torch_wheel(str(tmp_path))], check=True, capture_output=True)
    source = tmp_path / "source"  # a copy: building the metadata writes into the source folder
    shutil.copytree(os.path.join(ROOT, "kd_plugin"), source / "kd_plugin",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    report = tmp_path / "plan.json"
    out = subprocess.run([*pip, "install", "--dry-run", "--report", str(report), f"{source}[onnx]"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    planned = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "kd_plugin" in planned or "kd-plugin" in planned
    assert "torch" not in planned and "onnxruntime" in planned, sorted(planned)
