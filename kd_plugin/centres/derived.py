"""ProxylessKD's centres derived from the run's teacher (`kd.<head>.centres = "estimate"` or `"fit"`), this rank's
class range, saved per rank under `<output>/teacher_centres` and read back on resume."""

from __future__ import annotations

import os

from kd_plugin.centres.estimate import centres_from_cache, estimate_class_slice
from kd_plugin.centres.fit import fit_class_slice
from kd_plugin.data.datasets import dataset_fingerprint
from kd_plugin.distributed import get_rank, get_world_size
from kd_plugin.errors import KDPluginError
from kd_plugin.methods.heads import centre_settings, head_arguments
from kd_plugin.job_files import agree, agree_or_raise
from kd_plugin.teachers import build_cache, load_cache
from kd_plugin.teachers.classifier import save_class_slices, saved_class_slice
from kd_plugin.training_log import LOG


def derived_centres(cfg, dataset, feed):
    """ProxylessKD's centres derived from the teacher (`feed`: the run's TeacherFeed), this rank's class range:
    `centres="estimate"` (the class means of the cached or online teacher embeddings) or `centres="fit"` (a
    margin-softmax classifier fitted over the cached embeddings, starting from those means; without kd.cache the
    teacher's embeddings are cached first, in `<output>/teacher_cache`). Each rank saves its part as `<output>/teacher_centres/rank_{r}_softmax_weight.pt` (+ its
    .json); a resumed run (`resume=True`) reads its own part back instead of running the teacher over the dataset
    again, when every rank finds its part (the output folder may be node-local)."""
    settings = centre_settings(cfg.kd)
    folder = os.path.join(cfg.output, "teacher_centres")
    fingerprint = dataset_fingerprint(dataset)
    meta = {"kind": "estimated_centres", "teacher": cfg.kd.teacher, "num_classes": int(cfg.num_classes),
            "num_images": fingerprint["num_images"], "labels_sha1": fingerprint["labels_sha1"],
            "images_sha1": fingerprint["images_sha1"], "world_size": get_world_size()}
    if settings.centres == "fit":  # what the fit depends on: a saved fit of other settings is not reused
        meta.update(kind="fitted_centres", margin_list=list(cfg.margin_list), seed=int(cfg.seed), **settings.fit)
    # one decision for the job (estimation is collective): reuse only if every rank finds its own saved part
    mine = saved_class_slice(folder, get_rank(), meta) if cfg.resume else None
    if agree(mine is not None):
        if get_rank() == 0:
            LOG.info(f"resume: ProxylessKD reuses the centres derived before ({settings.centres}), {folder}")
        return mine
    if settings.centres == "fit":
        cache = feed.cache if feed.cache is not None else _cache_for_fit(cfg, dataset, feed)
        part = fit_class_slice(cache, dataset.labels, cfg.num_classes, head_arguments(cfg)[0], seed=cfg.seed,
                               **settings.fit)
    elif feed.cache is not None:
        part = centres_from_cache(feed.cache, dataset.labels, cfg.num_classes)
    else:
        part = estimate_class_slice(feed.embedder, dataset, batch_size=cfg.kd.teacher_batch_size)
    save_class_slices(part, folder, get_rank(), get_world_size(), meta)
    return part


def _cache_for_fit(cfg, dataset, feed):
    """The teacher's embeddings of every training image and its flip, cached once for the fit (collective): reused
    when every rank opens the cache of an earlier run, else built by all ranks."""
    folder = os.path.join(cfg.output, "teacher_cache")
    try:
        cache = load_cache(folder, dataset, teacher=cfg.kd.teacher)
    except KDPluginError:
        cache = None
    if agree(cache is not None):
        return cache
    if get_rank() == 0:
        LOG.info(f"centres='fit': caching the teacher's embeddings of the training set in {folder}")
    build_cache(feed.embedder, dataset, folder, cfg.kd.teacher, cfg.kd.teacher_batch_size)
    return agree_or_raise(lambda: load_cache(folder, dataset, teacher=cfg.kd.teacher))
