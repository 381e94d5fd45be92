"""RecordIO framing, reading the real insightface/im2rec files, and packing."""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import jpeg_bytes, shared
from kd_plugin.cli import main as cli_main
from kd_plugin.data import open_dataset
from kd_plugin.data.pack import pack_dataset
from kd_plugin.data.recordio import (MAGIC, RecordHeader, RecordIOReader, RecordIOWriter, frame_record, pack_payload,
                                     unpack_payload)

MAGIC_BYTES = struct.pack("<I", MAGIC)


def test_frame_splits_on_aligned_magic_and_reader_rejoins(tmp_path):
    payload = b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"xy" + MAGIC_BYTES[:3]  # two aligned magics
    framed = frame_record(payload)
    # three parts: first (cflag 1), middle (2), last (3); magics dropped; padded to 4 bytes
    lrecs = []
    pos = 0
    while pos < len(framed):
        magic, lrec = struct.unpack_from("<II", framed, pos)
        assert magic == MAGIC
        lrecs.append((lrec >> 29, lrec & ((1 << 29) - 1)))
        pos += 8 + lrecs[-1][1] + (-lrecs[-1][1] % 4)
    assert lrecs == [(1, 4), (2, 4), (3, 5)]
    assert len(framed) % 4 == 0
    unaligned = b"ab" + MAGIC_BYTES + b"cd"
    assert struct.unpack_from("<II", frame_record(unaligned))[1] == len(unaligned)  # not split
    with RecordIOWriter(str(tmp_path / "x.rec")) as w:
        w.write(7, payload)
        w.write(3, unaligned)
        w.write(5, b"")
    reader = RecordIOReader(str(tmp_path / "x.rec"))
    assert reader.keys == [7, 3, 5]
    assert reader.read(7) == payload and reader.read(3) == unaligned and reader.read(5) == b""
    (tmp_path / "x.idx").unlink()  # without .idx the reader walks the file
    scanned = RecordIOReader(str(tmp_path / "x.rec"))
    assert [scanned.read(k) for k in scanned.keys] == [payload, unaligned, b""]


def test_payload_header_scalar_and_array_labels():
    h, rest = unpack_payload(pack_payload(RecordHeader(flag=0, label=3.0, id=9), b"img"))
    assert (h.flag, h.class_label, h.id, rest) == (0, 3.0, 9, b"img")
    h, rest = unpack_payload(pack_payload(RecordHeader(flag=3, label=0.0, labels=(5.0, 1.5, 2.0)), b"jpg"))
    assert h.labels == (5.0, 1.5, 2.0) and h.class_label == 5.0 and rest == b"jpg"


def test_headerless_records_with_array_labels(tmp_path):
    """im2rec with several labels per image: flag = number of labels, the class is the first one."""
    with RecordIOWriter(str(tmp_path / "train.rec")) as w:
        for key, cls in enumerate([1, 0, 1]):
            w.write(key, pack_payload(RecordHeader(flag=2, label=0.0, id=key, labels=(float(cls), 0.25)), jpeg_bytes(key)))
    ds = open_dataset(str(tmp_path))
    assert not ds.has_header and list(ds.labels) == [1, 0, 1] and ds.num_classes == 2
    assert ds[2][0].shape == (3, 112, 112)


def _raw_image_bytes(rec_path, idx_path, key):
    """Independent reader: locate a record by .idx offset and strip the 24-byte IRHeader (+ labels)."""
    offsets = dict(tuple(map(int, line.split())) for line in open(idx_path) if line.strip())
    with open(rec_path, "rb") as f:
        f.seek(offsets[key])
        magic, lrec = struct.unpack("<II", f.read(8))
        assert magic == MAGIC and lrec >> 29 == 0
        payload = f.read(lrec & ((1 << 29) - 1))
    flag = struct.unpack_from("<I", payload)[0]
    return payload[24 + 4 * flag:]


def test_real_im2rec_file_without_header():
    rec = shared("formats", "im2rec_tiny", "train.rec")
    ds = open_dataset(str(rec))
    assert (len(ds), ds.num_classes, ds.has_header) == (8, 2, False)
    # im2rec's .lst gives `index label path`; sample i is the i-th key of the .idx (arcface_torch's order)
    lst = {int(f[0]): int(float(f[1])) for f in (line.split("\t") for line in open(rec.with_suffix(".lst")))}
    assert list(ds.labels) == [lst[k] for k in ds.keys]
    assert ds.keys == [0, 4, 7, 5, 1, 6, 3, 2]
    image, label, index = ds[(3, False)]
    ref = np.asarray(Image.open(io.BytesIO(_raw_image_bytes(rec, rec.with_suffix(".idx"), ds.keys[3]))).convert("RGB"))
    assert image.dtype == torch.uint8 and image.shape == (3, 112, 112)
    assert np.array_equal(image.numpy(), ref.transpose(2, 0, 1))
    assert label.dtype == torch.int64 and int(label) == lst[ds.keys[3]] and int(index) == 3


@pytest.mark.parametrize("name,images,identities", [("train", 5206, 249), ("val", 1077, 50)])
def test_real_celeba_records(name, images, identities):
    rec = shared("celeba", f"{name}.rec")
    ds = open_dataset(str(rec))
    assert (len(ds), ds.num_classes, ds.has_header) == (images, identities, True)
    assert len(ds.identity_ranges) == identities
    for cls, (start, end) in enumerate(ds.identity_ranges):  # ranges agree with the per-image labels
        assert set(ds.labels[start - 1:end - 1]) == {cls}
    for index in (0, images // 2, images - 1):
        image, label, idx = ds[(index, True)]
        ref = np.asarray(Image.open(io.BytesIO(_raw_image_bytes(rec, rec.with_suffix(".idx"), index + 1))).convert("RGB"))
        assert np.array_equal(image.numpy(), ref[:, ::-1].transpose(2, 0, 1))  # flip=True mirrors left-right
        assert int(idx) == index


def test_real_rec_through_dataloader_workers():
    ds = open_dataset(str(shared("celeba", "val.rec")))
    ds[0]  # the parent now holds an open handle ...
    assert ds.reader._handle is not None
    assert pickle.loads(pickle.dumps(ds)).reader._handle is None  # ... which workers never inherit
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, sampler=range(64))
    images, labels, indices = next(iter(loader))
    assert images.shape == (16, 3, 112, 112) and indices.tolist() == list(range(16))
    assert labels.tolist() == ds.labels[:16].tolist()


def test_pack_folder_roundtrip_keeps_bytes_and_labels(image_folder, tmp_path):
    assert cli_main(["pack", str(image_folder), str(tmp_path / "out")]) == 0
    packed = open_dataset(str(tmp_path / "out"))
    source = open_dataset(str(image_folder))
    assert packed.has_header and (tmp_path / "out" / "property").read_text() == "3,112,112"
    assert list(packed.labels) == list(source.labels)
    for i in range(len(source)):
        assert packed.read_bytes(i) == source.read_bytes(i)
    assert packed.identity_ranges.tolist() == [[1, 3], [3, 6], [6, 10]]


def test_pack_reproduces_real_celeba_file_byte_for_byte(tmp_path):
    rec = shared("celeba", "train.rec")
    pack_dataset(open_dataset(str(rec)), str(tmp_path), progress=False)
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / name).read_bytes() == (rec.parent / name).read_bytes(), name


def test_label_list_and_image_folder_layouts(tmp_path, image_folder):
    import tarfile
    with tarfile.open(shared("formats", "paddle_small_dataset.tar")) as tar:
        tar.extractall(tmp_path, filter="data")
    ds = open_dataset(str(tmp_path / "small_dataset"))
    assert (len(ds), ds.num_classes) == (10, 10)
    assert ds[(0, False)][0].shape == (3, 112, 112)
    folder = open_dataset(str(image_folder))
    assert list(folder.labels) == [0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_decoding_matches_opencv_like_arcface_torch():
    """arcface_torch decodes with mxnet/OpenCV; our PIL decoding must give the same pixels on the real files."""
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (the test extra) is not installed")
    ds = open_dataset(str(shared("celeba", "val.rec")))
    for index in range(0, len(ds), 7):
        bgr = cv2.imdecode(np.frombuffer(ds.read_bytes(index), np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(ds[index][0].numpy(), bgr[:, :, ::-1].transpose(2, 0, 1)), index


def test_dataset_reads_records_split_around_the_magic(tmp_path):
    """A JPEG comment holding the magic at an aligned payload offset makes the writer split the record (cflag 1/3)."""
    jpeg = jpeg_bytes(5)
    comment = b"xx" + MAGIC_BYTES + b"yy"  # payload offset 24 (IRHeader) + 2 (SOI) + 4 (COM marker+length) + 2 = 32
    tricky = jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]
    with RecordIOWriter(str(tmp_path / "train.rec")) as w:
        w.write(0, pack_payload(RecordHeader(flag=0, label=0.0, id=0), jpeg))
        w.write(1, pack_payload(RecordHeader(flag=0, label=1.0, id=1), tricky))
    offset = RecordIOReader(str(tmp_path / "train.rec")).offsets[1]
    lrec = struct.unpack_from("<I", (tmp_path / "train.rec").read_bytes(), offset + 4)[0]
    assert lrec >> 29 == 1  # really split
    ds = open_dataset(str(tmp_path))
    assert list(ds.labels) == [0, 1] and ds.read_bytes(1) == tricky
    assert np.array_equal(ds[1][0].numpy(), ds[0][0].numpy())  # the comment changes no pixel


def test_exif_orientation_is_applied_like_opencv(tmp_path):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (the test extra) is not installed")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    from kd_plugin.data.images import decode_image
    ours = decode_image(buf.getvalue(), "test")
    ref = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert np.array_equal(ours, ref)
