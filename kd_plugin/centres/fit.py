"""A classifier fitted to a frozen teacher, for teachers released without one: the margin-softmax classifier of the
training identities, trained over the teacher's cached embeddings (each image and its flip) with the teacher fixed.
ProxylessKD then inherits what its paper inherits — a classifier trained with the margin loss — instead of plain class
means, which place a centre where a class's images average out, not where the margin separates it from its neighbours.

The fit starts from the class means (`ClassSums`), so it only has to move the centres the margin needs moved, and takes
seconds at CelebA size. It runs on every rank of a process group like training does: each rank holds its class range
of the classifier (a trainable `PartialFCHead`, C/W rows), reads its share of each global batch from the cache (N/W
rows) and the batch is gathered, so a rank's memory and time grow with C/W and N/W."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kd_plugin.distributed import collective_device, gather_no_grad, gather_sizes, get_rank, get_world_size
from kd_plugin.methods.heads import CENTRE_FIT, CombinedMarginLoss, PartialFCHead
from kd_plugin.progress import Progress
from kd_plugin.centres.estimate import centres_from_cache
from kd_plugin.teachers.classifier import ClassSlice


def fit_class_slice(cache, labels: np.ndarray, num_classes: int, margin: CombinedMarginLoss,
                    epochs: int = CENTRE_FIT["epochs"], batch_size: int = CENTRE_FIT["batch_size"],
                    lr: float = CENTRE_FIT["lr"], seed: int = 0, progress: bool = True
                    ) -> ClassSlice:
    """This rank's rows of the fitted (num_classes, d) unit-norm classifier; call it on every rank.

    SGD (momentum 0.9, no weight decay: the rows are normalised in the logits) with a linear decay of `lr` to 0 over
    `epochs` passes of the 2N (image, flip) embeddings in a seeded order (the same on every rank); `batch_size` is the
    global batch, split over ranks."""
    rank, world = get_rank(), get_world_size()
    labels = np.asarray(labels, dtype=np.int64)
    start = centres_from_cache(cache, labels, num_classes)  # the class means: the starting point
    head = PartialFCHead(margin, cache.embedding_size, num_classes, centres=start, trainable=True, seed=seed)
    head = head.to(collective_device())
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    images = np.flatnonzero(labels >= 0)  # images without identity (kd.unlabeled) have no class to fit
    samples = 2 * len(images)
    steps_per_epoch = math.ceil(samples / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / max(1, total)))
    bar = Progress(total, "fitting the inherited classifier", "step", enabled=progress and rank == 0)
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(samples)
        for s in range(steps_per_epoch):
            batch = order[s * batch_size:(s + 1) * batch_size]
            mine = batch[rank::world]  # this rank reads its share; the batch is gathered in rank order
            rows = cache.get(images[mine // 2], mine % 2).to(collective_device())
            sizes = gather_sizes(len(mine), rows.device)
            embeddings = gather_no_grad(rows, sizes)
            targets = gather_no_grad(torch.from_numpy(labels[images[mine // 2]]).to(rows.device), sizes)
            loss = head.global_loss(embeddings, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    return ClassSlice(head.class_start, F.normalize(head.weight.detach().float().cpu(), dim=1))
