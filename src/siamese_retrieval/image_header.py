"""An image's size read from its header, and the pixel limit checked with it BEFORE anything is decoded.

    problem = pixel_problem(data)   # None, or "image is 30000 x 30000 = 900 Mpx, above data.max_image_pixels=..."
    check_pixels(path, data)               # the same as one DatasetError naming the file

Why: a decoder allocates width x height x channels before it looks at the pixels, so a small file can claim a huge
image (a 30000 x 30000 PNG of one colour compresses to a few hundred KB and decodes to 2.7 GB, 5.5 GB at peak).
OpenCV's own cap (CV_IO_MAX_IMAGE_PIXELS) is 2**30 pixels, far above what a retrieval dataset needs. Every place
that decodes a dataset or query image (data/images.py read_image, the dataset check in data/dataset.py, the
thumbnails and picture tiles) reads the size from the header first and refuses an image above the limit.

The size: PNG (IHDR) and JPEG (the first SOFn frame header) are parsed here; other formats (BMP, TIFF, WebP, ...)
through Pillow, which reads only the header (Image.open is lazy). A file whose size cannot be read from a header
is not decoded either (`pixel_problem` says it is not a decodable image).

The limit: `data.max_image_pixels` (conf/data/synth.yaml, default 50,000,000). It is a setting of the process, set
by the datamodule built from the data config (`set_max_image_pixels`), so that every decoder below it uses the
same one (the dataset reader, the input builders' decoders, the ORB feature extraction of the re-rankers, the
query images of retrieve.py); a call can pass its own `limit`. A foundation module: the standard library only
(Pillow imported when a format needs it).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from typing import Iterator

from siamese_retrieval.errors import ConfigError, DatasetError

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
_max_pixels = DEFAULT_MAX_IMAGE_PIXELS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (they carry the size): SOF0-3, 5-7, 9-11, 13-15 (0xC4 DHT, 0xC8 JPG, 0xCC DAC are not)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _checked_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"data.max_image_pixels={limit!r}: must be an integer >= 1")
    return int(limit)


def set_max_image_pixels(limit: int) -> int:
    """Set the process's limit (`data.max_image_pixels`); returns it. ConfigError for anything but an integer >= 1."""
    global _max_pixels
    _max_pixels = _checked_limit(limit)
    return _max_pixels


def max_image_pixels() -> int:
    """The process's limit on width x height of an image to decode."""
    return _max_pixels


@contextlib.contextmanager
def image_pixel_limit(limit: int) -> Iterator[int]:
    """The process's limit set to `limit` inside the block, restored after it."""
    before = _max_pixels
    set_max_image_pixels(limit)
    try:
        yield limit
    finally:
        set_max_image_pixels(before)


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(marker, position of its 0xFF, payload start, length field) of each segment of the JPEG `data`: the one
    walker of untrusted JPEG structure, shared by the size reader here and the dataset check (data/dataset.py).

    Markers without a length are skipped. The end-of-image marker (EOI, yielded with length 0) and a segment with
    a length below 2 (yielded) end the walk; so does data that ends before a marker or its length field.
    """
    n, i = len(data), 2
    while True:
        j = data.find(b"\xff", i)  # a marker; anything before it is junk that decoders skip
        while 0 <= j < n - 1 and data[j + 1] == 0xFF:  # fill bytes
            j += 1
        if j < 0 or j >= n - 1:
            return
        marker, i = data[j + 1], j + 2
        if marker == 0xD9:  # EOI
            yield marker, j, i, 0
            return
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # stuffed byte, TEM, SOI, RSTn: no length
            continue
        if i + 2 > n:
            return
        length = int.from_bytes(data[i : i + 2], "big")
        yield marker, j, i, length
        if length < 2:
            return
        i += length


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the first frame header, walking the segments (not the scans) from the start."""
    for marker, _, i, length in jpeg_segments(data):
        if marker in (0xD9, 0xDA):  # end of image, or a scan before any frame header: no size
            return None
        if marker in _SOF_MARKERS:
            if length < 7 or i + 7 > len(data):
                return None
            height, width = int.from_bytes(data[i + 3 : i + 5], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
            return width, height
    return None


_BOMB = (-1, -1)  # Pillow refused the header itself as a decompression bomb
_PILLOW_LOCK = threading.Lock()


def _pillow_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image

    # catch_warnings changes the process's warning filters: one thread at a time (the dataset check runs a pool), so
    # that no thread restores another's "ignore" for good
    with _PILLOW_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning and format warnings: the caller decides
        try:
            with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header, decodes nothing
                width, height = im.size
                return int(width), int(height)
        except Image.DecompressionBombError:
            return _BOMB
        except Exception:  # noqa: BLE001 - a file Pillow cannot parse: no size known
            return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of the encoded image `data` (the file's bytes), None when no header says
    it. Never decodes."""
    data = data if isinstance(data, bytes) else bytes(data)
    if data.startswith(PNG_SIGNATURE):
        return _png_size(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    return _pillow_size(data)


def _mpx(pixels: int) -> str:
    return f"{round(pixels / 1e6, 1):g} Mpx"


def pixel_problem(data: bytes, limit: int | None = None) -> str | None:
    """Why the encoded image `data` (the file's bytes) must not be decoded (None: it may): more than `limit` pixels
    (default: the process's `data.max_image_pixels`) by its header, or no header whose size can be read."""
    limit = _max_pixels if limit is None else _checked_limit(limit)
    size = image_size(data)
    if size is None:
        return "not a decodable image (no image header whose size can be read)"
    if size == _BOMB:
        from PIL import Image

        pillow = 2 * int(Image.MAX_IMAGE_PIXELS or 0)
        if pillow < limit:  # Pillow refuses less than the limit allows: say so, its size is unknown
            return (f"image is above {pillow} pixels by its header (Pillow's decompression-bomb limit, refused "
                    f"whatever data.max_image_pixels={limit} allows)")
        return f"image is above {pillow} pixels by its header, above data.max_image_pixels={limit}"
    width, height = size
    if width < 1 or height < 1:
        return f"not a decodable image (its header says {width} x {height} pixels)"
    if width * height > limit:
        return f"image is {width} x {height} = {_mpx(width * height)}, above data.max_image_pixels={limit}"
    return None


def check_pixels(path: str | os.PathLike, data: bytes, limit: int | None = None) -> None:
    """`pixel_problem` as one DatasetError naming `path`."""
    problem = pixel_problem(data, limit)
    if problem is not None:
        raise DatasetError(f"{path}: {problem}")
