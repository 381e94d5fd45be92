"""The one-line hook: `from kd_plugin import distill; distill(config, teacher="r100:...", method="proxyless+ekd")` at
the end of an arcface_torch job config makes the UNCHANGED `train_v2.py` distil.

train_v2.py imports its job config inside `main()`, after its own imports, and looks up `get_dataloader`, `get_model`
and `PartialFC_V2` in its module globals at call time. When the config is imported under train_v2.py, `distill`
replaces those three names there, keeping train_v2's contract with each:
- `get_dataloader` returns a `torch.utils.data.DataLoader` (train_v2 calls `train_loader.sampler.set_epoch(epoch)` only
  for one) whose `.sampler` is kd_plugin's identity-balanced sampler: epochs and flips follow `set_epoch`, batches
  are `(images normalised as arcface_torch's loader does, labels)`, both sent to `cuda:local_rank` as upstream's
  `DataLoaderX` sends them; the sample indices and flips of each batch stay on the side for the teacher cache;
- `get_model`: upstream's network with a forward pre-hook that keeps the batch it was given, so the teacher embeds
  the very same images (the teacher stays outside the backbone: not in model.pt, not in the optimizer);
- `PartialFC_V2`: a module holding kd_plugin's KD objective (the inherited head and the configured terms); its
  state_dict (the head's centres, the EKD thresholds, the KD step count) lands in `checkpoint_gpu_{rank}.pt` and is
  restored on resume. Its scalars are summed on the device and read every `frequent` steps, averaged over the
  ranks in one all-reduce (one device sync then, none in between); rank 0 writes them (training_log.RunLog) to
  `<output>/train_log.jsonl`, tensorboard and arcface_torch's `training.log`.
`config.num_image` is set to the sampler's epoch length so train_v2's LR schedule matches it.
train_v2 is recognised by those three names in the running script (`__main__`), whatever its file is called (a
renamed copy, a wrapper that defines them); a script with some but not all of them is refused. When kd_plugin reads
the config itself (`kd-plugin train`, `load_config`) `distill` only fills in `config.kd`; under any other program it
fills it in and warns that distillation is not active.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from easydict import EasyDict
from torch import nn

from kd_plugin.errors import KDPluginError
from kd_plugin.normalization import InputNormalization
# under train_v2 the kd_plugin logger reaches upstream's root handlers: training.log and stdout
from kd_plugin.training_log import LOG, console_figures

PATCHED_NAMES = ("get_dataloader", "get_model", "PartialFC_V2")
# arcface_torch's configs/base.py has save_all_states = False, and a job config rarely sets it
SAVE_ALL_STATES_OFF = (
    "kd_plugin: config.save_all_states is False (arcface_torch's default): train_v2 then writes no "
    "checkpoint_gpu_{rank}.pt, so this run leaves no classifier shards and resume=True cannot bring back its KD state "
    "(the head's centres, EKD's thresholds and memory, the KD step count). Set config.save_all_states = True in the "
    "job config")
SUPPORTED = ("insightface's recognition/arcface_torch train_v2.py with PartialFC_V2 (checked against insightface "
             "commit 7fadd42, 2026-07)")


def _prerequisite_notes(config, cfg) -> list[str]:
    """What the job would lose or where it would stop, said at train_v2's first call: `config` as the job config sets
    it (upstream's base.py fills the rest: save_all_states False), `cfg` resolved."""
    from kd_plugin.run.hook_verification import VERIFICATION_WILL_FAIL, upstream_verification_fails

    notes = [] if config.get("save_all_states", False) else [SAVE_ALL_STATES_OFF]
    targets = [t for t in config.get("val_targets") or [] if os.path.isfile(os.path.join(str(cfg.rec), f"{t}.bin"))]
    if targets and cfg.kd.verifier is None and upstream_verification_fails():  # upstream skips absent .bin files
        notes.append(VERIFICATION_WILL_FAIL)
    return notes


class _Shared:
    """What the patched functions pass to each other within one training process."""

    def __init__(self, config) -> None:
        self.config = config
        self.images: torch.Tensor | None = None  # the backbone's last input (arcface_torch-normalised)
        self.batch = None  # the loader's last Batch (kd_plugin.data.batches): indices, flips, cached teacher rows
        self.reader = None  # the loader's BatchReader (HookLoader)
        self.epoch = 0  # the loader's epoch (multi-step KD switches teachers on it)
        self._dataset = None
        self._sampler = None
        self._cfg = None

    def resolved(self):
        """The job config over arcface_torch's base defaults, resolved and checked once per process (its plan read by
        every patched function)."""
        if self._cfg is None:
            from kd_plugin.run.config import check_hook_keys, resolve
            cfg = resolve(self.config)
            check_hook_keys(cfg)
            self._cfg = cfg
        return self._cfg

    def dataset(self):
        """The training set, opened once per process."""
        if self._dataset is None:
            from kd_plugin.run.build import build_dataset
            self._dataset = build_dataset(self.resolved())
        return self._dataset

    def sampler(self):
        """The batch sampler of this rank (one per process: train_v2 builds one loader)."""
        if self._sampler is None:
            from kd_plugin.run.build import build_sampler
            self._sampler = build_sampler(self.resolved(), self.dataset().labels)
        return self._sampler


class HookLoader(torch.utils.data.DataLoader):
    """What train_v2 gets from `get_dataloader`: a DataLoader over kd_plugin's sampler that hands each batch
    `(images, labels)` to the training device, as arcface_torch's DataLoaderX does."""

    def __init__(self, shared: _Shared, device: torch.device, num_workers: int) -> None:
        from kd_plugin.run.build import batch_reader
        from kd_plugin.data.batches import as_is

        # the workers normalise as arcface_torch's dataset does: (x - 127.5) / 127.5
        shared.reader = batch_reader(shared.resolved(), shared.dataset(), normalise=InputNormalization().torch)
        super().__init__(shared.reader, sampler=shared.sampler(), batch_size=None, num_workers=num_workers,
                         pin_memory=device.type == "cuda", collate_fn=as_is)
        self.shared, self.device = shared, device

    def __iter__(self):
        self.shared.epoch = self.sampler.epoch
        for batch in super().__iter__():
            self.shared.batch = batch  # the KD step reads its indices, flips and rows
            yield batch.images.to(self.device, non_blocking=True), batch.labels.to(self.device, non_blocking=True)


class HookHead(nn.Module):
    """Stands where PartialFC_V2 stood: `forward(local_embeddings, local_labels) -> loss`."""

    def __init__(self, cfg, shared: _Shared) -> None:
        super().__init__()
        from kd_plugin.run.build import build_objective, build_teacher
        from kd_plugin.distributed import get_rank, training_device
        from kd_plugin.run.kd_step import KDStep
        from kd_plugin.training_log import RunLog

        self.shared, self.cfg, self.rank = shared, cfg, get_rank()
        device = training_device()
        self._teacher = build_teacher(cfg, shared.dataset(), device)  # a plain attribute: not in the state_dict
        if self._teacher is not None and shared.reader is not None:
            shared.reader.attach(self._teacher.cache, self._teacher.views)  # the loader's workers read the rows
        self.objective = build_objective(cfg, shared.dataset(), self._teacher, shared.sampler())
        self.register_buffer("kd_step", torch.zeros((), dtype=torch.int64))  # forward calls so far, resumed
        self._step: int | None = None  # its host copy, read once after a resume
        # the KD step of kd-plugin train too; its scalars are summed on the device and read every `frequent` steps
        self.kd = KDStep(self.objective, self._teacher, RunLog(cfg.output, self.rank, "kd"), device)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        if self._step is None:  # a fresh run (a resumed one reads kd_step once, when its state is loaded)
            self._step = 0
        # the backbone's input back to uint8 (arcface_torch normalised it to (x - 127.5) / 127.5), when it is needed
        images = lambda: (self.shared.images.detach().float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)  # noqa: E731
        loss, _ = self.kd(local_embeddings, local_labels, self.shared.batch, images, self.shared.epoch, self._step)
        self._step += 1
        self.kd_step.fill_(self._step)
        self._publish()
        return loss

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._step = int(self.kd_step)  # the step count's host copy, read once at resume

    def _publish(self) -> None:
        """Every `frequent` steps read the means of the scalars (over those steps and the ranks) at once, and rank 0
        logs them. train_v2 reads its loss itself every step: the finite check is its."""
        if self._step % self.cfg.frequent:
            return
        figures, _, _ = self.kd.log.read(stop_requested=False)  # the one sync (all ranks reach it at the same step)
        self.kd.publish(self._step, self.shared.epoch, figures,
                        message=f"KD step {self._step} epoch {self.shared.epoch}: " + console_figures(figures))


def _align_epoch_length(config, shared: _Shared) -> None:
    """train_v2 derives its LR schedule from num_image // (batch_size * W) steps per epoch; kd_plugin's sampler takes
    ceil(N / (W * R)) steps (R = the random part of each rank's batch), so num_image is set to match."""
    from kd_plugin.run.config import check_against_data
    from kd_plugin.distributed import get_world_size

    cfg, dataset = shared.resolved(), shared.dataset()
    check_against_data(cfg, dataset)
    world = get_world_size() if torch.distributed.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    config.num_image = shared.sampler().steps_per_epoch * cfg.batch_size * world


def _calling_module() -> str:
    """The module name of the code that called `distill` (the job config: `configs.<job>` under train_v2)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "kd_plugin":
        frame = frame.f_back
    return frame.f_globals.get("__name__", "job") if frame is not None else "job"


def _upstream_output(job_module: str) -> str:
    """arcface_torch's output folder for a job config that leaves `output` unset: its base config's value, or
    `work_dirs/<job name>` where that is None (utils_config.get_config)."""
    base = sys.modules.get("configs.base")
    value = getattr(getattr(base, "config", None), "output", None) if base is not None else None
    return value if value is not None else os.path.join("work_dirs", job_module.rsplit(".", 1)[-1])


def distill(config, teacher: str | None = None, method: str = "proxyless", centres=None, **kd) -> None:
    """Make the unchanged arcface_torch `train_v2.py` distil with `method` from `teacher` (see the module docstring);
    `centres`: where the inheriting head's class centres come from (config.kd.<head>.centres)."""
    block = dict(config.get("kd") or {})
    block.update(kd, method=method)
    if teacher is not None:
        block["teacher"] = teacher
    if centres is not None:
        from kd_plugin.methods import with_centres

        block = with_centres(block, method, centres)
    config.kd = block
    from kd_plugin.run.config import read_by_kd_plugin

    if read_by_kd_plugin():
        return  # kd-plugin train (or another kd_plugin command) reads config.kd itself
    main = sys.modules.get("__main__")
    names = vars(main) if main is not None else {}
    script = getattr(main, "__file__", None) or "the running program"
    missing = [n for n in PATCHED_NAMES if n not in names]
    if len(missing) == len(PATCHED_NAMES):  # not train_v2 (whatever its file name): say so, never train silently
        warnings.warn(f"kd_plugin.distill: distillation is NOT active: {script} defines none of "
                      f"{', '.join(PATCHED_NAMES)} (the names the hook replaces in arcface_torch's train_v2.py, or a "
                      f"renamed copy of it), and kd_plugin is not reading this config (kd-plugin train). Run the "
                      f"config with train_v2.py, or with `kd-plugin train CONFIG`", stacklevel=2)
        LOG.warning(f"kd_plugin.distill: distillation is NOT active under {script} (none of "
                    f"{', '.join(PATCHED_NAMES)} to replace)")
        return
    if missing:
        raise KDPluginError(f"kd_plugin.distill: {script} has no {missing[0]!r} to replace; the hook supports "
                            f"{SUPPORTED}. Update kd_plugin, or train with `kd-plugin train CONFIG` instead")
    if block.get("verifier") == "kd_plugin":  # checked again by resolve (allowed values) at the first call
        if "CallBackVerification" not in names:
            raise KDPluginError(f"kd_plugin.distill: verifier='kd_plugin' but {script} has no CallBackVerification to "
                                f"replace; the hook supports {SUPPORTED}")
        from kd_plugin.run.hook_verification import KDPluginVerification

        names["CallBackVerification"] = KDPluginVerification
    from kd_plugin.distributed import settle_at_exit
    settle_at_exit()  # train_v2 ends without destroy_process_group: gloo's threads settle before the interpreter ends
    if config.get("output") is None:  # what upstream's get_config does after importing this job config
        config.output = _upstream_output(_calling_module())
    shared = _Shared(config)
    _align_epoch_length(config, shared)
    original_get_model = names["get_model"]

    def get_model(*args, **kwargs):
        model = original_get_model(*args, **kwargs)

        def tap(module, inputs):
            shared.images = inputs[0]
        model.register_forward_pre_hook(tap)
        return model

    def get_dataloader(root_dir, local_rank, batch_size, dali=False, dali_aug=False, seed=2048, num_workers=2):
        cfg = shared.resolved()  # refuses dali with what to do
        given = {"rec": root_dir, "batch_size": batch_size, "seed": seed}
        differs = {k: v for k, v in given.items() if v != cfg[k]}
        if differs:
            raise KDPluginError(f"kd_plugin.distill: train_v2 asks for a loader with {differs}, the config says "
                                f"{ {k: cfg[k] for k in differs} }; the hook supports {SUPPORTED}")
        from kd_plugin.distributed import get_rank

        if get_rank() == 0:  # at train_v2's first call, once its logging reaches training.log
            for note in _prerequisite_notes(shared.config, cfg):
                LOG.warning(note)
        return HookLoader(shared, torch.device("cuda", int(local_rank)), num_workers)

    def partial_fc(margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False):
        cfg = shared.resolved()
        if (embedding_size, num_classes) != (cfg.embedding_size, cfg.num_classes):
            raise KDPluginError(f"kd_plugin.distill: train_v2 asks for a classifier of {num_classes} classes x "
                                f"{embedding_size}, the config says {cfg.num_classes} x {cfg.embedding_size}")
        # the head's logits in the precision train_v2 asks for: it passes fp16=False, keeping them in fp32 even
        # when cfg.fp16 runs the backbone under autocast
        return HookHead(EasyDict({**cfg, "fp16": bool(fp16)}), shared)

    names.update(get_model=get_model, get_dataloader=get_dataloader, PartialFC_V2=partial_fc)
