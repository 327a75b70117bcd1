"""PNG files Pillow cannot read faithfully: 16-bit colour (SYNTHIA's label files).

Pillow decodes a 48-bit RGB PNG into 8-bit RGB (keeping the high byte), which turns SYNTHIA's class
ids 0..22 into zeros. PNG filters act byte-wise, each byte predicted from the *same* byte of the
left, upper and upper-left pixel, so every byte lane of a pixel is an independent 8-bit greyscale
image. We split the filtered scanlines into lanes, stack them vertically with an all-zero,
unfiltered row between lanes (it reconstructs to zeros, i.e. exactly the "no row above" state a
first row sees) and let Pillow's C decoder undo the filters in one pass.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (palette 3 not needed here)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def read_png(path: str | Path) -> np.ndarray:
    """Any non-interlaced grey/RGB(A) PNG, 8 or 16 bit -> (H, W, C) uint8/uint16 in file channel order."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OSError(f"cannot read {path}: {e}") from e
    if not data.startswith(_SIGNATURE):
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, header = 8, [], None
    try:
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos:pos + 4])
            kind = data[pos + 4:pos + 8]
            body = data[pos + 8:pos + 8 + length]
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", body)
            elif kind == b"IDAT":
                idat.append(body)
            elif kind == b"IEND":
                break
            pos += 12 + length
        if header is None:
            raise ValueError("no IHDR chunk")
        width, height, depth, ctype, _, _, interlace = header
        if ctype not in _CHANNELS or depth not in (8, 16):
            raise ValueError(f"unsupported PNG colour type {ctype} / bit depth {depth}")
        if interlace:
            raise ValueError("interlaced PNGs are not supported")
        channels = _CHANNELS[ctype]
        bpp = channels * depth // 8
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
        if raw.size != height * (1 + width * bpp):
            raise ValueError("truncated image data")
    except (struct.error, zlib.error, ValueError) as e:
        raise ValueError(f"cannot decode PNG {path}: {e}") from e
    rows = raw.reshape(height, 1 + width * bpp)
    filters, pixels = rows[:, :1], rows[:, 1:].reshape(height, width, bpp)
    sep = np.zeros((1, 1 + width), np.uint8)
    parts = []
    for lane in range(bpp):
        if lane:
            parts.append(sep)
        parts.append(np.concatenate([filters, pixels[:, :, lane]], axis=1))
    stacked = np.concatenate(parts, axis=0)
    hdr = struct.pack(">IIBBBBB", width, stacked.shape[0], 8, 0, 0, 0, 0)
    png = _SIGNATURE + _chunk(b"IHDR", hdr) + _chunk(b"IDAT", zlib.compress(stacked.tobytes(), 0)) + _chunk(b"IEND", b"")
    planes = np.asarray(Image.open(io.BytesIO(png)))
    lanes = [planes[i * (height + 1):i * (height + 1) + height] for i in range(bpp)]
    if depth == 8:
        return np.stack(lanes, axis=-1)
    out = [(lanes[2 * c].astype(np.uint16) << 8) | lanes[2 * c + 1] for c in range(channels)]
    return np.stack(out, axis=-1)


def encode_png16(arr) -> bytes:
    """(H, W) or (H, W, C) uint16 -> PNG bytes, 16 bit, unfiltered (fixtures; SYNTHIA-style labels)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    h, w, c = arr.shape
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    big = arr.astype(">u2")
    raw = np.concatenate([np.zeros((h, 1), np.uint8), big.view(np.uint8).reshape(h, w * c * 2)], axis=1)
    hdr = struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", hdr) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + _chunk(b"IEND", b"")
