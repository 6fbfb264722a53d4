"""Encoded bytes -> the uint8 grayscale square the models see: one function for the training
cache and the server, so the served preprocessing is the cache's by construction.

``to_pixels`` sniffs the format (JPEG, PNG or DICOM by content, never by name), checks what the
header promises against fixed bounds *before* anything is decoded, decodes strictly, and applies
one geometry: centre-crop the long side to a square, then resize to ``size`` (antialiased
bilinear; only the cropped region is read). Chest films are close to square, so the crop loses
only a thin margin at the lateral edges.

Bounds, all checked from the header (they are what keeps a hostile upload cheap):
  * sides of at least ``MIN_SIDE`` px and an aspect ratio of at most ``MAX_ASPECT``;
  * at most ``MAX_DECODED_BYTES`` of decoded raster (after JPEG DCT-domain scaling, plus the
    coefficient buffer of multi-scan JPEGs): a bound on bytes, so 16-bit and colour images
    count for what they cost, and at most ``MAX_PIXELS`` pixels (the entropy decoding of a
    JPEG is not shrunk by DCT scaling);
  * at most ``MAX_JPEG_SCANS`` JPEG scans (each progressive scan is a pass over the image);
  * a JPEG must hold at least one bit per 8x8 block: fewer bytes than that cannot encode the
    size its header claims (a truncated file).
Multi-frame files (multi-frame DICOM, APNG, MPO) are refused: the cache and the server share
one policy. JPEGs decode through libjpeg-turbo in strict mode, so data that ends early (even when
an end marker follows) is refused instead of padded with grey.

``python -m cxr_ray.imaging SIZE MEMORY_MB`` runs a decoder process for the server (see ``serve_worker``
and serve_decoders.py).
"""
from __future__ import annotations

import io
import json
import re
import struct
import sys
from typing import NamedTuple

import numpy as np
from PIL import Image

from .errors import CxrError

MIN_SIDE = 16
MAX_ASPECT = 4.0  # chest films are about 1:1.25; a 16 x 3,750,000 "image" is an attack
MAX_DECODED_BYTES = 64 * 2**20  # e.g. a 5,800 x 5,800 16-bit radiograph; real ones are smaller
MAX_PIXELS = 60_000_000  # bounds the entropy decoding of JPEGs, which DCT scaling does not shrink
MAX_JPEG_SCANS = 64  # libjpeg's progressive modes write 6-10; each scan is a pass over the image


class ImageError(CxrError, ValueError):
    """Bytes that are not a usable image. ``str()`` names the file and says why, in words fit
    for the client; ``detail`` holds the decoder's own text, for logs only."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


class UnsupportedFormat(ImageError):
    """Not a JPEG, PNG or DICOM file at all."""


class Decoded(NamedTuple):
    pixels: np.ndarray  # (size, size) uint8
    width: int  # of the stored image, before orientation and geometry
    height: int


def sniff(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if is_dicom(data):
        return "dicom"
    return None


def is_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def to_pixels(data: bytes, size: int, name: str = "image") -> Decoded:
    """Encoded bytes -> ``Decoded`` (the ``size`` x ``size`` uint8 pixels and the stored size).

    Raises ImageError (UnsupportedFormat for bytes of no accepted format) naming ``name``.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    kind = sniff(data)
    if kind is None:
        raise UnsupportedFormat(f"{name}: not a readable image (not a JPEG, PNG or DICOM file)")
    gray, width, height = _DECODERS[kind](data, size, name)
    return Decoded(square(gray, size), width, height)


def square(gray: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop the long side to a square, then resize it to ``size`` x ``size``."""
    h, w = gray.shape
    if (h, w) == (size, size):
        return gray
    side = min(h, w)
    left, top = (w - side) // 2, (h - side) // 2
    img = Image.fromarray(np.ascontiguousarray(gray))
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    return np.asarray(out, dtype=np.uint8)


# ----------------------------------------------------------------------------- bounds

def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _check_shape(name: str, width: int, height: int, decoded_bytes: int) -> None:
    """The bounds every format shares, from header values, before anything is decoded."""
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{name}: image too small ({width}x{height} px, need at least {MIN_SIDE} px a side)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(f"{name}: aspect ratio of {width}x{height} px exceeds {MAX_ASPECT:g}:1; "
                         "not a radiograph")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: image too large ({width}x{height} px, limit {MAX_PIXELS:,} pixels)")
    if decoded_bytes > MAX_DECODED_BYTES:
        raise ImageError(f"{name}: image too large ({width}x{height} px would decode to "
                         f"{decoded_bytes / 2**20:.0f} MiB; the limit is {MAX_DECODED_BYTES / 2**20:.0f} MiB)")


_ORIENTATION = {  # EXIF orientation -> the array operation that undoes it (as PIL's exif_transpose)
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.T, 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).T, 8: lambda a: np.rot90(a, 1),
}


def _orient(gray: np.ndarray, orientation: int) -> np.ndarray:
    fix = _ORIENTATION.get(orientation)
    return np.ascontiguousarray(fix(gray)) if fix else gray


def _orientation(img: Image.Image, name: str) -> int:
    """The EXIF orientation (1 when absent or not one of the eight values, as PIL's exif_transpose)."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception as e:  # noqa: BLE001 - any failure to parse hostile EXIF is the file's fault
        raise ImageError(f"{name}: EXIF metadata is unreadable", repr(e)) from None
    return value if isinstance(value, int) else 1


# ----------------------------------------------------------------------------- JPEG

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_HUFFMAN_SOF = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive: what libjpeg-turbo decodes
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # skips stuffed bytes and restart markers


class _JpegHeader(NamedTuple):
    width: int
    height: int
    blocks: list[int]  # 8x8 blocks per component
    scans: int


def _jpeg_header(data: bytes, name: str) -> _JpegHeader:
    """Walk the marker segments (not the entropy-coded data): frame size, components, scan count."""
    corrupt = f"{name}: JPEG structure is truncated or corrupt"
    pos, n, frame, scans = 2, len(data), None, 0
    while True:
        if pos >= n:
            raise ImageError(corrupt, "no end-of-image marker")
        if data[pos] != 0xFF:
            raise ImageError(corrupt, f"no marker at byte {pos}")
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise ImageError(corrupt, "file ends inside a marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        if pos + 2 > n:
            raise ImageError(corrupt, "file ends inside a segment length")
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2 or pos + length > n:
            raise ImageError(corrupt, f"segment 0x{marker:02X} of {length} bytes runs past the end")
        segment = data[pos + 2:pos + length]
        pos += length
        if marker in _SOF:
            if frame is not None:
                raise ImageError(f"{name}: hierarchical JPEG (several frames) is not supported")
            if marker not in _HUFFMAN_SOF:
                raise ImageError(f"{name}: JPEG coding process 0x{marker:02X} is not supported "
                                 "(send a baseline or progressive JPEG)")
            if len(segment) < 6 or segment[0] != 8:
                raise ImageError(f"{name}: only 8-bit JPEG is supported", f"precision {segment[:1]!r}")
            height, width, count = struct.unpack(">HHB", segment[1:6])
            if count not in (1, 3) or len(segment) < 6 + 3 * count:
                raise ImageError(f"{name}: JPEG with {count} colour components is not supported")
            factors = [(segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 15) for i in range(count)]
            if any(not (1 <= hf <= 4 and 1 <= vf <= 4) for hf, vf in factors):
                raise ImageError(corrupt, f"sampling factors {factors}")
            hmax, vmax = max(f[0] for f in factors), max(f[1] for f in factors)
            blocks = [_ceil(_ceil(width * hf, hmax), 8) * _ceil(_ceil(height * vf, vmax), 8) for hf, vf in factors]
            frame = (width, height, blocks)
        elif marker == 0xDA:
            if frame is None:
                raise ImageError(corrupt, "scan before frame header")
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageError(f"{name}: JPEG has more than {MAX_JPEG_SCANS} scans; refused (each scan is "
                                 "another pass over the image)")
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                raise ImageError(corrupt, "file ends inside the entropy-coded data")
            pos = found.start()
    if frame is None or not scans:
        raise ImageError(corrupt, "no frame header or no scan")
    return _JpegHeader(*frame, scans)


def _jpeg(data: bytes, size: int, name: str) -> tuple[np.ndarray, int, int]:
    import simplejpeg

    head = _jpeg_header(data, name)
    w, h = head.width, head.height
    # DCT-domain scaling as PIL's draft(): the largest of 1/8, 1/4, 1/2 that keeps both sides >= size
    ratio = min(w // size, h // size)
    s = next((s for s in (8, 4, 2) if ratio >= s), 1)
    out_w, out_h = _ceil(w, s), _ceil(h, s)
    coefficients = 128 * sum(head.blocks) if head.scans > 1 else 0  # libjpeg buffers the whole image
    _check_shape(name, w, h, out_w * out_h + coefficients)
    if len(data) * 8 < sum(head.blocks):  # every block costs at least one bit in any Huffman scan
        raise ImageError(f"{name}: JPEG claims {w}x{h} px but holds only {len(data)} bytes; truncated or corrupt")
    try:
        img = Image.open(io.BytesIO(data))
        frames = getattr(img, "n_frames", 1)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for hostile bytes
        raise ImageError(f"{name}: JPEG structure is truncated or corrupt", repr(e)) from None
    if frames > 1:
        raise ImageError(f"{name}: multi-frame image ({frames} frames): send one frame")
    try:
        gray = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_width=out_w, min_height=out_h, strict=True)
    except (ValueError, MemoryError) as e:
        raise ImageError(f"{name}: image data is truncated or corrupt", str(e)) from None
    if gray.shape[:2] != (out_h, out_w):
        raise ImageError(f"{name}: JPEG decodes to {gray.shape[1]}x{gray.shape[0]} px, not the "
                         f"{out_w}x{out_h} its header implies")
    return _orient(gray[..., 0], _orientation(img, name)), w, h


# ----------------------------------------------------------------------------- PNG

_PIL_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}  # others: 4


def _png(data: bytes, size: int, name: str) -> tuple[np.ndarray, int, int]:
    try:
        img = Image.open(io.BytesIO(data))
        frames = getattr(img, "n_frames", 1)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for hostile bytes
        raise ImageError(f"{name}: not a readable PNG", repr(e)) from None
    w, h = img.size
    raster = w * h * _PIL_BYTES_PER_PIXEL.get(img.mode, 4)
    _check_shape(name, w, h, raster)
    if frames > 1:
        raise ImageError(f"{name}: multi-frame image ({frames} frames): send one frame")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated, bad CRC, bad zlib stream, oversized chunks
        raise ImageError(f"{name}: image data is truncated or corrupt", repr(e)) from None
    orientation = _orientation(img, name)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(img)
        del img  # keep one 16-bit raster, not two
        if values.min() < 0 or values.max() > 65535:
            raise ImageError(f"{name}: PNG sample values outside 0..65535")
        values = values.astype(np.uint16, copy=False)
        gray = _min_max_lut(np.arange(65536, dtype=np.float64), _present(values, 65536), invert=False)[values]
    else:
        gray = np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)
    return _orient(gray, orientation), w, h


def _present(keys: np.ndarray, n: int) -> np.ndarray:
    """Which of the ``n`` stored values occur (a boolean scatter: no full-size index copy)."""
    seen = np.zeros(n, bool)
    seen[keys] = True
    return seen


def _min_max_lut(mapped: np.ndarray, present: np.ndarray, invert: bool) -> np.ndarray:
    """Per-stored-value table to uint8: min-max scaled over the values the image holds (16-bit and
    DICOM data are scaled, not clipped), the same arithmetic per value as per pixel, one byte out."""
    lo, hi = float(mapped[present].min()), float(mapped[present].max())
    gray = (mapped - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
    if invert:
        gray = 255.0 - gray
    return np.clip(gray, 0, 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- DICOM

def _dicom(data: bytes, size: int, name: str) -> tuple[np.ndarray, int, int]:
    """A single-frame grayscale DICOM: modality LUT (rescale), then the VOI LUT or window when
    present, MONOCHROME1 inverted (high values are dark), min-max scaled to 0..255.

    The transforms are applied to a table of the stored values, not to the pixels, so memory
    stays at the stored raster plus one byte per pixel.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for hostile bytes
        raise ImageError(f"{name}: not a readable DICOM file", repr(e)) from None
    try:
        photometric = str(ds.get("PhotometricInterpretation", ""))
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, cols, bits = int(ds.get("Rows", 0)), int(ds.get("Columns", 0)), int(ds.get("BitsAllocated", 0))
    except Exception as e:  # noqa: BLE001 - non-numeric values in numeric attributes
        raise ImageError(f"{name}: DICOM image attributes are malformed", repr(e)) from None
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(f"{name}: DICOM PhotometricInterpretation {photometric or 'missing'} is not a grayscale "
                         "radiograph (need MONOCHROME1 or MONOCHROME2)")
    if samples != 1:
        raise ImageError(f"{name}: DICOM with {samples} samples per pixel is not a grayscale radiograph")
    if frames != 1:
        raise ImageError(f"{name}: multi-frame DICOM ({frames} frames): send one frame")
    if bits not in (8, 16):
        raise ImageError(f"{name}: DICOM BitsAllocated {bits} is not supported (need 8 or 16)")
    _check_shape(name, cols, rows, rows * cols * bits // 8)
    try:
        pixels = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - compressed syntaxes without a decoder, short pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ImageError(f"{name}: DICOM pixel data cannot be decoded: truncated, or transfer syntax {syntax} "
                         "(uncompressed and RLE are supported)", repr(e)) from None
    if pixels.shape != (rows, cols) or pixels.dtype.kind not in "ui":
        raise ImageError(f"{name}: DICOM pixel data does not match its header", f"{pixels.shape} {pixels.dtype}")
    unsigned = f"u{pixels.dtype.itemsize}"
    offset = 1 << (8 * pixels.dtype.itemsize - 1) if pixels.dtype.kind == "i" else 0
    keys = pixels.view(unsigned) ^ np.array(offset, unsigned) if offset else pixels  # order-keeping, >= 0
    stored = (np.arange(1 << (8 * pixels.dtype.itemsize)) - offset).astype(pixels.dtype)
    try:
        mapped = np.asarray(apply_voi_lut(apply_modality_lut(stored, ds), ds), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - window width < 1, non-numeric slope, broken LUT sequences
        raise ImageError(f"{name}: DICOM rescale or window attributes are invalid", repr(e)) from None
    present = _present(keys, len(stored))
    if not np.isfinite(mapped[present]).all():
        raise ImageError(f"{name}: DICOM rescale or window attributes give non-finite values")
    return _min_max_lut(mapped, present, invert=photometric == "MONOCHROME1")[keys], cols, rows


_DECODERS = {"jpeg": _jpeg, "png": _png, "dicom": _dicom}


# ----------------------------------------------------------------------------- decoder process

def serve_worker(size: int, memory_mb: int) -> None:
    """Decode requests from stdin, answer on stdout, until stdin closes: the server's decoder
    process, so a decode that overruns its time can be killed and a decoder crash or memory
    blow-up costs this process, not the replica. Its address space is capped at what it holds
    after start-up plus ``memory_mb`` (Linux), so an allocation beyond the header bounds fails
    here with MemoryError. JSON and raw bytes only (no pickle): a compromised decoder cannot make
    the replica run code.

    Request: ``>II`` (name length, data length), name (UTF-8), data.
    Reply: ``>BI`` (kind, payload length), payload: kind 0 = ``>II`` width, height + size*size
    pixels; kind 1 = ImageError as JSON {message, detail, unsupported}; kind 2 = JSON {detail}
    of an unexpected exception (a server fault).
    """
    import os
    import traceback

    import pydicom  # noqa: F401 - imported before the first request, not during it
    import simplejpeg  # noqa: F401

    if sys.platform == "linux":
        import resource
        with open("/proc/self/status") as status:
            vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        cap = vm + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints of libraries go to stderr, never into the reply stream
    stdin = sys.stdin.buffer
    while True:
        head = stdin.read(8)
        if len(head) < 8:
            return
        name_len, data_len = struct.unpack(">II", head)
        name = stdin.read(name_len).decode("utf-8", "replace")
        data = stdin.read(data_len)
        try:
            got = to_pixels(data, size, name)
            kind, payload = 0, struct.pack(">II", got.width, got.height) + got.pixels.tobytes()
        except ImageError as e:
            kind, payload = 1, json.dumps({"message": str(e), "detail": e.detail,
                                           "unsupported": isinstance(e, UnsupportedFormat)}).encode()
        except MemoryError:
            kind, payload = 1, json.dumps({"message": f"{name}: image too large to decode in the decoder's "
                                                      "memory limit", "detail": "MemoryError",
                                           "unsupported": False}).encode()
        except Exception:  # noqa: BLE001 - reported to the replica as a server fault, with the trace
            kind, payload = 2, json.dumps({"detail": traceback.format_exc()}).encode()
        del data
        out.write(struct.pack(">BI", kind, len(payload)) + payload)
        out.flush()


if __name__ == "__main__":
    serve_worker(int(sys.argv[1]), int(sys.argv[2]))


def overlay(gray: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A heat map in [0, 1] blended over a uint8 gray image: RGB uint8, hotter is more opaque
    (the server's /v1/explain and the report's failure grids; no torch)."""
    from matplotlib import colormaps
    rgb = np.repeat(gray[..., None] / 255.0, 3, axis=2)
    colour = colormaps["inferno"](heat)[..., :3]
    alpha = 0.45 * heat[..., None]
    return (((1 - alpha) * rgb + alpha * colour) * 255).round().astype(np.uint8)
