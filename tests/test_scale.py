"""Scale: opening a .rec from its identity ranges, per-rank class ranges of the classifier, AdaDistill and centre
estimation holding only their slice (equal to one process), estimated centres reused on resume."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import shared
from kd_plugin.benchmarks.scale import write_synthetic_rec
from kd_plugin.data import open_dataset
from kd_plugin.data.recordio import RecordIOReader


def test_real_celeba_labels_from_identity_ranges_equal_every_records_header():
    rec = str(shared("celeba", "train.rec"))
    fast, scanned = open_dataset(rec), open_dataset(rec, skip_bad_records=True)  # skip mode reads every header
    assert np.array_equal(fast.labels, scanned.labels) and fast.keys == scanned.keys


def test_a_rec_with_identity_ranges_opens_without_reading_every_header(tmp_path, monkeypatch):
    write_synthetic_rec(str(tmp_path), 20_000, 300)
    reads = []
    real = RecordIOReader.read_header
    monkeypatch.setattr(RecordIOReader, "read_header", lambda self, key: reads.append(key) or real(self, key))
    ds = open_dataset(str(tmp_path))
    assert (len(ds), ds.num_classes) == (20_000, 300) and len(reads) <= 65  # the header record + 64 spot checks
    assert ds.labels[0] == 0 and ds.labels[-1] == 299 and np.bincount(ds.labels).min() == 20_000 // 300
    monkeypatch.undo()
    assert np.array_equal(ds.labels, open_dataset(str(tmp_path), skip_bad_records=True).labels)


def test_identity_ranges_that_disagree_with_the_records_fall_back_to_reading_them(tmp_path):
    write_synthetic_rec(str(tmp_path), 1_000, 10)
    raw = bytearray((tmp_path / "train.rec").read_bytes())
    first_image = 40  # the header record is 40 bytes; the image record's label is a float32 at byte 12
    raw[first_image + 12:first_image + 16] = np.float32(7).tobytes()
    (tmp_path / "train.rec").write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="its label 7 disagrees with the identity ranges"):
        ds = open_dataset(str(tmp_path))
    assert ds.labels[0] == 7 and ds.labels[1] == 0
