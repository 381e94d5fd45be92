"""The report of `kd-plugin bench celeba`: the summary over seeds (and each row's paired identity-bootstrap interval
against the student alone), the markdown table with its verdicts, and the TPR-FPR plot."""

from __future__ import annotations

import os
import warnings

import numpy as np

from kd_plugin.benchmarks.celeba_rows import run_folder
from kd_plugin.extras import import_extra

FIGURES = ("accuracy", "tpr@1e-2", "tpr@1e-3", "cross_tpr@1e-3", "epoch_seconds")


def number(value, digits: int = 4) -> str:
    """A figure with `digits` decimals, or n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def mean_of(values) -> float | None:
    """The mean of the figures that exist (None: none does)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def gap_closed(row: float | None, student: float | None, teacher: float | None) -> float | None:
    """The share of the teacher-student gap a row closes, (row - student) / (teacher - student); None where a figure
    is missing or there is no gap."""
    if row is None or student is None or teacher is None or teacher == student:
        return None
    return (row - student) / (teacher - student)


def summarise(records: list[dict], teacher: dict, order: list[str] | None = None,
              intervals: dict[str, dict] | None = None) -> dict:
    """{"teacher": figures, "methods": {row: {figure: [one value per seed], "gap_closed@1e-3": ...,
    "vs_student@1e-3": {"diff": mean difference, "ci95": [low, high]} when `intervals` has the row}}."""
    order = order or list(dict.fromkeys(r["method"] for r in records))
    methods: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: (order.index(r["method"]), r["seed"])):
        entry = methods.setdefault(record["method"], {k: [] for k in FIGURES} | {"seeds": []})
        for key in FIGURES:
            entry[key].append(record[key])
        entry["seeds"].append(record["seed"])
    base = mean_of(methods.get("student", {}).get("tpr@1e-3", []))
    for name, entry in methods.items():
        entry["gap_closed@1e-3"] = gap_closed(mean_of(entry["tpr@1e-3"]), base, teacher["tpr@1e-3"])
        if intervals and name in intervals:
            entry["vs_student@1e-3"] = intervals[name]
    return {"teacher": {k: teacher[k] for k in ("accuracy", "tpr@1e-2", "tpr@1e-3")}, "methods": methods}


def bootstrap_intervals(out: str, records: list[dict], val_labels: np.ndarray, resamples: int) -> dict[str, dict]:
    """Per row: the mean difference in TPR@1e-3 to the student alone (over their seeds) and its 95% paired
    identity-bootstrap interval, from the saved validation embeddings."""
    from kd_plugin.benchmarks.bootstrap import PairScores, difference_interval, paired_bootstrap

    if resamples <= 0 or not any(r["method"] == "student" for r in records):
        return {}
    identities = int(np.max(val_labels)) + 1
    scores: dict[str, list] = {}
    for r in records:
        folder = run_folder(out, r["method"], r["seed"])
        scores.setdefault(r["method"], []).append(PairScores(np.load(os.path.join(folder, "val_embeddings.npy")),
                                                             val_labels))
    print(f"[bench celeba] identity bootstrap: {resamples} resamples of {identities} identities", flush=True)
    tpr = paired_bootstrap(scores, identities, 1e-3, resamples)
    point = {name: mean_of([r["tpr@1e-3"] for r in records if r["method"] == name]) for name in scores}
    return {name: {"diff": point[name] - point["student"],
                   "ci95": difference_interval(tpr[name], tpr["student"])}
            for name in scores if name != "student"}


def _fmt(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def markdown_table(summary: dict, settings: dict) -> str:
    """The results as a markdown table, with an explicit verdict against the student alone."""
    methods, teacher = summary["methods"], summary["teacher"]
    student = methods.get("student")
    base = mean_of(student["tpr@1e-3"]) if student else None
    spread = float(np.std(student["tpr@1e-3"])) if student and len(student["tpr@1e-3"]) > 1 else 0.0
    paired = any("vs_student@1e-3" in entry for entry in methods.values())
    ci_head, ci_rule, ci_blank = (" difference @1e-3 (95% identity-bootstrap interval) |", "---|", " - |") if paired \
        else ("", "", "")
    lines = ["| method | seeds | accuracy (celeba_val.bin) | TPR@1e-2 | TPR@1e-3 | cross TPR@1e-3 | gap closed @1e-3 | "
             f"s/epoch |{ci_head} vs student alone @1e-3 |", f"|---|---|---|---|---|---|---|---|{ci_rule}---|"]
    lines.append(f"| teacher ({_teacher_name(summary)}) | - | {number(teacher['accuracy'], 3)} | "
                 f"{number(teacher['tpr@1e-2'], 3)} | {number(teacher['tpr@1e-3'], 3)} | - | - | - |{ci_blank} ceiling |")
    for name, entry in methods.items():
        mean = mean_of(entry["tpr@1e-3"])
        paired_figure = entry.get("vs_student@1e-3")
        if name == "student" or base is None or mean is None:
            verdict = "reference"
        elif paired_figure is not None:
            low, high = paired_figure["ci95"]
            verdict = ("better (interval above 0)" if low > 0 else "worse (interval below 0)" if high < 0
                       else "no clear difference (interval spans 0)")
        elif mean - base > 2 * max(spread, float(np.std(entry["tpr@1e-3"])) if len(entry["tpr@1e-3"]) > 1 else spread):
            verdict = "better (by more than twice the seed spread)"
        elif mean > base:
            verdict = "not clearly better (within twice the seed spread)"
        else:
            verdict = "does NOT beat the student alone"
        gap = entry["gap_closed@1e-3"]
        ci = ""
        if paired:
            ci = " - |" if paired_figure is None else (f" {paired_figure['diff']:+.3f} [{paired_figure['ci95'][0]:+.3f}, "
                                                      f"{paired_figure['ci95'][1]:+.3f}] |")
        lines.append(f"| {name} | {len(entry['seeds'])} | {_fmt(entry['accuracy'])} | {_fmt(entry['tpr@1e-2'])} | "
                     f"{_fmt(entry['tpr@1e-3'])} | {_fmt(entry['cross_tpr@1e-3'])} | "
                     f"{'n/a' if gap is None else f'{gap:.0%}'} | {_fmt(entry['epoch_seconds'], 1)} |{ci} {verdict} |")
    lines.append("")
    lines.append(f"Mean ± std over seeds. Budget for every method: {settings['network']}, {settings['epochs']} epochs "
                 f"of the labelled images ('@utk' rows: half as many, with as many steps: half of each batch's random "
                 f"part unlabelled{_views_note(settings.get('views'))}), "
                 f"batch {settings['batch_size']} ({settings['identities']} identities x "
                 f"{settings['images_per_identity']} images + random), {settings['optimizer']} lr {settings['lr']}, "
                 f"margin {tuple(settings['margin'])}; "
                 + (f"term weights {settings['weights']}, the others published." if settings.get("weights")
                    else "every term at its published weight."))
    return "\n".join(lines) + "\n"


def _teacher_name(summary: dict) -> str:
    """The teacher the benchmark was given: its file name (the summary's data paths), else 'given'."""
    path = (summary.get("data") or {}).get("teacher")
    return os.path.basename(path) if path else "given"


def _views_note(views: dict | None) -> str:
    if not views:
        return ""
    crop = "no crop" if views["crop"] >= 1 else f"crop {views['crop']:g}"
    shift = f", shift {views['shift']} px" if views.get("shift") else ""
    seen = ("in the head, lam-weighted over both identities" if views.get("mixed_labels") == "mix"
            else "by the label-free terms only")
    return f"; '@views' rows: consistent views, {crop}{shift}, {views['mixup']:.0%} of the samples mixed and seen {seen}"


def plot(records: list[dict], teacher: dict, path: str) -> None:
    """TPR against FPR (log scale) per method, the mean over seeds, with the teacher dashed."""
    matplotlib = import_extra("matplotlib", "the benchmark's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    fprs = [f for f, _ in teacher["curve"]]
    ax.plot(fprs, [t for _, t in teacher["curve"]], "k--", label="teacher")
    for method in dict.fromkeys(r["method"] for r in records):
        curves = [r["curve"] for r in records if r["method"] == method]
        if curves:
            values = np.array([[np.nan if t is None else t for _, t in c] for c in curves], dtype=float)
            with warnings.catch_warnings():  # FPRs below 1 / negatives have no TPR: a gap in the curve
                warnings.simplefilter("ignore", RuntimeWarning)
                tprs = np.nanmean(values, axis=0)
            ax.plot(fprs, tprs, label=f"{method} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
    ax.set_xscale("log")
    ax.set_xlabel("FPR (celeba/val, all pairs)")
    ax.set_ylabel("TPR")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
