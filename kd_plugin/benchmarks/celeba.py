"""Every method side by side on real faces: `kd-plugin bench celeba --json` (`--quick`: a reduced version).

Training data: `celeba/train` (249 identities) plus `celeba_extra` (1,855 more, blurrier), one class space; the rows
marked `@utk` also draw `unlabeled/utkface` faces (no identity labels) for their label-free terms. Teacher: the shared
MobileFaceNet ONNX (128-d, ImageNet normalisation); its embeddings of every training image and its flip are cached once
per training set (`<out>/teacher_cache*`) and shared by every row and seed. Students: the same network, trained from
scratch by `kd_plugin.run.train` with the same budget for every row (image presentations: epochs x steps x batch, the
identity-balanced batches, learning rate, schedule), one run per row and seed. Each student is evaluated as
arcface_torch evaluates (embedding + flipped embedding, cosine): `celeba_val.bin` 10-fold accuracy, all-pairs TPR@FPR
on `celeba/val.rec`, and the cross-model TPR (student queries against the teacher's gallery); against the student alone
each row gets the paired difference in TPR@1e-3 with a 95% interval from resampling the 50 validation identities (the
same resample for both; kd_plugin.benchmarks.bootstrap). Results go to `<out>`: `results.json` (also the last line of
stdout with --json), `results.md`, `tpr_fpr.png`, and per run `<row>/seed<k>/model.pt`, `model.onnx` (insightface
format, normalisation inside), `val_embeddings.npy` and `result.json`. A run whose `result.json` matches the settings is
reused, so an interrupted benchmark continues where it stopped; `--fresh` retrains everything.

Its parts: the rows ('proxyless+ekd@fit@memory': a method of the registry with '@' settings) in
kd_plugin.benchmarks.celeba_rows; this runner (data, caches, one training run per row and seed, its evaluation through
kd_plugin.evaluation); the summary, table and plot in kd_plugin.benchmarks.celeba_report; `--budgets` adds the budget
curve (kd_plugin.benchmarks.budget). '@views' rows keep the teacher's embedding of each (sample, epoch) view in
`<out>/teacher_views*` (one per training set and view settings), so the first such run pays the teacher and the other
rows and seeds read it. The defaults fit 2 CPU cores (the `cpu_r8` student at half resolution);
`--network mbf --epochs 20` with a GPU is the same benchmark at the usual size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from kd_plugin.atomic import write_json
from kd_plugin.benchmarks.budget import parse_budgets
from kd_plugin.benchmarks.celeba_report import bootstrap_intervals, markdown_table, number, plot, summarise
from kd_plugin.benchmarks.celeba_rows import (FULL, QUICK, VARIANTS, method_plan, parse_row, registry_rows, run_folder,
                                              seeded_rows)
from kd_plugin.run.config import KD_SETTINGS
from kd_plugin.errors import KDPluginError
from kd_plugin.extras import import_extra
from kd_plugin.evaluation import all_pairs_tpr, bin_accuracy, embed_images, fpr_key
from kd_plugin.normalization import IMAGENET_MEAN, IMAGENET_STD


def _paths(args) -> dict:
    """The files the benchmark reads. The extra labelled set and the unlabelled faces default to the shared data's
    unless --train is given (a stand-in training set is then used alone, unless --extra / --unlabeled name more)."""
    root = args.data_root
    defaults = args.train is None
    paths = {"train": args.train or os.path.join(root, "celeba", "train.rec"),
             "val": args.val or os.path.join(root, "celeba", "val.rec"),
             "bin": args.bin or os.path.join(root, "celeba", "celeba_val.bin"),
             "teacher": args.teacher or os.path.join(root, "teachers", "mobilefacenet_ms1m",
                                                     "mobilefacenet_dynamic.onnx"),
             "extra": args.extra or (os.path.join(root, "celeba_extra", "train.rec") if defaults else None),
             "unlabeled": args.unlabeled or (os.path.join(root, "unlabeled", "utkface") if defaults else None)}
    for name, path in paths.items():
        if path is not None and path != "none" and not os.path.exists(path):
            raise KDPluginError(f"kd-plugin bench celeba: the {name} file {path} does not exist; point --data-root at "
                                f"the shared data folder (with celeba/, celeba_extra/, unlabeled/ and teachers/) or "
                                f"give --{name}")
    for name in ("extra", "unlabeled"):
        paths[name] = None if paths[name] == "none" else paths[name]
    return paths


def _training_sets(paths: dict, unlabeled: bool) -> tuple[list[str], str | None]:
    return [paths["train"]] + ([paths["extra"]] if paths["extra"] else []), paths["unlabeled"] if unlabeled else None


# 1, 2, ..., 9 x 10^k from 1e-4 to 0.9: distinct at one significant digit, as the evaluation's keys ('2e-04') are
CURVE_FPRS = tuple(float(f"{m}e{k}") for k in range(-4, 0) for m in range(1, 10))


@dataclass(frozen=True)
class _Embeddings:
    """One model's L2-normalised flip-summed embeddings of the .bin images and of the validation images."""
    bin: np.ndarray
    val: np.ndarray

    @classmethod
    def of(cls, model, data: dict) -> _Embeddings:
        return cls(embed_images(model, data["bin_images"]), embed_images(model, data["val_images"]))

    def figures(self, data: dict, gallery: _Embeddings | None) -> dict:
        """The row's figures (kd_plugin.evaluation), the cross-model TPR against `gallery` (the teacher's)."""
        tpr = all_pairs_tpr(self.val, data["val_labels"], CURVE_FPRS + (1e-2, 1e-3))
        out = {"accuracy": bin_accuracy(self.bin, data["issame"]), "tpr@1e-2": tpr[fpr_key(1e-2)],
               "tpr@1e-3": tpr[fpr_key(1e-3)], "curve": [[f, tpr[fpr_key(f)]] for f in CURVE_FPRS]}
        if gallery is not None:
            out["cross_tpr@1e-3"] = all_pairs_tpr(self.val, data["val_labels"], (1e-3,), gallery.val)[fpr_key(1e-3)]
        return out


def _config(args, paths: dict, row: str, seed: int, output: str, caches: dict, num_classes: int,
            epochs: int) -> dict:
    """A row's training config at a budget of `epochs`: its method from the registry with its '@' settings; every row
    the same batches, budget and schedule. An '@utk' row draws half of each batch's random part from the unlabelled faces and makes half
    as many passes over the labelled images, so it takes as many steps of as many images as the others."""
    from kd_plugin.methods import kd_block

    method, variants = parse_row(row)
    utk = "utk" in variants
    kd = kd_block("none" if method == "student" else method, centres="fit" if "fit" in variants else None,
                  teacher=paths["teacher"],
                  teacher_mean=",".join(map(str, IMAGENET_MEAN)), teacher_std=",".join(map(str, IMAGENET_STD)),
                  cache=caches[utk], weights=_row_weights(args, row),
                  sampler={"identities_per_batch": args.identities, "images_per_identity": args.images_per_identity,
                           "balanced": True})  # the same batches for every method
    for v in variants:
        for key, value in VARIANTS[v][0].items():
            kd[key] = dict(kd.get(key) or {}, **value) if isinstance(value, dict) else value
    if "views" in variants:  # the teacher on each view (not the cache of plain images), its embeddings shared
        kd["cache"] = None
        kd["views"] = {"enabled": True, **_views(args), "cache": os.path.join(args.out, _views_folder(args, utk))}
    warmup = 1
    if utk:  # half as many epochs of twice the steps: the same steps, the same warm-up steps
        kd["unlabeled"] = {"data": paths["unlabeled"], "per_batch": _random_rows(args) // 2}
        epochs, warmup = epochs // 2, 0.5
    rec, _ = _training_sets(paths, utk)
    return {"network": args.network, "embedding_size": 128, "rec": rec if len(rec) > 1 else rec[0],
            "num_classes": num_classes, "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
            "weight_decay": args.weight_decay, "momentum": 0.9, "num_epoch": epochs, "warmup_epoch": warmup,
            "margin_list": tuple(args.margin), "sample_rate": 1.0, "fp16": False, "seed": 2048 + seed,
            "num_workers": args.workers, "output": output, "frequent": 10 ** 9, "verbose": 10 ** 9,
            "checkpoint_every": 10 ** 9, "val_targets": [], "kd": kd}


def _views(args) -> dict:
    """The '@views' rows' kd.views settings; shift only when set and mixed labels only when not "drop" (what runs
    made before these settings existed did), so those runs stay reusable."""
    out = {"crop": args.views_crop, "mixup": args.views_mixup}
    if args.views_shift != KD_SETTINGS["views"]["shift"]:
        out["shift"] = args.views_shift
    if args.views_mixed_labels != "drop":
        out["mixed_labels"] = args.views_mixed_labels
    return out


def _views_folder(args, utk: bool) -> str:
    """The teacher-view cache of the '@views' rows: one per training set and view settings (what makes the views:
    crop, mixup and shift; mixed labels change only the loss)."""
    shift = f"_shift{args.views_shift}" if args.views_shift else ""
    return f"teacher_views{'_utk' if utk else ''}_crop{args.views_crop:g}_mixup{args.views_mixup:g}{shift}"


def _random_rows(args) -> int:
    return args.batch_size - args.identities * args.images_per_identity


def _settings(args, paths: dict, row: str = "", epochs: int | None = None) -> dict:
    """What a run's result depends on (a saved run is reused only when these match); `epochs`: its budget (default
    --epochs)."""
    keys = ("network", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "margin", "identities",
            "images_per_identity")
    settings = {k: getattr(args, k) for k in keys}
    settings["epochs"] = args.epochs if epochs is None else epochs
    settings["data"] = [os.path.basename(os.path.dirname(p)) for p in (paths["train"], paths["extra"]) if p]
    if row and "utk" in parse_row(row)[1]:
        settings["unlabeled"] = os.path.abspath(paths["unlabeled"])
    if row and "views" in parse_row(row)[1]:
        settings["views"] = {**_views(args), "seed": KD_SETTINGS["views"]["seed"]}
    weights = _row_weights(args, row) if row else {}
    if weights:  # recorded only when set, so runs with the published weights stay reusable
        settings["weights"] = weights
    return settings


def _row_weights(args, row: str) -> dict[str, float]:
    """The --weight overrides of the terms `row` has (the student and rows without the term keep theirs)."""
    terms = method_plan(parse_row(row)[0]).weights
    return {name: weight for name, weight in args.weight if name in terms}


@dataclass
class _Runner:
    """What every training run of one benchmark shares: its settings (`args`, the parsed command line, never
    changed), the files it reads, the teacher caches, the evaluation data, the teacher's embeddings of it and the
    class count."""

    args: argparse.Namespace
    paths: dict
    caches: dict
    data: dict
    teacher: _Embeddings
    num_classes: int

    def train(self, row: str, seed: int, epochs: int | None = None, root: str | None = None) -> dict:
        """Train (or reuse) one student of `row` at a budget of `epochs` (default --epochs), its run folder under
        `root` (default --out); returns its result record."""
        from kd_plugin.run.config import resolve
        from kd_plugin.export import export_onnx
        from kd_plugin.run.train import Trainer

        args, epochs = self.args, self.args.epochs if epochs is None else epochs
        folder = run_folder(root or args.out, row, seed)
        record_path = os.path.join(folder, "result.json")
        settings = _settings(args, self.paths, row, epochs)
        if not args.fresh and os.path.isfile(record_path) and \
                os.path.isfile(os.path.join(folder, "val_embeddings.npy")):
            with open(record_path, encoding="utf-8") as f:
                record = json.load(f)
            if record.get("settings") == settings:
                print(f"[bench celeba] {row} seed {seed}: reusing {record_path}", flush=True)
                return record
        shutil.rmtree(folder, ignore_errors=True)
        cfg = resolve(_config(args, self.paths, row, seed, folder, self.caches, self.num_classes, epochs))
        print(f"[bench celeba] training {row} seed {seed}: {cfg.network}, {cfg.num_epoch} epochs, batch "
              f"{cfg.batch_size}, lr {cfg.lr}", flush=True)
        trainer = Trainer(cfg)
        start = time.perf_counter()
        trainer.run()
        train_seconds = time.perf_counter() - start
        embeddings = _Embeddings.of(trainer.student_embedder(), self.data)
        figures = embeddings.figures(self.data, self.teacher)
        np.save(os.path.join(folder, "val_embeddings.npy"), embeddings.val.astype(np.float32))
        export_onnx(trainer.student.eval(), os.path.join(folder, "model.onnx"), trainer.student_norm)
        record = {"method": row, "seed": seed, "settings": settings, "epoch_seconds": _mean_epoch_seconds(folder),
                  "steps": trainer.global_step, "images": trainer.global_step * cfg.batch_size,
                  "teacher_rows": 0 if trainer.teacher is None else trainer.teacher.teacher_rows,
                  "train_seconds": train_seconds, **figures}
        write_json(record, record_path)
        print(f"[bench celeba] {row} seed {seed}: accuracy {number(record['accuracy'])}, TPR@1e-3 "
              f"{number(record['tpr@1e-3'])}, cross TPR@1e-3 {number(record['cross_tpr@1e-3'])}, "
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


def _caches(args, paths: dict, teacher, rows: list[str]) -> dict[bool, str]:
    """The teacher's embeddings of every training image and flip, one cache per training set (with the unlabelled
    faces or without), shared by every row and seed: {uses the unlabelled faces: cache folder}."""
    from kd_plugin.data.datasets import open_training_data
    from kd_plugin.teachers import build_cache, load_cache

    caches = {}
    for utk in sorted({"utk" in parse_row(r)[1] for r in rows}):
        dataset = open_training_data(*_training_sets(paths, utk))
        folder = os.path.join(args.out, "teacher_cache_utk" if utk else "teacher_cache")
        try:
            load_cache(folder, dataset, teacher=paths["teacher"])
            print(f"[bench celeba] teacher cache: reusing {folder}", flush=True)
        except KDPluginError:
            build_cache(teacher, dataset, folder, paths["teacher"], batch_size=64)
        caches[utk] = folder
    return caches


def run(args) -> dict:
    from kd_plugin.data.datasets import open_training_data
    from kd_plugin.normalization import InputNormalization
    from kd_plugin.teachers import load_embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = _paths(args)
    rows = list(dict.fromkeys(args.methods))
    for row in rows:
        if "utk" in parse_row(row)[1] and (not paths["unlabeled"] or args.epochs % 2 or _random_rows(args) % 2):
            raise KDPluginError(f"--methods: row {row!r} needs the unlabelled faces (--unlabeled), an even --epochs "
                                f"and an even random part of the batch (batch_size - identities x "
                                f"images_per_identity): its runs make half as many passes with half of each "
                                f"batch's random part unlabelled")
    num_classes = open_training_data(*_training_sets(paths, False)).num_classes
    if args.num_classes is not None and args.num_classes != num_classes:
        raise KDPluginError(f"--num-classes {args.num_classes}, but the training data has {num_classes} identities")
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    teacher = load_embedder(paths["teacher"], InputNormalization(IMAGENET_MEAN, IMAGENET_STD), batch_size=64,
                            onnx_on_cpu="onnxruntime")
    caches = _caches(args, paths, teacher, rows)
    print("[bench celeba] embedding the evaluation images with the teacher", flush=True)
    data = _load_eval_data(paths)
    teacher_emb = _Embeddings.of(teacher, data)
    teacher_figures = teacher_emb.figures(data, None)
    print(f"[bench celeba] teacher: accuracy {number(teacher_figures['accuracy'])}, TPR@1e-2 "
          f"{number(teacher_figures['tpr@1e-2'])}, TPR@1e-3 {number(teacher_figures['tpr@1e-3'])}", flush=True)
    runner = _Runner(args, paths, caches, data, teacher_emb, num_classes)
    records = [runner.train(row, 0) for row in rows]
    if args.seeds > 1:
        again = seeded_rows(rows)
        others = [r for r in records if r["method"] not in again]
        if others:  # the best of the rest (TPR@1e-3 at seed 0) gets every seed too
            again.append(max(others, key=lambda r: r["tpr@1e-3"] or 0.0)["method"])
        print(f"[bench celeba] seeds 1..{args.seeds - 1} for {', '.join(again)}", flush=True)
        for seed in range(1, args.seeds):
            records += [runner.train(row, seed) for row in rows if row in again]
    intervals = bootstrap_intervals(args.out, records, data["val_labels"], args.resamples)
    summary = summarise(records, teacher_figures, rows, intervals)
    settings = _settings(args, paths)
    if any("views" in parse_row(r)[1] for r in rows):
        settings["views"] = _views(args)
    summary.update(settings=settings, seconds=time.perf_counter() - started,
                   data={k: os.path.abspath(v) for k, v in paths.items() if v})
    write_json(summary, os.path.join(args.out, "results.json"), indent=1)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(summary, summary["settings"]))
    plot(records, teacher_figures, os.path.join(args.out, "tpr_fpr.png"))
    if args.budgets:
        summary["budget"] = _budget_curve(runner, rows, records, intervals, teacher_figures["tpr@1e-3"])
    return summary


def _budget_curve(runner: _Runner, rows: list[str], records: list[dict], table_intervals: dict,
                  teacher_tpr: float) -> dict:
    """The rows again at each budget of --budgets (seed 0; the table's own budget reuses its records and intervals,
    every seed), each budget's runs under `<out>/epochs<E>/` with their intervals against that budget's student;
    writes budget.json, budget.md and budget.png."""
    from kd_plugin.benchmarks import budget

    args, val_labels = runner.args, runner.data["val_labels"]
    curve_rows = args.budget_methods or rows
    by_budget, intervals = {}, {}
    for epochs in args.budgets:
        if epochs == args.epochs and all(row in rows for row in curve_rows):
            by_budget[epochs] = [r for r in records if r["method"] in curve_rows]
            intervals[epochs] = table_intervals
            continue
        print(f"[bench celeba] budget {epochs} epochs: {', '.join(curve_rows)}", flush=True)
        root = os.path.join(args.out, f"epochs{epochs}")
        by_budget[epochs] = [runner.train(row, 0, epochs, root) for row in curve_rows]
        intervals[epochs] = bootstrap_intervals(root, by_budget[epochs], val_labels, args.resamples)
    result = budget.curve(by_budget, teacher_tpr, intervals)
    write_json(result, os.path.join(args.out, "budget.json"), indent=1)
    with open(os.path.join(args.out, "budget.md"), "w", encoding="utf-8") as f:
        f.write(budget.markdown(result))
    budget.plot(result, os.path.join(args.out, "budget.png"))
    return result


def _weight(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TERM=WEIGHT like l2=1000, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kd-plugin bench celeba", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=os.path.join("..", "shared", "data"),
                   help="the shared data folder holding celeba/, celeba_extra/, unlabeled/ and teachers/ (default "
                        "../shared/data)")
    p.add_argument("--train", help="training data (default <data-root>/celeba/train.rec)")
    p.add_argument("--extra", help="a second labelled training set, its identities after --train's (default "
                                   "<data-root>/celeba_extra/train.rec unless --train is given; 'none': without)")
    p.add_argument("--unlabeled", help="unlabelled faces for the '@utk' rows (default <data-root>/unlabeled/utkface "
                                       "unless --train is given)")
    p.add_argument("--val", help="all-pairs evaluation data (default <data-root>/celeba/val.rec)")
    p.add_argument("--bin", help="verification .bin (default <data-root>/celeba/celeba_val.bin)")
    p.add_argument("--teacher", help="teacher ONNX, ImageNet normalisation (default: the shared MobileFaceNet)")
    p.add_argument("--num-classes", type=int, help="identities in the training data (checked; default: read from it)")
    p.add_argument("--out", default=os.path.join("work_dirs", "bench_celeba"), help="output folder")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m],
                   help=f"comma-separated rows (default: {','.join(FULL)}; with --quick: {','.join(QUICK)}; 'all' "
                        f"adds every row the method registry offers: {','.join(registry_rows())})")
    p.add_argument("--seeds", type=int, help="seeds for the student, the headline ProxylessKD+EKD row (the adaptive "
                                             "head's if present, with the most settings) and the best other row "
                                             "(default 3; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="a reduced version for iteration: fewer rows, one seed, "
                                                        "2 epochs (about 10 minutes on 2 CPU cores)")
    p.add_argument("--resamples", type=int, default=1000, help="identity-bootstrap resamples (0: no intervals)")
    p.add_argument("--network", default="cpu_r8", help="student network (cpu_r8 for CPU; mbf or r18 on a GPU)")
    p.add_argument("--epochs", type=int, help="passes over the labelled images (default 6; --quick: 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--identities", type=int, default=8, help="identities per batch in the balanced part")
    p.add_argument("--images-per-identity", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--margin", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.5, 0.0],
                   help="arcface_torch margin_list m1,m2,m3 (default ArcFace 1.0,0.5,0.0)")
    p.add_argument("--weight", action="append", default=[], type=_weight, metavar="TERM=W",
                   help="override a term's published weight (config.kd.weights) in the rows that have the term, e.g. "
                        "--weight cosine=64; repeatable")
    views = KD_SETTINGS["views"]
    p.add_argument("--views-crop", type=float, default=views["crop"],
                   help=f"'@views' rows: kd.views.crop, the smallest share of the area a crop keeps (default "
                        f"{views['crop']}; 1: no crop)")
    p.add_argument("--views-mixup", type=float, default=views["mixup"],
                   help=f"'@views' rows: kd.views.mixup, the share of samples mixed (default {views['mixup']}; 0: none)")
    p.add_argument("--views-shift", type=int, default=views["shift"],
                   help=f"'@views' rows: kd.views.shift, the largest translation in pixels (default {views['shift']})")
    p.add_argument("--views-mixed-labels", choices=("drop", "mix"), default=views["mixed_labels"],
                   help=f"'@views' rows: kd.views.mixed_labels (default {views['mixed_labels']}; 'mix': the head "
                        f"takes mixed images lam-weighted over both identities)")
    p.add_argument("--budgets", type=parse_budgets, help="the budget curve: epoch counts such as 6,12,24 (the first is the "
                                                   "table's --epochs unless given); each row again at each budget "
                                                   "(one seed), runs under <out>/epochs<E>; writes budget.json, "
                                                   "budget.md and budget.png")
    p.add_argument("--budget-methods", type=lambda s: [m for m in s.split(",") if m],
                   help="the rows of the budget curve (default: every --methods row; 'student' is always added)")
    p.add_argument("--workers", type=int, default=1, help="data loader processes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--fresh", action="store_true", help="retrain every run instead of reusing finished ones")
    p.add_argument("--json", action="store_true", help="print the results JSON as the last line of stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import_extra("matplotlib", "kd-plugin bench celeba (its plots, drawn at the end)")  # before hours of training
    args.methods = args.methods or list(QUICK if args.quick else FULL)
    if "all" in args.methods:
        args.methods = [m for m in args.methods if m != "all"] + list(registry_rows())
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.epochs = args.epochs or (args.budgets[0] if args.budgets else 2 if args.quick else 6)
    if args.budget_methods and not args.budgets:
        raise KDPluginError("--budget-methods: the rows of the budget curve; give the budgets too (--budgets 6,12,24)")
    if args.budget_methods:
        args.budget_methods = list(dict.fromkeys(["student", *args.budget_methods]))
        for row in args.budget_methods:
            parse_row(row)
    for row in args.methods:
        method, variants = parse_row(row)  # unknown methods or settings stop before anything runs
        if ("views" in variants and args.views_mixed_labels == "drop" and args.views_mixup > 0
                and not method_plan(method).label_free):
            raise KDPluginError(f"--methods: row {row!r}: '@views' with --views-mixed-labels drop feeds the mixed "
                                f"images to the label-free terms only, and this row has none: add one (e.g. "
                                f"'cosine') or pass --views-mixed-labels mix")
    unused = [name for name, _ in args.weight
              if not any(name in _row_weights(args, row) for row in args.methods + (args.budget_methods or []))]
    if unused:
        raise KDPluginError(f"--weight {unused[0]}=...: no row of --methods has the term {unused[0]!r} (rows: "
                            f"{', '.join(args.methods)}): add a row with it or drop the override")
    summary = run(args)
    print(markdown_table(summary, summary["settings"]))
    if "budget" in summary:
        from kd_plugin.benchmarks.budget import markdown

        print(markdown(summary["budget"]))
    print(f"[bench celeba] done in {summary['seconds'] / 60:.1f} min; results in {args.out}", flush=True)
    if args.json:
        print(json.dumps(summary))
    return 0
