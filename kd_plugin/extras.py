"""The optional parts of kd_plugin and the packages they need, installed as extras:

- `kd_plugin[onnx]` (onnxruntime): ONNX teachers (the converted teacher is checked against onnxruntime; on a CPU
  an ONNX teacher may run in it) and `kd-plugin export` (the written file is checked against torch). Beside a GPU
  insightface, which has `onnxruntime-gpu`, install nothing: that package provides `onnxruntime` too, and the CPU
  wheel installed next to it can take the CUDA execution provider away from both.
- `kd_plugin[bench]` (matplotlib): the benchmarks' plots.

A path that needs a missing one stops with `MissingExtra`, naming the extra to install."""

from __future__ import annotations

import importlib

from kd_plugin.errors import KDPluginError

EXTRAS = {"onnxruntime": ("onnx", "onnxruntime, or onnxruntime-gpu where it is installed already"),
          "matplotlib": ("bench", "matplotlib")}


class MissingExtra(KDPluginError, ImportError):
    """A package an optional part of kd_plugin needs is not installed."""


def import_extra(module: str, needed_for: str):
    """`module` imported, or MissingExtra naming the extra that installs it and what needs it."""
    extra, provides = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{needed_for} needs {module}, which is not installed: pip install 'kd_plugin[{extra}]' "
                           f"(it provides {provides})") from exc
