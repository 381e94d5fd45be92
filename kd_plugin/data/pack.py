"""Write any face dataset as an insightface `train.rec/train.idx/property` (header record + identity ranges)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from kd_plugin.data.datasets import FaceDataset
from kd_plugin.data.images import decode_image
from kd_plugin.data.recordio import RecordHeader, RecordIOWriter, pack_payload
from kd_plugin.progress import Progress

_JPEG_SOI = b"\xff\xd8"


def pack_dataset(dataset: FaceDataset, out_dir: str, progress: bool = True) -> dict:
    """Pack `dataset` into `out_dir` in the insightface layout; returns counts.

    Record 0 is the header (flag=2, label=[first_non_image_key, end_of_ranges]); records 1..N are the images sorted by
    label (flag=0, label=class, id=key), JPEG bytes kept as they are; then one record per identity (flag=2,
    label=[first_key, end_key), id=key). Files are written under temporary names and renamed at the end, so an interrupted
    run leaves no half-written train.rec behind."""
    os.makedirs(out_dir, exist_ok=True)
    n, num_classes = len(dataset), dataset.num_classes
    order = np.argsort(dataset.labels, kind="stable")
    rec, idx = os.path.join(out_dir, "train.rec"), os.path.join(out_dir, "train.idx")
    first_range_key = n + 1
    re_encoded = 0
    bar = Progress(n, f"packing into {rec}", "img", enabled=progress)
    with RecordIOWriter(rec + ".tmp", idx + ".tmp") as writer:
        header = RecordHeader(flag=2, label=0.0, labels=(float(first_range_key), float(first_range_key + num_classes)))
        writer.write(0, pack_payload(header))
        for key, index in enumerate(order, start=1):
            data = dataset.read_bytes(int(index))
            rgb = decode_image(data, dataset.where(int(index)), dataset.image_size)  # refuse what training could not read
            if not data.startswith(_JPEG_SOI):
                data = _encode_jpeg(rgb)
                re_encoded += 1
            label = float(dataset.labels[index])
            writer.write(key, pack_payload(RecordHeader(flag=0, label=label, id=key), data))
            bar.update()
        counts = np.bincount(dataset.labels, minlength=num_classes)
        ends = np.cumsum(counts) + 1
        for cls in range(num_classes):
            bounds = (float(ends[cls] - counts[cls]), float(ends[cls]))
            key = first_range_key + cls
            writer.write(key, pack_payload(RecordHeader(flag=2, label=0.0, id=key, labels=bounds)))
    with open(os.path.join(out_dir, "property.tmp"), "w", encoding="ascii") as f:
        f.write(f"{num_classes},{dataset.image_size[0]},{dataset.image_size[1]}")
    for name in ("train.rec", "train.idx", "property"):
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    return {"images": n, "identities": num_classes, "re_encoded": re_encoded, "out_dir": out_dir}


def _encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
