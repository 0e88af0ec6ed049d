"""The stream compressions a text input may have, told from its first bytes (never from its name).

gzip, bzip2, xz and zstd: what corpora ship JSON lines and text in (`.jsonl.zst` shards, Wikipedia
dumps in `.bz2`, `.json.gz` crawls). Gzip has a reader of its own in `cleaning.readers` that skips a
corrupt member to the next intact one; the others are read as one stream, and damage stops the file
after the last whole line before it.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from typing import BinaryIO

import zstandard

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"

#: the file name suffixes of compressed text inputs (`data.jsonl.zst`); the bytes decide, not these
SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")

#: what reading a damaged or truncated stream raises
STREAM_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)

# zstd frames may ask for windows up to 2 GiB (`zstd --long=31`); the library refuses those above 128 MiB
# unless told, and a file written so could not be read at all.
_ZSTD_MAX_WINDOW = 1 << 31
# Compressed bytes fed to the zstd decompressor at a time: what one call can inflate to is bounded by
# this times the compression ratio, since the decompressor cannot be asked for less.
_ZSTD_CHUNK = 64 * 1024


def compression(head: bytes) -> str | None:
    """The compression that content starting with `head` (its first 8 bytes) is in, or None."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0":  # bzip2: block size 1-9
        return "bzip2"
    return None


def decompressed(raw: BinaryIO, kind: str) -> BinaryIO:
    """A binary reader of `raw`'s content, with `read(n)` and `readline(limit)`; damage raises one of
    `STREAM_ERRORS` when it is reached, a stream that ends early included."""
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if kind == "bzip2":
        return bz2.BZ2File(raw)
    if kind == "xz":
        return lzma.LZMAFile(raw)
    if kind == "zstd":
        return io.BufferedReader(_ZstdReader(raw), 1 << 20)
    raise ValueError(f"unknown compression {kind!r}")


class _ZstdReader(io.RawIOBase):
    """zstd frames one after another, decompressed. The library's own stream reader ends quietly when the
    input ends inside a frame; a cut-short file would pass for a whole one. This raises EOFError then."""

    def __init__(self, raw: BinaryIO):
        super().__init__()
        self._raw = raw
        self._frame = None  # the decompressor of the frame being read
        self._left = b""  # input after the end of the last frame: the next frame's start
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            if not self._fill():
                return 0
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _fill(self) -> bool:
        data = self._left or self._raw.read(_ZSTD_CHUNK)
        self._left = b""
        if not data:
            if self._frame is not None and not self._frame.eof:
                raise EOFError("the zstd stream ends inside a frame (the file was cut short)")
            return False
        if self._frame is None or self._frame.eof:
            self._frame = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).decompressobj()
        self._out = memoryview(self._frame.decompress(data))
        if self._frame.eof:
            self._left = self._frame.unused_data
        return True
