"""PNG / image reading and writing for RGB-T datasets, with errors that name the file.

Layouts and conventions follow MSRS (Tang et al., PIAFusion, Information Fusion 2022) and MFNet
(Ha et al., IROS 2017): visible images are 8-bit RGB, infrared images 8-bit single channel, label maps
8-bit class ids (0..8, 255 = ignore). Every reader returns a numpy array in the file's pixel order (H, W[, C]).

Conversion rules (documented once, here):

* ``read_rgb``: RGB as is; RGBA drops alpha; palette (P) images are expanded to RGB. Anything else
  (grayscale, 16-bit, CMYK, ...) is an error: a visible image must have colour.
* ``read_gray``: L as is; LA drops alpha; an RGB (or P / RGBA) infrared image becomes one channel with the
  BT.601 luma weights of :mod:`rgbt.color` (0.299 R + 0.587 G + 0.114 B), rounded — exact for the common
  case of three identical channels. 16-bit / float images are an error (convert them to 8 bit first).
* ``read_label``: L or P (the palette index is the class id). Colour-coded (RGB) label images are an error.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from rgbt.color import KB, KR
from trainer.errors import PaifError, os_error_at

__all__ = [
    "DataError",
    "MissingDataError",
    "read_image",
    "read_rgb",
    "read_gray",
    "read_label",
    "read_rgbt",
    "write_png",
    "encode_png",
    "image_size",
]

logger = logging.getLogger(__name__)

_KG = 1.0 - KR - KB


class DataError(PaifError, ValueError):
    """Bad dataset input: an unreadable, truncated or malformed file, or an inconsistent dataset."""


class MissingDataError(DataError, FileNotFoundError):
    """A file or folder that the dataset needs does not exist (or is empty)."""


def read_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image; truncated or corrupt files raise :class:`DataError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: expected an image file, got nothing at this path; check the dataset root")
    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated PNG only fails here
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image is too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(
            f"{path}: unreadable or truncated image ({type(exc).__name__}: {exc}); re-export or remove the file"
        ) from exc
    return image


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image from its header only (cheap; does not detect truncation)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            w, h = image.size
    except FileNotFoundError as exc:
        raise MissingDataError(f"{path}: expected an image file, got nothing at this path") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image header ({type(exc).__name__}: {exc})") from exc
    return h, w


def _mode_error(path: Path, image: Image.Image, expected: str) -> DataError:
    bands = len(image.getbands())
    return DataError(
        f"{path}: expected {expected}, got PIL mode {image.mode!r} ({bands} channel{'s' * (bands != 1)}); "
        "convert the file to the expected format"
    )


def read_rgb(path: str | Path) -> np.ndarray:
    """Read a visible image.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    path = Path(path)
    image = read_image(path)
    if image.mode == "RGB":
        return np.array(image, dtype=np.uint8)
    if image.mode in ("RGBA", "P"):
        return np.array(image.convert("RGB"), dtype=np.uint8)
    raise _mode_error(path, image, "an 8-bit RGB visible image (mode RGB, RGBA or P)")


def _luma_u8(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    y = KR * rgb[..., 0] + _KG * rgb[..., 1] + KB * rgb[..., 2]
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def read_gray(path: str | Path) -> np.ndarray:
    """Read an infrared image as one channel (RGB files: BT.601 luma, see the module docstring).

    Returns:
        (H, W) uint8.
    """
    path = Path(path)
    image = read_image(path)
    if image.mode == "L":
        return np.array(image, dtype=np.uint8)
    if image.mode == "LA":
        return np.asarray(image, dtype=np.uint8)[..., 0].copy()
    if image.mode in ("RGB", "RGBA", "P"):
        return _luma_u8(np.asarray(image.convert("RGB"), dtype=np.uint8))
    raise _mode_error(path, image, "an 8-bit infrared image (mode L, LA, RGB, RGBA or P)")


def read_label(path: str | Path) -> np.ndarray:
    """Read a label map of class ids (values are not range-checked here; the dataset does that).

    Returns:
        (H, W) uint8 for 8-bit files, int32 for 16/32-bit integer files.
    """
    path = Path(path)
    image = read_image(path)
    if image.mode in ("L", "P"):
        return np.array(image, dtype=np.uint8)
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        return np.asarray(image).astype(np.int32)
    raise _mode_error(path, image, "a single-channel label map of class ids (mode L or P; colour labels are not ids)")


def read_rgbt(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an MFNet 4-channel image (R, G, B, thermal).

    Returns:
        ((H, W, 3) uint8 RGB, (H, W) uint8 thermal).
    """
    path = Path(path)
    image = read_image(path)
    if image.mode != "RGBA":
        raise _mode_error(path, image, "a 4-channel MFNet image (R, G, B, thermal; PIL mode RGBA)")
    arr = np.asarray(image, dtype=np.uint8)
    return arr[..., :3].copy(), arr[..., 3].copy()


def encode_png(array: np.ndarray, where: str | Path = "image") -> bytes:
    """The PNG bytes of a uint8 array (deterministic), for writers that place the file themselves (atomically).

    Args:
        array: (H, W) -> mode L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA; dtype uint8.
        where: the destination, named in errors.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise DataError(f"{where}: expected a uint8 array to write, got dtype {array.dtype}; scale and cast first")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise DataError(f"{where}: expected shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as PNG (deterministic bytes, :func:`encode_png`), creating parent folders."""
    path = Path(path)
    data = encode_png(array, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_bytes(data)
    except OSError as exc:  # a failed write (full disk, size limit): name the file
        raise os_error_at(exc, path) from exc
