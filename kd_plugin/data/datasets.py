"""Identity-labelled face datasets: insightface RecordIO, image folders and `label.txt` lists.

Every dataset yields `(image, label, index)`: a uint8 (3, H, W) RGB tensor, an int64 label and the int64 sample
index. An item is either an index or an `(index, flip)` pair: flipping is decided by whoever draws the indices
(the sampler), never inside the dataset, so a sample is fully named by (index, flip).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Sequence

import numpy as np
import torch

from kd_plugin.atomic import replacing
from kd_plugin.data.images import decode_image, hwc_to_chw
from kd_plugin.data.recordio import RecordIOReader, unpack_payload
from kd_plugin.distributed import get_rank, is_distributed
from kd_plugin.errors import DataFormatError
from kd_plugin.progress import Progress

LABEL_INDEX_MIN_RECORDS = 200_000  # a full header read of a file this large leaves a label index beside it
LABEL_INDEX_WRITES = 0  # label indexes this process wrote (the scale benchmark counts writers)
FLOAT32_EXACT = 1 << 24  # identity-range records store keys as float32: exact integers up to here
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
Item = int | tuple[int, bool]
_REPACK = "re-pack the data (kd-plugin pack) or pass skip_bad_records=True to skip and count bad records"
_EMPTY_CLASS_HINT = ("labels must be 0..C-1 with every class present: relabel the source without gaps and re-pack, or "
                     "pass skip_bad_records=True to accept it (that class then never appears in training)")


def _float32_round(keys: np.ndarray) -> np.ndarray:
    """What a float32 label field makes of integer keys (round to nearest, ties to even), back as int64."""
    return np.asarray(keys, dtype=np.int64).astype(np.float32).astype(np.int64)


def _keys_rounding_to(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(candidates, which): row i holds the integers around `values[i]`, ascending, and `which[i]` marks those whose
    float32 is `values[i]` (at most 3 a value below 2^26)."""
    values = np.asarray(values, dtype=np.int64)
    step = max(1, int(np.spacing(np.float32(values.max())))) if len(values) else 1
    candidates = values[:, None] + np.arange(-step, step + 1)
    return candidates, _float32_round(candidates) == values[:, None]


def split_item(item: Item) -> tuple[int, bool]:
    """Normalise a dataset item to (index, flip)."""
    if isinstance(item, (tuple, list)):
        index, flip = item
        return int(index), bool(flip)
    return int(item), False


class FaceDataset(torch.utils.data.Dataset):
    """Base class: subclasses provide `labels`, `read_bytes(index)` and `where(index)`."""

    labels: np.ndarray
    num_classes: int

    def __init__(self, source: str, image_size: tuple[int, int] = (112, 112), skip_bad_records: bool = False) -> None:
        self.source = source
        self.image_size = tuple(image_size)
        self.skip_bad_records = skip_bad_records
        self.skipped: list[str] = []  # structurally bad records left out when opening (skip mode)
        # undecodable images replaced while reading (skip mode); in shared memory, so DataLoader workers add to it
        self._bad_images = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def bad_images(self) -> int:
        """Number of undecodable images replaced so far, counted across DataLoader workers."""
        return int(self._bad_images.item())

    def __len__(self) -> int:
        return len(self.labels)

    def read_bytes(self, index: int) -> bytes:
        """The encoded image of sample `index`."""
        raise NotImplementedError

    def where(self, index: int) -> str:
        """Where sample `index` lives, for error messages."""
        raise NotImplementedError

    def load_image(self, index: int) -> np.ndarray:
        """Decode sample `index` to (H, W, 3) uint8 RGB."""
        return decode_image(self.read_bytes(index), self.where(index), self.image_size)

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, flip = split_item(item)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.source}: sample index {index} out of range 0..{len(self) - 1}")
        try:
            rgb = self.load_image(index)
        except DataFormatError:
            if not self.skip_bad_records:
                raise
            rgb = self._replacement_image(index)
        return (torch.from_numpy(hwc_to_chw(rgb, flip)), torch.tensor(int(self.labels[index]), dtype=torch.int64),
                torch.tensor(index, dtype=torch.int64))

    def _replacement_image(self, index: int) -> np.ndarray:
        """Skip mode: stand in the next decodable image of the same identity, so the label stays right."""
        self._bad_images += 1
        warnings.warn(f"{self.where(index)}: undecodable image skipped ({self.bad_images} so far)")
        same = np.flatnonzero(self.labels == self.labels[index])
        start = int(np.searchsorted(same, index))
        for other in np.roll(same, -start)[1:]:
            try:
                return self.load_image(int(other))
            except DataFormatError:
                continue
        raise DataFormatError(f"{self.where(index)}: undecodable, and identity {int(self.labels[index])} has no other "
                              f"decodable image to stand in for it; drop it from the data (kd-plugin pack "
                              f"--skip-bad-records SOURCE OUT_DIR leaves undecodable images out)")

    def _finish_labels(self, labels: Sequence[int], num_classes: int | None) -> None:
        """Store labels and check that every class in 0..C-1 has at least one image."""
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) == 0:
            raise DataFormatError(f"{self.source}: no images found")
        if self.labels.min() < 0:
            raise DataFormatError(f"{self.source}: negative label {int(self.labels.min())}; labels must be 0..C-1")
        counts = np.bincount(self.labels)
        self.num_classes = int(num_classes if num_classes is not None else len(counts))
        if len(counts) > self.num_classes:
            raise DataFormatError(f"{self.source}: label {len(counts) - 1} found but the dataset declares "
                                  f"{self.num_classes} classes (property file); fix the property file or the labels")
        empty = np.flatnonzero(np.bincount(self.labels, minlength=self.num_classes) == 0)
        if len(empty):
            msg = (f"{self.source}: {len(empty)} of {self.num_classes} classes have no image (first: class "
                   f"{int(empty[0])}); {_EMPTY_CLASS_HINT}")
            if not self.skip_bad_records:
                raise DataFormatError(msg)
            warnings.warn(msg + " (kept: skip_bad_records=True)")

    def class_counts(self) -> np.ndarray:
        """Number of images per class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    @property
    def num_labeled(self) -> int:
        """Images with an identity label (all of them, but in a set combined with unlabelled images)."""
        return len(self.labels)


def read_property(path: str) -> tuple[int, int, int]:
    """Parse an insightface `property` file: `num_classes,height,width`."""
    with open(path, "r", encoding="ascii") as f:
        text = f.read().strip()
    try:
        num_classes, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise DataFormatError(f"{path}: expected 'num_classes,height,width' (e.g. '93431,112,112'), got {text!r}") from None
    return num_classes, height, width


class RecordDataset(FaceDataset):
    """An insightface `train.rec/train.idx`, with or without the header record (im2rec output).

    Labels come, cheapest first, from the identity-range records (one read per class; past 2^24 records their float32
    keys are rounded, and each rounded boundary is found by reading the few records that round to it), from a label
    index an earlier full read saved (beside the .rec, or in `index_dir` when the dataset folder is read-only), or
    from every record's header (then saved as that index). With `share_labels` under a process group, rank 0 alone
    does this and the other ranks receive the keys and labels: one reader per job, whatever the node layout."""

    def __init__(self, rec_path: str, idx_path: str | None = None, skip_bad_records: bool = False,
                 image_size: tuple[int, int] | None = None, index_dir: str | None = None,
                 share_labels: bool = False) -> None:
        self.index_dir = index_dir
        if share_labels and is_distributed():
            from kd_plugin.data.shared_labels import from_rank0

            def on_rank0(beat) -> dict:
                self._open(rec_path, idx_path, skip_bad_records, image_size)
                keys, labels = self._derive_labels(beat)
                return {"index_keys": self.reader.offsets.keys, "index_offsets": self.reader.offsets.offsets,
                        "keys": keys, "labels": labels}
            got = from_rank0(on_rank0, ("index_keys", "index_offsets", "keys", "labels"), os.fspath(rec_path))
            if get_rank() != 0:  # the other ranks: the index rank 0 read, not the .idx again
                self._open(rec_path, idx_path, skip_bad_records, image_size, (got["index_keys"], got["index_offsets"]))
            self._key_array, labels = got["keys"], got["labels"]
        else:
            self._open(rec_path, idx_path, skip_bad_records, image_size)
            self._key_array, labels = self._derive_labels()
        if self.skipped:
            warnings.warn(f"{self.source}: skipped {len(self.skipped)} bad records; first: {self.skipped[0]}")
        self._finish_labels(labels, self._declared_classes)

    def _open(self, rec_path: str, idx_path: str | None, skip_bad_records: bool,
              image_size: tuple[int, int] | None, index: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """The reader, the `property` file and the base class's state."""
        self.reader = RecordIOReader(rec_path, idx_path, index)
        folder = os.path.dirname(os.path.abspath(rec_path))
        prop_path = os.path.join(folder, "property")
        # insightface's `property` describes the folder's train.rec only (a val.rec beside it has other classes)
        is_train = os.path.basename(self.reader.rec_path) == "train.rec"
        prop = read_property(prop_path) if is_train and os.path.isfile(prop_path) else None
        self._declared_classes = prop[0] if prop else None
        if image_size is None:
            image_size = prop[1:] if prop else (112, 112)
        super().__init__(self.reader.rec_path, image_size, skip_bad_records)
        self.has_header = False
        self.identity_ranges = np.zeros((0, 2), dtype=np.int64)  # [first, end) keys per class, as recorded
        self.range_keys: range | list[int] = []

    def _derive_labels(self, beat=None) -> tuple[np.ndarray, np.ndarray]:
        """(image keys, labels) of the file, by the cheapest way that holds; `beat()` is called now and then during
        a long read (a process group's heartbeat)."""
        keys = self._image_keys()
        labels = self._labels_from_ranges(keys) if len(self.identity_ranges) and not self.skip_bad_records else None
        if labels is None and not self.skip_bad_records:
            labels = self._read_label_index(keys)
        if labels is None:
            labels, kept = self._labels_from_headers(keys, beat)
            keys, labels = np.asarray(kept, dtype=np.int64), np.asarray(labels, dtype=np.int64)
            if not self.skip_bad_records and len(keys) >= LABEL_INDEX_MIN_RECORDS:
                self._write_label_index(keys, labels)
        self._check_identity_ranges()
        return keys, np.asarray(labels, dtype=np.int64)

    @property
    def keys(self) -> list[int]:
        """The record key of each sample, in sample order."""
        return self._key_array.tolist()

    def _label_index_paths(self) -> list[str]:
        """Where a label index may live: beside the .rec, then in `index_dir` (named after the .rec's path)."""
        paths = [os.path.splitext(self.reader.rec_path)[0] + ".kd_labels.npz"]
        if self.index_dir:
            name = hashlib.sha1(os.path.abspath(self.reader.rec_path).encode()).hexdigest()[:16]
            paths.append(os.path.join(self.index_dir, "label_index", f"{name}.kd_labels.npz"))
        return paths

    def _label_index_stamp(self) -> np.ndarray:
        """What the label index was written for: the .rec's and .idx's sizes and modification times."""
        stats = [os.stat(p) for p in (self.reader.rec_path, self.reader.idx_path) if p]
        return np.asarray([v for st in stats for v in (st.st_size, st.st_mtime_ns)], dtype=np.int64)

    def _read_label_index(self, keys: np.ndarray) -> np.ndarray | None:
        """The labels saved by an earlier full read, if they were written for this very file."""
        for path in self._label_index_paths():
            try:
                with np.load(path) as saved:
                    if np.array_equal(saved["stamp"], self._label_index_stamp()) and np.array_equal(saved["keys"], keys):
                        return saved["labels"].astype(np.int64)
            except Exception:  # a missing, truncated or foreign file (EOFError, BadZipFile, ...): try the next
                continue
        return None

    def _write_label_index(self, keys: np.ndarray, labels: np.ndarray) -> None:
        """Save the labels read from every header beside the .rec (or, in a read-only dataset folder, in
        `index_dir`), so the next open of this file takes a second."""
        global LABEL_INDEX_WRITES
        failures = []
        for path in self._label_index_paths():
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with replacing(path) as tmp, open(tmp, "wb") as f:
                    np.savez(f, keys=keys, labels=labels, stamp=self._label_index_stamp())
                LABEL_INDEX_WRITES += 1
                return
            except OSError as exc:
                failures.append(f"{path} ({exc})")
        warnings.warn(f"{self.source}: could not save the label index: {'; '.join(failures)}; the next open reads "
                      f"every record's header again" + ("" if self.index_dir else " (kd_plugin's runs save it in "
                                                                                  "their output folder)"))

    def _labels_from_ranges(self, keys: np.ndarray) -> np.ndarray | None:
        """Labels from the identity-range records alone, when the ranges tile the image keys in class order and
        evenly spaced image records agree; None means read every header. Range records hold float32 keys, exact
        only up to 2^24: past that each rounded boundary is resolved by reading the records that round to it."""
        ranges = np.asarray(self.identity_ranges, dtype=np.int64)
        starts, ends = ranges[:, 0], ranges[:, 1]
        if (len(keys) == 0 or (ends < starts).any() or (starts[1:] != ends[:-1]).any()
                or len(keys) != keys[-1] - keys[0] + 1):
            return None
        bounds = self._exact_bounds(np.append(starts, ends[-1]), keys)
        if bounds is None:
            return None
        labels = np.repeat(np.arange(len(ranges), dtype=np.int64), np.diff(bounds))
        for i in np.unique(np.linspace(0, len(keys) - 1, min(64, len(keys))).astype(np.int64)):
            header, has_image = self.reader.read_header(int(keys[i]))
            if not has_image or int(header.class_label) != labels[i]:
                warnings.warn(f"{self.reader.where(int(keys[i]))}: its label {int(header.class_label)} disagrees with "
                              f"the identity ranges ({int(labels[i])}); reading every record's label instead")
                return None
        return labels

    def _exact_bounds(self, rounded: np.ndarray, keys: np.ndarray) -> np.ndarray | None:
        """The C + 1 class boundaries (first key of each class, then the end) from their recorded values: exact below
        2^24; from there on the first key of class i is the first of the keys rounding to the recorded value whose
        record's label is >= i (labels grow with the key): those records' labels are read, with one gather for all
        boundaries (at most 3 records a boundary below 2^26). The first and the end are the index's own keys. None
        when they do not fit the records."""
        bounds = rounded.copy()
        bounds[0], bounds[-1] = keys[0], keys[-1] + 1
        if (_float32_round(bounds[[0, -1]]) != rounded[[0, -1]]).any():
            return None
        inner = np.flatnonzero(rounded[1:-1] >= FLOAT32_EXACT) + 1
        if len(inner):
            candidates, valid = _keys_rounding_to(rounded[inner])
            valid &= (candidates >= keys[0]) & (candidates <= keys[-1])
            if not valid.any(axis=1).all():
                return None
            labels = np.full(candidates.shape, -1, dtype=np.int64)
            read = self.reader.read_class_labels(candidates[valid])
            if read is None:
                return None
            labels[valid] = read
            holds = valid & (labels >= inner[:, None])  # keys already in class i (or later)
            last = candidates.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
            first = np.where(holds.any(axis=1), np.argmax(holds, axis=1), last)
            bounds[inner] = candidates[np.arange(len(inner)), first]
        return bounds if (np.diff(bounds) >= 0).all() else None

    def _labels_from_headers(self, keys: np.ndarray, beat=None) -> tuple[list[int], list[int]]:
        """Labels read from every image record's header (im2rec files without identity ranges, or skip mode)."""
        labels, kept = [], []
        bar = Progress(len(keys), f"reading labels of {self.source}", "records", enabled=len(keys) >= 200_000)
        for n, key in enumerate(keys.tolist()):
            bar.update()
            if beat is not None and n % 65536 == 0:
                beat()
            try:
                header, has_image = self.reader.read_header(key)
                if not has_image:
                    raise DataFormatError(f"{self.reader.where(key)}: record holds no image bytes; {_REPACK}")
            except DataFormatError as exc:
                if not self.skip_bad_records:
                    raise
                self.skipped.append(str(exc))
                continue
            kept.append(key)
            labels.append(int(header.class_label))
        return labels, kept

    def _image_keys(self) -> np.ndarray:
        """Keys of the image records: 1..first_non_image_key-1 with the insightface header, else every key."""
        if len(self.reader.key_array) == 0:
            raise DataFormatError(f"{self.source}: the index lists no records")
        first = int(self.reader.key_array[0])
        header, has_image = self.reader.read_header(first)
        if header.flag > 0 and not has_image:
            self.has_header = True
            end_images, end_ranges = self._header_ends(*(int(v) for v in header.labels[:2]))
            self._read_identity_ranges(range(end_images, end_ranges))
            candidates = np.arange(first + 1, end_images, dtype=np.int64)
            present = self.reader.offsets.positions(candidates) >= 0
            for key in candidates[~present].tolist():
                msg = f"{self.source}: image record key {key} (below the header's first_non_image_key {end_images}) " \
                      f"is missing from {self.reader.idx_path}; {_REPACK}"
                if not self.skip_bad_records:
                    raise DataFormatError(msg)
                self.skipped.append(msg)
            return candidates[present]
        return self.reader.key_array.copy()

    def _header_ends(self, end_images: int, end_ranges: int) -> tuple[int, int]:
        """The header's first_non_image_key and end of the range records, exact: past 2^24 its float32 labels are
        rounded, and the true keys are the ones rounding to them where the records change (an image record before
        first_non_image_key, none after; the last range record is the last key of the index)."""
        if end_images >= FLOAT32_EXACT:
            around, which = _keys_rounding_to([end_images])
            candidates = around[0][which[0]]
            end_images = int(candidates[-1])
            for key in candidates[:-1].tolist():
                if key in self.reader.offsets and not self.reader.read_header(key)[1]:  # no image: a range record
                    end_images = key
                    break
        if end_ranges >= FLOAT32_EXACT:
            around, which = _keys_rounding_to([end_ranges])
            candidates = around[0][which[0]]
            present = self.reader.offsets.positions(candidates - 1) >= 0
            ends_here = present & (self.reader.offsets.positions(candidates) < 0)
            end_ranges = int(candidates[ends_here][0] if ends_here.any() else candidates[present][-1]
                             if present.any() else end_ranges)
        return end_images, end_ranges

    def _read_identity_ranges(self, keys: range) -> None:
        """The per-identity [first, end) key ranges after the images; all or nothing (classes are their order)."""
        fast = self.reader.read_label_pairs(np.arange(keys.start, keys.stop, dtype=np.int64))
        if fast is not None:
            self.identity_ranges, self.range_keys = fast, keys
            return
        ranges, range_keys = [], []
        try:
            for key in keys:
                if key not in self.reader.offsets:
                    raise DataFormatError(f"{self.source}: identity range record key {key} (announced by the header "
                                          f"record) is missing from {self.reader.idx_path}; {_REPACK}")
                rng, _ = unpack_payload(self.reader.read(key), self.reader.where(key))
                if len(rng.labels) < 2:
                    raise DataFormatError(f"{self.reader.where(key)}: identity range record holds {len(rng.labels)} "
                                          f"labels, expected [first_key, end_key); {_REPACK}")
                ranges.append((int(rng.labels[0]), int(rng.labels[1])))
                range_keys.append(key)
        except DataFormatError as exc:
            if not self.skip_bad_records:
                raise
            self.skipped.append(f"{exc} (identity ranges ignored; labels come from the image records)")
            return
        self.identity_ranges, self.range_keys = np.asarray(ranges, dtype=np.int64).reshape(-1, 2), range_keys

    def _check_identity_ranges(self) -> None:
        """Empty identity ranges in the header layout mean an identity without images."""
        starts, ends = self.identity_ranges[:, 0], self.identity_ranges[:, 1]
        for cls in np.flatnonzero((ends <= starts) & (ends < FLOAT32_EXACT)).tolist():  # past 2^24: rounded, no proof
            start, end = int(starts[cls]), int(ends[cls])
            msg = (f"{self.reader.where(self.range_keys[cls])}: the identity range record of class {cls} is empty "
                   f"([{start}, {end})): that identity has no image; {_EMPTY_CLASS_HINT}")
            if not self.skip_bad_records:
                raise DataFormatError(msg)
            warnings.warn(msg)

    def read_bytes(self, index: int) -> bytes:
        key = int(self._key_array[index])
        _, data = unpack_payload(self.reader.read(key), self.reader.where(key))
        return data

    def where(self, index: int) -> str:
        return self.reader.where(int(self._key_array[index]))



class FileListDataset(FaceDataset):
    """Images on disk given as (path, label) pairs; base of the folder and list layouts."""

    def __init__(self, source: str, paths: Sequence[str], labels: Sequence[int], num_classes: int | None = None,
                 image_size: tuple[int, int] = (112, 112), skip_bad_records: bool = False) -> None:
        super().__init__(source, image_size, skip_bad_records)
        self.paths = list(paths)
        self._finish_labels(labels, num_classes)

    def read_bytes(self, index: int) -> bytes:
        try:
            with open(self.paths[index], "rb") as f:
                return f.read()
        except OSError as exc:
            raise DataFormatError(f"{self.where(index)}: cannot read ({exc})") from None

    def where(self, index: int) -> str:
        return f"{self.paths[index]} (sample {index})"


def list_image_folder(root: str, skip_bad_records: bool = False) -> tuple[list[str], list[int], list[str]]:
    """arcface_torch/torchvision ImageFolder layout: root/<identity>/<image>; classes sorted by folder name."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataFormatError(f"{root}: no identity sub-folders; expected ROOT/<identity>/<image>.jpg")
    paths, labels, kept = [], [], []
    for name in classes:
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not files:
            msg = f"{folder}: identity folder holds no image ({', '.join(IMAGE_EXTENSIONS)}); remove it or add images"
            if not skip_bad_records:
                raise DataFormatError(msg)
            warnings.warn(msg + " (skipped)")
            continue
        paths += [os.path.join(folder, f) for f in files]
        labels += [len(kept)] * len(files)
        kept.append(name)
    return paths, labels, kept


def read_label_list(list_path: str) -> tuple[list[str], list[int]]:
    """`label.txt` lines `relative/path label`, or im2rec `.lst` lines `index<TAB>label<TAB>path`."""
    root = os.path.dirname(os.path.abspath(list_path))
    paths, labels = [], []
    with open(list_path, "r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.strip().split("\t") if "\t" in line else line.split()
            if not fields or not line.strip():
                continue
            try:
                if len(fields) == 2:
                    path, label = fields[0], int(fields[1])
                elif len(fields) == 3:
                    path, label = fields[2], int(float(fields[1]))
                else:
                    raise ValueError
            except ValueError:
                raise DataFormatError(f"{list_path}, line {line_no}: expected 'path label' (label.txt) or "
                                      f"'index<TAB>label<TAB>path' (.lst), got {line.rstrip()!r}") from None
            paths.append(os.path.join(root, path))
            labels.append(label)
    return paths, labels


def open_dataset(path: str, skip_bad_records: bool = False, index_dir: str | None = None,
                 share_labels: bool = False) -> FaceDataset:
    """Open a face dataset, recognising its layout: a `.rec` file or a folder holding `train.rec`, a `label.txt`
    or `.lst` list (or a folder holding `label.txt`), or an ImageFolder tree. `index_dir` and `share_labels`: see
    RecordDataset (`share_labels` is collective: every rank of the process group must open the same path)."""
    path = os.fspath(path)
    records = {"skip_bad_records": skip_bad_records, "index_dir": index_dir, "share_labels": share_labels}
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "train.rec")):
            return RecordDataset(os.path.join(path, "train.rec"), **records)
        if os.path.isfile(os.path.join(path, "label.txt")):
            path = os.path.join(path, "label.txt")
        else:
            paths, labels, _ = list_image_folder(path, skip_bad_records)
            return FileListDataset(path, paths, labels, skip_bad_records=skip_bad_records)
    if path.endswith(".rec"):
        return RecordDataset(path, **records)
    if path.endswith((".txt", ".lst")) and os.path.isfile(path):
        paths, labels = read_label_list(path)
        return FileListDataset(path, paths, labels, skip_bad_records=skip_bad_records)
    raise DataFormatError(f"{path}: not a face dataset; expected a train.rec (with train.idx), a folder holding "
                          f"train.rec, a label.txt / .lst list, or an ImageFolder tree ROOT/<identity>/<image>.jpg")


UNLABELED = -1  # the label of an image without identity (kd.unlabeled): only label-free terms see it


def open_images(path: str) -> FaceDataset:
    """A set of face images whose labels, if any, are not used: any `open_dataset` layout, or one flat folder of
    images (such as UTKFace's aligned faces)."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "train.rec")) and \
            not os.path.isfile(os.path.join(path, "label.txt")):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if files:
            return FileListDataset(path, [os.path.join(path, f) for f in files], [0] * len(files), num_classes=1)
    return open_dataset(path)


class CombinedDataset(FaceDataset):
    """Several sets as one: the labelled ones first, their labels offset into one class space (set k's classes follow
    set k-1's), then the unlabelled ones, labelled UNLABELLED. Sample i is the i-th image in that order, so a teacher
    cache and the sampler's indices name samples of the whole."""

    def __init__(self, labeled: Sequence[FaceDataset], unlabeled: Sequence[FaceDataset] = ()) -> None:
        parts = list(labeled) + list(unlabeled)
        super().__init__("+".join(p.source for p in parts), parts[0].image_size,
                         any(p.skip_bad_records for p in parts))
        sizes = {tuple(p.image_size) for p in parts}
        if len(sizes) > 1:
            raise DataFormatError(f"{self.source}: the sets have different image sizes {sorted(sizes)}; pack them at "
                                  f"one size")
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        offsets = np.cumsum([0] + [p.num_classes for p in labeled])
        self.labels = np.concatenate([p.labels + offset for p, offset in zip(labeled, offsets)]
                                     + [np.full(len(p), UNLABELED, dtype=np.int64) for p in unlabeled])
        self.num_classes = int(offsets[-1])
        self._labeled = int(self.starts[len(labeled)])

    @property
    def num_labeled(self) -> int:
        return self._labeled

    def _part(self, index: int) -> tuple[FaceDataset, int]:
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[k], index - int(self.starts[k])

    def read_bytes(self, index: int) -> bytes:
        part, i = self._part(index)
        return part.read_bytes(i)

    def where(self, index: int) -> str:
        part, i = self._part(index)
        return f"{part.where(i)} (sample {index} of {self.source})"

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=self.num_classes)


def open_training_data(rec, unlabeled=None, index_dir: str | None = None) -> FaceDataset:
    """The training set of a config: `rec` one labelled set or a list of them, plus `unlabeled` image sets (a path or
    a list). One labelled set alone is returned as it is. Call it on every rank: under a process group rank 0 reads
    the labels of each RecordIO set and sends them to the others; a label index that cannot be saved beside a .rec
    goes to `index_dir` (the run's output folder)."""
    labeled = [open_dataset(p, index_dir=index_dir, share_labels=True)
                for p in ([rec] if isinstance(rec, (str, os.PathLike)) else rec)]
    unlabeled = [open_images(p) for p in ([unlabeled] if isinstance(unlabeled, (str, os.PathLike)) else
                                           (unlabeled or []))]
    if len(labeled) == 1 and not unlabeled:
        return labeled[0]
    return CombinedDataset(labeled, unlabeled)


def dataset_fingerprint(dataset: FaceDataset, samples: int = 16) -> dict:
    """What identifies a dataset: sizes, a hash of all labels, and a hash of a few evenly spaced encoded images."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).astype(np.int64))
    content = hashlib.sha1()
    for i in picks:
        content.update(dataset.read_bytes(int(i)))
    return {"source": dataset.source, "num_images": len(dataset), "num_classes": int(dataset.num_classes),
            "labels_sha1": hashlib.sha1(np.ascontiguousarray(dataset.labels, dtype=np.int64).tobytes()).hexdigest(),
            "images_sha1": content.hexdigest()}
