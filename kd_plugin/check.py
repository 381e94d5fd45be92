"""`kd-plugin check CONFIG`: the preflight to run before a long job, alone or under torchrun, on a GPU or a CPU.

The run is built from the config exactly as `kd-plugin train` builds it, then a few real training steps are taken.
Stages, in order (the first that fails stops the check, and the report names it and why):

1. config: every setting resolved and checked as the run checks it; a refused setting is reported with its key.
2. hook: whether the config file calls `distill(...)`, and whether the train_v2.py the hook will run under (beside
   the config's folder, or `--train-v2`) defines the three names the hook replaces.
3. build: the training set against `num_classes` / `num_image`; the teacher loaded on the training device (an ONNX
   teacher converted to torch is compared with onnxruntime on the run's first images: its relative error is
   printed) and its input normalisation; the classifier source (shards, one file, estimate, fit) against
   `num_classes` and `embedding_size`. Centres derived from the teacher are not derived here (that is a teacher pass
   over the whole training set): a stand-in of their shape takes their place and the report gives the pass's cost.
4. steps: `--warmup` then `--steps` real steps of the configured method and precision. Per step: the host
   synchronisations (kd_plugin.host_syncs' spy; on CUDA also torch's sync debug mode, counted) against the budget,
   the time of each part (data, teacher, student forward, head and terms, backward, optimizer), images/s per rank;
   per rank: the peak memory (CUDA: max_memory_allocated; CPU: peak RSS) beside the model `bench scale` uses (the
   classifier's C·d·bytes/W plus the student, its gradients, its optimizer state and its activations); the ETA of
   `num_epoch` at this world size; whether a teacher cache would pay (its size on disk, its build time, the online
   teacher's share of the step).

The check writes only under `<output>/kd_check` (never the job's checkpoints). Exit status: 0 when every stage
passed, 1 when one failed. Cost: the build and `warmup + steps` steps, no reads over the whole training set."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from kd_plugin.embeddings import embedding_width
from kd_plugin.errors import KDPluginError

ONNX_BATCHES = 3  # measured batches an ONNX teacher is also compared with onnxruntime on


class CheckFailed(Exception):
    """A stage failed: `stage` and the message that says why."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def _stage(name: str, work):
    try:
        return work()
    except (KDPluginError, FileNotFoundError, ValueError) as exc:
        raise CheckFailed(name, str(exc)) from exc


# --- 1. config, 2. hook -------------------------------------------------------------------------------------------
def _load(config_path: str, warmup: int, steps: int):
    from kd_plugin.run.config import load_config

    cfg = load_config(config_path)
    job_output = cfg.output
    cfg.output = os.path.join(job_output, "kd_check")  # the job's own checkpoints are never touched
    cfg.resume, cfg.val_targets = False, []
    cfg.frequent = cfg.checkpoint_every = 10 ** 9  # no logging step, no checkpoint inside the measured steps
    cfg.max_steps = warmup + steps
    return cfg, job_output


def hook_report(config_path: str, train_v2: str | None) -> dict:
    """Whether the config calls the one-line hook, and whether train_v2.py has what the hook replaces."""
    from kd_plugin.run.hook import PATCHED_NAMES, SUPPORTED

    with open(config_path) as f:
        calls = re.search(r"\bdistill\s*\(", f.read()) is not None
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(config_path))), "train_v2.py")
    script = train_v2 or (beside if calls and os.path.isfile(beside) else None)
    report = {"config_calls_distill": calls, "train_v2": script, "written_against": SUPPORTED}
    if script is None:
        report["names_found"] = None
        return report
    if not os.path.isfile(script):
        raise KDPluginError(f"--train-v2 {script}: no such file; give the train_v2.py the job will run")
    with open(script) as f:
        source = f.read()
    found = [name for name in PATCHED_NAMES if re.search(rf"\b{name}\b", source)]
    report["names_found"] = found
    if len(found) != len(PATCHED_NAMES):
        missing = [name for name in PATCHED_NAMES if name not in found]
        raise KDPluginError(f"{script}: does not name {', '.join(missing)}, which the hook replaces (it expects "
                            f"{SUPPORTED}); run the job with that train_v2.py, or with kd-plugin train")
    return report


# --- 3. build -----------------------------------------------------------------------------------------------------
def _stand_in_centres(cfg):
    """Unit rows of this rank's class range in place of centres derived from the teacher (not derived here)."""
    from kd_plugin.distributed import class_range, get_rank, get_world_size
    from kd_plugin.teachers.classifier import ClassSlice

    start, count = class_range(int(cfg.num_classes), get_rank(), get_world_size())
    generator = torch.Generator().manual_seed(int(cfg.seed))
    return ClassSlice(start, F.normalize(torch.randn(count, int(cfg.embedding_size), generator=generator)))


def _classifier_source(cfg) -> str | None:
    from kd_plugin.methods.heads import centre_settings

    settings = centre_settings(cfg.kd)
    if settings is None:  # a trainable classifier, or a head that builds its own centres (adadistill)
        return cfg.kd.plan.head
    return str(settings.centres)


def _build(cfg):
    from kd_plugin.distributed import init_from_env
    from kd_plugin.methods.heads import derives_centres
    from kd_plugin.run.train import Trainer

    source = _classifier_source(cfg)
    # estimated from a cache is a read of the cache: cheap enough to do; anything else derived needs the teacher
    # over the whole set (or a fit), measured here instead of run
    stand_in = derives_centres(cfg.kd) and not (source == "estimate" and cfg.kd.cache)
    init_from_env()  # the stand-in is this rank's class range (Trainer joins the same process group)
    trainer = Trainer(cfg, centres=_stand_in_centres(cfg) if stand_in else None)
    return trainer, source, stand_in


def _teacher_report(trainer) -> dict | None:
    feed = trainer.teacher
    if feed is None:
        return None
    if feed.embedder is None:
        return {"spec": trainer.cfg.kd.teacher, "cached": trainer.cfg.kd.cache, "device": None}
    embedder = feed.embedder
    module = getattr(embedder, "module", None)
    # where its weights are (a converted ONNX graph holds them as buffers), not where it was asked to be
    held = next(itertools.chain(module.parameters(), module.buffers()), None) if module is not None else None
    device = str(held.device) if held is not None else str(getattr(embedder, "device", "cpu"))
    norm = embedder.normalization
    return {"spec": embedder.spec or trainer.cfg.kd.teacher, "cached": trainer.cfg.kd.cache or None,
            "device": device, "on_training_device": torch.device(device) == trainer.device,
            "normalization": None if norm is None else {"mean": list(norm.mean), "std": list(norm.std),
                                                        "bgr": bool(norm.bgr)},
            "onnx_relative_error": embedder.check_error}


def _classifier_report(trainer, source: str | None, stand_in: bool) -> dict:
    head = trainer.objective.head
    weight = head.weight
    return {"source": source, "stand_in": stand_in, "num_classes": int(head.num_classes),
            "embedding_size": int(head.embedding_size), "rank_rows": [int(head.class_start),
                                                                      int(head.class_start + head.num_local)],
            "dtype": str(weight.dtype).replace("torch.", ""), "trainable": bool(head.trainable),
            "rank_bytes": int(weight.numel() * weight.element_size())}


# --- 4. steps -----------------------------------------------------------------------------------------------------
def sync_budget(cfg) -> int:
    """Host synchronisations allowed in a step that is not a logging step (kd_plugin.host_syncs), plus GradScaler's
    own overflow read with fp16 (torch's, once per optimizer step; counted by the spy on a CPU)."""
    from kd_plugin.host_syncs import PER_STEP_BUDGET

    views = cfg.kd.views
    budget = PER_STEP_BUDGET["other step"]
    budget += PER_STEP_BUDGET["adadistill"] if cfg.kd.plan.head == "adadistill" else 0
    counted_rows = cfg.sample_rate < 1 or cfg.kd.unlabeled.per_batch > 0 or (views.enabled and views.mixup > 0)
    budget += PER_STEP_BUDGET["counted rows"] if counted_rows else 0
    budget += PER_STEP_BUDGET["grad scaler"] if cfg.fp16 and cfg.amp_dtype == "float16" else 0
    return budget


def _batches(trainer):
    epoch = 0
    while True:
        trainer.sampler.set_epoch(epoch)
        yield from trainer.loader
        epoch += 1


def _peak_memory(device: torch.device) -> int:
    from kd_plugin.benchmarks.memory import peak_rss_bytes

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else peak_rss_bytes()


def _memory_model(trainer) -> dict:
    """What a rank should hold, from the model `bench scale` measures (C·d·bytes/W for the classifier)."""
    from kd_plugin.benchmarks.memory import activation_bytes_per_image

    cfg, head = trainer.cfg, trainer.objective.head
    per_parameter = 3 if cfg.optimizer == "sgd" else 4  # weights, gradients, momentum (AdamW: two moments)
    student = sum(p.numel() * p.element_size() for p in trainer.student.parameters()) * per_parameter
    classifier = head.num_local * head.embedding_size * head.weight.element_size() * (3 if head.trainable else 1)
    activations = activation_bytes_per_image(trainer.student) * int(cfg.batch_size)  # leaves it in train mode
    return {"classifier": int(classifier), "student_and_optimizer": int(student), "activations": int(activations),
            "total": int(classifier + student + activations)}


def _onnx_error_on(trainer, batches: list) -> float | None:
    """An ONNX teacher converted to torch against onnxruntime on the measured steps' batches, at the run's teacher
    precision (max |torch - onnxruntime| / max |onnxruntime|); None for any other teacher."""
    from kd_plugin.teachers.onnx_embedder import CheckedOnnxModule, OnnxEmbedder

    embedder = trainer.teacher.embedder if trainer.teacher is not None else None
    if not isinstance(embedder, CheckedOnnxModule) or not batches:
        return None
    reference = OnnxEmbedder(embedder.path, embedder.normalization, batch_size=len(batches[0]))
    error = 0.0
    for images in batches:
        expected = torch.from_numpy(reference.embed(images.cpu().numpy()))
        got = torch.as_tensor(embedder.embed(images.to(trainer.device))).float().cpu()
        error = max(error, float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)))
    return error


def _steps(trainer, warmup: int, steps: int) -> dict:
    from kd_plugin.benchmarks.memory import reset_peak_rss, rss_bytes
    from kd_plugin.host_syncs import count_host_syncs
    from kd_plugin.step_parts import PartClock

    device = trainer.device
    clock = PartClock(device)
    trainer.time_parts(clock)
    batches = _batches(trainer)
    seconds, syncs, cuda_syncs, parts, kept = [], [], [], {}, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = int(torch.cuda.memory_allocated(device))
    else:
        reset_peak_rss()
        base = rss_bytes()
    for step in range(warmup + steps):
        start = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - start
        with warnings.catch_warnings(record=True) as seen_warnings, count_host_syncs() as seen:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.step(batch)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        taken = clock.take()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step < warmup:
            continue
        if len(kept) < ONNX_BATCHES:
            kept.append(batch.images)  # uint8, as the loader gave them: compared with onnxruntime after the steps
        seconds.append(time.perf_counter() - start)
        syncs.append(seen.total)
        cuda_syncs.append(sum("synchroniz" in str(w.message) for w in seen_warnings))
        for name, value in {"data": waited, **taken}.items():
            parts.setdefault(name, []).append(value)
    peak = _peak_memory(device)  # before the comparison with onnxruntime below, which is not the run's
    _, _, nonfinite = trainer.kd.log.read(False)  # the logging read, once, outside the measured steps
    if nonfinite:
        raise KDPluginError(f"non-finite loss in {nonfinite} of the check's steps; lower config.lr or check the data "
                            f"and the teacher")
    onnx_error = _onnx_error_on(trainer, kept)
    step_seconds = statistics.median(seconds)
    split = {name: statistics.median(values) for name, values in parts.items()}
    return {"measured": steps, "warmup": warmup, "seconds_per_step": step_seconds,
            "images_per_second": trainer.cfg.batch_size / step_seconds, "parts": split,
            "host_syncs_per_step": max(syncs), "host_sync_budget": sync_budget(trainer.cfg),
            "cuda_sync_warnings_per_step": max(cuda_syncs) if device.type == "cuda" else None,
            "peak_memory_bytes": peak, "added_memory_bytes": max(peak - base, 0),
            "onnx_relative_error_batches": onnx_error}


def _cache_command(cfg) -> str:
    """The `kd-plugin cache` line that caches this job's teacher (its normalisation flags included)."""
    kd = cfg.kd
    flags = "".join(f" --{name} {value}" for name, value in (("mean", kd.teacher_mean), ("std", kd.teacher_std))
                    if value) + (" --bgr" if kd.teacher_bgr else "")
    def listed(sets) -> str:  # config.rec and kd.unlabeled.data: one set or a list, as --data / --unlabeled take them
        return " ".join(map(str, [sets] if isinstance(sets, (str, os.PathLike)) else sets))
    unlabeled = f" --unlabeled {listed(kd.unlabeled.data)}" if kd.unlabeled.data else ""
    return (f"kd-plugin cache --teacher {kd.teacher}{flags} --data {listed(cfg.rec)}{unlabeled} --out DIR, then "
            f"config.kd.cache = DIR")


def _job_report(trainer, measured: dict, source: str | None, stand_in: bool) -> dict:
    """ETA of the whole job, the cost of deriving the centres, and whether a teacher cache would pay."""
    cfg, world = trainer.cfg, trainer.world
    total_steps = trainer.steps_per_epoch * int(cfg.num_epoch)
    report = {"steps_per_epoch": trainer.steps_per_epoch, "num_epoch": int(cfg.num_epoch),
              "eta_seconds": total_steps * measured["seconds_per_step"]}
    teacher_seconds = measured["parts"].get("teacher")
    feed = trainer.teacher
    if feed is None or feed.embedder is None or not teacher_seconds:
        report["cache"] = {"in_use": bool(cfg.kd.cache)} if feed is not None else None
        return report
    images = len(trainer.dataset)
    rate = cfg.batch_size / teacher_seconds  # teacher images per second on one rank
    width = embedding_width(feed.embedder, trainer.dataset)
    build = 2 * images / (rate * world)  # every image and its flip, the ranks sharing the set
    saves = teacher_seconds * total_steps
    report["cache"] = {"in_use": False, "bytes": 2 * images * width * 2, "build_seconds": build,
                       "teacher_share_of_step": teacher_seconds / measured["seconds_per_step"],
                       "saves_seconds": saves, "pays": bool(saves > build and not cfg.kd.views.enabled),
                       "command": _cache_command(cfg)}
    if stand_in:
        report["centres_cost_seconds"] = (images / (rate * world) if source == "estimate" else None)
        report["centres_note"] = (f"centres={source!r} runs the teacher over the {images} training images before "
                                  f"the first step" + (" and fits the classifier over the cache (not timed here)"
                                                       if source == "fit" else ""))
    return report


# --- the whole check ----------------------------------------------------------------------------------------------
def check(config_path: str, steps: int = 4, warmup: int = 1, train_v2: str | None = None) -> dict:
    """Run the stages; returns this rank's report (`ok`, and `failed` {stage, error} when one failed)."""
    from kd_plugin.distributed import get_rank, get_world_size

    report: dict = {"config": config_path, "ok": False}
    try:
        cfg, job_output = _stage("config", lambda: _load(config_path, warmup, steps))
        report.update(method=cfg.kd.method, network=cfg.network, fp16=bool(cfg.fp16), amp_dtype=cfg.amp_dtype,
                      job_output=job_output)
        report["hook"] = _stage("hook", lambda: hook_report(config_path, train_v2))
        trainer, source, stand_in = _stage("build", lambda: _build(cfg))
        report.update(rank=get_rank(), world_size=get_world_size(), device=str(trainer.device),
                      teacher=_teacher_report(trainer), classifier=_classifier_report(trainer, source, stand_in))
        measured = _stage("steps", lambda: _steps(trainer, warmup, steps))
        measured["memory_model_bytes"] = _memory_model(trainer)
        batches_error = measured.pop("onnx_relative_error_batches")
        if report["teacher"] is not None:
            report["teacher"]["onnx_relative_error_batches"] = batches_error
        report["steps"] = measured
        report["job"] = _job_report(trainer, measured, source, stand_in)
        if measured["host_syncs_per_step"] > measured["host_sync_budget"]:
            raise CheckFailed("steps", f"{measured['host_syncs_per_step']} host synchronisations in a step, the "
                                       f"budget is {measured['host_sync_budget']} (kd_plugin.host_syncs)")
        report["ok"] = True
    except CheckFailed as exc:
        report["failed"] = {"stage": exc.stage, "error": str(exc)}
    return report


def _gathered(report: dict) -> list[dict]:
    """Every rank's report on every rank (one collective, after the steps); [report] without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [report]
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    return reports


def _mib(value) -> str:
    return f"{value / 2 ** 20:.0f} MiB"


def describe(reports: list[dict]) -> str:
    """The human report of every rank's figures (rank 0's stages, each rank's time and memory)."""
    first = reports[0]
    lines = [f"kd-plugin check {first['config']}: {'PASSED' if all(r['ok'] for r in reports) else 'FAILED'}"]
    for report in reports:
        if "failed" in report:
            lines.append(f"  rank {report.get('rank', '?')}: stage {report['failed']['stage']} failed: "
                         f"{report['failed']['error']}")
    if "method" in first:
        lines.append(f"  method {first['method']}, student {first['network']}, fp16 {first['fp16']} "
                     f"({first['amp_dtype']}), {first.get('world_size', 1)} process(es) on {first.get('device')}")
    hook = first.get("hook")
    if hook:
        lines.append(f"  hook: config calls distill(...): {hook['config_calls_distill']}; train_v2: "
                     f"{hook['train_v2'] or 'not checked (none beside the config; --train-v2 PATH)'}"
                     + (f", names found: {', '.join(hook['names_found'])}" if hook.get("names_found") else ""))
    teacher = first.get("teacher")
    if teacher:
        norm = teacher.get("normalization")
        error = teacher.get("onnx_relative_error")
        lines.append(f"  teacher {teacher['spec']} on {teacher['device'] or 'its cache'}"
                     + (f", normalisation mean {norm['mean']} std {norm['std']}{' BGR' if norm['bgr'] else ''}"
                        if norm else "")
                     + (f", ONNX vs onnxruntime: max relative error {error:.1e}" if error is not None else "")
                     + (f" on the first images, {teacher['onnx_relative_error_batches']:.1e} on the steps' "
                        f"batches" if teacher.get("onnx_relative_error_batches") is not None else ""))
    classifier = first.get("classifier")
    if classifier:
        lines.append(f"  classifier: {classifier['source']}, {classifier['num_classes']} classes x "
                     f"{classifier['embedding_size']} ({classifier['dtype']}), rank 0 holds rows "
                     f"{classifier['rank_rows'][0]}..{classifier['rank_rows'][1]}"
                     + (" — a stand-in: the centres are derived from the teacher at the start of the job"
                        if classifier["stand_in"] else ""))
    for report in reports:
        measured = report.get("steps")
        if not measured:
            continue
        parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in measured["parts"].items())
        model = measured["memory_model_bytes"]
        lines.append(f"  rank {report['rank']}: {measured['seconds_per_step'] * 1000:.0f} ms/step, "
                     f"{measured['images_per_second']:.0f} images/s ({parts}); host syncs/step "
                     f"{measured['host_syncs_per_step']} (budget {measured['host_sync_budget']}); peak memory "
                     f"{_mib(measured['peak_memory_bytes'])}, added {_mib(measured['added_memory_bytes'])} "
                     f"(model {_mib(model['total'])}: classifier {_mib(model['classifier'])}, student "
                     f"{_mib(model['student_and_optimizer'])}, activations {_mib(model['activations'])})")
    job = first.get("job")
    if job:
        lines.append(f"  job: {job['num_epoch']} epochs of {job['steps_per_epoch']} steps, ETA "
                     f"{job['eta_seconds'] / 3600:.1f} h at this world size")
        cache = job.get("cache")
        if cache and "bytes" in cache:
            lines.append(f"  teacher cache: {_mib(cache['bytes'])} on disk, built in about "
                         f"{cache['build_seconds'] / 60:.1f} min; the online teacher is "
                         f"{cache['teacher_share_of_step']:.0%} of a step ({cache['saves_seconds'] / 3600:.1f} h over "
                         f"the job): {'it pays: ' + cache['command'] if cache['pays'] else 'it does not pay'}")
        if job.get("centres_note"):
            cost = job.get("centres_cost_seconds")
            lines.append(f"  centres: {job['centres_note']}" + (f" (about {cost / 60:.1f} min)" if cost else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kd-plugin check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the job's config file (kd-plugin train's, or the arcface_torch config with "
                                       "the distill(...) line)")
    parser.add_argument("--steps", type=int, default=4, help="measured training steps (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="steps taken before measuring (default 1)")
    parser.add_argument("--train-v2", help="the train_v2.py the job runs under the hook (default: the one beside "
                                           "the config's folder, when the config calls distill)")
    parser.add_argument("--json", action="store_true", help="print every rank's report as one JSON line")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")
    report = check(args.config, args.steps, args.warmup, args.train_v2)
    reports = _gathered(report) if report["ok"] else [report]
    if report.get("rank", 0) == 0 or not report["ok"]:
        print(json.dumps({"ok": all(r["ok"] for r in reports), "ranks": reports}) if args.json
              else describe(reports), flush=True)
    return 0 if all(r["ok"] for r in reports) else 1
