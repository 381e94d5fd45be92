"""EKD's cost next to a plain student step, side by side: `kd-plugin bench ekd --json`.

For each global batch N: a plain step (student forward, trainable margin head over 1000 classes, backward, SGD step)
and the same step plus EKD against fixed teacher embeddings (as a cache gives them), alternated, median of `--steps`.
`ekd_overhead[N]` is the fraction EKD adds to the plain step's time; `ekd_alone_fraction` times EKD's forward +
backward by itself over the plain step (steadier where the step's own noise is larger than EKD). Separately, EKD's own forward + backward is
measured alone for its peak memory (CUDA: torch's peak allocation; CPU: peak resident memory above the baseline), from
which `bytes_per_pair` and the largest N fitting in 80 GB follow.

It sizes itself to the machine: on a GPU the defaults centre on the published size (student `mbf`, global batches 256,
512 — EKD's 8 GPUs x 64 — and 1024: mbf keeps about 42 MiB of fp32 activations per image, so 2048 would not fit
80 GB; EKD memory at 1024, 4096, 8192), on a CPU sizes that finish in minutes (the 4-layer `tiny` student at 128,
256, 512; EKD memory at 1024, 2048, 4096). Before each size it predicts the peak memory (the student's activations per
image, measured by forward hooks, and EKD's bytes per pair, measured at the smallest memory size) and stops with what
it needs and which option lowers it, rather than being killed by the OS."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn

from kd_plugin.benchmarks.memory import activation_bytes_per_image, peak_rss_bytes, require, reset_peak_rss, rss_bytes


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


def _student(name: str, dim: int, device: str) -> nn.Module:
    from kd_plugin.networks import create_network

    return (TinyStudent(dim) if name == "tiny" else create_network(name, dim)).to(device)


def step_bytes(n: int, student: nn.Module, ekd_bytes_per_pair: float) -> float:
    """Predicted peak of one step at global batch `n`: parameters with gradient and momentum, the input batch, the
    layer outputs kept for backward (measured here for mbf: 43 MiB per image predicted, 42 MiB peak), EKD's pairs."""
    params = sum(p.numel() * p.element_size() for p in student.parameters())
    return 3 * params + n * (3 * 112 * 112 * 4 + activation_bytes_per_image(student)) + ekd_bytes_per_pair * n * n


def time_steps(n: int, student_name: str, dim: int, steps: int, device: str) -> dict:
    """Median plain and EKD step times at global batch `n` on one device."""
    from kd_plugin.methods.heads import CombinedMarginLoss, PartialFCHead
    from kd_plugin.methods.losses import EKDLoss

    torch.manual_seed(0)
    student = _student(student_name, dim, device)
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
    from kd_plugin.methods.losses import EKDLoss

    torch.manual_seed(0)
    student = torch.randn(n, dim, device=device, requires_grad=True)
    teacher, labels = torch.randn(n, 512, device=device), (torch.arange(n, device=device) // 4)
    ekd = EKDLoss().to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
        reset_peak_rss()
    ekd(student, teacher, labels)[0].backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return max(peak_rss_bytes() - base, 0)


DEFAULTS = {"cuda": {"batches": "256,512,1024", "memory_batches": "1024,4096,8192", "student": "mbf"},
            "cpu": {"batches": "128,256,512", "memory_batches": "1024,2048,4096", "student": "tiny"}}


def _sizes(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b]


def _memory_of(n: int, args) -> int:
    """EKD's peak memory at global batch `n`, in a fresh process (a clean baseline)."""
    cmd = [sys.executable, "-m", "kd_plugin.benchmarks.ekd", "--one-memory", str(n), "--device", args.device,
           "--embedding-size", str(args.embedding_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """`kd-plugin bench ekd` entry point."""
    parser = argparse.ArgumentParser(prog="kd-plugin bench ekd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", help="global batch sizes timed (default: 256,512,1024 on a GPU, 128,256,512 "
                                          "on a CPU)")
    parser.add_argument("--memory-batches", help="batch sizes for EKD's peak memory (default: 1024,4096,8192 on a "
                                                 "GPU, 1024,2048,4096 on a CPU)")
    parser.add_argument("--student", help="arcface_torch network name, or 'tiny' (default: mbf on a GPU, tiny on a "
                                           "CPU)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one-memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_memory:
        print(ekd_peak_bytes(args.one_memory, args.embedding_size, args.device))
        return 0
    for key, value in DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    result = {"device": args.device, "student": args.student, "embedding_size": args.embedding_size,
              "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
              "batches": _sizes(args.batches), "memory_batches": _sizes(args.memory_batches),
              "steps": {}, "ekd_overhead": {}, "ekd_peak_bytes": {}}
    print(f"bench ekd on {args.device}: student {args.student}, global batches {args.batches}, EKD memory at "
          f"{args.memory_batches}", file=sys.stderr, flush=True)
    # EKD's memory first, smallest size first: its bytes per pair predict the larger sizes and the timed steps
    per_pair = None
    for n in sorted(result["memory_batches"]):
        if per_pair is not None:
            require(per_pair * n * n, f"bench ekd: EKD alone at global batch {n}", args.device,
                    "lower --memory-batches")
        result["ekd_peak_bytes"][str(n)] = _memory_of(n, args)
        per_pair = max(per_pair or 0.0, result["ekd_peak_bytes"][str(n)] / n ** 2)
    if per_pair is None:  # no memory sizes asked for: one small measurement for the predictions
        per_pair = _memory_of(512, args) / 512 ** 2
    probe = _student(args.student, args.embedding_size, args.device)
    for n in result["batches"]:
        need = step_bytes(n, probe, per_pair)
        require(need, f"bench ekd: a {args.student} step at global batch {n}", args.device,
                "lower --batches" + (" or use --student tiny" if args.student != "tiny" else ""))
        print(f"bench ekd: timing global batch {n} (predicted peak {need / 2**30:.1f} GiB) ...", file=sys.stderr,
              flush=True)
        timing = time_steps(n, args.student, args.embedding_size, args.steps, args.device)
        result["steps"][str(n)] = timing
        result["ekd_overhead"][str(n)] = round(timing["overhead"], 4)
        print(f"  plain {timing['plain_seconds']:.3f}s, with EKD {timing['ekd_seconds']:.3f}s", file=sys.stderr)
    if result["ekd_peak_bytes"]:
        n_max = max(result["ekd_peak_bytes"], key=int)
        per_pair = result["ekd_peak_bytes"][n_max] / int(n_max) ** 2
        result["bytes_per_pair"] = round(per_pair, 2)
        result["largest_n_in_80gb"] = int((80e9 / per_pair) ** 0.5) if per_pair > 0 else None
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
