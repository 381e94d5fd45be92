"""mxnet RecordIO (`train.rec` + `train.idx`) read and written without mxnet.

Format facts (dmlc-core recordio): every record is a little-endian uint32 magic 0xCED7230A, a uint32 `lrec`
whose top 3 bits are a continuation flag and low 29 bits the part length, the part bytes, then zero padding to
4 bytes. A payload containing the magic at a 4-byte aligned position is split there into parts (flag 1 = first,
2 = middle, 3 = last) and the magic is dropped; readers put it back. The payload of an image record starts with
the `IRHeader` `<IfQQ` (flag, label, id, id2); when flag > 0, `flag` float32 labels follow and `label` is unused.
The `.idx` file has one `key<TAB>offset` line per record.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from kd_plugin.errors import DataFormatError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_FIX_HINT = "re-create the file (kd-plugin pack) or pass skip_bad_records=True to skip and count bad records"


@dataclass(frozen=True)
class RecordHeader:
    """The IRHeader of one record: `labels` holds the float32 label array when flag > 0, else the scalar label."""

    flag: int
    label: float
    id: int = 0
    id2: int = 0
    labels: tuple[float, ...] = ()

    @property
    def class_label(self) -> float:
        """The identity label as arcface_torch reads it: the scalar label, or the first of the label array."""
        return self.labels[0] if self.labels else self.label


def pack_payload(header: RecordHeader, data: bytes = b"") -> bytes:
    """Serialise an IRHeader (and its label array when flag > 0) followed by `data`."""
    if header.labels:
        if header.flag != len(header.labels):
            raise ValueError(f"RecordHeader.flag must equal the number of labels ({len(header.labels)}), got {header.flag}")
        head = _IR_HEADER.pack(header.flag, 0.0, header.id, header.id2)
        return head + np.asarray(header.labels, dtype="<f4").tobytes() + data
    return _IR_HEADER.pack(header.flag, header.label, header.id, header.id2) + data


def unpack_payload(payload: bytes, where: str = "record") -> tuple[RecordHeader, bytes]:
    """Split a record payload into its IRHeader and the remaining bytes (the encoded image, possibly empty)."""
    if len(payload) < _IR_HEADER.size:
        raise DataFormatError(f"{where}: payload of {len(payload)} bytes is shorter than the {_IR_HEADER.size}-byte "
                              f"IRHeader; {_FIX_HINT}")
    flag, label, rid, rid2 = _IR_HEADER.unpack_from(payload)
    rest = payload[_IR_HEADER.size:]
    labels: tuple[float, ...] = ()
    if flag > 0:
        need = 4 * flag
        if len(rest) < need:
            raise DataFormatError(f"{where}: IRHeader says {flag} float32 labels follow ({need} bytes) but only "
                                  f"{len(rest)} bytes remain; {_FIX_HINT}")
        labels = tuple(float(v) for v in np.frombuffer(rest[:need], dtype="<f4"))
        rest = rest[need:]
    return RecordHeader(flag=int(flag), label=float(label), id=int(rid), id2=int(rid2), labels=labels), rest


_PREFIX_BYTES = _IR_HEADER.size + 4 * 8


def frame_record(payload: bytes) -> bytes:
    """Frame one payload as RecordIO bytes, splitting it where the magic appears at an aligned position."""
    if len(payload) > _LENGTH_MASK:
        raise ValueError(f"a RecordIO record holds at most {_LENGTH_MASK} bytes, got {len(payload)}")
    out = bytearray()
    start = 0
    aligned_end = len(payload) - len(payload) % 4
    pos = payload.find(_MAGIC_BYTES, 0, aligned_end)
    while pos != -1:
        if pos % 4 == 0:
            out += _FRAME.pack(MAGIC, ((1 if start == 0 else 2) << _LENGTH_BITS) | (pos - start))
            out += payload[start:pos]
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start, aligned_end)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1, aligned_end)
    out += _FRAME.pack(MAGIC, ((3 if start else 0) << _LENGTH_BITS) | (len(payload) - start))
    out += payload[start:]
    out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _read_idx_lines(idx_path: str) -> tuple[list[int], list[int]]:
    """The line-by-line parser: slow, but names the first bad line exactly."""
    keys: list[int] = []
    offsets: list[int] = []
    seen: set[int] = set()
    with open(idx_path, "r", encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                key, offset = int(fields[0]), int(fields[1])
            except (ValueError, IndexError):
                raise DataFormatError(f"{idx_path}, line {line_no}: expected 'key<TAB>offset' (two integers), got "
                                      f"{line.rstrip()!r}; regenerate the index alongside the .rec file") from None
            if key in seen:
                raise DataFormatError(f"{idx_path}, line {line_no}: key {key} appears twice; regenerate the index")
            seen.add(key)
            keys.append(key)
            offsets.append(offset)
    return keys, offsets


def _two_tokens_per_line(raw: bytes) -> bool:
    """Whether `raw` is exactly `digits<TAB>digits<NEWLINE>` lines (the layout every .idx writer uses), checked
    vectorised in about a second per 20M lines; anything else (spaces, CRLF, empty lines) answers False and is read
    by the precise line parser."""
    text = np.frombuffer(raw, dtype=np.uint8)
    if len(text) == 0 or text[-1] != ord("\n"):
        return False
    separators = np.flatnonzero(text < ord("0"))  # tabs and newlines (anything else below '0' fails below)
    return bool(len(separators) % 2 == 0 and separators[0] > 0 and int(text.max()) <= ord("9")
                and (text[separators[0::2]] == ord("\t")).all() and (text[separators[1::2]] == ord("\n")).all()
                and (np.diff(separators) > 1).all())


def read_idx(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse a `.idx` file into int64 arrays of the keys (file order) and their byte offsets.

    numpy parses the whole file at once (5M lines in about a quarter of a second); anything unusual — a line without
    exactly two integers, a repeated key — is re-read line by line for an error that names the line."""
    with open(idx_path, "rb") as f:
        raw = f.read()
    lines = raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (and stops) at the first token that is not an integer
            values = np.fromstring(raw, dtype=np.int64, sep=" ") if raw.strip() else np.zeros(0, np.int64)
    except (DeprecationWarning, ValueError):
        values = None
    if values is None or len(values) != 2 * lines or not _two_tokens_per_line(raw):
        keys, offsets = _read_idx_lines(idx_path)
        return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    keys, offsets = values[0::2].copy(), values[1::2].copy()
    if len(keys) and not np.array_equal(keys, np.arange(keys[0], keys[0] + len(keys))):  # not 0..n-1: look closer
        ordered = np.sort(keys)
        if (ordered[1:] == ordered[:-1]).any():
            _read_idx_lines(idx_path)  # raises naming the repeated key's line
    return keys, offsets


class RecordIndex:
    """key -> byte offset over two int64 arrays: a .idx of millions of records costs 16 bytes per record, not a
    Python dict (which every DataLoader worker would also copy page by page)."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        self.keys, self.offsets = np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
        first = int(self.keys[0]) if len(self.keys) else 0
        self._contiguous = bool(np.array_equal(self.keys, np.arange(first, first + len(self.keys))))
        self._first = first
        if not self._contiguous:
            self._order = np.argsort(self.keys, kind="stable")
            self._sorted = self.keys[self._order]

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Index into the file order of each key, -1 where the key is not in the index."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._contiguous:
            pos = keys - self._first
            return np.where((pos >= 0) & (pos < len(self.keys)), pos, -1)
        if len(self._sorted) == 0:
            return np.full(keys.shape, -1, dtype=np.int64)
        at = np.searchsorted(self._sorted, keys).clip(0, len(self._sorted) - 1)
        return np.where(self._sorted[at] == keys, self._order[at], -1)

    def get(self, key: int, default=None):
        """The byte offset of `key`, or `default`."""
        pos = int(self.positions(np.asarray([key]))[0])
        return int(self.offsets[pos]) if pos >= 0 else default

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def __getitem__(self, key: int) -> int:
        offset = self.get(key)
        if offset is None:
            raise KeyError(key)
        return offset

    def __len__(self) -> int:
        return len(self.keys)


class RecordIOReader:
    """Random access to an indexed RecordIO file; the handle is (re)opened lazily in each process that reads."""

    def __init__(self, rec_path: str, idx_path: str | None = None,
                 index: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """`index`: the (keys, offsets) another process already read from the .idx (then not read again)."""
        self.rec_path = os.fspath(rec_path)
        if not os.path.isfile(self.rec_path):
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        self.file_size = os.path.getsize(self.rec_path)
        if idx_path is None:
            guess = os.path.splitext(self.rec_path)[0] + ".idx"
            idx_path = guess if os.path.isfile(guess) else None
        self.idx_path = idx_path
        if index is not None:
            keys, offsets = index
        else:
            keys, offsets = read_idx(idx_path) if idx_path is not None else self._scan_offsets()
        self.offsets = RecordIndex(keys, offsets)  # key -> byte offset (`in`, `[]`, `.get`)
        self._handle: BinaryIO | None = None
        self._pid = -1
        self._word_map: np.ndarray | None = None

    @property
    def key_array(self) -> np.ndarray:
        """The record keys in index order (int64)."""
        return self.offsets.keys

    @property
    def keys(self) -> list[int]:
        """The record keys in index order, as a list."""
        return self.offsets.keys.tolist()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, -1  # never share a file position with another process
        state["_word_map"] = None
        return state

    def _file(self) -> BinaryIO:
        if self._handle is None or self._pid != os.getpid():
            self._handle = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._handle

    def close(self) -> None:
        """Close the file handle of this process (it reopens on the next read)."""
        self._word_map = None
        handle = getattr(self, "_handle", None)
        if handle is not None and self._pid == os.getpid():
            handle.close()
        self._handle = None

    def __del__(self) -> None:
        self.close()

    def where(self, key: int) -> str:
        """A human-readable location of a record, for error messages."""
        return f"{self.rec_path}: record key {key} at byte offset {self.offsets.get(key, '?')}"

    def read(self, key: int) -> bytes:
        """Return the payload of the record with this key (all continuation parts joined)."""
        if key not in self.offsets:
            raise KeyError(f"{self.rec_path}: no record with key {key} in {self.idx_path or 'the scanned index'}")
        return self._read_at(self.offsets[key], f"record key {key}")

    def read_header(self, key: int) -> tuple[RecordHeader, bool]:
        """The IRHeader of a record and whether image bytes follow it, reading only the record's first bytes."""
        offset = self.offsets.get(key, -1)
        if 0 <= offset and offset + _FRAME.size <= self.file_size:
            f = self._file()
            f.seek(offset)
            magic, lrec = _FRAME.unpack(f.read(_FRAME.size))
            length = lrec & _LENGTH_MASK
            complete = magic == MAGIC and lrec >> _LENGTH_BITS == 0 and offset + _FRAME.size + length <= self.file_size
            head = f.read(min(length, _PREFIX_BYTES)) if complete else b""
            if len(head) >= _IR_HEADER.size and _IR_HEADER.size + 4 * _IR_HEADER.unpack_from(head)[0] <= len(head):
                header, _ = unpack_payload(head, self.where(key))
                return header, length > _IR_HEADER.size + 4 * header.flag
        # split, broken or label-heavy records: the full reader parses them or raises the precise error
        header, rest = unpack_payload(self.read(key), self.where(key))
        return header, len(rest) > 0

    def _words(self) -> np.ndarray:
        """The .rec as little-endian 32-bit words, memory-mapped: RecordIO keeps every record 4-byte aligned, so a
        header field of any record is one word, and the fields of many records are one numpy gather (only the pages
        touched are read)."""
        if self._word_map is None:
            words = self.file_size // 4
            self._word_map = (np.memmap(self.rec_path, dtype="<u4", mode="r", shape=(words,)) if words else
                              np.zeros(0, dtype="<u4"))
        return self._word_map

    def _plain_records(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(word index of each record, its IRHeader flag, its payload length) for records stored whole (no
        continuation parts) with a full IRHeader and its label array; None when a key is absent or a record is not
        such a plain one (the per-record readers then parse it or raise the precise error)."""
        pos = self.offsets.positions(np.asarray(keys, dtype=np.int64))
        if (pos < 0).any():
            return None
        offsets = self.offsets.offsets[pos]
        words = self._words()
        at = offsets // 4
        if (offsets % 4).any() or (at + 3 > len(words)).any():
            return None
        magic, lrec, flag = words[at], words[at + 1], words[at + 2].astype(np.int64)
        length = (lrec & _LENGTH_MASK).astype(np.int64)
        plain = ((magic == MAGIC) & (lrec >> _LENGTH_BITS == 0) & (length >= _IR_HEADER.size + 4 * flag)
                 & (offsets + _FRAME.size + length <= self.file_size) & (flag < (1 << 20)))
        return (at, flag, length) if plain.all() else None

    def read_label_pairs(self, keys: np.ndarray) -> np.ndarray | None:
        """The first two float32 labels of many small label records (insightface's header and identity-range records)
        at once, as int64 (n, 2), read with one gather. None when a record is absent or not such a plain record;
        `read` then parses them one by one with precise errors."""
        plain = self._plain_records(keys) if len(keys) else None
        if plain is None or (plain[1] < 2).any():
            return None
        at, floats = plain[0], self._words().view("<f4")
        first = (_FRAME.size + _IR_HEADER.size) // 4
        return np.stack([floats[at + first], floats[at + first + 1]], axis=1).astype(np.int64)

    def read_class_labels(self, keys: np.ndarray) -> np.ndarray | None:
        """The class label (the scalar label, or the first of the label array) of many image records at once,
        as int64, read with one gather; None when a record is absent, split, or holds no image bytes."""
        plain = self._plain_records(keys) if len(keys) else None
        if plain is None:
            return np.zeros(0, dtype=np.int64) if len(keys) == 0 else None
        at, flag, length = plain
        if (length <= _IR_HEADER.size + 4 * flag).any():
            return None
        floats = self._words().view("<f4")
        scalar, first_of_array = floats[at + 3], floats[at + (_FRAME.size + _IR_HEADER.size) // 4]
        return np.where(flag > 0, first_of_array, scalar).astype(np.int64)

    def _read_at(self, offset: int, what: str) -> bytes:
        where = f"{self.rec_path}: {what} at byte offset {offset}"
        if offset < 0 or offset + _FRAME.size > self.file_size:
            raise DataFormatError(f"{where}: offset lies past the end of the {self.file_size}-byte file (the .idx "
                                  f"does not belong to this .rec, or the .rec is truncated); {_FIX_HINT}")
        f = self._file()
        f.seek(offset)
        parts: list[bytes] = []
        while True:
            frame = f.read(_FRAME.size)
            if len(frame) < _FRAME.size:
                raise DataFormatError(f"{where}: file ends inside a record frame (truncated file); {_FIX_HINT}")
            magic, lrec = _FRAME.unpack(frame)
            if magic != MAGIC:
                raise DataFormatError(f"{where}: wrong magic 0x{magic:08x} at byte {f.tell() - _FRAME.size} "
                                      f"(expected 0x{MAGIC:08x}); the offset is wrong or the file is corrupt; {_FIX_HINT}")
            cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
            data = f.read(length)
            if len(data) < length:
                raise DataFormatError(f"{where}: record says {length} bytes but the file ends after {len(data)} "
                                      f"(truncated file); {_FIX_HINT}")
            f.seek(-length % 4, os.SEEK_CUR)
            parts.append(data)
            if cflag in (0, 3):
                if cflag == 0 and len(parts) > 1:
                    raise DataFormatError(f"{where}: continuation record ended by a plain record; {_FIX_HINT}")
                return _MAGIC_BYTES.join(parts)
            if cflag not in (1, 2) or (cflag == 1) != (len(parts) == 1):
                raise DataFormatError(f"{where}: unexpected continuation flag {cflag}; {_FIX_HINT}")

    def _scan_offsets(self) -> tuple[list[int], list[int]]:
        """Keys and offsets found by walking the file (used when there is no .idx)."""
        keys, offsets = [], []
        with open(self.rec_path, "rb") as f:
            offset = 0
            while offset < self.file_size:
                start = offset
                while True:
                    f.seek(offset)
                    frame = f.read(_FRAME.size)
                    if len(frame) < _FRAME.size:
                        raise DataFormatError(f"{self.rec_path}: record {len(keys)} at byte offset {offset}: truncated "
                                              f"record frame while scanning a file without .idx; {_FIX_HINT}")
                    magic, lrec = _FRAME.unpack(frame)
                    if magic != MAGIC:
                        raise DataFormatError(f"{self.rec_path}: record {len(keys)} at byte offset {offset}: wrong "
                                              f"magic 0x{magic:08x} while scanning a file without .idx; {_FIX_HINT}")
                    length = lrec & _LENGTH_MASK
                    offset += _FRAME.size + length + (-length % 4)
                    if (lrec >> _LENGTH_BITS) in (0, 3):
                        break
                keys.append(len(keys))
                offsets.append(start)
        return keys, offsets


class RecordIOWriter:
    """Write an indexed RecordIO file pair; keys are written to `.idx` in the order records are written."""

    def __init__(self, rec_path: str, idx_path: str | None = None) -> None:
        self.rec_path = os.fspath(rec_path)
        self.idx_path = idx_path or os.path.splitext(self.rec_path)[0] + ".idx"
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii")
        self._seen: set[int] = set()

    def write(self, key: int, payload: bytes) -> None:
        """Append one record with this key."""
        if key in self._seen:
            raise ValueError(f"{self.rec_path}: key {key} written twice")
        self._seen.add(key)
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        self._rec.write(frame_record(payload))

    def close(self) -> None:
        """Flush and close both files."""
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
