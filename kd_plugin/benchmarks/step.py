"""One KD training step, part by part, with its host synchronisations: `kd-plugin bench step --json`.

Four configurations of `kd-plugin train`'s Trainer on the same synthetic faces, built in one process and stepped in
turn (one step of each, round after round, so that they share the machine's state): the student alone (margin head,
no teacher), a cached teacher (`kd.cache`), an online torch teacher (`mbf:backbone.pth`) and the same network
exported to ONNX by `kd-plugin export` and run online. The teacher configurations add the cosine term. Each step is
split into the parts the step marks (kd_plugin.step_parts): loader wait, teacher, student forward, backward, head, each
term, optimizer; `seconds` is the median wall time of a whole step (loader wait included) over `--steps` steps after
`--warmup`. `host_syncs` counts the calls
that wait for the device (kd_plugin.host_syncs) per step, over the steps and one logging read.

On a CPU the figures to read are the ratios (`cached/student`, `onnx_teacher/torch_teacher`): every part runs on the
same cores. On a GPU this is the command to run first (it sets `torch.cuda.set_sync_debug_mode("warn")`, so torch
itself reports any synchronisation the spy cannot see); part times there come from CUDA events."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch

CONFIGS = ("student", "cached", "torch_teacher", "onnx_teacher")


def _prepare(folder: str, network: str, size: int, identities: int, per_identity: int) -> dict:
    """Faces, a teacher checkpoint, its ONNX export and its cache."""
    from kd_plugin.data.datasets import open_dataset
    from kd_plugin.demo import make_identities
    from kd_plugin.export import export_onnx
    from kd_plugin.networks import create_network
    from kd_plugin.teachers import build_cache, load_embedder

    faces = os.path.join(folder, "faces")
    make_identities(faces, identities, per_identity, seed=0)
    torch.manual_seed(0)
    teacher = create_network(network, size).eval()
    checkpoint = os.path.join(folder, "teacher.pth")
    torch.save(teacher.state_dict(), checkpoint)
    onnx_path = os.path.join(folder, "teacher.onnx")
    export_onnx(teacher, onnx_path)
    cache = os.path.join(folder, "cache")
    spec = f"{network}:{checkpoint}"
    build_cache(load_embedder(spec), open_dataset(faces), cache, spec, progress=False)
    return {"faces": faces, "torch": spec, "onnx": onnx_path, "cache": cache}


def _config(name: str, made: dict, out: str, args) -> dict:
    kd = {} if name == "student" else {"method": "cosine", "teacher": made["onnx" if name == "onnx_teacher" else "torch"]}
    if name == "cached":
        kd["cache"] = made["cache"]
    return {"rec": made["faces"], "num_classes": args.identities, "network": args.network,
            "embedding_size": args.embedding_size, "batch_size": args.batch_size, "lr": 0.1, "num_epoch": 1,
            "warmup_epoch": 0, "num_workers": args.workers, "output": os.path.join(out, name), "frequent": 10 ** 6,
            "kd": kd}


def run(args) -> dict:
    from kd_plugin.run.config import resolve
    from kd_plugin.host_syncs import count_host_syncs
    from kd_plugin.step_parts import PartClock
    from kd_plugin.run.train import Trainer

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
    folder = args.out or tempfile.mkdtemp(prefix="kd_bench_step_")
    made = _prepare(folder, args.network, args.embedding_size, args.identities, args.per_identity)
    runs = {}
    for name in CONFIGS:
        trainer = Trainer(resolve(_config(name, made, folder, args)))
        if trainer.device != device:
            raise SystemExit(f"kd-plugin bench step: --device {device} but the trainer picked {trainer.device}")
        clock = PartClock(device)
        trainer.time_parts(clock)  # the step's own part marks (kd_plugin.step_parts)
        trainer.sampler.set_epoch(0)
        runs[name] = {"trainer": trainer, "clock": clock, "batches": iter(trainer.loader),
                      "seconds": [], "parts": defaultdict(list), "syncs": 0}
    total = args.warmup + args.steps
    if runs["student"]["trainer"].steps_per_epoch < total:
        raise SystemExit(f"kd-plugin bench step: {total} steps need more than one epoch of "
                         f"{runs['student']['trainer'].steps_per_epoch}; raise --per-identity or lower --batch-size")
    for step in range(total):
        for name, run_ in runs.items():
            trainer, clock = run_["trainer"], run_["clock"]
            start = time.perf_counter()
            batch = next(run_["batches"])
            waited = time.perf_counter() - start
            with count_host_syncs() as seen:
                trainer.step(batch)  # its scalars are summed in trainer.kd.log, as in a training run
                if step == total - 1:
                    trainer.kd.log.read(False)  # the logging step's read, once over the measured steps
            parts = clock.take()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if step >= args.warmup:
                run_["seconds"].append(seconds)
                run_["syncs"] += seen.total
                run_["parts"]["loader_wait"].append(waited)
                for part, value in parts.items():
                    run_["parts"][part].append(value)
    steps = {}
    for name, run_ in runs.items():
        steps[name] = {"seconds": statistics.median(run_["seconds"]), "host_syncs": run_["syncs"] / args.steps,
                       **{part: statistics.median(values) for part, values in sorted(run_["parts"].items())}}
    ratios = {"cached/student": steps["cached"]["seconds"] / steps["student"]["seconds"],
              "onnx_teacher/torch_teacher": steps["onnx_teacher"]["seconds"] / steps["torch_teacher"]["seconds"],
              "torch_teacher/student": steps["torch_teacher"]["seconds"] / steps["student"]["seconds"]}
    return {"device": str(device), "network": args.network, "batch_size": args.batch_size, "steps_measured": args.steps,
            "steps": steps, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kd-plugin bench step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--network", default="mbf", help="student and teacher network (default mbf)")
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="per process (default 32)")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per configuration (default 8)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--identities", type=int, default=24)
    parser.add_argument("--per-identity", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    parser.add_argument("--out", help="working folder (default: a new temporary folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"one KD step on {result['device']} ({args.network}, batch {args.batch_size}; median of {args.steps})")
    for name, figures in result["steps"].items():
        parts = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in figures.items() if k not in ("seconds", "host_syncs"))
        print(f"  {name:14s} {figures['seconds'] * 1000:8.1f} ms/step  host syncs/step {figures['host_syncs']:.2f}"
              f"   ({parts})")
    for key, value in result["ratios"].items():
        print(f"  {key}: {value:.3f}")
    return 0
