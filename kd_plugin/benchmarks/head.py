"""Inherited (frozen, ProxylessKD) vs trainable (PartialFC_V2-like) classifier: step time and memory, side by side.

`kd-plugin bench head --json` runs every configuration in its own subprocess (so each peak memory figure is its own),
one after the other in one command, and prints one JSON object as the last stdout line. A step is forward + backward
+ SGD step (momentum 0.9, weight decay 5e-4, as arcface_torch) of a 512->512 linear "backbone" and the head, on a
batch of 128 random inputs. Classifier memory counts the bytes of the C x d matrix's parameter or buffer, its
gradient and its optimizer state after a step; peak memory is the process's peak resident memory during the steps
above its resident memory before the classifier existed (CPU), or torch's peak allocation during the steps (CUDA)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from kd_plugin.benchmarks.memory import USABLE_FRACTION, available_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def run_one(mode: str, classes: int, storage: str, sample_rate: float, dim: int, batch: int, steps: int,
            device: str) -> dict:
    """Measure one configuration in this process."""
    import torch

    from kd_plugin.methods.heads import CombinedMarginLoss, PartialFCHead

    torch.manual_seed(0)
    baseline = rss_bytes()
    backbone = torch.nn.Linear(dim, dim).to(device)
    margin = CombinedMarginLoss(64, 1.0, 0.5, 0.0)
    if mode == "trainable":
        head = PartialFCHead(margin, dim, classes, sample_rate).to(device)
    else:
        centres = torch.empty(classes, dim).normal_()
        head = PartialFCHead(margin, dim, classes, sample_rate, centres=centres,
                             centre_dtype=getattr(torch, DTYPES[storage])).to(device)
        del centres
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}], lr=0.1, momentum=0.9,
                          weight_decay=5e-4)
    inputs = torch.randn(batch, dim, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    times = []
    for step in range(steps + 1):  # the first step warms up (allocations, optimizer state)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = head(backbone(inputs), labels)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    weight = head.weight
    tensors = [weight] + ([weight.grad] if weight.grad is not None else [])
    tensors += [t for t in opt.state.get(weight, {}).values() if torch.is_tensor(t)]
    classifier_bytes = sum(t.numel() * t.element_size() for t in tensors)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = max(peak_rss_bytes() - baseline, 0)  # tiny configurations can free more than they add
    return {"mode": mode, "classes": classes, "storage": storage if mode == "inherited" else "fp32",
            "sample_rate": sample_rate, "step_seconds": sorted(times)[len(times) // 2],
            "classifier_bytes": classifier_bytes, "classifier_bytes_per_class": classifier_bytes / classes,
            "peak_bytes": int(peak), "loss": loss.item()}


def run_all(classes: list[int], dim: int, batch: int, steps: int, device: str, sample_rate_check: float,
            progress=print) -> dict:
    """Every configuration, each in a subprocess; returns the JSON-ready summary."""
    configs = []
    for c in classes:
        configs += [("trainable", c, "fp32", 1.0), ("inherited", c, "fp32", 1.0), ("inherited", c, "fp16", 1.0)]
    if sample_rate_check < 1.0:
        largest = max(classes[:2]) if len(classes) > 1 else classes[0]
        configs += [("trainable", largest, "fp32", sample_rate_check), ("inherited", largest, "fp16", sample_rate_check)]
    runs, skipped = [], []
    for mode, c, storage, rate in configs:
        need = _predicted_peak(runs, mode, c, storage)
        if need and need > USABLE_FRACTION * available_bytes(device):
            skipped.append({"mode": mode, "classes": c, "storage": storage, "reason":
                            f"predicted peak {need / 2**30:.1f} GiB, more than {USABLE_FRACTION:.0%} of the "
                            f"{available_bytes(device) / 2**30:.1f} GiB available here; lower --classes to run it"})
            continue
        progress(f"bench head: {mode} C={c} storage={storage} sample_rate={rate} ...")
        cmd = [sys.executable, "-m", "kd_plugin.benchmarks.head", "--one",
               json.dumps([mode, c, storage, rate, dim, batch, steps, device])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            skipped.append({"mode": mode, "classes": c, "storage": storage,
                            "reason": f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"})
            continue
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        progress(f"  step {r['step_seconds']:.3f}s, classifier {r['classifier_bytes'] / 2**20:.0f} MiB, "
                 f"peak {r['peak_bytes'] / 2**20:.0f} MiB")
    summary = {"device": device, "machine": _machine(device), "embedding_size": dim, "batch": batch,
               "steps_timed": steps, "runs": runs, "skipped": skipped, "ratios": {}}
    for c in classes:
        pick = {(r["mode"], r["storage"]): r for r in runs if r["classes"] == c and r["sample_rate"] == 1.0}
        trainable = pick.get(("trainable", "fp32"))
        if not trainable:
            continue
        ratios = {}
        for storage in ("fp32", "fp16"):
            inherited = pick.get(("inherited", storage))
            if inherited:
                ratios[f"memory_ratio_{storage}"] = inherited["classifier_bytes"] / trainable["classifier_bytes"]
                ratios[f"peak_memory_ratio_{storage}"] = inherited["peak_bytes"] / trainable["peak_bytes"]
                ratios[f"step_time_ratio_{storage}"] = inherited["step_seconds"] / trainable["step_seconds"]
        if "step_time_ratio_fp32" in ratios:
            ratios["step_time_ratio"] = ratios["step_time_ratio_fp32"]
        summary["ratios"][str(c)] = ratios
    headline = summary["ratios"].get("1000000", {})
    for key in ("memory_ratio_fp32", "memory_ratio_fp16", "step_time_ratio"):
        summary[key] = headline.get(key)
    return summary


def _predicted_peak(runs: list[dict], mode: str, classes: int, storage: str) -> float | None:
    """Scale the peak of the same configuration at a smaller class count linearly."""
    same = [r for r in runs if (r["mode"], r["storage"]) == (mode, storage) and r["classes"] < classes]
    if not same:
        return None
    ref = max(same, key=lambda r: r["classes"])
    return ref["peak_bytes"] * classes / ref["classes"]


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch CPU"


def main(argv: list[str] | None = None) -> int:
    """`kd-plugin bench head` entry point."""
    parser = argparse.ArgumentParser(prog="kd-plugin bench head", description=__doc__)
    parser.add_argument("--classes", default="100000,1000000,2000000",
                        help="class counts; larger ones are skipped when their predicted memory does not fit")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    parser.add_argument("--sample-rate-check", type=float, default=0.1,
                        help="also time this sample_rate at 1M classes (1.0 to skip)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--json", action="store_true", help="print the JSON summary as the last stdout line")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*json.loads(args.one))))
        return 0
    classes = [int(c) for c in args.classes.split(",") if c]
    summary = run_all(classes, args.embedding_size, args.batch, args.steps, args.device, args.sample_rate_check,
                      progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps(summary, indent=2))
    return 0


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
