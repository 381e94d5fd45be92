"""The one place that turns a resolved config into a run's objects: the batch sampler, the teacher feed, the
classifier head, the distillation terms and the KD objective. `kd-plugin train`, the train_v2 hook and the benchmarks
all build through here, from the run's plan (`cfg.kd.plan`, kd_plugin.methods.plan: what it runs and needs) and the method
registry's builders."""

from __future__ import annotations

import torch

from kd_plugin.centres.derived import derived_centres
from kd_plugin.data.batches import BatchReader, as_is
from kd_plugin.data.datasets import open_training_data
from kd_plugin.data.sampler import IdentityBalancedBatchSampler
from kd_plugin.data.views import EpochItems, ViewDataset, ViewSettings
from kd_plugin.embeddings import embedding_width
from kd_plugin.methods.heads import PartialFCHead, centre_settings, derives_centres, trainable_head
from kd_plugin.job_files import agree_or_raise, require_shared_folder
from kd_plugin.methods import methods
from kd_plugin.normalization import given_normalization
from kd_plugin.methods.objective import KDObjective
from kd_plugin.teachers import load_cache, load_embedder
from kd_plugin.teachers.feed import TeacherFeed
from kd_plugin.teachers.onnx_embedder import CHECK_IMAGES
from kd_plugin.teachers.view_cache import open_view_cache


def build_dataset(cfg):
    """The training set: `config.rec` (one labelled set or a list, one class space) plus `kd.unlabeled.data`."""
    return open_training_data(cfg.rec, cfg.kd.unlabeled.data, index_dir=cfg.output)


def build_sampler(cfg, labels) -> IdentityBalancedBatchSampler:
    """This rank's batch sampler: the identity-balanced part (P x K) when `kd.sampler.balanced`, else random only,
    and `kd.unlabeled.per_batch` unlabelled images; with `kd.views` the views decide the flips."""
    per_rank = cfg.kd.sampler.identities_per_batch if cfg.kd.sampler.balanced else 0
    return IdentityBalancedBatchSampler(labels, cfg.batch_size, per_rank, cfg.kd.sampler.images_per_identity,
                                        seed=cfg.seed, unlabeled_per_batch=cfg.kd.unlabeled.per_batch,
                                        flip=not cfg.kd.views.enabled)


def batch_reader(cfg, dataset, normalise=None) -> BatchReader:
    """What the loader's workers read for each batch of the sampler (kd_plugin.data.batches): the dataset's items, or
    with `kd.views` each sample's consistent view of the sampler's epoch."""
    if cfg.kd.views.enabled:
        dataset = ViewDataset(dataset, ViewSettings.from_config(cfg.kd.views), mixed_labels(cfg))
    return BatchReader(dataset, normalise)


def build_loader(cfg, dataset, sampler, pin_memory: bool, feed: TeacherFeed | None = None) -> torch.utils.data.DataLoader:
    """The training batches (`Batch`es, kd_plugin.data.batches) of the sampler's epoch. With a teacher cache (or a
    view cache) in `feed`, the workers also read each batch's cached teacher rows."""
    reader = batch_reader(cfg, dataset)
    if feed is not None:
        reader.attach(feed.cache, feed.views)
    return torch.utils.data.DataLoader(reader, sampler=EpochItems(sampler) if cfg.kd.views.enabled else sampler,
                                       batch_size=None, num_workers=cfg.num_workers, pin_memory=pin_memory,
                                       collate_fn=as_is)


def build_teacher(cfg, dataset, device: torch.device) -> TeacherFeed | None:
    """The teacher's embeddings for the run: its cache when configured, else the frozen teacher (a method's own,
    such as multi-step KD's schedule, or kd.teacher); None when no method needs the teacher."""
    kd, plan = cfg.kd, cfg.kd.plan
    if not derives_centres(kd) and not plan.teacher:
        return None
    if kd.cache:  # every rank opens it, or every rank stops with the message of one that could not
        return TeacherFeed(cache=agree_or_raise(lambda: load_cache(kd.cache, dataset, teacher=kd.teacher)))
    if kd.views.enabled and kd.views.cache:  # ranks read views other ranks stored: checked before the teacher loads
        require_shared_folder(kd.views.cache, "kd.views.cache (the teacher-view cache)")
    norm = given_normalization(kd.teacher_mean, kd.teacher_std, kd.teacher_bgr)
    amp = getattr(torch, kd.teacher_amp) if kd.teacher_amp else None
    if plan.own_teacher:
        return TeacherFeed(methods()[plan.own_teacher[0]].teacher(kd, norm, device, amp))
    embedder = load_embedder(kd.teacher, norm, device=str(device), batch_size=kd.teacher_batch_size, amp_dtype=amp)
    # an ONNX teacher converted to torch compares itself with onnxruntime now, not in a step
    embedder.check(lambda: torch.stack([dataset[i][0] for i in range(min(CHECK_IMAGES, len(dataset)))]))
    if not kd.views.enabled or not kd.views.cache:
        return TeacherFeed(embedder)
    width = embedding_width(embedder, dataset)
    views = agree_or_raise(lambda: open_view_cache(kd.views.cache, dataset, kd.teacher,
                                                   embedder.normalization or norm,
                                                   ViewSettings.from_config(kd.views).as_dict(), width))
    return TeacherFeed(embedder, views=views)


def build_head(cfg, dataset, feed: TeacherFeed | None, centres=None) -> PartialFCHead:
    """The classifier: the configured head method's (inherited centres, adaptive centres, ...) or trainable.
    `centres` (a ClassSlice of this rank's range): used instead of deriving them from the teacher (kd-plugin check's
    stand-in, which measures the step without a teacher pass over the whole training set)."""
    kd, plan = cfg.kd, cfg.kd.plan
    if plan.head == "trainable":
        return trainable_head(cfg)
    if plan.centres and centres is None:
        centres = derived_centres(cfg, dataset, feed) if derives_centres(kd) else centre_settings(kd).centres
    return methods()[plan.head].build(cfg, centres)


def build_terms(cfg) -> dict:
    """{name: (module, weight)} of the configured distillation terms, built from their config blocks."""
    return {name: (methods()[name].build(**dict(cfg.kd.get(name) or {})), weight)
            for name, weight in cfg.kd.plan.terms}


def build_objective(cfg, dataset, feed: TeacherFeed | None, sampler: IdentityBalancedBatchSampler,
                    centres=None) -> KDObjective:
    """The head (`centres`: see build_head) plus the weighted terms; with `kd.margin_on_random_part`, the head's loss
    sees only the sampler's random part of each rank's batch."""
    random_rows = sampler.random_size if cfg.kd.margin_on_random_part else None
    plan = cfg.kd.plan
    return KDObjective(build_head(cfg, dataset, feed, centres), build_terms(cfg), cfg.kd.reference_gradient_scaling,
                       random_rows, needs_teacher=plan.teacher, equal_dims=plan.equal_dims,
                       unlabeled_rows=cfg.kd.unlabeled.per_batch > 0 or (cfg.kd.views.enabled and
                                                                          cfg.kd.views.mixup > 0),
                       label_free=plan.label_free,
                       mixed_labels=mixed_labels(cfg))


def mixed_labels(cfg) -> bool:
    """Whether mixed views keep their labels for the head (kd.views.mixed_labels = "mix", with mixup on)."""
    views = cfg.kd.views
    return bool(views.enabled and views.mixup > 0 and views.mixed_labels == "mix")
