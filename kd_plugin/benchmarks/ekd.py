"""EKD's cost next to a plain student step, side by side: `kd-plugin bench ekd --json`.

For each global batch N: a plain step (student forward, trainable margin head over 1000 classes, backward, SGD step)
and the same step plus EKD against fixed teacher embeddings (as a cache gives them), alternated, median of `--steps`.
`ekd_overhead[N]` is the fraction EKD adds to the plain step's time; `ekd_alone_fraction` times EKD's forward +
backward by itself over the plain step (steadier where the step's own noise is larger than EKD). Separately, EKD's own forward + backward is
measured alone for its peak memory (CUDA: torch's peak allocation; CPU: peak resident memory above the baseline), from
which `bytes_per_pair` and the largest N fitting in 80 GB follow. `--student tiny` (a 4-layer CNN) keeps CPU runs short;
the default is arcface_torch's `mbf`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn


class TinyStudent(nn.Module):
    """A small CNN for CPU runs of the benchmark (not a face model)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        layers, ch = [], 3
        for out in (16, 32, 64, 128):
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.PReLU(out)]
            ch = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(ch, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(n: int, student_name: str, dim: int, steps: int, device: str) -> dict:
    """Median plain and EKD step times at global batch `n` on one device."""
    from kd_plugin.heads import CombinedMarginLoss, PartialFCHead
    from kd_plugin.losses import EKDLoss
    from kd_plugin.networks import create_network

    torch.manual_seed(0)
    student = (TinyStudent(dim) if student_name == "tiny" else create_network(student_name, dim)).to(device)
    head = PartialFCHead(CombinedMarginLoss(64, 1.0, 0.4, 0.0), dim, 1000).to(device)
    opt = torch.optim.SGD(list(student.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
    ekd = EKDLoss().to(device)
    images = torch.randn(n, 3, 112, 112, device=device)
    labels = (torch.arange(n, device=device) // 4) % 1000  # identity-balanced: 4 images per identity
    teacher = torch.randn(n, 512, device=device)
    times = {"plain": [], "ekd": []}
    for step in range(steps + 1):
        for mode in ("plain", "ekd"):
            _sync(device)
            start = time.perf_counter()
            emb = student(images)
            loss = head(emb, labels)
            if mode == "ekd":
                loss = loss + ekd(emb, teacher, labels)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            _sync(device)
            if step:  # the first round warms up
                times[mode].append(time.perf_counter() - start)
    alone = []
    for step in range(steps + 1):  # EKD's forward + backward by itself, on the same embeddings
        leaf = emb.detach().clone().requires_grad_(True)
        _sync(device)
        start = time.perf_counter()
        ekd(leaf, teacher, labels)[0].backward()
        _sync(device)
        if step:
            alone.append(time.perf_counter() - start)
    plain, with_ekd, ekd_only = (sorted(t)[len(t) // 2] for t in (times["plain"], times["ekd"], alone))
    return {"plain_seconds": plain, "ekd_seconds": with_ekd, "overhead": (with_ekd - plain) / plain,
            "ekd_alone_seconds": ekd_only, "ekd_alone_fraction": ekd_only / plain}


def ekd_peak_bytes(n: int, dim: int, device: str) -> int:
    """Peak memory of EKD's forward + backward alone at global batch `n`."""
    from kd_plugin.benchmarks.head import _peak_rss_bytes, _reset_peak_rss, _rss_bytes
    from kd_plugin.losses import EKDLoss

    torch.manual_seed(0)
    student = torch.randn(n, dim, device=device, requires_grad=True)
    teacher, labels = torch.randn(n, 512, device=device), (torch.arange(n, device=device) // 4)
    ekd = EKDLoss().to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
        _reset_peak_rss()
    ekd(student, teacher, labels)[0].backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return max(_peak_rss_bytes() - base, 0)


def main(argv: list[str] | None = None) -> int:
    """`kd-plugin bench ekd` entry point."""
    parser = argparse.ArgumentParser(prog="kd-plugin bench ekd", description=__doc__)
    parser.add_argument("--batches", default="512,1024,4096", help="global batch sizes")
    parser.add_argument("--memory-batches", default="1024,4096,8192", help="batch sizes for EKD's peak memory")
    parser.add_argument("--student", default="mbf", help="arcface_torch network name, or 'tiny' for CPU runs")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one-memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_memory:
        print(ekd_peak_bytes(args.one_memory, args.embedding_size, args.device))
        return 0
    result = {"device": args.device, "student": args.student, "embedding_size": args.embedding_size,
              "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
              "steps": {}, "ekd_overhead": {}, "ekd_peak_bytes": {}}
    for n in (int(b) for b in args.batches.split(",") if b):
        print(f"bench ekd: timing global batch {n} ...", file=sys.stderr, flush=True)
        timing = time_steps(n, args.student, args.embedding_size, args.steps, args.device)
        result["steps"][str(n)] = timing
        result["ekd_overhead"][str(n)] = round(timing["overhead"], 4)
        print(f"  plain {timing['plain_seconds']:.3f}s, with EKD {timing['ekd_seconds']:.3f}s", file=sys.stderr)
    for n in (int(b) for b in args.memory_batches.split(",") if b):  # each in a fresh process: a clean baseline
        cmd = [sys.executable, "-m", "kd_plugin.benchmarks.ekd", "--one-memory", str(n), "--device", args.device,
               "--embedding-size", str(args.embedding_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result["ekd_peak_bytes"][str(n)] = int(out.strip().splitlines()[-1])
    if result["ekd_peak_bytes"]:
        n_max = max(result["ekd_peak_bytes"], key=int)
        per_pair = result["ekd_peak_bytes"][n_max] / int(n_max) ** 2
        result["bytes_per_pair"] = round(per_pair, 2)
        result["largest_n_in_80gb"] = int((80e9 / per_pair) ** 0.5) if per_pair > 0 else None
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
