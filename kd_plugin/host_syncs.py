"""Host synchronisations: the budget of a training step, and the spy that counts them.

On a GPU, reading a device value on the host (`.item()`, `.tolist()`, `.cpu()`, `float(t)`, `int(t)`, `bool(t)`,
`nonzero`, a boolean-mask index) or copying a host list to the device (`torch.tensor(list, device=...)`) waits until
every queued kernel has run: the GPU idles while Python catches up. kd_plugin's budget per training step, in the trainer
and under the train_v2 hook alike, whatever the number of ranks:

- **1 at a logging step** (every `frequent` steps): the step's scalars, the stop request (SIGTERM) and the finite-loss
  check, read together after one all-reduce; **0 at any other step**,
- **+1 per step with AdaDistill** (how many times a class repeats in the batch sets its update waves),
- **+1 per step with `sample_rate < 1`** (the number of sampled classes), or with rows some terms skip in the batch
  (unlabelled images, mixed views: their count), where those settings are used.

So `proxyless+ekd` (with EKD's memory), logit KD and the other embedding terms make at most 1 per step and AdaDistill
at most 2. Not counted here, because they are torch's own and upstream makes them too: with fp16, `GradScaler.step`
reads its overflow flag once per optimizer step; under the hook, train_v2 itself calls `loss.item()` every step.

`count_host_syncs()` counts these calls while it is active (tests and `kd-plugin bench step` use it). On a CPU every
tensor is a host tensor, so the spy counts the calls, not real waits: code inside the counted region must not make
such calls even on host tensors.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch

PER_STEP_BUDGET = {"logging step": 1, "other step": 0, "adadistill": 1, "counted rows": 1,
                   "grad scaler": 1}  # the last: torch's own (fp16), counted by the spy on a CPU
TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__float__", "__int__", "__bool__", "__index__")


class HostSyncs:
    """What a `count_host_syncs()` block saw: `total` and `by_call` (call name -> count)."""

    def __init__(self) -> None:
        self.by_call: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_call.values())


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count host-synchronising tensor calls made inside the block (in this process)."""
    seen = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in TENSOR_METHODS}
    real_tensor, real_nonzero, real_getitem = torch.tensor, torch.nonzero, torch.Tensor.__getitem__

    def counted(name, method):
        def call(self, *args, **kwargs):
            seen.by_call[name] += 1
            return method(self, *args, **kwargs)
        return call

    def tensor(data, *args, **kwargs):
        if kwargs.get("device") is not None and not isinstance(data, torch.Tensor):
            seen.by_call["torch.tensor(..., device=)"] += 1
        return real_tensor(data, *args, **kwargs)

    def nonzero(*args, **kwargs):
        seen.by_call["torch.nonzero"] += 1
        return real_nonzero(*args, **kwargs)

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            seen.by_call["boolean mask index"] += 1  # its result's size is read on the host
        return real_getitem(self, index)

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, counted(name, method))
        torch.tensor, torch.nonzero, torch.Tensor.__getitem__ = tensor, nonzero, getitem
        yield seen
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.tensor, torch.nonzero, torch.Tensor.__getitem__ = real_tensor, real_nonzero, real_getitem
