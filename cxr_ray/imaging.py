"""Image decoding and geometry shared by the training cache and the server.

One function turns encoded bytes into the uint8 grayscale square the models see, so the
served preprocessing is the cache's by construction, not by convention.

Geometry policy: keep the aspect ratio, resize the short side to ``size`` (antialiased
bilinear), then centre-crop the long side to ``size``. Chest films are close to square,
so the crop loses only a thin margin at the lateral edges.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# Bigger than any real radiograph (about 3000 x 3000 px); above it we refuse instead of
# allocating gigabytes for a decompression bomb.
MAX_PIXELS = 60_000_000
MIN_SIDE = 16


class ImageError(ValueError):
    """Bytes that are not a usable image; the message says why."""


def open_image(data: bytes, name: str = "image") -> Image.Image:
    """Open encoded bytes with size guards; raises ImageError naming ``name``."""
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large ({e})") from None
    except Exception as e:  # PIL raises several types for garbage bytes
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: image too large ({w}x{h} px, limit {MAX_PIXELS} pixels)")
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{name}: image too small ({w}x{h} px, need at least {MIN_SIDE} px a side)")
    return img


def to_gray(img: Image.Image, size_hint: int | None = None) -> np.ndarray:
    """Decode to a 2-D uint8 grayscale array, using JPEG DCT scaling when possible.

    16-bit and float images are min-max scaled to 0..255 (PIL's own conversion to "L"
    would clip them). Multi-frame files use their first frame.
    """
    if size_hint and img.format == "JPEG":
        img.draft("L", (size_hint, size_hint))  # both sides stay >= size_hint
    try:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
            return ((arr - lo) * scale).round().astype(np.uint8)
        if img.mode != "L":
            img = img.convert("L")
        return np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image data is corrupt or truncated ({e})") from None


def square(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` and centre-crop to ``size`` x ``size``."""
    h, w = gray.shape
    if (h, w) == (size, size):
        return gray
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = Image.fromarray(gray).resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """Encoded bytes -> uint8 ``size`` x ``size`` grayscale array (the cache's pixels)."""
    img = open_image(data, name)
    try:
        gray = to_gray(img, size)
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from None
    return square(gray, size)


def is_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def decode_dicom(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """A single-frame grayscale DICOM -> the same uint8 square as ``decode``.

    Applies the modality LUT (RescaleSlope/Intercept), the VOI LUT or window when present,
    inverts MONOCHROME1 (where high values are dark), then min-max scales to 0..255.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:
        raise ImageError(f"{name}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(f"{name}: DICOM PhotometricInterpretation {photometric or 'missing'} is not a grayscale "
                         "radiograph (need MONOCHROME1 or MONOCHROME2)")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageError(f"{name}: multi-frame DICOM ({ds.NumberOfFrames} frames): send one frame")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > MAX_PIXELS:
        raise ImageError(f"{name}: image too large ({cols}x{rows} px, limit {MAX_PIXELS} pixels)")
    if min(rows, cols) < MIN_SIDE:
        raise ImageError(f"{name}: image too small ({cols}x{rows} px, need at least {MIN_SIDE} px a side)")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # compressed transfer syntaxes need optional decoders
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", "unknown")
        raise ImageError(f"{name}: cannot decode DICOM pixel data (transfer syntax {syntax}: {e})") from None
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    gray = (values - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
    if photometric == "MONOCHROME1":
        gray = 255.0 - gray
    return square(gray.round().astype(np.uint8), size)
