"""`kd-plugin train CONFIG`: arcface_torch's training loop with distillation, on CPU or GPU, 1 process or torchrun.

Per step: the sampler's batch (uint8 images, labels, sample indices and flips; with `kd.views` each sample's
consistent view of the epoch, kd_plugin.data.views) -> the student's own normalisation -> student embeddings (under
autocast with `fp16`: float16 by default, `amp_dtype="bfloat16"` as an option); teacher embeddings from the cache (by
index and flip, read with the images by the loader's workers), the teacher-view cache (by index and epoch) or the
frozen teacher; the KD objective (head + weighted terms, exact one-process gradients); the student's embedding
gradient times W for DDP's averaging (those three: kd_plugin.run.kd_step, the same under the hook); as arcface_torch:
backward of the GradScaler-scaled loss (fp16), and every `gradient_acc` steps unscale, clip 5, SGD/AdamW step; arcface_torch's linear
warm-up then linear decay, stepped every step. Rank 0 logs as arcface_torch does (`<output>/training.log` and the
console: its speed line every `frequent` steps, with every loss term and EKD diagnostic) and writes `train_log.jsonl`
(the means of every scalar since the last logging step, each epoch's wall time), tensorboard scalars and `model.pt` (the student's state_dict); every rank writes
`checkpoint_gpu_{rank}.pt` (arcface_torch's keys plus `state_kd`), atomically, every `checkpoint_every` steps and at
each epoch end. `resume=True` continues from it exactly; SIGTERM writes one and exits at the next logging step; a
non-finite loss (checked at logging steps and before each checkpoint: no step waits for the device) stops with the
last good checkpoint left in place."""

from __future__ import annotations

import os
import signal
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from kd_plugin.atomic import save_torch
from kd_plugin.run.build import build_dataset, build_loader, build_objective, build_sampler, build_teacher
from kd_plugin.step_parts import NO_PARTS
from kd_plugin.run.config import check_against_data, check_trainer_keys, load_config
from kd_plugin.data.batches import Batch
from kd_plugin.distributed import (get_rank, get_world_size, init_from_env, is_distributed, scale_grad,
                                   training_device)
from kd_plugin.errors import KDPluginError
from kd_plugin.run.kd_step import KDStep
from kd_plugin.normalization import InputNormalization
from kd_plugin.networks import build_network
from kd_plugin.teachers.torch_embedder import TorchEmbedder
from kd_plugin.training_log import LOG, RunLog, SpeedLine, training_log


def verification_targets(cfg) -> list[str]:
    """`val_targets` as paths: arcface_torch names (`lfw`) mean `<rec folder>/lfw.bin`; paths are kept."""
    first = cfg.rec if isinstance(cfg.rec, (str, os.PathLike)) else cfg.rec[0]
    folder = first if os.path.isdir(first) else os.path.dirname(first)
    return [t if os.path.exists(t) else os.path.join(folder, f"{t}.bin") for t in cfg.val_targets]


def poly_warmup_factor(step: int, warmup: int, total: int) -> float:
    """arcface_torch's PolynomialLRWarmup (power 1): linear warm-up over `warmup` steps, then linear decay to 0."""
    if warmup > 0 and step <= warmup:
        return step / warmup
    return max(0.0, 1.0 - (min(step, total) - warmup) / max(1, total - warmup))


class Trainer:
    """Builds everything from a resolved config; `run()` trains. `centres`: inherited centres to use instead of
    deriving them (kd_plugin.run.build.build_head; kd-plugin check's stand-in)."""

    def __init__(self, cfg, centres=None) -> None:
        check_trainer_keys(cfg)
        init_from_env()
        self.cfg, kd = cfg, cfg.kd
        self.rank, self.world = get_rank(), get_world_size()
        self.device = training_device()
        os.makedirs(cfg.output, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.dataset = build_dataset(cfg)
        check_against_data(cfg, self.dataset)
        self._notes = [] if cfg.save_all_states else [
            "save_all_states = False, but kd-plugin train still writes checkpoint_gpu_{rank}.pt (its resume and crash "
            "safety need it)"]
        self.sampler = build_sampler(cfg, self.dataset.labels)
        self.student_norm = InputNormalization(kd.student_mean, kd.student_std)
        self.student = build_network(cfg.network, cfg.embedding_size, fp16=cfg.fp16).to(self.device)
        self.teacher = build_teacher(cfg, self.dataset, self.device)
        self.loader = build_loader(cfg, self.dataset, self.sampler, pin_memory=self.device.type == "cuda",
                                   feed=self.teacher)
        self.objective = build_objective(cfg, self.dataset, self.teacher, self.sampler, centres).to(self.device)
        self._records = RunLog(cfg.output, self.rank, "train")
        self.kd = KDStep(self.objective, self.teacher, self._records, self.device)  # shared with the hook
        self.parts = NO_PARTS  # the step's parts, timed only when a caller asks (time_parts)
        self.model = (DistributedDataParallel(self.student, device_ids=[self.device.index] if self.device.type == "cuda"
                                              else None) if is_distributed() else self.student)
        params = [{"params": self.student.parameters()}, {"params": self.objective.parameters()}]
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        total = self.steps_per_epoch * cfg.num_epoch
        warmup = self.steps_per_epoch * cfg.warmup_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: poly_warmup_factor(s, warmup, total))
        # arcface_torch's mixed precision: autocast for the student, GradScaler(growth_interval=100) with fp16;
        # bfloat16 has fp32's exponent range, so it needs no scaling
        self.amp_dtype = getattr(torch, cfg.amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, growth_interval=100,
                                           enabled=bool(cfg.fp16) and self.amp_dtype == torch.float16)
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.epoch, self.position, self.global_step = 0, 0, 0
        self._stop_requested = False

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def _checkpoint_path(self) -> str:
        return os.path.join(self.cfg.output, f"checkpoint_gpu_{self.rank}.pt")

    def save(self) -> None:
        """checkpoint_gpu_{rank}.pt with arcface_torch's keys plus the KD state; model.pt on rank 0; both atomic. Not
        after a non-finite loss: the checkpoint on disk stays the last good one."""
        if bool(self.kd.log.nonfinite > 0):  # one read per save, not per step
            raise KDPluginError(f"non-finite loss before step {self.global_step} (epoch {self.epoch}); the last good "
                                f"checkpoint is {self._checkpoint_path()}; lower the learning rate or check the data "
                                f"and teacher")
        state = {"epoch": self.epoch, "global_step": self.global_step,
                 "state_dict_backbone": self.student.state_dict(),
                 "state_dict_softmax_fc": self.objective.head.state_dict(),
                 "state_optimizer": self.opt.state_dict(), "state_lr_scheduler": self.scheduler.state_dict(),
                 "state_kd": {"objective": self.objective.state_dict(), "position": self.position,
                              "rng": torch.get_rng_state(), "world_size": self.world,
                              "scaler": self.scaler.state_dict(), "accumulated_grads": self._accumulated_grads()}}
        save_torch(state, self._checkpoint_path())
        if self.rank == 0:
            save_torch(self.student.state_dict(), os.path.join(self.cfg.output, "model.pt"))

    def load(self) -> None:
        """Resume from this rank's checkpoint_gpu_{rank}.pt."""
        path = self._checkpoint_path()
        if not os.path.isfile(path):
            raise KDPluginError(f"config.resume = True but {path} does not exist; start without resume")
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state["state_kd"]["world_size"] != self.world:
            raise KDPluginError(f"{path} was written by {state['state_kd']['world_size']} processes, this run has "
                                f"{self.world}; resume with the same number of processes")
        self.student.load_state_dict(state["state_dict_backbone"])
        self.objective.load_state_dict(state["state_kd"]["objective"])
        self.opt.load_state_dict(state["state_optimizer"])
        self.scheduler.load_state_dict(state["state_lr_scheduler"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.position = int(state["state_kd"]["position"])
        torch.set_rng_state(state["state_kd"]["rng"].cpu())
        if state["state_kd"].get("scaler"):
            self.scaler.load_state_dict(state["state_kd"]["scaler"])
        for param, grad in zip(self._trained_parameters(), state["state_kd"].get("accumulated_grads") or []):
            param.grad = None if grad is None else grad.to(param.device)

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.opt.param_groups for p in group["params"]]

    def _accumulated_grads(self) -> list[torch.Tensor | None] | None:
        """Gradients summed so far towards the next optimizer step (gradient_acc > 1, saved mid-accumulation)."""
        if self.global_step % self.cfg.gradient_acc == 0:
            return None
        return [None if p.grad is None else p.grad.detach().clone() for p in self._trained_parameters()]

    # --- the loop -------------------------------------------------------------------------------------------------
    def step(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One training step as arcface_torch takes it: forward under autocast (fp16), the KD step (kd_plugin.run.kd_step,
        the same as under the hook), backward of the scaled loss; every `gradient_acc` steps the summed gradients are
        unscaled, clipped to norm 5 and applied. Returns the step's scalars and its loss, on the device: nothing here
        waits for the device (see kd_plugin.host_syncs; with fp16, GradScaler.step reads its overflow flag, as in
        arcface_torch)."""
        images = batch.images.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        with self.parts.span("student_forward"), \
                torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=bool(self.cfg.fp16)):
            embeddings = self.model(self.student_norm.torch(images))
        loss, stats = self.kd(embeddings, labels, batch, images, self.epoch, self.global_step)
        with self.parts.span("backward"):
            self.scaler.scale(loss).backward()
        self.global_step += 1
        self.position += 1
        if self.global_step % self.cfg.gradient_acc == 0:
            with self.parts.span("optimizer"):
                self.scaler.unscale_(self.opt)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), 5)
                self.scaler.step(self.opt)  # skipped (and the scale lowered) when a gradient overflowed
                self.scaler.update()
                self.opt.zero_grad(set_to_none=True)
        self.scheduler.step()
        return stats, loss

    def time_parts(self, parts) -> None:
        """Time the parts of every step with `parts` (a kd_plugin.step_parts.PartClock; NO_PARTS: not timed, the
        default): the student's forward, backward and optimizer here, the teacher in the KD step, the head and each
        term in the objective."""
        self.parts = self.kd.parts = self.objective.parts = parts

    def _logging_step(self, speed: SpeedLine) -> bool:
        """Every `frequent` steps (and at the last): read the scalars, the stop request and the finite-loss check in
        one synchronisation; rank 0 writes them. A non-finite loss since the last read stops the run (the checkpoints
        on disk predate it: `save` checks first). Returns whether any rank asked to stop."""
        current = {"grad_scale": self.scaler._get_scale_async()} if self.scaler.is_enabled() else None
        means, stop, nonfinite = self.kd.log.read(self._stop_requested, current)
        if nonfinite:
            raise KDPluginError(f"non-finite loss in {nonfinite} step(s) up to step {self.global_step} (epoch "
                                f"{self.epoch}); means since the last logging step: {means}. The last good checkpoint "
                                f"is {self._checkpoint_path()}; lower the learning rate or check the data and teacher")
        if self.rank == 0:
            lr = self.scheduler.get_last_lr()[0]
            self.kd.publish(self.global_step, self.epoch, means, {"lr": lr})
            speed(self.global_step, self.epoch, {k: v for k, v in means.items() if k != "grad_scale"}, lr,
                  means.get("grad_scale"))
        self._last_means = means
        return stop

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def run(self) -> dict:
        """Train to the end (or `max_steps`, or SIGTERM); returns a short summary. Logs as arcface_torch does: rank 0
        writes `<output>/training.log` and the console."""
        with training_log(self.rank, self.cfg.output):
            for note in self._notes:
                LOG.info(f"note: {note}")
            return self._run()

    def _run(self) -> dict:
        if self.cfg.resume:
            self.load()
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        speed = SpeedLine(self.total_steps, self.cfg.batch_size * self.world, self.global_step)
        self._last_means = {}
        try:
            while self.epoch < self.cfg.num_epoch and self.global_step < self.total_steps:
                self.sampler.set_epoch(self.epoch)
                self.sampler.load_state_dict({"epoch": self.epoch, "position": self.position, "seed": self.cfg.seed})
                epoch_start, steps_at_epoch_start = time.perf_counter(), self.global_step
                for batch in self.loader:  # a Batch: its flips and cached teacher rows come with it
                    self.step(batch)
                    last = self.global_step >= self.total_steps or self.position >= self.steps_per_epoch
                    if (self.global_step % self.cfg.frequent == 0 or last) and self._logging_step(speed):
                        self.save()
                        LOG.warning(f"[rank {self.rank}] SIGTERM: checkpoint written at step {self.global_step}")
                        return {"stopped": "sigterm", "global_step": self.global_step}
                    if self.cfg.val_targets and self.global_step % self.cfg.verbose == 0 and self.rank == 0:
                        self.verify()
                    if self.global_step % self.cfg.checkpoint_every == 0:
                        self.save()
                    if self.global_step >= self.total_steps:
                        break
                self._epoch_done(time.perf_counter() - epoch_start, self.global_step - steps_at_epoch_start,
                                 self._last_means)
                if self.global_step >= self.total_steps:
                    break
                self.epoch, self.position = self.epoch + 1, 0
                self.save()
            self.save()
            return {"stopped": "done", "global_step": self.global_step}
        finally:
            signal.signal(signal.SIGTERM, previous)
            self._records.close()

    def verify(self) -> dict:
        """10-fold accuracy on `.bin` targets and all-pairs TPR@FPR on dataset targets, logged (rank 0)."""
        from kd_plugin.evaluation import evaluate_bin, evaluate_pairs

        embedder = self.student_embedder()
        results = {}
        for target in verification_targets(self.cfg):
            name = os.path.splitext(os.path.basename(target.rstrip("/")))[0]
            if target.endswith(".bin"):
                r = evaluate_bin(target, embedder)
                figures = {f"val/{name}/accuracy": r["accuracy"]}
            else:
                r = evaluate_pairs(target, embedder, progress=False)
                figures = {f"val/{name}/tpr@{k}": v for k, v in r["tpr_at_fpr"].items() if v is not None}
            results.update(figures)
        self._records.scalars(results, self.global_step, prefix="")
        self._records.write({"step": self.global_step, "verification": results},
                            f"verification at step {self.global_step}: "
                            + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
        return results

    def student_embedder(self) -> TorchEmbedder:
        """The student as an evaluation embedder (eval mode while embedding, then back to training)."""
        return TorchEmbedder(self.student, self.student_norm, self.device, spec="student", freeze=False)

    def _epoch_done(self, seconds: float, steps: int, stats: dict) -> None:
        """Rank 0 prints and logs the epoch's wall time (checkpointing excluded) and its steps (fewer than an epoch's
        after a resume or at max_steps)."""
        loss = f", loss {stats['loss']:.4f}" if "loss" in stats else ""
        self._records.write({"epoch": self.epoch, "epoch_seconds": seconds, "epoch_steps": steps},
                            f"epoch {self.epoch + 1}/{self.cfg.num_epoch} done: {steps} steps in {seconds:.1f}s{loss}")


def train(config_path_or_cfg) -> dict:
    """Train from a config file path or an already resolved config."""
    cfg = load_config(config_path_or_cfg) if isinstance(config_path_or_cfg, str) else config_path_or_cfg
    return Trainer(cfg).run()
