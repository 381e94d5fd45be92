"""`kd-plugin demo --quick`: the README's main job, end to end, in seconds."""

from __future__ import annotations

import json

from kd_plugin.cli import main


def test_quick_demo_trains_every_method_and_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = json.loads(out.strip().splitlines()[-1])
    assert set(table) == {"teacher", "none", "proxyless", "ekd", "proxyless+ekd", "seconds"}
    assert all(0.0 <= table[m]["auc"] <= 1.0 for m in ("teacher", "none", "proxyless", "ekd", "proxyless+ekd"))
    assert "| proxyless+ekd |" in out
    for folder in ("teacher", "none", "proxyless", "ekd", "proxyless_ekd"):
        assert (tmp_path / folder / "model.pt").exists() and (tmp_path / folder / "checkpoint_gpu_0.pt").exists()
    assert (tmp_path / "teacher_cache" / "meta.json").exists() and (tmp_path / "data" / "train" / "train.rec").exists()
