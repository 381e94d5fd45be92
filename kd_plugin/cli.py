"""`kd-plugin` command line: `eval` (face verification), `pack` (write insightface RecordIO), `bench` (figures)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from kd_plugin.errors import KDPluginError
from kd_plugin.normalization import ARCFACE_MEAN, ARCFACE_STD, InputNormalization


def _triplet_help(what: str) -> str:
    return f"{what} in pixel units, RGB order: one number or 'R,G,B' (default 127.5)"


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="face-verification figures of a model on a .bin set or all pairs of a dataset")
    p.add_argument("--model", required=True, help="the model to evaluate: an ONNX file")
    p.add_argument("--mean", default=",".join(map(str, ARCFACE_MEAN)), help=_triplet_help("input mean"))
    p.add_argument("--std", default=",".join(map(str, ARCFACE_STD)), help=_triplet_help("input std"))
    p.add_argument("--bgr", action="store_true", help="the model takes BGR input (images are RGB)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--bin", help="arcface_torch verification set (.bin): 10-fold accuracy")
    target.add_argument("--pairs-from", help="identity-labelled dataset (train.rec, its folder, image folder, "
                                             "label.txt): all-pairs TPR@FPR")
    p.add_argument("--gallery-model", help="cross-model: embed the gallery side with this model instead")
    p.add_argument("--gallery-mean", help="gallery model's input mean (default: --mean)")
    p.add_argument("--gallery-std", help="gallery model's input std (default: --std)")
    p.add_argument("--gallery-bgr", action="store_true", help="the gallery model takes BGR input")
    p.add_argument("--fprs", default="1e-1,1e-2,1e-3,1e-4,1e-5,1e-6", help="FPRs to report TPR at")
    p.add_argument("--batch-size", type=int, default=64, help="inference batch (fixed-batch models use their own)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from kd_plugin.evaluation import evaluate_bin, evaluate_pairs
    from kd_plugin.teachers import load_embedder

    try:
        fprs = [float(f) for f in args.fprs.split(",") if f]
    except ValueError:
        fprs = []
    if not fprs or not all(0.0 < f < 1.0 for f in fprs):
        raise KDPluginError(f"--fprs: expected comma-separated false-positive rates between 0 and 1 (exclusive) like "
                            f"1e-2,1e-3, got {args.fprs!r}")
    model = load_embedder(args.model, InputNormalization(args.mean, args.std, args.bgr), args.batch_size)
    gallery = None
    if args.gallery_model:
        norm = InputNormalization(args.gallery_mean or args.mean, args.gallery_std or args.std, args.gallery_bgr)
        gallery = load_embedder(args.gallery_model, norm, args.batch_size)
    if args.bin:
        result = evaluate_bin(args.bin, model, gallery, fprs)
    else:
        result = evaluate_pairs(args.pairs_from, model, gallery, fprs)
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(result)
    return 0


def _print_human(result: dict) -> None:
    if "accuracy" in result:
        print(f"accuracy {result['accuracy']:.4f} +- {result['accuracy_std']:.4f}")
    for key, value in result["tpr_at_fpr"].items():
        print(f"TPR@FPR={key}: " + ("n/a (too few negative pairs)" if value is None else f"{value:.4f}"))
    auc = result["auc"]
    print(f"AUC {auc:.5f}" if auc is not None else "AUC n/a")
    print(f"{result['num_images']} images, {result['num_pos']} positive pairs, {result['num_neg']} negative pairs")


def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="write a dataset (image folder, label.txt, .rec) as insightface train.rec/idx/property")
    p.add_argument("source", help="ImageFolder tree ROOT/<identity>/<image>, a label.txt list, or a .rec")
    p.add_argument("out_dir", help="folder to write train.rec, train.idx and property into")
    p.add_argument("--skip-bad-records", action="store_true", help="skip unreadable inputs instead of stopping")
    p.set_defaults(func=_run_pack)


def _run_pack(args: argparse.Namespace) -> int:
    from kd_plugin.data.datasets import open_dataset
    from kd_plugin.data.pack import pack_dataset

    dataset = open_dataset(args.source, skip_bad_records=args.skip_bad_records)
    result = pack_dataset(dataset, args.out_dir)
    notes = [f"{result['re_encoded']} non-JPEG images re-encoded as JPEG"] if result["re_encoded"] else []
    notes += [f"{result['skipped']} undecodable images left out"] if result["skipped"] else []
    print(f"packed {result['images']} images of {result['identities']} identities into {args.out_dir}"
          + (f" ({'; '.join(notes)})" if notes else ""))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures: `kd-plugin bench head --json`", add_help=False)
    p.add_argument("name", choices=["head"], help="head: inherited vs trainable classifier, time and memory")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see kd-plugin bench NAME --help)")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from kd_plugin.benchmarks import head

    return {"head": head.main}[args.name](args.rest)


def build_parser() -> argparse.ArgumentParser:
    """The `kd-plugin` argument parser with all sub-commands."""
    parser = argparse.ArgumentParser(prog="kd-plugin", description="Knowledge distillation for arcface_torch.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_eval(sub)
    _add_pack(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kd-plugin` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KDPluginError, FileNotFoundError, ValueError) as exc:
        print(f"kd-plugin {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
