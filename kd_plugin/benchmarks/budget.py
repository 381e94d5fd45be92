"""The budget curve of `kd-plugin bench celeba --budgets 6,12,24`: the same rows trained for each number of epochs,
and how much of the teacher-student gap each closes as training grows.

At each budget a row's figure is its TPR@1e-3 on celeba/val (the mean over its seeds: the first budget has the
table's seeds, the others one), and its share of the gap closed is (row - student) / (teacher - student), with the
student alone trained for the same budget. `budget.json` holds {"teacher": TPR, "budgets": [...], "rows": {row:
{epochs: {"tpr@1e-3", "gap_closed@1e-3", "images", "seeds", "vs_student@1e-3"}}}}, the last being the paired
identity-bootstrap difference to that budget's student with its 95% interval ({"diff", "ci95": [low, high]}; absent
for the student and without resamples); `budget.png` draws the gap closed (and the TPR) against the image
presentations (steps x batch), one line per row."""

from __future__ import annotations

import numpy as np

from kd_plugin.benchmarks.celeba_report import gap_closed, mean_of, number
from kd_plugin.extras import import_extra


def parse_budgets(text: str) -> list[int]:
    """'6,12,24' -> [6, 12, 24]: distinct positive epoch counts, in the order given."""
    import argparse

    try:
        budgets = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epoch counts like 6,12,24, got {text!r}") from None
    if not budgets or min(budgets) < 1 or len(set(budgets)) != len(budgets):
        raise argparse.ArgumentTypeError(f"expected distinct positive epoch counts like 6,12,24, got {text!r}")
    return budgets


def curve(records_by_budget: dict[int, list[dict]], teacher_tpr: float,
          intervals: dict[int, dict[str, dict]] | None = None) -> dict:
    """budget.json's content from each budget's result records (the student's among them) and, where given, each
    budget's paired intervals ({budget: {row: {"diff", "ci95"}}}, as celeba_report.bootstrap_intervals returns)."""
    rows: dict[str, dict] = {}
    for budget, records in records_by_budget.items():
        tprs: dict[str, list[float]] = {}
        images: dict[str, int] = {}
        for record in records:
            tprs.setdefault(record["method"], []).append(record["tpr@1e-3"])
            images[record["method"]] = record["images"]
        student = mean_of(tprs.get("student", []))
        for row, values in tprs.items():
            mean = mean_of(values)
            point = {"tpr@1e-3": mean, "gap_closed@1e-3": gap_closed(mean, student, teacher_tpr),
                     "images": images[row], "seeds": len(values)}
            paired = (intervals or {}).get(budget, {}).get(row)
            if paired is not None:
                point["vs_student@1e-3"] = paired
            rows.setdefault(row, {})[str(budget)] = point
    return {"teacher": teacher_tpr, "budgets": list(records_by_budget), "rows": rows}


def markdown(result: dict) -> str:
    """Rows x budgets: TPR@1e-3, the share of the gap closed and, where measured, the difference to the student with
    its 95% interval."""
    budgets = [str(b) for b in result["budgets"]]
    lines = ["| row | " + " | ".join(f"{b} epochs: TPR@1e-3 (gap closed)" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for row, points in result["rows"].items():
        cells = []
        for b in budgets:
            point = points.get(b)
            if point is None:
                cells.append("-")
                continue
            gap = point["gap_closed@1e-3"]
            share = "reference" if row == "student" else "n/a" if gap is None else f"{gap:.0%}"
            paired = point.get("vs_student@1e-3")
            if paired is not None:
                low, high = paired["ci95"]
                share += f"; {paired['diff']:+.3f} [{low:+.3f}, {high:+.3f}]"
            cells.append(f"{number(point['tpr@1e-3'], 3)} ({share})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    """Gap closed (left) and TPR@1e-3 (right) against image presentations, one line per row."""
    matplotlib = import_extra("matplotlib", "the benchmark's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gap_ax, tpr_ax) = plt.subplots(1, 2, figsize=(12, 5))
    for index, (row, points) in enumerate(result["rows"].items()):
        ordered = sorted(points.values(), key=lambda p: p["images"])
        images, colour = [p["images"] for p in ordered], f"C{index}"  # one colour per row in both panels
        tpr_ax.plot(images, [np.nan if p["tpr@1e-3"] is None else p["tpr@1e-3"] for p in ordered], "o-", color=colour,
                    label=row)
        if row != "student":
            gap_ax.plot(images, [np.nan if p["gap_closed@1e-3"] is None else 100 * p["gap_closed@1e-3"]
                                 for p in ordered], "o-", color=colour, label=row)
    tpr_ax.axhline(result["teacher"], color="k", linestyle="--", label="teacher")
    for ax, label in ((gap_ax, "gap to the teacher closed at TPR@1e-3 (%)"), (tpr_ax, "TPR@1e-3 (celeba/val)")):
        ax.set_xscale("log")
        ax.set_xlabel("image presentations (steps x batch)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
