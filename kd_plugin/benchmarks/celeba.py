"""Every method side by side on real faces: `kd-plugin bench celeba --json`.

Teacher: the shared MobileFaceNet ONNX (128-d, ImageNet normalisation), its embeddings of every training image and
its flip cached once (`<out>/teacher_cache`). Students: the same network, trained from scratch by `kd_plugin.train`
with the same budget for every method (epochs, batch, identity-balanced batches, learning rate, schedule, seed), one
run per method and seed. Each student is evaluated as arcface_torch evaluates (embedding + flipped embedding, cosine):
`celeba_val.bin` 10-fold accuracy, all-pairs TPR@FPR on `celeba/val.rec`, and the cross-model TPR (student queries
against the teacher's gallery). Results go to `<out>`: `results.json` (also the last line of stdout with --json),
`results.md` (the table), `tpr_fpr.png` (TPR against FPR per method), and per run `<method>/seed<k>/model.pt`,
`model.onnx` (uint8 RGB in, normalisation inside) and `result.json`. A run whose `result.json` matches the settings is
reused, so an interrupted benchmark continues where it stopped; `--fresh` retrains everything.

The defaults fit 2 CPU cores (the `cpu_r8` student at half resolution); `--network mbf --epochs 20` with a GPU is the
same benchmark at the usual size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings

import numpy as np
import torch

from kd_plugin.atomic import write_json
from kd_plugin.errors import KDPluginError
from kd_plugin.normalization import IMAGENET_MEAN, IMAGENET_STD



def _rows() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """From the method registry: (every row, the baselines' rows, the rows every seed trains). The rows are the
    student alone, every baseline, then each method this plugin is about and their combination — each method that
    runs from a teacher and the training data alone (logit KD needs ProxylessKD's head, multi-step KD per-epoch
    teacher checkpoints)."""
    from kd_plugin.methods import methods, runs_from_a_teacher

    runnable = {name: m for name, m in methods().items() if runs_from_a_teacher(m)}
    ours = [name for name, m in runnable.items() if not m.baseline]
    baselines = tuple(name for name, m in runnable.items() if m.baseline)
    return ("student", *baselines, *ours, "+".join(ours)), baselines, ("student", *ours, "+".join(ours))


METHODS, BASELINES, ALWAYS_SEEDED = _rows()  # ALWAYS_SEEDED: plus the best baseline
FIGURES = ("accuracy", "tpr@1e-2", "tpr@1e-3", "cross_tpr@1e-3", "epoch_seconds")
# 1, 2, ..., 9 x 10^k from 1e-4 to 0.9: distinct at one significant digit, as the evaluation's keys ('2e-04') are
CURVE_FPRS = tuple(float(f"{m}e{k}") for k in range(-4, 0) for m in range(1, 10))


def _paths(args) -> dict:
    root = args.data_root
    paths = {"train": args.train or os.path.join(root, "celeba", "train.rec"),
             "val": args.val or os.path.join(root, "celeba", "val.rec"),
             "bin": args.bin or os.path.join(root, "celeba", "celeba_val.bin"),
             "teacher": args.teacher or os.path.join(root, "teachers", "mobilefacenet_ms1m",
                                                     "mobilefacenet_dynamic.onnx")}
    for name, path in paths.items():
        if not os.path.exists(path):
            raise KDPluginError(f"kd-plugin bench celeba: the {name} file {path} does not exist; point --data-root at "
                                f"the shared data folder (with celeba/ and teachers/) or give --{name}")
    return paths


class _Embeddings:
    """The figures of one model from its flip-summed embeddings of the .bin images and the val images."""

    def __init__(self, model, bin_images: np.ndarray, val_images: np.ndarray) -> None:
        from kd_plugin.evaluation import embed_with_flip, l2_normalize

        def embed(images: np.ndarray) -> np.ndarray:
            return l2_normalize(np.concatenate([embed_with_flip(model, images[i:i + 256])
                                                for i in range(0, len(images), 256)]))

        self.bin, self.val = embed(bin_images), embed(val_images)

    def figures(self, issame: np.ndarray, val_labels: np.ndarray, gallery: "_Embeddings | None") -> dict:
        from kd_plugin.evaluation import fpr_key, kfold_accuracy, pair_score_blocks, roc_summary

        scores = np.sum(self.bin[0::2] * self.bin[1::2], axis=1)
        accuracy, _, _ = kfold_accuracy(scores, issame)
        roc = roc_summary(lambda: pair_score_blocks(self.val, val_labels), CURVE_FPRS + (1e-2, 1e-3))
        tpr = roc["tpr_at_fpr"]
        out = {"accuracy": accuracy, "tpr@1e-2": tpr[fpr_key(1e-2)], "tpr@1e-3": tpr[fpr_key(1e-3)],
               "curve": [[f, tpr[fpr_key(f)]] for f in CURVE_FPRS]}
        if gallery is not None:
            cross = roc_summary(lambda: pair_score_blocks(self.val, val_labels, gallery.val), (1e-3,))
            out["cross_tpr@1e-3"] = cross["tpr_at_fpr"][fpr_key(1e-3)]
        return out


def _config(args, paths: dict, method: str, seed: int, output: str, cache_dir: str) -> dict:
    from kd_plugin.methods import kd_block

    kd = kd_block("none" if method == "student" else method, teacher=paths["teacher"],
                  teacher_mean=",".join(map(str, IMAGENET_MEAN)), teacher_std=",".join(map(str, IMAGENET_STD)),
                  cache=cache_dir, weights=dict(args.weight),
                  sampler={"identities_per_batch": args.identities, "images_per_identity": args.images_per_identity,
                           "balanced": True})  # the same batches for every method
    return {"network": args.network, "embedding_size": 128, "rec": paths["train"], "num_classes": args.num_classes,
            "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
            "weight_decay": args.weight_decay, "momentum": 0.9, "num_epoch": args.epochs, "warmup_epoch": 1,
            "margin_list": tuple(args.margin), "sample_rate": 1.0, "fp16": False, "seed": 2048 + seed,
            "num_workers": args.workers, "output": output, "frequent": 10 ** 9, "verbose": 10 ** 9,
            "checkpoint_every": 10 ** 9, "val_targets": [], "kd": kd}


def _settings(args) -> dict:
    keys = ("network", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "margin", "identities",
            "images_per_identity", "num_classes")
    settings = {k: getattr(args, k) for k in keys}
    if args.weight:  # recorded only when set, so results made with the published weights stay reusable
        settings["weights"] = dict(args.weight)
    return settings


def _train_one(args, paths, method, seed, cache_dir, data, teacher_emb) -> dict:
    """Train (or reuse) one student; returns its result record."""
    from kd_plugin.config import resolve
    from kd_plugin.export import export_onnx
    from kd_plugin.train import Trainer

    folder = os.path.join(args.out, method, f"seed{seed}")
    record_path = os.path.join(folder, "result.json")
    if not args.fresh and os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("settings") == _settings(args):
            print(f"[bench celeba] {method} seed {seed}: reusing {record_path}", flush=True)
            return record
    shutil.rmtree(folder, ignore_errors=True)
    cfg = resolve(_config(args, paths, method, seed, folder, cache_dir))
    print(f"[bench celeba] training {method} seed {seed}: {cfg.network}, {cfg.num_epoch} epochs, batch "
          f"{cfg.batch_size}, lr {cfg.lr}", flush=True)
    trainer = Trainer(cfg)
    start = time.perf_counter()
    trainer.run()
    train_seconds = time.perf_counter() - start
    student = trainer.student_embedder()
    figures = _Embeddings(student, data["bin_images"], data["val_images"]).figures(
        data["issame"], data["val_labels"], teacher_emb)
    export_onnx(trainer.student.eval(), os.path.join(folder, "model.onnx"), trainer.student_norm)
    record = {"method": method, "seed": seed, "settings": _settings(args),
              "epoch_seconds": _mean_epoch_seconds(folder),
              "train_seconds": train_seconds, **figures}
    write_json(record, record_path)
    print(f"[bench celeba] {method} seed {seed}: accuracy {_num(record['accuracy'])}, TPR@1e-3 "
          f"{_num(record['tpr@1e-3'])}, cross TPR@1e-3 {_num(record['cross_tpr@1e-3'])}, "
          f"{record['epoch_seconds']:.1f}s/epoch", flush=True)
    return record


def _mean_epoch_seconds(folder: str) -> float:
    """The mean wall time of the run's epochs, as the trainer logged them (checkpointing excluded)."""
    with open(os.path.join(folder, "train_log.jsonl"), encoding="utf-8") as f:
        seconds = [entry["epoch_seconds"] for entry in map(json.loads, f) if "epoch_seconds" in entry]
    return float(np.mean(seconds))


def _load_eval_data(paths: dict) -> dict:
    from kd_plugin.data.datasets import open_dataset
    from kd_plugin.data.verification_bin import load_bin

    bin_images, issame = load_bin(paths["bin"])
    val = open_dataset(paths["val"])
    val_images = np.stack([val[i][0].numpy() for i in range(len(val))])
    return {"bin_images": bin_images, "issame": np.asarray(issame, bool), "val_images": val_images,
            "val_labels": np.asarray(val.labels)}


def _num(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(records: list[dict], teacher: dict) -> dict:
    """{"teacher": figures, "methods": {method: {figure: [one value per seed]}}, "gap_closed@1e-3": ...}."""
    methods: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: (list(METHODS).index(r["method"]), r["seed"])):
        entry = methods.setdefault(record["method"], {k: [] for k in FIGURES} | {"seeds": []})
        for key in FIGURES:
            entry[key].append(record[key])
        entry["seeds"].append(record["seed"])
    base = _mean(methods.get("student", {}).get("tpr@1e-3", []))
    for entry in methods.values():
        mean = _mean(entry["tpr@1e-3"])
        gap = teacher["tpr@1e-3"] - base if base is not None and teacher["tpr@1e-3"] is not None else None
        entry["gap_closed@1e-3"] = (mean - base) / gap if gap and mean is not None else None
    return {"teacher": {k: teacher[k] for k in ("accuracy", "tpr@1e-2", "tpr@1e-3")}, "methods": methods}


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
    base = _mean(student["tpr@1e-3"]) if student else None
    spread = float(np.std(student["tpr@1e-3"])) if student and len(student["tpr@1e-3"]) > 1 else 0.0
    lines = ["| method | seeds | accuracy (celeba_val.bin) | TPR@1e-2 | TPR@1e-3 | cross TPR@1e-3 | gap closed @1e-3 | "
             "s/epoch | vs student alone @1e-3 |", "|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| teacher (MobileFaceNet ONNX) | - | {_num(teacher['accuracy'], 3)} | "
                 f"{_num(teacher['tpr@1e-2'], 3)} | {_num(teacher['tpr@1e-3'], 3)} | - | - | - | ceiling |")
    for name, entry in methods.items():
        mean = _mean(entry["tpr@1e-3"])
        if name == "student" or base is None or mean is None:
            verdict = "reference"
        elif mean - base > 2 * max(spread, float(np.std(entry["tpr@1e-3"])) if len(entry["tpr@1e-3"]) > 1 else spread):
            verdict = "better (by more than twice the seed spread)"
        elif mean > base:
            verdict = "not clearly better (within twice the seed spread)"
        else:
            verdict = "does NOT beat the student alone"
        gap = entry["gap_closed@1e-3"]
        lines.append(f"| {name} | {len(entry['seeds'])} | {_fmt(entry['accuracy'])} | {_fmt(entry['tpr@1e-2'])} | "
                     f"{_fmt(entry['tpr@1e-3'])} | {_fmt(entry['cross_tpr@1e-3'])} | "
                     f"{'n/a' if gap is None else f'{gap:.0%}'} | {_fmt(entry['epoch_seconds'], 1)} | {verdict} |")
    lines.append("")
    lines.append(f"Mean ± std over seeds. Budget for every method: {settings['network']}, {settings['epochs']} epochs, "
                 f"batch {settings['batch_size']} ({settings['identities']} identities x "
                 f"{settings['images_per_identity']} images + random), {settings['optimizer']} lr {settings['lr']}, "
                 f"margin {tuple(settings['margin'])}; "
                 + (f"term weights {settings['weights']}, the others published." if settings.get("weights")
                    else "every term at its published weight."))
    return "\n".join(lines) + "\n"


def plot(records: list[dict], teacher: dict, path: str) -> None:
    """TPR against FPR (log scale) per method, the mean over seeds, with the teacher dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    fprs = [f for f, _ in teacher["curve"]]
    ax.plot(fprs, [t for _, t in teacher["curve"]], "k--", label="teacher")
    for method in METHODS:
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


def run(args) -> dict:
    from kd_plugin.data.datasets import open_dataset
    from kd_plugin.normalization import InputNormalization
    from kd_plugin.teachers import build_cache, load_cache, load_embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = _paths(args)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    norm = InputNormalization(IMAGENET_MEAN, IMAGENET_STD)
    teacher = load_embedder(paths["teacher"], norm, batch_size=64)
    train = open_dataset(paths["train"])
    cache_dir = os.path.join(args.out, "teacher_cache")
    try:
        load_cache(cache_dir, train, teacher=paths["teacher"])
        print(f"[bench celeba] teacher cache: reusing {cache_dir}", flush=True)
    except KDPluginError:
        build_cache(teacher, train, cache_dir, paths["teacher"], batch_size=64)
    print("[bench celeba] embedding the evaluation images with the teacher", flush=True)
    data = _load_eval_data(paths)
    teacher_emb = _Embeddings(teacher, data["bin_images"], data["val_images"])
    teacher_figures = teacher_emb.figures(data["issame"], data["val_labels"], None)
    print(f"[bench celeba] teacher: accuracy {_num(teacher_figures['accuracy'])}, TPR@1e-2 "
          f"{_num(teacher_figures['tpr@1e-2'])}, TPR@1e-3 {_num(teacher_figures['tpr@1e-3'])}", flush=True)
    methods = [m for m in METHODS if m in args.methods]
    records = [_train_one(args, paths, m, 0, cache_dir, data, teacher_emb) for m in methods]
    if args.seeds > 1:
        scored = [r for r in records if r["method"] in BASELINES]
        best = max(scored, key=lambda r: r["tpr@1e-3"] or 0.0)["method"] if scored else None
        again = [m for m in methods if m in ALWAYS_SEEDED or m == best]
        if best:
            print(f"[bench celeba] best baseline at seed 0 (TPR@1e-3): {best}; seeds 1..{args.seeds - 1} for "
                  f"{', '.join(again)}", flush=True)
        for seed in range(1, args.seeds):
            records += [_train_one(args, paths, m, seed, cache_dir, data, teacher_emb) for m in again]
    summary = summarise(records, teacher_figures)
    summary.update(settings=_settings(args), seconds=time.perf_counter() - started,
                   data={k: os.path.abspath(v) for k, v in paths.items()})
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(summary, summary["settings"]))
    plot(records, teacher_figures, os.path.join(args.out, "tpr_fpr.png"))
    return summary


def _weight(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TERM=WEIGHT like l2=1000, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kd-plugin bench celeba", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=os.path.join("..", "shared", "data"),
                   help="the shared data folder holding celeba/ and teachers/ (default ../shared/data)")
    p.add_argument("--train", help="training data (default <data-root>/celeba/train.rec)")
    p.add_argument("--val", help="all-pairs evaluation data (default <data-root>/celeba/val.rec)")
    p.add_argument("--bin", help="verification .bin (default <data-root>/celeba/celeba_val.bin)")
    p.add_argument("--teacher", help="teacher ONNX, ImageNet normalisation (default: the shared MobileFaceNet)")
    p.add_argument("--num-classes", type=int, default=249, help="identities in the training data")
    p.add_argument("--out", default=os.path.join("work_dirs", "bench_celeba"), help="output folder")
    p.add_argument("--methods", default=",".join(METHODS), type=lambda s: [m for m in s.split(",") if m],
                   help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=2, help="seeds for student, the best baseline, proxyless, ekd and "
                                                        "proxyless+ekd (the other methods get one)")
    p.add_argument("--network", default="cpu_r8", help="student network (cpu_r8 for CPU; mbf or r18 on a GPU)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--identities", type=int, default=8, help="identities per batch in the balanced part")
    p.add_argument("--images-per-identity", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--margin", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.5, 0.0],
                   help="arcface_torch margin_list m1,m2,m3 (default ArcFace 1.0,0.5,0.0)")
    p.add_argument("--weight", action="append", default=[], type=_weight, metavar="TERM=W",
                   help="override a term's published weight (config.kd.weights), e.g. --weight l2=1000; repeatable")
    p.add_argument("--workers", type=int, default=1, help="data loader processes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--fresh", action="store_true", help="retrain every run instead of reusing finished ones")
    p.add_argument("--json", action="store_true", help="print the results JSON as the last line of stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise KDPluginError(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    summary = run(args)
    print(markdown_table(summary, summary["settings"]))
    print(f"[bench celeba] done in {summary['seconds'] / 60:.1f} min; results in {args.out}", flush=True)
    if args.json:
        print(json.dumps(summary))
    return 0
