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


def test_truncated_image_record(packed):
    out, offsets = packed
    data = (out / "train.rec").read_bytes()
    (out / "train.rec").write_bytes(data[:offsets[9] + 100])
    (out / "train.idx").write_text(f"0\t{offsets[0]}\n" + "".join(f"{k}\t{offsets[k]}\n" for k in range(1, 10)))
    # the header still announces identity ranges at keys 10..12, now missing: read only the image part
    with pytest.raises(DataFormatError) as err:
        open_dataset(str(out))
    assert "truncated" in str(err.value)
    _assert_names_place(str(err.value), out / "train.rec", 9, offsets[9])


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
