"""arcface_torch `.bin` verification sets through the restricted unpickler."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_bytes, shared
from kd_plugin.data.verification_bin import load_bin, load_bin_raw
from kd_plugin.errors import DataFormatError, UnsafePickleError


def _trusted_reference(path):
    """Our own shared test file, trusted: plain pickle gives the independent reference."""
    with open(path, "rb") as f:
        images, issame = pickle.load(f, encoding="bytes")
    return [np.asarray(i).tobytes() if isinstance(i, np.ndarray) else i for i in images], list(issame)


@pytest.mark.parametrize("parts,pairs", [(("formats", "lfw_excerpt.bin"), 10), (("celeba", "celeba_val.bin"), 600)])
def test_real_bins_both_image_forms(parts, pairs):
    """lfw_excerpt holds numpy uint8 (N,1) arrays of JPEG bytes, celeba_val python bytes."""
    path = str(shared(*parts))
    images, issame = load_bin(path)
    ref_bytes, ref_issame = _trusted_reference(path)
    assert images.shape == (2 * pairs, 3, 112, 112) and images.dtype == np.uint8
    assert issame.tolist() == [bool(v) for v in ref_issame]
    for i in range(0, 2 * pairs, max(1, pairs // 10)):
        ref = np.asarray(Image.open(io.BytesIO(ref_bytes[i])).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(images[i], ref), i


def test_bytes_and_bool_arrays_written_here(tmp_path):
    data = [jpeg_bytes(i) for i in range(4)]
    path = tmp_path / "x.bin"
    for protocol in (2, 4):  # protocol 2 from python 3 stores bytes through _codecs.encode(..., "latin1")
        path.write_bytes(pickle.dumps((data, [np.bool_(True), False]), protocol=protocol))
        images, issame = load_bin(str(path))
        assert images.shape == (4, 3, 112, 112) and issame.tolist() == [True, False]
        assert load_bin_raw(str(path))[0] == data


def _py2_protocol2_pickle(images, issame):
    """What python 2 writes for (list of str, list of bool): BINSTRING opcodes, no _codecs."""
    out = b"\x80\x02(]("
    for data in images:
        out += b"T" + len(data).to_bytes(4, "little") + data
    out += b"e]("
    out += b"".join(b"\x88" if v else b"\x89" for v in issame)
    return out + b"et."


def test_python2_pickles_and_bool_arrays(tmp_path):
    data = [jpeg_bytes(i) for i in range(4)]
    path = tmp_path / "py2.bin"
    path.write_bytes(_py2_protocol2_pickle(data, [True, False]))
    assert load_bin_raw(str(path))[0] == data
    path.write_bytes(pickle.dumps((data, np.array([True, False]))))
    assert load_bin(str(path))[1].tolist() == [True, False]
    path.write_bytes(pickle.dumps((data, [1, 0])))
    with pytest.raises(DataFormatError, match="must hold bools, found int"):
        load_bin(str(path))


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_carrying_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_RunsCode(str(marker))], [True])))
    with pytest.raises(UnsafePickleError, match=r"refused to unpickle '(posix|os)\.system'") as err:
        load_bin(str(path))
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_object_arrays_and_direct_ndarray_calls_are_refused(tmp_path):
    path = tmp_path / "obj.bin"
    path.write_bytes(pickle.dumps(([np.array([b"x"], dtype=object)], [True])))
    with pytest.raises(UnsafePickleError, match="dtype"):
        load_bin(str(path))
    # a pickle that REDUCEs numpy.ndarray itself (not as _reconstruct's subtype) gets a non-callable token
    crafted = b"\x80\x02cnumpy\nndarray\nK\x05\x85R."
    (tmp_path / "call.bin").write_bytes(crafted)
    with pytest.raises(DataFormatError, match="call.bin: not a readable verification .bin.*not callable"):
        load_bin(str(tmp_path / "call.bin"))
