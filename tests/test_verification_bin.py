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


def test_real_bins_both_image_forms():
    images, issame = load_bin(str(shared("formats", "lfw_excerpt.bin")))  # numpy uint8 (N,1) arrays of JPEG bytes
    assert images.shape == (20, 3, 112, 112) and images.dtype == np.uint8
    assert issame.shape == (10,) and issame.all()
    images, issame = load_bin(str(shared("celeba", "celeba_val.bin")))  # python bytes
    assert images.shape == (1200, 3, 112, 112) and issame.sum() == 300 and len(issame) == 600
    raw, _ = load_bin_raw(str(shared("celeba", "celeba_val.bin")))
    ref = np.asarray(Image.open(io.BytesIO(raw[7])).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(images[7], ref)


def test_bytes_and_bool_arrays_written_here(tmp_path):
    data = [jpeg_bytes(i) for i in range(4)]
    path = tmp_path / "x.bin"
    for protocol in (2, 4):  # protocol 2 from python 3 stores bytes through _codecs.encode(..., "latin1")
        path.write_bytes(pickle.dumps((data, [np.bool_(True), False]), protocol=protocol))
        images, issame = load_bin(str(path))
        assert images.shape == (4, 3, 112, 112) and issame.tolist() == [True, False]
        assert load_bin_raw(str(path))[0] == data


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
