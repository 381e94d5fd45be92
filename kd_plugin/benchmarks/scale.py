"""Per-rank memory and time at MS1MV3 / Glint360K / WebFace42M scale, measured on synthetic data written for the
purpose: `kd-plugin bench scale --json`.

Side by side in one run: (1) opening a `.rec` of 5,000,000 records (insightface layout: header, images, identity
ranges); (2) for W = 1, 2 and 4 gloo ranks, the peak resident memory each rank adds while (a) loading its class range
of an inherited classifier of C = 1,000,000 x 512 from one classifier file, (b) creating AdaDistill's centres and
running one update, (c) estimating class centres from embeddings spread over the ranks, each over C·d·bytes/W for the
dtype it holds. Then what these mean per GPU for MS1MV3, Glint360K and WebFace42M on 8 GPUs. The last stdout line is
the JSON."""

from __future__ import annotations

import os

import numpy as np

from kd_plugin.data.recordio import MAGIC

_LABELS2 = [("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"), ("id2", "<u8"),
            ("first", "<f4"), ("second", "<f4")]  # a record holding two float32 labels and no image
_IMAGE = [("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"), ("id2", "<u8"),
          ("pixels", "<u4")]  # a record with a 4-byte stand-in for the image


def write_synthetic_rec(folder: str, num_images: int, num_classes: int) -> None:
    """An insightface train.rec/idx/property of `num_images` tiny records over `num_classes` identities (header
    record, images in class order, identity-range records), written with numpy in seconds."""
    os.makedirs(folder, exist_ok=True)
    per_class = np.full(num_classes, num_images // num_classes, dtype=np.int64)
    per_class[: num_images % num_classes] += 1
    ends = 1 + np.cumsum(per_class)
    end_images, end_ranges = num_images + 1, num_images + 1 + num_classes
    labels2, image = np.dtype(_LABELS2), np.dtype(_IMAGE)
    header = np.zeros(1, labels2)
    images = np.zeros(num_images, image)
    ranges = np.zeros(num_classes, labels2)
    for part in (header, images, ranges):
        part["magic"] = MAGIC
        part["lrec"] = part.dtype.itemsize - 8
    header["flag"], header["first"], header["second"] = 2, end_images, end_ranges
    images["label"], images["id"] = np.repeat(np.arange(num_classes), per_class), np.arange(1, end_images)
    ranges["flag"], ranges["first"], ranges["second"] = 2, ends - per_class, ends
    ranges["id"] = np.arange(end_images, end_ranges)
    with open(os.path.join(folder, "train.rec"), "wb") as f:
        for part in (header, images, ranges):
            part.tofile(f)
    offsets = np.concatenate([[0], labels2.itemsize + image.itemsize * np.arange(num_images),
                              labels2.itemsize + image.itemsize * num_images + labels2.itemsize * np.arange(num_classes)])
    with open(os.path.join(folder, "train.idx"), "w", encoding="ascii") as f:
        f.write("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets.tolist())))
    with open(os.path.join(folder, "property"), "w", encoding="ascii") as f:
        f.write(f"{num_classes},112,112")
