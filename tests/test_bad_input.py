"""Bad data files give errors naming the file, the record key, the byte offset and what to do; skip mode counts."""

from __future__ import annotations

import re

import pytest

from kd_plugin.data import open_dataset
from kd_plugin.data.pack import pack_dataset
from kd_plugin.errors import DataFormatError


@pytest.fixture
def packed(image_folder, tmp_path):
    out = tmp_path / "rec"
    pack_dataset(open_dataset(str(image_folder)), str(out), progress=False)
    offsets = {int(k): int(o) for k, o in (line.split() for line in (out / "train.idx").read_text().splitlines())}
    return out, offsets


def _assert_names_place(message, path, key, offset):
    assert str(path) in message and f"record key {key}" in message and f"byte offset {offset}" in message
    assert "skip_bad_records" in message or "kd-plugin pack" in message


def test_wrong_magic(packed):
    out, offsets = packed
    data = bytearray((out / "train.rec").read_bytes())
    data[offsets[4]] ^= 0xFF
    (out / "train.rec").write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match="wrong magic") as err:
        open_dataset(str(out))
    _assert_names_place(str(err.value), out / "train.rec", 4, offsets[4])
    with pytest.warns(UserWarning, match="skipped 1 bad records"):
        ds = open_dataset(str(out), skip_bad_records=True)
    assert len(ds) == 8 and len(ds.skipped) == 1 and "record key 4" in ds.skipped[0]


def test_truncated_file(packed):
    out, offsets = packed
    data = (out / "train.rec").read_bytes()
    (out / "train.rec").write_bytes(data[:offsets[9] + 100])  # cuts image 9 and every identity range record
    with pytest.raises(DataFormatError) as err:
        open_dataset(str(out))
    message = str(err.value)
    assert "past the end" in message or "truncated" in message
    assert str(out / "train.rec") in message and re.search(r"record key \d+ at byte offset \d+", message)


def test_truncated_image_record(tmp_path):
    from conftest import jpeg_bytes
    from kd_plugin.data.recordio import RecordHeader, RecordIOWriter, pack_payload
    with RecordIOWriter(str(tmp_path / "train.rec")) as w:  # im2rec layout: no header, every key an image
        for key in range(3):
            w.write(key, pack_payload(RecordHeader(flag=0, label=float(key % 2), id=key), jpeg_bytes(key)))
    offsets = {int(k): int(o) for k, o in (line.split() for line in (tmp_path / "train.idx").read_text().splitlines())}
    data = (tmp_path / "train.rec").read_bytes()
    (tmp_path / "train.rec").write_bytes(data[:-100])
    with pytest.raises(DataFormatError, match="truncated") as err:
        open_dataset(str(tmp_path))
    _assert_names_place(str(err.value), tmp_path / "train.rec", 2, offsets[2])


def test_idx_entry_past_end(packed):
    out, offsets = packed
    lines = (out / "train.idx").read_text().splitlines()
    lines[2] = "2\t999999999"
    (out / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match="past the end") as err:
        open_dataset(str(out))
    _assert_names_place(str(err.value), out / "train.rec", 2, 999999999)
    with pytest.warns(UserWarning, match="skipped 1 bad records"):
        assert len(open_dataset(str(out), skip_bad_records=True)) == 8


def test_undecodable_jpeg(packed):
    out, offsets = packed
    data = bytearray((out / "train.rec").read_bytes())
    start = offsets[5] + 8 + 24
    data[start:start + 600] = b"\0" * 600  # destroy the JPEG header of image key 5 (sample 4, identity 1)
    (out / "train.rec").write_bytes(bytes(data))
    ds = open_dataset(str(out))
    with pytest.raises(DataFormatError, match="cannot decode") as err:
        ds[4]
    _assert_names_place(str(err.value), out / "train.rec", 5, offsets[5])
    skipping = open_dataset(str(out), skip_bad_records=True)
    with pytest.warns(UserWarning, match="undecodable"):
        image, label, index = skipping[4]
    assert int(label) == 1 and int(index) == 4 and skipping.bad_images == 1  # replaced within the same identity


def test_empty_class(image_folder, tmp_path):
    (image_folder / "dave").mkdir()
    with pytest.raises(DataFormatError, match="dave.*no image"):
        open_dataset(str(image_folder))
    with pytest.warns(UserWarning):
        assert open_dataset(str(image_folder), skip_bad_records=True).num_classes == 3
    listing = tmp_path / "label.txt"
    listing.write_text("".join(f"{p} {lab}\n" for p, lab in [("faces/alice/000.jpg", 0), ("faces/carol/000.jpg", 2)]))
    with pytest.raises(DataFormatError, match="class 1"):
        open_dataset(str(listing))


def test_malformed_idx_line(packed):
    out, _ = packed
    (out / "train.idx").write_text("0\t0\nnot-a-number\n")
    with pytest.raises(DataFormatError, match=r"train.idx, line 2: expected 'key<TAB>offset'"):
        open_dataset(str(out))


def test_truncated_file_in_skip_mode_keeps_the_readable_images(packed):
    out, offsets = packed
    data = (out / "train.rec").read_bytes()
    (out / "train.rec").write_bytes(data[:offsets[9] + 100])  # image key 9 and every identity range record cut
    with pytest.warns(UserWarning, match="skipped"):
        ds = open_dataset(str(out), skip_bad_records=True)
    assert len(ds) == 8 and len(ds.identity_ranges) == 0
    assert any("record key 9" in s for s in ds.skipped) and any("identity ranges ignored" in s for s in ds.skipped)
    assert ds[7][0].shape == (3, 112, 112)


def test_pack_skip_bad_records_leaves_undecodable_images_out(image_folder, tmp_path):
    (image_folder / "bob" / "001.jpg").write_bytes(b"\0" * 300)
    with pytest.raises(DataFormatError, match=r"bob/001.jpg.*cannot decode"):
        pack_dataset(open_dataset(str(image_folder)), str(tmp_path / "out"), progress=False)
    assert not list((tmp_path / "out").glob("*.tmp")) and not (tmp_path / "out" / "train.rec").exists()
    with pytest.warns(UserWarning, match="left out"):
        result = pack_dataset(open_dataset(str(image_folder), skip_bad_records=True), str(tmp_path / "out"),
                              progress=False)
    assert (result["images"], result["skipped"]) == (8, 1)
    packed = open_dataset(str(tmp_path / "out"))
    assert list(packed.labels) == [0, 0, 1, 1, 2, 2, 2, 2] and packed.identity_ranges.tolist() == [[1, 3], [3, 5], [5, 9]]


def test_pack_refuses_a_label_gap(tmp_path, image_folder):
    listing = tmp_path / "label.txt"
    listing.write_text("faces/alice/000.jpg 0\nfaces/carol/000.jpg 2\n")
    with pytest.warns(UserWarning):
        gapped = open_dataset(str(listing), skip_bad_records=True)
    with pytest.raises(DataFormatError, match="class 1 has no image"):
        pack_dataset(gapped, str(tmp_path / "out"), progress=False)


def test_empty_identity_range_names_its_record(packed):
    out, offsets = packed
    from kd_plugin.data.recordio import RecordHeader, RecordIOReader, RecordIOWriter, pack_payload
    reader = RecordIOReader(str(out / "train.rec"))
    payloads = {k: reader.read(k) for k in reader.keys}
    payloads[11] = pack_payload(RecordHeader(flag=2, label=0.0, id=11, labels=(3.0, 3.0)))  # class 1: no images
    with RecordIOWriter(str(out / "train.rec")) as w:
        for k in reader.keys:
            w.write(k, payloads[k])
    new_offset = int((out / "train.idx").read_text().splitlines()[11].split()[1])
    with pytest.raises(DataFormatError, match="class 1 is empty") as err:
        open_dataset(str(out))
    _assert_names_place(str(err.value), out / "train.rec", 11, new_offset)


def test_undecodable_single_image_identity_says_what_to_do(tmp_path):
    from conftest import jpeg_bytes
    for name, files in (("a", {"0.jpg": jpeg_bytes(1), "1.jpg": jpeg_bytes(2)}), ("b", {"0.jpg": b"\0" * 50})):
        (tmp_path / name).mkdir()
        for f, data in files.items():
            (tmp_path / name / f).write_bytes(data)
    ds = open_dataset(str(tmp_path), skip_bad_records=True)
    with pytest.warns(UserWarning), pytest.raises(DataFormatError, match="pack --skip-bad-records"):
        ds[2]


def test_replaced_images_are_counted_across_dataloader_workers(packed):
    import torch
    out, offsets = packed
    data = bytearray((out / "train.rec").read_bytes())
    for key in (2, 5):
        start = offsets[key] + 8 + 24
        data[start:start + 600] = b"\0" * 600
    (out / "train.rec").write_bytes(bytes(data))
    ds = open_dataset(str(out), skip_bad_records=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    labels = torch.cat([b[1] for b in loader])  # the workers print their warnings; the count is shared
    assert labels.tolist() == list(ds.labels) and ds.bad_images == 2
