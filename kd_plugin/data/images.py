"""Decoding encoded face images to uint8 RGB arrays."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kd_plugin.errors import DataFormatError


def decode_image(data: bytes, where: str, image_size: tuple[int, int] | None = (112, 112)) -> np.ndarray:
    """Decode JPEG/PNG bytes to an (H, W, 3) uint8 RGB array; `where` names the source in errors."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # EXIF orientation is applied, as OpenCV's imdecode (mxnet, arcface_torch) does
            rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataFormatError(f"{where}: cannot decode the image ({len(data)} bytes: {exc}); replace or drop this "
                              f"image, or pass skip_bad_records=True to skip and count undecodable images") from None
    if image_size is not None and rgb.shape[:2] != tuple(image_size):
        raise DataFormatError(f"{where}: image is {rgb.shape[0]}x{rgb.shape[1]}, expected {image_size[0]}x{image_size[1]} "
                              f"aligned faces; align/resize the data before training (arcface_torch does not resize)")
    return rgb


def hwc_to_chw(rgb: np.ndarray, flip: bool = False) -> np.ndarray:
    """(H, W, 3) -> contiguous (3, H, W), mirrored left-right when `flip`."""
    if flip:
        rgb = rgb[:, ::-1]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))
