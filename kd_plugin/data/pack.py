"""Write any face dataset as an insightface `train.rec/train.idx/property` (header record + identity ranges)."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

from kd_plugin.atomic import replacing_all
from kd_plugin.data.datasets import FaceDataset
from kd_plugin.data.images import decode_image
from kd_plugin.data.recordio import RecordHeader, RecordIOWriter, pack_payload
from kd_plugin.errors import DataFormatError
from kd_plugin.progress import Progress

_JPEG_SOI = b"\xff\xd8"
_OUTPUTS = ("train.rec", "train.idx", "property")


def pack_dataset(dataset: FaceDataset, out_dir: str, progress: bool = True) -> dict:
    """Pack `dataset` into `out_dir` in the insightface layout; returns counts.

    Record 0 is the header (flag=2, label=[first_non_image_key, end_of_ranges]); records 1..N are the images sorted by
    label (flag=0, label=class, id=key), JPEG bytes kept as they are; then one record per identity (flag=2,
    label=[first_key, end_key), id=key). Every image is decoded first: an undecodable one stops the run, or with the
    dataset's `skip_bad_records` is left out and counted. Files are written under temporary names and renamed at the
    end, so an interrupted run leaves no half-written train.rec behind."""
    os.makedirs(out_dir, exist_ok=True)
    with replacing_all([os.path.join(out_dir, name) for name in _OUTPUTS]) as files:
        return _write(dataset, out_dir, {name: files[os.path.join(out_dir, name)] for name in _OUTPUTS}, progress)


def _write(dataset: FaceDataset, out_dir: str, tmp: dict[str, str], progress: bool) -> dict:
    num_classes = dataset.num_classes
    counts = dataset.class_counts()
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DataFormatError(f"{dataset.source}: class {int(empty[0])} has no image ({len(empty)} empty classes); an "
                              f"insightface .rec needs every class 0..C-1 present: relabel the source without gaps")
    order = np.argsort(dataset.labels, kind="stable")
    bar = Progress(len(order), f"packing into {os.path.join(out_dir, 'train.rec')}", "img", enabled=progress)
    images, labels, re_encoded, skipped = [], [], 0, 0
    for index in order:  # read and check everything first: the header must know the final image count
        index = int(index)
        data = dataset.read_bytes(index)
        try:
            rgb = decode_image(data, dataset.where(index), dataset.image_size)
        except DataFormatError as exc:
            if not dataset.skip_bad_records:
                raise
            warnings.warn(f"{exc} (left out)")
            skipped += 1
            continue
        if not data.startswith(_JPEG_SOI):
            data = _encode_jpeg(rgb)
            re_encoded += 1
        images.append(data)
        labels.append(int(dataset.labels[index]))
        bar.update()
    kept = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    if (kept == 0).any():
        raise DataFormatError(f"{dataset.source}: every image of class {int(np.flatnonzero(kept == 0)[0])} was "
                              f"undecodable; replace them or remove that class and relabel")
    first_range_key = len(images) + 1
    with RecordIOWriter(tmp["train.rec"], tmp["train.idx"]) as writer:
        header = RecordHeader(flag=2, label=0.0, labels=(float(first_range_key), float(first_range_key + num_classes)))
        writer.write(0, pack_payload(header))
        for key, (data, label) in enumerate(zip(images, labels), start=1):
            writer.write(key, pack_payload(RecordHeader(flag=0, label=float(label), id=key), data))
        ends = np.cumsum(kept) + 1
        for cls in range(num_classes):
            key = first_range_key + cls
            bounds = (float(ends[cls] - kept[cls]), float(ends[cls]))
            writer.write(key, pack_payload(RecordHeader(flag=2, label=0.0, id=key, labels=bounds)))
    with open(tmp["property"], "w", encoding="ascii") as f:
        f.write(f"{num_classes},{dataset.image_size[0]},{dataset.image_size[1]}")
    return {"images": len(images), "identities": num_classes, "re_encoded": re_encoded, "skipped": skipped,
            "out_dir": out_dir}


def _encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
