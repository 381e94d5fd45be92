"""`kd-plugin` command line: `eval`, `pack`, `classifier`, `centres` (alias `centers`), `cache`, `methods`, `train`,
`export`, `demo`, `bench`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from kd_plugin.errors import KDPluginError
from kd_plugin.evaluation.fprs import DEFAULT_FPRS
from kd_plugin.normalization import given_normalization


def _triplet_help(what: str) -> str:
    return (f"{what} in pixel units, RGB order: one number or 'R,G,B' (default: the model's convention, 127.5 for "
            f"arcface_torch networks and insightface packs)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="face-verification figures of a model on a .bin set or all pairs of a dataset")
    p.add_argument("--model", required=True, help="model spec: FILE.onnx, or NETWORK:CHECKPOINT (r100:backbone.pth)")
    p.add_argument("--mean", help=_triplet_help("input mean"))
    p.add_argument("--std", help=_triplet_help("input std"))
    p.add_argument("--bgr", action="store_true", help="the model takes BGR input (images are RGB)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--bin", help="arcface_torch verification set (.bin): 10-fold accuracy")
    target.add_argument("--pairs-from", help="identity-labelled dataset (train.rec, its folder, image folder, "
                                             "label.txt): all-pairs TPR@FPR")
    target.add_argument("--ijb", metavar="ROOT", help="IJB-B/IJB-C release folder (meta/, loose_crop/): 1:1 template "
                                                      "verification, TPR@FAR, arcface_torch's protocol")
    p.add_argument("--target", choices=["IJBC", "IJBB"], help="with --ijb: which set (default IJBC)")
    p.add_argument("--gallery-model", help="cross-model: embed the gallery side with this model instead")
    p.add_argument("--gallery-mean", help="gallery model's input mean (default: --mean)")
    p.add_argument("--gallery-std", help="gallery model's input std (default: --std)")
    p.add_argument("--gallery-bgr", action="store_true", help="the gallery model takes BGR input")
    p.add_argument("--fprs", default=",".join(f"{f:.0e}" for f in DEFAULT_FPRS), help="FPRs to report TPR at")
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
    model = load_embedder(args.model, given_normalization(args.mean, args.std, args.bgr), batch_size=args.batch_size,
                          onnx_on_cpu="onnxruntime")
    gallery = None
    if args.gallery_model:
        norm = given_normalization(args.gallery_mean or args.mean, args.gallery_std or args.std, args.gallery_bgr)
        gallery = load_embedder(args.gallery_model, norm, batch_size=args.batch_size, onnx_on_cpu="onnxruntime")
    if args.target and not args.ijb:
        raise KDPluginError(f"--target {args.target}: applies to --ijb only; drop it or evaluate with --ijb ROOT")
    if args.ijb:
        if gallery is not None:
            raise KDPluginError("--ijb with --gallery-model: cross-model IJB evaluation is not implemented; drop "
                                "--gallery-model")
        from kd_plugin.evaluation.ijb import evaluate_ijb
        result = evaluate_ijb(args.ijb, model, args.target or "IJBC", fprs, batch_size=args.batch_size)
    elif args.bin:
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


def _add_teacher_command(sub: argparse._SubParsersAction, name: str, help: str, out_help: str, run,
                         aliases: Sequence[str] = ()) -> None:
    """A command that runs the teacher over the training data (under torchrun, each rank its share)."""
    p = sub.add_parser(name, help=help, aliases=list(aliases))
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--teacher", required=True, help="teacher spec: FILE.onnx, or NETWORK:CHECKPOINT (r100:backbone.pth)")
    p.add_argument("--mean", help=_triplet_help("teacher input mean"))
    p.add_argument("--std", help=_triplet_help("teacher input std"))
    p.add_argument("--bgr", action="store_true", help="the teacher takes BGR input (images are RGB)")
    p.add_argument("--data", required=True, nargs="+", help="training data: train.rec (or its folder), image folder, "
                                                            "label.txt; several sets as config.rec lists them")
    p.add_argument("--unlabeled", nargs="+", help="unlabelled image sets, as config.kd.unlabeled.data names them")
    p.add_argument("--batch-size", type=int, default=128, help="teacher inference batch")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu", help="where a torch teacher runs")
    p.set_defaults(func=run)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _teacher_and_data(args: argparse.Namespace):
    from kd_plugin.distributed import get_rank, init_from_env, training_device
    from kd_plugin.teachers import load_embedder

    init_from_env()
    device = args.device
    if device == "cuda":  # torchrun: each rank on its own GPU, as in training
        device = str(training_device())
    teacher = load_embedder(args.teacher, given_normalization(args.mean, args.std, args.bgr), device=device,
                            batch_size=args.batch_size, onnx_on_cpu="onnxruntime")
    return teacher, _training_data(args), get_rank()


def _training_data(args: argparse.Namespace):
    """--data (one set or several, one class space) and --unlabeled, opened as kd-plugin train opens config.rec and
    config.kd.unlabeled.data, so a cache made here fits that run."""
    from kd_plugin.data.datasets import open_training_data

    return open_training_data(args.data if len(args.data) > 1 else args.data[0], args.unlabeled)


def _add_classifier(sub: argparse._SubParsersAction) -> None:
    from kd_plugin.methods.heads import CENTRE_FIT

    p = sub.add_parser("classifier", help="the teacher's classifier as one (C, d) file: converted from any shard "
                                          "layout (--from), or fitted to its cached embeddings (--fit)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source",
                        help="folder of checkpoint_gpu_{r}.pt or rank_{r}_softmax_weight.pt shards, one shard, a full "
                             "(C, d) tensor file, or a fork's header with a (d, C) 'kernel'")
    source.add_argument("--fit", metavar="CACHE", help="a `kd-plugin cache` folder of a teacher released without "
                                                       "classifier: fit the margin-softmax classifier of the training "
                                                       "identities to its embeddings (runs under torchrun)")
    p.add_argument("--num-classes", type=int, required=True, help="classes of the training data (config.num_classes)")
    p.add_argument("--embedding-size", type=int, help="expected embedding size (config.embedding_size)")
    p.add_argument("--out", required=True, help="output file (torch.save dict with 'weight')")
    p.add_argument("--data", nargs="+", help="with --fit: the training data the cache was made from (train.rec, ...; "
                                             "several sets as config.rec lists them)")
    p.add_argument("--unlabeled", nargs="+", help="with --fit: the unlabelled sets the cache was made with")
    p.add_argument("--margin", default="1.0,0.5,0.0", help="with --fit: arcface_torch margin_list m1,m2,m3 (default "
                                                           "ArcFace 0.5)")
    for key, value in CENTRE_FIT.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value,
                       help=f"with --fit: {key} of the fit (default {value}; config.kd.proxyless.fit)")
    p.set_defaults(func=_run_classifier)


def _run_classifier(args: argparse.Namespace) -> int:
    from kd_plugin.teachers import read_classifier, save_classifier

    if args.fit:
        return _fit_classifier(args)
    weight = read_classifier(args.source, args.num_classes, args.embedding_size)
    save_classifier(weight, args.out, source=args.source, kind="classifier")
    print(f"wrote {args.out}: {weight.shape[0]} classes x {weight.shape[1]}")
    return 0


def _fit_classifier(args: argparse.Namespace) -> int:
    from kd_plugin.distributed import get_rank, init_from_env
    from kd_plugin.methods.heads import CombinedMarginLoss
    from kd_plugin.teachers import load_cache, save_classifier
    from kd_plugin.centres.estimate import whole_matrix
    from kd_plugin.centres.fit import fit_class_slice

    if not args.data:
        raise KDPluginError("kd-plugin classifier --fit: give --data, the training data the cache was made from")
    try:
        margin = CombinedMarginLoss(64, *(float(m) for m in args.margin.split(",")))
    except (TypeError, ValueError) as exc:
        raise KDPluginError(f"--margin {args.margin!r}: expected m1,m2,m3 as in arcface_torch's margin_list, e.g. "
                            f"1.0,0.5,0.0 ({exc})") from None
    init_from_env()
    dataset = _training_data(args)
    if dataset.num_classes != args.num_classes:
        raise KDPluginError(f"--num-classes {args.num_classes}, but {args.data} has {dataset.num_classes} classes")
    cache = load_cache(args.fit, dataset)
    part = fit_class_slice(cache, dataset.labels, args.num_classes, margin, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr)
    weight = whole_matrix(part, args.num_classes)
    if get_rank() == 0:
        save_classifier(weight, args.out, source=args.fit, kind="fitted_centres", margin=args.margin)
        print(f"wrote {args.out}: {weight.shape[0]} fitted class centres x {weight.shape[1]}")
    return 0


def _run_centres(args: argparse.Namespace) -> int:
    from kd_plugin.centres.estimate import estimate_centres
    from kd_plugin.teachers import save_classifier

    teacher, dataset, rank = _teacher_and_data(args)
    centres = estimate_centres(teacher, dataset, args.batch_size)
    if rank == 0:
        save_classifier(centres, args.out, source=",".join(args.data), teacher=args.teacher, kind="estimated_centres")
        print(f"wrote {args.out}: {centres.shape[0]} class centres x {centres.shape[1]}")
    return 0


def _run_cache(args: argparse.Namespace) -> int:
    import time

    from kd_plugin.teachers import build_cache

    teacher, dataset, rank = _teacher_and_data(args)
    start = time.perf_counter()
    path = build_cache(teacher, dataset, args.out, args.teacher, args.batch_size)
    if rank == 0:
        seconds = time.perf_counter() - start
        print(f"wrote {path}: {len(dataset)} images x 2 (image, flip) in {seconds:.1f}s "
              f"({2 * len(dataset) / seconds:.1f} embeddings/s)")
    return 0


def _add_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="the distillation methods config.kd.method can name: weights, needs, settings")
    p.set_defaults(func=_run_methods)


def _run_methods(args: argparse.Namespace) -> int:
    from kd_plugin.methods import describe

    print(describe())
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from kd_plugin.methods import methods

    listing = "; ".join(f"{name} ({m.title})" for name, m in methods().items())
    p = sub.add_parser("train", help="train (and distil) a student from an arcface_torch-style config; torchrun-ready",
                       epilog=f"config.kd.method names one or more of: {listing}, joined with '+'; details: "
                              f"kd-plugin methods")
    p.add_argument("config", help="python config file defining `config` (an EasyDict) with an optional `config.kd`")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from kd_plugin.run.train import train

    result = train(args.config)
    print(f"training stopped ({result['stopped']}) at step {result['global_step']}")
    return 0


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", add_help=False,
                       help="the preflight before a long job: builds the run from its config, takes a few real steps "
                            "and reports time, memory, host syncs, ETA and what fails (alone or under torchrun)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="CONFIG and options (see kd-plugin check --help)")
    p.set_defaults(func=lambda args: __import__("kd_plugin.check", fromlist=["main"]).main(args.rest))


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a student as ONNX for insightface's model_zoo (normalisation inside)")
    p.add_argument("model", help="a training config (.py: its network, <output>/model.pt, kd.student_mean/std) or a "
                                 "model spec NETWORK:CHECKPOINT (mbf:work_dirs/job/model.pt)")
    p.add_argument("--out", help="ONNX file to write (default for a config: <output>/model.onnx)")
    p.add_argument("--checkpoint", help="with a config: these weights instead of <output>/model.pt")
    p.add_argument("--mean", help=_triplet_help("with a spec: the student's input mean"))
    p.add_argument("--std", help=_triplet_help("with a spec: the student's input std"))
    p.add_argument("--bgr", action="store_true", help="with a spec: the student was trained on BGR input")
    p.add_argument("--embedding-size", type=int, help="with a spec: embedding size (default: from the checkpoint)")
    p.add_argument("--input-size", type=int, default=112, help="image side the student takes (default 112)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--format", default="insightface", choices=["insightface", "uint8"],
                   help="insightface (default): float32 RGB 0..255 input that insightface's model_zoo loads and feeds "
                        "as it is; uint8: uint8 RGB input")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from kd_plugin.export import export_from_config, export_onnx
    from kd_plugin.networks import build_network, network_family, parse_network_spec

    if args.model.endswith(".py"):
        result = export_from_config(args.model, args.out, args.checkpoint, args.opset, args.format)
    else:
        spec = parse_network_spec(args.model) if network_family(args.model) else None
        if spec is None or spec.checkpoint is None:
            raise KDPluginError(f"kd-plugin export {args.model}: expected a training config (.py) or "
                                f"NETWORK:CHECKPOINT, e.g. mbf:work_dirs/job/model.pt")
        if not args.out:
            raise KDPluginError("kd-plugin export NETWORK:CHECKPOINT: give --out FILE.onnx")
        norm = given_normalization(args.mean, args.std, args.bgr)  # None: arcface_torch's 127.5 / 127.5
        network = build_network(spec, args.embedding_size)
        result = export_onnx(network, args.out, norm, (args.input_size, args.input_size), args.opset,
                             input_format=args.format)
    kind = "uint8 RGB" if result["format"] == "uint8" else "float32 RGB 0..255 (insightface's model_zoo loads it)"
    print(f"wrote {result['path']}: input {kind} (N, 3, {result['input_size'][0]}, {result['input_size'][1]}) "
          f"normalised inside, output embedding (N, {result['embedding_size']}); onnxruntime matches torch "
          f"(relative error {result['relative_error']:.1e})")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="distil students on synthetic identities with a teacher trained here (CPU, minutes)",
                       add_help=False)  # its own options: kd-plugin demo --help
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from kd_plugin import demo

    return demo.main(args.extra)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures: `kd-plugin bench head --json`", add_help=False)
    p.add_argument("name", choices=["head", "cache", "ekd", "celeba", "scale", "step", "all_pairs"],
                   help="head: inherited vs trainable classifier, time and memory; cache: teacher vs cache-build rate; "
                        "ekd: EKD's overhead on a student step and its memory; celeba: every method side by side on "
                        "the shared real faces; scale: per-rank memory and .rec opening at MS1MV3..WebFace42M scale; "
                        "step: one KD step part by part, with its host synchronisations; all_pairs: time and memory "
                        "of all-pairs verification")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see kd-plugin bench NAME --help)")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from kd_plugin.benchmarks import all_pairs, cache, celeba, ekd, head, scale, step

    return {"head": head.main, "cache": cache.main, "ekd": ekd.main, "celeba": celeba.main,
            "scale": scale.main, "step": step.main, "all_pairs": all_pairs.main}[args.name](args.rest)


def build_parser() -> argparse.ArgumentParser:
    """The `kd-plugin` argument parser with all sub-commands."""
    parser = argparse.ArgumentParser(prog="kd-plugin", description="Knowledge distillation for arcface_torch.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_eval(sub)
    _add_pack(sub)
    _add_classifier(sub)
    _add_teacher_command(sub, "centres", "estimate class centres from a teacher's embeddings (runs under torchrun)",
                         "output file (torch.save dict with 'weight')", _run_centres, aliases=["centers"])
    _add_teacher_command(sub, "cache", "embed every training image and its flip with the teacher once (fp16)",
                         "output folder (embeddings.npy + meta.json)", _run_cache)
    _add_methods(sub)
    _add_train(sub)
    _add_check(sub)
    _add_export(sub)
    _add_demo(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kd-plugin` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.func(args)
    except (KDPluginError, FileNotFoundError, ValueError) as exc:
        print(f"kd-plugin {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
