"""arcface_torch verification sets (`lfw.bin`, `cfp_fp.bin`, ...): `(list of encoded images, list of issame bools)`.

These files are pickles, usually downloaded. They are read through an unpickler that can build only python
containers, bytes, bools and numpy uint8/bool arrays; any other global a pickle names is refused before anything
runs. Images appear as python `bytes` or as numpy uint8 arrays holding the JPEG bytes (both forms exist).
"""

from __future__ import annotations

import pickle
from typing import Any, Callable

import numpy as np

from kd_plugin.data.images import decode_image
from kd_plugin.errors import DataFormatError, UnsafePickleError

_ALLOWED_DTYPES = {"u1", "|u1", "uint8", "b1", "|b1", "bool"}
# `numpy.ndarray` only ever appears as the subtype argument of `_reconstruct`; a token (not the class) stands in for
# it so a pickle cannot call the ndarray constructor directly.
_NDARRAY_TOKEN = object()


def _as_str(value: Any) -> Any:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _checked_dtype(path: str) -> Callable[..., np.dtype]:
    def make_dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype:
        if _as_str(name) not in _ALLOWED_DTYPES:
            raise UnsafePickleError(f"{path}: pickle asks for numpy dtype {name!r}; a verification .bin may hold only "
                                    f"uint8 or bool arrays")
        return np.dtype(_as_str(name))
    return make_dtype


def _checked_reconstruct(path: str) -> Callable[..., np.ndarray]:
    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _NDARRAY_TOKEN:
            raise UnsafePickleError(f"{path}: pickle asks to rebuild {subtype!r}; only numpy.ndarray is allowed")
        return np.ndarray.__new__(np.ndarray, (0,), np.uint8)  # BUILD then sets shape, dtype and data
    return reconstruct


def _checked_scalar(path: str) -> Callable[..., Any]:
    def scalar(dtype: Any, data: Any = None) -> Any:
        if not isinstance(dtype, np.dtype) or dtype.kind not in "bu" or not isinstance(data, bytes):
            raise UnsafePickleError(f"{path}: pickle asks for a numpy scalar of {dtype!r}; only bool/uint8 are allowed")
        return np.frombuffer(data, dtype=dtype)[0]
    return scalar


def _checked_latin1(path: str) -> Callable[..., bytes]:
    def encode(text: Any, encoding: Any = "latin1") -> bytes:  # how protocol-2 pickles from python 3 store bytes
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise UnsafePickleError(f"{path}: pickle asks for _codecs.encode with {encoding!r}; only latin1 is allowed")
        return text.encode("latin1")
    return encode


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed for uint8/bool arrays; everything else is refused."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path
        self._allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct(path),
            ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct(path),
            ("numpy.core.multiarray", "scalar"): _checked_scalar(path),
            ("numpy._core.multiarray", "scalar"): _checked_scalar(path),
            ("numpy", "ndarray"): _NDARRAY_TOKEN,
            ("numpy", "dtype"): _checked_dtype(path),
            ("_codecs", "encode"): _checked_latin1(path),
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{self.path}: refused to unpickle '{module}.{name}' (nothing was executed); a "
                                    f"verification .bin may hold only lists/tuples of bytes, numpy uint8 arrays and "
                                    f"bools — this file is not a verification set or has been tampered with") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.path}: refused a persistent-id reference in the pickle")


def load_bin_raw(path: str) -> tuple[list[bytes], np.ndarray]:
    """Read a `.bin` into (encoded images as bytes, issame bool array), validating its structure."""
    with open(path, "rb") as f:
        try:
            obj = RestrictedUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as exc:  # truncated or not a pickle at all
            raise DataFormatError(f"{path}: not a readable verification .bin pickle ({type(exc).__name__}: {exc}); "
                                  f"expected (list of JPEG bytes, list of bools) as written by arcface_torch") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataFormatError(f"{path}: expected a pickled pair (list of images, list of issame bools), got "
                              f"{type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)):
        raise DataFormatError(f"{path}: the images must be a list of JPEG bytes, got {type(images).__name__}")
    if isinstance(issame, np.ndarray) and issame.dtype == bool and issame.ndim == 1:
        issame = list(issame)
    if not isinstance(issame, (list, tuple)):
        raise DataFormatError(f"{path}: issame must be a list (or 1-D bool array) of bools, got {type(issame).__name__}")
    encoded = []
    for i, item in enumerate(images):
        if isinstance(item, np.ndarray) and item.dtype == np.uint8:
            item = item.tobytes()
        if not isinstance(item, bytes):
            raise DataFormatError(f"{path}: image {i} is {type(item).__name__}; expected JPEG bytes or a uint8 array")
        encoded.append(item)
    wrong = next((v for v in issame if not isinstance(v, (bool, np.bool_))), None)
    if wrong is not None:
        raise DataFormatError(f"{path}: issame list must hold bools, found {type(wrong).__name__}")
    if len(encoded) != 2 * len(issame):
        raise DataFormatError(f"{path}: {len(encoded)} images for {len(issame)} pairs; expected exactly 2 images per pair")
    return encoded, np.asarray(issame, dtype=bool)


def load_bin(path: str, image_size: tuple[int, int] = (112, 112)) -> tuple[np.ndarray, np.ndarray]:
    """Read a `.bin` into uint8 images (2P, 3, H, W) RGB and the issame bool array (P,)."""
    encoded, issame = load_bin_raw(path)
    images = np.empty((len(encoded), 3, *image_size), dtype=np.uint8)
    for i, data in enumerate(encoded):
        images[i] = decode_image(data, f"{path}: image {i}", image_size).transpose(2, 0, 1)
    return images, issame
