"""Read MindSpore `.ckpt` files without MindSpore or protobuf.

A MindSpore checkpoint (format "ckpt", `mindspore/train/serialization.py` `_exec_save`) is a run of
serialized protobuf messages, one per tensor or tensor slice, simply concatenated (protobuf merges
concatenated messages, so the file parses as one `Checkpoint`). From `checkpoint.proto`:

    message Checkpoint  { repeated Value value = 1;
                          message Value { required string tag = 1;
                                          oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } } }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }

A tensor over 512 MiB is written as several consecutive values with the same tag, each a slice of its
bytes (split on dim 0; `dims` is the whole shape in each). With `crc_check` the file ends in
b"crc_num" and a 10-byte big-endian CRC-32 of everything before it.

The wire format is walked here directly: MindSpore's own loader reads the whole file into one protobuf
message (2 GiB limit, the file's size in memory twice). Here only the index is parsed; tensor bytes stay
in the file behind a memory map and are viewed one tensor at a time, so a 26 GB release costs the
memory of the tensor being converted.
"""
from __future__ import annotations

import mmap
import zlib
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
import torch

CRC_MARKER = b"crc_num"
CRC_TRAILER = len(CRC_MARKER) + 10
# MindSpore's tensor_type names (serialization.py `tensor_to_ms_type`) → torch.
DTYPES = {
    "Float16": torch.float16, "Float32": torch.float32, "Float64": torch.float64, "BFloat16": torch.bfloat16,
    "Int8": torch.int8, "Int16": torch.int16, "Int32": torch.int32, "Int64": torch.int64,
    "UInt8": torch.uint8, "UInt16": torch.uint16, "UInt32": torch.uint32, "UInt64": torch.uint64,
    "Bool": torch.bool,
}
# numpy has no bfloat16: its bytes are read as int16 and reinterpreted in torch.
_NUMPY = {name: np.dtype(np.int16) if dtype == torch.bfloat16 else np.dtype(str(dtype).removeprefix("torch."))
          for name, dtype in DTYPES.items()}
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


class MindSporeCheckpointError(ValueError):
    """The file is not a readable MindSpore checkpoint; the message names the file and the byte."""


@dataclass(frozen=True)
class Entry:
    """One tag of the checkpoint: its shape, MindSpore type and where its bytes lie (one span per slice)."""

    tag: str
    dims: tuple[int, ...]
    tensor_type: str
    spans: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.spans)


class _Reader:
    """Protobuf wire-format cursor over `buf[start:end]`; errors name the file and the offset."""

    def __init__(self, buf: mmap.mmap | bytes, start: int, end: int, path: Path):
        self.buf, self.pos, self.end, self.path = buf, start, end, path

    def fail(self, what: str) -> MindSporeCheckpointError:
        return MindSporeCheckpointError(f"{self.path}: not a readable MindSpore checkpoint at byte {self.pos}: {what}")

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= self.end:
                raise self.fail("the file ends inside a number (truncated?)")
            byte = self.buf[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise self.fail("a number longer than 10 bytes (corrupt or encrypted?)")

    def key(self) -> tuple[int, int]:
        key = self.varint()
        return key >> 3, key & 7

    def span(self) -> tuple[int, int]:
        """A length-delimited field's (offset, length), skipped over."""
        length = self.varint()
        if self.pos + length > self.end:
            raise self.fail(f"a field of {length} bytes runs past byte {self.end} (truncated?)")
        start = self.pos
        self.pos += length
        return start, length

    def skip(self, wire: int) -> None:
        if wire == _WIRE_VARINT:
            self.varint()
        elif wire == _WIRE_LEN:
            self.span()
        elif wire in (_WIRE_I64, _WIRE_I32):
            self.pos += 8 if wire == _WIRE_I64 else 4
        else:
            raise self.fail(f"wire type {wire} (corrupt or encrypted?)")

    def text(self, span: tuple[int, int]) -> str:
        start, length = span
        try:
            return bytes(self.buf[start:start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a name that is not UTF-8 (corrupt or encrypted?)") from None


def _tensor_proto(reader: _Reader, span: tuple[int, int]) -> tuple[tuple[int, ...], str | None, tuple[int, int] | None]:
    inner = _Reader(reader.buf, span[0], span[0] + span[1], reader.path)
    dims: list[int] = []
    tensor_type, content = None, None
    while inner.pos < inner.end:
        field, wire = inner.key()
        if field == 1 and wire == _WIRE_VARINT:
            dims.append(inner.varint())
        elif field == 1 and wire == _WIRE_LEN:  # packed encoding of the same field
            packed = inner.span()
            sub = _Reader(inner.buf, packed[0], packed[0] + packed[1], inner.path)
            while sub.pos < sub.end:
                dims.append(sub.varint())
        elif field == 2 and wire == _WIRE_LEN:
            tensor_type = inner.text(inner.span())
        elif field == 3 and wire == _WIRE_LEN:
            content = inner.span()
        else:
            inner.skip(wire)
    return tuple(dims), tensor_type, content


class MindSporeCheckpoint:
    """The index of a MindSpore `.ckpt` and its tensors, viewed from a memory map.

    `entries`: tag → `Entry` for every tensor; `skipped`: tags that hold no tensor (map tensors,
    strings, unknown types), with the reason. `tensor(tag)` returns a torch tensor of the recorded shape
    and type; a tensor written in one piece is a copy-on-write view of the file, a sliced one is joined
    in memory.
    """

    def __init__(self, path: str | Path, verify_crc: bool = True):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise MindSporeCheckpointError(f"{self.path}: {exc.strerror or exc}") from None
        size = self.path.stat().st_size
        if size == 0:
            self._file.close()
            raise MindSporeCheckpointError(f"{self.path}: empty file")
        # Copy-on-write: a tensor handed out may be written to (a parameter assigned from it) without
        # touching the file.
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        end = size
        if size >= CRC_TRAILER and self._map[size - CRC_TRAILER:size - 10] == CRC_MARKER:
            end = size - CRC_TRAILER
            if verify_crc:
                self._check_crc(end, int.from_bytes(self._map[size - 10:size], "big"))
        self.entries: dict[str, Entry] = {}
        self.skipped: dict[str, str] = {}
        self._index(end)

    def _check_crc(self, end: int, expected: int) -> None:
        crc, chunk = 0, 64 << 20
        for start in range(0, end, chunk):
            crc = zlib.crc32(self._map[start:min(start + chunk, end)], crc)
        if crc != expected:
            raise MindSporeCheckpointError(f"{self.path}: CRC-32 {crc:#010x} of the content differs from the "
                                           f"{expected:#010x} it was saved with: the file is damaged")

    def _index(self, end: int) -> None:
        reader = _Reader(self._map, 0, end, self.path)
        if self._map[0] != (1 << 3 | _WIRE_LEN):
            raise reader.fail("it does not start with a checkpoint value (another format, or an encrypted "
                              "checkpoint: decrypt it with MindSpore first)")
        previous: str | None = None
        while reader.pos < end:
            field, wire = reader.key()
            if field != 1 or wire != _WIRE_LEN:
                reader.skip(wire)
                continue
            value = reader.span()
            inner = _Reader(self._map, value[0], value[0] + value[1], self.path)
            tag, tensor, kind = None, None, None
            while inner.pos < inner.end:
                f, w = inner.key()
                if f == 1 and w == _WIRE_LEN:
                    tag = inner.text(inner.span())
                elif f == 2 and w == _WIRE_LEN:
                    tensor = inner.span()
                elif f == 3 and w == _WIRE_LEN:
                    inner.span()
                    kind = "map tensor"
                else:
                    inner.skip(w)
            if tag is None:
                raise inner.fail("a value without a tag")
            if tensor is None:
                self.skipped[tag] = kind or "no tensor"
                previous = None
                continue
            dims, tensor_type, content = _tensor_proto(inner, tensor)
            if tensor_type is None or content is None:
                raise inner.fail(f"tensor {tag!r} lacks its type or content")
            if tensor_type not in DTYPES:
                self.skipped[tag] = f"type {tensor_type}"
                previous = None
                continue
            if tag == previous:  # the next slice of a tensor written in pieces
                last = self.entries[tag]
                self.entries[tag] = Entry(tag, last.dims, last.tensor_type, last.spans + (content,))
                continue
            if tag in self.entries:
                raise inner.fail(f"tag {tag!r} appears twice, apart")
            # MindSpore writes a scalar's dims as [0]
            self.entries[tag] = Entry(tag, () if dims == (0,) else dims, tensor_type, (content,))
            previous = tag
        for entry in self.entries.values():
            expected = prod(entry.dims) * DTYPES[entry.tensor_type].itemsize
            if entry.nbytes != expected:
                raise MindSporeCheckpointError(
                    f"{self.path}: tensor {entry.tag!r} {list(entry.dims)} {entry.tensor_type} holds "
                    f"{entry.nbytes} bytes, not {expected} (truncated or corrupt)")

    def tensor(self, tag: str) -> torch.Tensor:
        entry = self.entries[tag]
        dtype = DTYPES[entry.tensor_type]
        np_type = _NUMPY[entry.tensor_type]
        pieces = [np.frombuffer(self._map, dtype=np.uint8, count=length, offset=start) for start, length in entry.spans]
        raw = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        # Protobuf places the bytes at any offset; torch kernels expect element-aligned data.
        array = np.require(raw.view(np_type), requirements="A").reshape(entry.dims)
        out = torch.from_numpy(array)
        return out.view(torch.bfloat16) if dtype == torch.bfloat16 else out

    def close(self) -> None:
        self._file.close()  # the map stays valid while tensors view it

    def __enter__(self) -> MindSporeCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

