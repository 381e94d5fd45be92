"""Memory for the benchmarks: what a process holds and held at its peak, what the machine can still give, and a
clear stop (what is needed, what is there, which option lowers it) before a benchmark allocates more than that."""

from __future__ import annotations

import os
import resource

import torch
from torch import nn

from kd_plugin.errors import KDPluginError

USABLE_FRACTION = 0.8  # of the memory available when a benchmark starts: room for the rest of the machine


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so a peak reflects what follows, not construction."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory since start or the last `reset_peak_rss`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes(device: str = "cpu") -> int:
    """Memory a new allocation can take now: free GPU memory on CUDA, MemAvailable on the host otherwise."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def require(need_bytes: float, what: str, device: str, lower_it: str) -> None:
    """Stop with a clear message, before allocating, when `what` would need more than this machine can give."""
    have = available_bytes(device)
    if need_bytes > USABLE_FRACTION * have:
        raise KDPluginError(f"{what} needs about {need_bytes / 2**30:.1f} GiB but {device} has "
                            f"{have / 2**30:.1f} GiB available (a benchmark uses at most {USABLE_FRACTION:.0%} of it); "
                            f"{lower_it}")


def activation_bytes_per_image(module: nn.Module, image_size: int = 112) -> int:
    """Bytes of every layer output one image leaves for the backward pass (a batch of 2 in train mode, halved)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    device = next(module.parameters()).device
    handles = [m.register_forward_hook(count) for m in module.modules() if not list(m.children())]
    try:
        module.train()
        with torch.no_grad():
            module(torch.zeros(2, 3, image_size, image_size, device=device))
    finally:
        for h in handles:
            h.remove()
    return total // 2
