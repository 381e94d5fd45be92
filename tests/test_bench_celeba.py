"""`kd-plugin bench celeba`: the pipeline end to end on small synthetic stand-ins (any machine), the summary's
arithmetic and the table's honesty. The real benchmark (about 27 minutes on 2 cores) is run by hand; see the README."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import jpeg_bytes
from kd_plugin.benchmarks.celeba import main
from kd_plugin.benchmarks.celeba_report import markdown_table, summarise
from kd_plugin.export import export_onnx
from kd_plugin.networks.demo import demo_teacher


def _folder(root, identities, per_identity, offset):
    for i in range(identities):
        os.makedirs(root / f"id{i:02d}", exist_ok=True)
        for k in range(per_identity):
            (root / f"id{i:02d}" / f"{k}.jpg").write_bytes(jpeg_bytes(offset + i * 100 + k))
    return root


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """6 training identities, 8 evaluation identities, a 20-pair .bin and a small ONNX teacher."""
    root = tmp_path_factory.mktemp("bench")
    train = _folder(root / "train", 6, 8, 0)
    val = _folder(root / "val", 8, 8, 10_000)  # 1,792 negative pairs: TPR at FPR 1e-3 is defined
    images = [jpeg_bytes(20_000 + i) for i in range(40)]
    with open(root / "val.bin", "wb") as f:
        pickle.dump((images, [i % 2 == 0 for i in range(20)]), f)
    torch.manual_seed(0)
    teacher = str(root / "teacher.onnx")
    export_onnx(demo_teacher(128).eval(), teacher)
    return {"train": str(train), "val": str(val), "bin": str(root / "val.bin"), "teacher": teacher}


def _run(stand_ins, out, capsys):
    argv = ["--train", stand_ins["train"], "--val", stand_ins["val"], "--bin", stand_ins["bin"],
            "--teacher", stand_ins["teacher"], "--num-classes", "6", "--out", str(out), "--epochs", "1",
            "--batch-size", "8", "--identities", "2", "--images-per-identity", "2", "--workers", "0",
            "--methods", "student,l2,proxyless+ekd", "--seeds", "2", "--budgets", "1,2", "--budget-methods", "l2",
            "--json"]
    assert main(argv) == 0
    return capsys.readouterr().out


def test_the_benchmark_runs_end_to_end_and_reuses_finished_runs(stand_ins, tmp_path, capsys):
    out = tmp_path / "bench"
    stdout = _run(stand_ins, out, capsys)
    result = json.loads(stdout.strip().splitlines()[-1])
    assert set(result["teacher"]) == {"accuracy", "tpr@1e-2", "tpr@1e-3"}
    # student, the best (only) baseline and proxyless+ekd get 2 seeds; each figure is one value per seed
    assert list(result["methods"]) == ["student", "l2", "proxyless+ekd"]
    for entry in result["methods"].values():
        assert entry["seeds"] == [0, 1]
        for key in ("accuracy", "tpr@1e-2", "tpr@1e-3", "cross_tpr@1e-3", "epoch_seconds"):
            assert len(entry[key]) == 2 and all(isinstance(v, float) for v in entry[key]), key
        assert all(s > 0 for s in entry["epoch_seconds"])  # from the trainer's per-epoch log lines
    assert result["methods"]["student"]["gap_closed@1e-3"] == 0.0
    for method in ("l2", "proxyless+ekd"):  # the paired difference to the student alone, with its interval
        paired = result["methods"][method]["vs_student@1e-3"]
        low, high = paired["ci95"]
        assert low <= high and set(paired) == {"diff", "ci95"}
        student, this = (np.mean(result["methods"][m]["tpr@1e-3"]) for m in ("student", method))
        assert paired["diff"] == pytest.approx(this - student)
    assert "vs_student@1e-3" not in result["methods"]["student"]
    for method in ("student", "l2", "proxyless+ekd"):
        for seed in (0, 1):
            folder = out / method / f"seed{seed}"
            assert (folder / "model.pt").is_file() and (folder / "model.onnx").is_file()
    assert (out / "tpr_fpr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "student" / "seed0" / "result.json").read_text())
    curve = {f: t for f, t in record["curve"] if t is not None}
    assert curve[1e-3] == record["tpr@1e-3"] and curve[1e-2] == record["tpr@1e-2"]
    assert list(curve.values()) == sorted(curve.values())  # TPR never falls as the FPR grows
    assert "| proxyless+ekd | 2 |" in (out / "results.md").read_text()
    assert "| teacher (teacher.onnx) |" in (out / "results.md").read_text()  # the teacher it was given
    # the budget curve: the table's runs are its first budget (every seed), each other budget trains its rows once
    budget = json.loads((out / "budget.json").read_text())
    assert budget == result["budget"] and budget["budgets"] == [1, 2] and set(budget["rows"]) == {"student", "l2"}
    for row in ("student", "l2"):
        first, second = budget["rows"][row]["1"], budget["rows"][row]["2"]
        assert first["tpr@1e-3"] == pytest.approx(np.mean(result["methods"][row]["tpr@1e-3"]))
        assert (first["seeds"], second["seeds"], second["images"]) == (2, 1, 2 * first["images"])
        record = json.loads((out / "epochs2" / row / "seed0" / "result.json").read_text())
        assert record["settings"]["epochs"] == 2 and record["tpr@1e-3"] == second["tpr@1e-3"]
    # l2's interval against the student at each budget: the table's at the first, its own runs' at the second
    assert budget["rows"]["l2"]["1"]["vs_student@1e-3"] == result["methods"]["l2"]["vs_student@1e-3"]
    low, high = budget["rows"]["l2"]["2"]["vs_student@1e-3"]["ci95"]
    assert low <= high and budget["rows"]["l2"]["2"]["vs_student@1e-3"]["diff"] == pytest.approx(
        budget["rows"]["l2"]["2"]["tpr@1e-3"] - budget["rows"]["student"]["2"]["tpr@1e-3"])
    assert (out / "budget.png").stat().st_size > 0 and "| l2 |" in (out / "budget.md").read_text()
    # run again: every finished run is reused, the figures are the same
    stdout = _run(stand_ins, out, capsys)
    again = json.loads(stdout.strip().splitlines()[-1])
    assert again["methods"] == result["methods"] and again["budget"] == budget and "training" not in stdout


def test_views_rows_share_one_teacher_view_cache(stand_ins, tmp_path, capsys):
    out = tmp_path / "views"
    argv = ["--train", stand_ins["train"], "--val", stand_ins["val"], "--bin", stand_ins["bin"],
            "--teacher", stand_ins["teacher"], "--out", str(out), "--epochs", "1", "--batch-size", "8",
            "--identities", "2", "--images-per-identity", "2", "--workers", "0", "--resamples", "0",
            "--methods", "l2@views,cosine@views", "--seeds", "1", "--views-mixed-labels", "drop"]
    assert main(argv) == 0
    first, second = (json.loads((out / row / "seed0" / "result.json").read_text())
                     for row in ("l2_at_views", "cosine_at_views"))
    assert first["teacher_rows"] > 0 and second["teacher_rows"] == 0  # the second row read every view from the cache
    assert first["settings"]["views"] == {"crop": 0.8, "mixup": 0.5, "seed": 0}
    parts = list((out / "teacher_views_crop0.8_mixup0.5").glob("epoch_0000.*.filled.npy"))
    assert len(parts) == 1 and np.load(parts[0]).sum() == first["teacher_rows"]  # one writer: the first row's run
    with pytest.raises(Exception, match=r"row 'proxyless@views': '@views' with --views-mixed-labels drop feeds the "
                                        r"mixed images to the label-free terms only.*--views-mixed-labels mix"):
        main(argv[:-6] + ["--methods", "proxyless@views", "--views-mixed-labels", "drop"])
    # with mixed labels (the default) the head takes the mixed images: a row without a label-free term runs; aligned
    # shifted views have their own teacher-view cache
    assert main(argv[:-6] + ["--methods", "adadistill@views", "--views-crop", "1", "--views-shift", "2"]) == 0
    mixed = json.loads((out / "adadistill_at_views" / "seed0" / "result.json").read_text())
    assert mixed["settings"]["views"] == {"crop": 1.0, "mixup": 0.5, "shift": 2, "mixed_labels": "mix", "seed": 0}
    assert mixed["teacher_rows"] > 0 and list((out / "teacher_views_crop1_mixup0.5_shift2").glob("epoch_0000.*"))
    assert "no crop, shift 2 px, 50% of the samples mixed and seen in the head" in (out / "results.md").read_text()


def test_the_budget_curve_measures_each_budget_against_the_student_of_that_budget():
    from kd_plugin.benchmarks.budget import curve, markdown

    def record(method, tpr, images, seed=0):
        return {"method": method, "tpr@1e-3": tpr, "images": images, "seed": seed}

    records = {6: [record("student", 0.1, 600), record("student", 0.2, 600, 1), record("ada", 0.45, 600)],
               12: [record("student", 0.3, 1200), record("ada", 0.5, 1200)]}
    result = curve(records, teacher_tpr=0.8)
    assert result["rows"]["student"]["6"] == {"tpr@1e-3": pytest.approx(0.15), "gap_closed@1e-3": 0.0,
                                              "images": 600, "seeds": 2}
    assert result["rows"]["ada"]["6"]["gap_closed@1e-3"] == pytest.approx(0.3 / 0.65)
    assert result["rows"]["ada"]["12"]["gap_closed@1e-3"] == pytest.approx(0.2 / 0.5)  # the 12-epoch student's gap
    assert "| ada | 0.450 (46%) | 0.500 (40%) |" in markdown(result)
    # each budget's paired interval against the student of that budget goes with its point (none for the student)
    paired = {6: {"ada": {"diff": 0.3, "ci95": [0.1, 0.5]}}, 12: {"ada": {"diff": 0.2, "ci95": [-0.05, 0.4]}}}
    result = curve(records, teacher_tpr=0.8, intervals=paired)
    assert result["rows"]["ada"]["12"]["vs_student@1e-3"] == paired[12]["ada"]
    assert "vs_student@1e-3" not in result["rows"]["student"]["12"]
    assert "| ada | 0.450 (46%; +0.300 [+0.100, +0.500]) | 0.500 (40%; +0.200 [-0.050, +0.400]) |" in markdown(result)


@pytest.mark.parametrize("budgets", ["6,6", "0,6", "six"])
def test_budgets_that_are_not_distinct_positive_epoch_counts_are_refused(budgets, capsys):
    with pytest.raises(SystemExit):
        main(["--budgets", budgets])
    assert "expected distinct positive epoch counts like 6,12,24" in capsys.readouterr().err or budgets == "six"


def test_curve_points_are_distinct_figures():
    """The evaluation keys TPRs by the FPR at one significant digit: two curve points must never share a key."""
    from kd_plugin.benchmarks.celeba import CURVE_FPRS
    from kd_plugin.evaluation import fpr_key

    assert len({fpr_key(f) for f in CURVE_FPRS}) == len(CURVE_FPRS)
    assert CURVE_FPRS[0] == 1e-4 and 1e-3 in CURVE_FPRS and 1e-2 in CURVE_FPRS


def _record(method, seed, tpr):
    return {"method": method, "seed": seed, "accuracy": 0.8, "tpr@1e-2": 0.5, "tpr@1e-3": tpr,
            "cross_tpr@1e-3": 0.1, "epoch_seconds": 10.0}


def test_gap_closed_and_an_honest_verdict():
    teacher = {"accuracy": 0.93, "tpr@1e-2": 0.86, "tpr@1e-3": 0.70}
    records = [_record("student", 0, 0.10), _record("student", 1, 0.12),  # mean 0.11, spread (std) 0.01
               _record("ekd", 0, 0.40), _record("ekd", 1, 0.42),
               _record("l2", 0, 0.115),
               _record("rkd", 0, 0.05)]
    summary = summarise(records, teacher)
    assert summary["methods"]["ekd"]["gap_closed@1e-3"] == pytest.approx((0.41 - 0.11) / (0.70 - 0.11))
    assert summary["methods"]["ekd"]["tpr@1e-3"] == [0.40, 0.42]
    table = markdown_table(summary, {"network": "n", "epochs": 1, "batch_size": 8, "identities": 2,
                                     "images_per_identity": 2, "optimizer": "sgd", "lr": 0.1, "margin": [1, 0.5, 0]})
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["ekd"].endswith("better (by more than twice the seed spread) |")
    assert rows["l2"].endswith("not clearly better (within twice the seed spread) |")
    assert rows["rkd"].endswith("does NOT beat the student alone |")
    assert "0.410 ± 0.010" in rows["ekd"]


def test_a_weight_override_applies_to_the_rows_with_that_term_only(stand_ins, tmp_path, capsys):
    out = tmp_path / "weights"
    argv = ["--train", stand_ins["train"], "--val", stand_ins["val"], "--bin", stand_ins["bin"],
            "--teacher", stand_ins["teacher"], "--out", str(out), "--epochs", "1", "--batch-size", "8",
            "--identities", "2", "--images-per-identity", "2", "--workers", "0", "--seeds", "1"]
    with pytest.raises(Exception, match=r"--weight cosine=...: no row of --methods has the term 'cosine'"):
        main(argv + ["--methods", "student,l2", "--weight", "cosine=8"])
    assert not out.exists()  # refused before anything ran
    assert main(argv + ["--methods", "student,cosine", "--weight", "cosine=8"]) == 0
    student, cosine = (json.loads((out / row / "seed0" / "result.json").read_text()) for row in ("student", "cosine"))
    assert "weights" not in student["settings"] and cosine["settings"]["weights"] == {"cosine": 8.0}
    epoch = json.loads((out / "cosine" / "seed0" / "train_log.jsonl").read_text().splitlines()[0])
    assert epoch["loss"] == pytest.approx(epoch["loss_head"] + 8.0 * epoch["loss_cosine"], rel=1e-5)
    # the student alone keeps its settings, so a run made without the override is reused beside the weighted row
    assert main(argv + ["--methods", "student", "--resamples", "0"]) == 0
    assert "student seed 0: reusing" in capsys.readouterr().out
