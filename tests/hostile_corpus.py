"""Hostile and malformed uploads, generated here (never downloaded): what tests/test_serving.py
sends to a served model and benchmarks/bench_serve.py bursts at a replica to measure its memory.

Each builder returns real encoded bytes; the comments say which bound of ``imaging`` (or of the
server) is meant to catch them.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w)) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- PNG

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zeros(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A complete, valid grayscale PNG of zeros, compressed row by row (never the whole raster in
    memory): tiny on the wire, huge when decoded."""
    row = b"\0" * (1 + width * bit_depth // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width`` x ``height``."""
    png = encode(np.zeros((20, 20), np.uint8), "PNG")
    ihdr = bytearray(png[8:33])
    ihdr[8:16] = struct.pack(">II", width, height)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])))
    return png[:8] + bytes(ihdr) + png[33:]


def two_frame_png() -> bytes:
    buf = io.BytesIO()
    frames = [Image.fromarray(np.full((64, 64), v, np.uint8)) for v in (0, 255)]
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


# ----------------------------------------------------------------------------- JPEG

def jpeg_segments(data: bytes) -> list[bytes]:
    """A JPEG split into marker segments; a scan's segment carries its entropy-coded data."""
    out, pos = [data[:2]], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append(data[pos:pos + 2])
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + 2 + length
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not RSTn or a stuffed 0xFF00
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        out.append(data[pos:end])
        pos = end
    return out


def jpeg_with_repeated_scan(repeats: int) -> bytes:
    """A progressive JPEG whose smallest scan is repeated ``repeats`` times: little on the wire,
    one more pass over the image per copy (the CPU bomb of issue 12)."""
    base = encode(noise(128, 128), "JPEG", quality=90, progressive=True)
    segments = jpeg_segments(base)
    scans = [i for i, s in enumerate(segments) if s[:2] == b"\xff\xda"]
    small = min(scans, key=lambda i: len(segments[i]))
    return b"".join(segments[:small] + [segments[small]] * repeats + segments[small + 1:])


def jpeg_cut_mid_scan() -> bytes:
    """Baseline JPEG cut halfway through its scan, with an end marker appended: decoders pad the
    rest with grey unless they are strict."""
    good = encode(noise(256, 256), "JPEG", quality=90)
    return good[: len(good) // 2] + b"\xff\xd9"


def jpeg_claiming(width: int, height: int) -> bytes:
    """A ~15 KB baseline JPEG whose frame header claims ``width`` x ``height``."""
    data = bytearray(encode(noise(96, 96, 1), "JPEG", quality=95))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def jpeg_with_exif(tiff: bytes, pixels: np.ndarray | None = None) -> bytes:
    """A JPEG with ``tiff`` (a TIFF structure) as its EXIF APP1 segment."""
    data = encode(noise(40, 64, 2) if pixels is None else pixels, "JPEG", quality=95)
    app1 = b"Exif\0\0" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def exif_tiff(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """Little-endian TIFF with one IFD of (tag, type, count, value bytes) entries."""
    n = len(entries)
    data_offset = 8 + 2 + 12 * n + 4
    ifd, extra = struct.pack("<H", n), b""
    for tag, kind, count, value in entries:
        if len(value) <= 4:
            ifd += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, kind, count, data_offset + len(extra))
            extra += value
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + extra


def exif_zero_denominators(orientation: int = 6) -> bytes:
    """Orientation plus XResolution 72/0 and YResolution 0/0 (rationals with zero denominators)."""
    return exif_tiff([(0x0112, 3, 1, struct.pack("<H", orientation)),
                      (0x011A, 5, 1, struct.pack("<II", 72, 0)), (0x011B, 5, 1, struct.pack("<II", 0, 0))])


# ----------------------------------------------------------------------------- DICOM

def dicom(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", *, rows: int | None = None,
          cols: int | None = None, samples: int = 1, rle: bool = False, pixel_data: bytes | None = None,
          **attrs) -> bytes:
    """A DICOM file; ``attrs`` set (or override) attributes, raw strings allowed for malformed ones."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = RLELossless if rle else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = (rows, cols) if pixels is None else pixels.shape[:2]
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = samples, 16, 16, 15
    ds.PixelRepresentation = 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    if pixel_data is not None:
        ds.PixelData = pixel_data
    else:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    if rle:
        ds["PixelData"].is_undefined_length = True
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def rle_dicom_claiming(side: int) -> bytes:
    """An RLE DICOM whose header claims ``side`` x ``side`` 16-bit pixels, over a few bytes of
    (encapsulated) data: refused from its header, before any decoding."""
    from pydicom.encaps import encapsulate
    header = struct.pack("<16I", 2, 64, 64 + 4, *([0] * 13))
    frame = header + b"\x81\x00" * 2 + b"\x81\x00" * 2  # two segments of runs of zeros
    return dicom(None, rows=side, cols=side, rle=True, pixel_data=encapsulate([frame]))


# ----------------------------------------------------------------------------- the bombs

def bombs() -> dict[str, bytes]:
    """The worst uploads of issue 12, by name: what a replica must survive with bounded memory."""
    return {
        "tall PNG 16 x 3,750,000": png_of_zeros(16, 3_750_000),
        "16-bit PNG 7745 x 7745 of zeros": png_of_zeros(7745, 7745, 16),
        "RLE DICOM claiming 7745 x 7745": rle_dicom_claiming(7745),
        "progressive JPEG, 2000 repeated scans": jpeg_with_repeated_scan(2000),
        "JPEG claiming 7000 x 7000 over 15 KB": jpeg_claiming(7000, 7000),
        "largest accepted: 8-bit PNG 7745 x 7745": png_of_zeros(7745, 7745, 8),
    }


def with_raw_value(data: bytes, group: int, element: int, value: bytes) -> bytes:
    """``data`` (explicit-VR little-endian DICOM) with one element's value bytes replaced by
    ``value`` of the same length: for malformed values pydicom would refuse to write."""
    at = data.index(struct.pack("<HH", group, element))
    length = struct.unpack("<H", data[at + 6:at + 8])[0]
    assert len(value) == length, (value, length)
    return data[:at + 8] + value + data[at + 8 + length:]


def bad_dicoms() -> dict[str, bytes]:
    """DICOM files whose header values break a naive decoder (500s before issue 12)."""
    base = (np.random.default_rng(4).random((64, 64)) * 3000).astype(np.uint16)
    return {
        "window-width-0.dcm": dicom(base, WindowCenter=100, WindowWidth=0),
        "frames-not-a-number.dcm": with_raw_value(dicom(base, NumberOfFrames=1), 0x0028, 0x0008, b"ab"),
        "slope-not-a-number.dcm": with_raw_value(dicom(base, RescaleSlope="2", RescaleIntercept=0), 0x0028, 0x1053,
                                                 b"ab"),
        "three-samples-monochrome2.dcm": dicom(base, samples=3),
        "pixel-data-short.dcm": dicom(None, rows=64, cols=64, pixel_data=b"\0" * 100),
        "rgb-photometric.dcm": dicom(base, "RGB"),
    }


def cmyk_jpeg() -> bytes:
    """A 4-component (CMYK) JPEG: not a radiograph."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 4), np.uint8), "CMYK").save(buf, "JPEG")
    return buf.getvalue()
