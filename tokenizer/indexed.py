"""Indexed token shards in Megatron-LM's `MMIDIDX` format (`.bin` + `.idx`).

`.bin` is the token ids of every sequence back to back (little-endian, one dtype). `.idx`:

    b"MMIDIDX\\x00\\x00"       9-byte magic
    <Q version = 1
    <B dtype code             1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    <Q sequence count N
    <Q document count D       len(document_indices) = number of documents + 1
    int32[N] sequence lengths (in tokens)
    int64[N] sequence pointers (byte offsets into .bin)
    int64[D] document indices (sequence index where each document starts, then N)

One sequence per document here (Megatron allows several sentences per document), so the document
indices are 0..N. Megatron's `IndexedDataset(path_prefix)` reads these files as they are.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from cleaning.temporaries import temporary_path

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65_536 else np.dtype(np.int32)


class IndexedWriter:
    """Append documents to `<prefix>.bin` as they come; `commit()` writes `.idx` and renames both in.

    Until `commit()`, only temporary files exist, so a reader never sees a partial shard.
    Memory: 12 bytes per document (length + pointer), nothing per token.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type = np.uint16) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        self.bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        self._bin_tmp = Path(temporary_path(str(self.bin_path)))
        self._idx_tmp = Path(temporary_path(str(self.idx_path)))
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []
        self.tokens = 0

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their concatenated ids and each one's length."""
        if int(lengths.sum()) != flat.size:
            raise ValueError("lengths do not add up to the ids given")
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids outside the range of {self.dtype}")
        self._bin.write(np.ascontiguousarray(flat, dtype=self.dtype).astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.tokens += int(flat.size)

    def commit(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as fh:
            fh.write(MAGIC)
            fh.write(struct.pack("<Q", VERSION))
            fh.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            fh.write(struct.pack("<Q", len(lengths)))
            fh.write(struct.pack("<Q", len(document_indices)))
            fh.write(lengths.astype("<i4").tobytes())
            fh.write(pointers.astype("<i8").tobytes())
            fh.write(document_indices.astype("<i8").tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        self._bin.close()
        for tmp in (self._bin_tmp, self._idx_tmp):
            if tmp.exists():
                tmp.unlink()

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class IndexedReader:
    """Memory-mapped view of a `<prefix>.bin/.idx` pair."""

    def __init__(self, prefix: str | Path) -> None:
        prefix = Path(prefix)
        self.idx_path = prefix.with_name(prefix.name + ".idx")
        self.bin_path = prefix.with_name(prefix.name + ".bin")
        with open(self.idx_path, "rb") as fh:
            header = fh.read(len(MAGIC) + 8 + 1 + 8 + 8)
        if len(header) < 34 or header[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{self.idx_path} is not an MMIDIDX index")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise ValueError(f"{self.idx_path}: unsupported MMIDIDX version {version}")
        code = header[17]
        if code not in DTYPE_CODES:
            raise ValueError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code]).newbyteorder("<")
        count, doc_count = struct.unpack("<QQ", header[18:34])
        index = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        offset = 34
        self.sizes = np.frombuffer(index, dtype="<i4", count=count, offset=offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(index, dtype="<i8", count=count, offset=offset)
        offset += self.pointers.nbytes
        self.document_indices = np.frombuffer(index, dtype="<i8", count=doc_count, offset=offset)
        total = int(self.sizes.astype(np.int64).sum())
        if os.path.getsize(self.bin_path) != total * self.dtype.itemsize:
            raise ValueError(f"{self.bin_path} does not match its index ({total} tokens expected)")
        self.tokens = (
            np.memmap(self.bin_path, mode="r", dtype=self.dtype) if total else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)
