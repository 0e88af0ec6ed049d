"""Encoding over worker processes: chunks of documents in, ids out, in input order, bounded memory.

Each worker holds its own sentencepiece processor (from the serialized model, so any start method
works) and its own `FastSegmenter`, whose caches warm up over the chunks it sees. The pool lives as
long as the `EncoderPool`: starting one costs about a second per worker (jieba's dictionary).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import sentencepiece as spm

from cleaning.orphans import exit_with_parent
from tokenizer.segment import FastSegmenter

T = TypeVar("T")
R = TypeVar("R")


class ChunkEncoder:
    """Segment a chunk of documents and encode it with one batched sentencepiece call."""

    def __init__(self, sp: spm.SentencePieceProcessor, segmenter: FastSegmenter | None = None) -> None:
        self.sp = sp
        self.segmenter = segmenter or FastSegmenter()

    def ids(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode([self.segmenter.segment(t) for t in texts], num_threads=1)

    def arrays(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All ids of the chunk as one int32 array, and each document's length."""
        encoded = self.sp.encode([self.segmenter.segment(t) for t in texts], out_type="numpy", num_threads=1)
        lengths = np.fromiter((len(a) for a in encoded), dtype=np.int64, count=len(encoded))
        flat = np.concatenate(encoded) if encoded else np.zeros(0, dtype=np.int32)
        return flat.astype(np.int32, copy=False), lengths


_WORKER: ChunkEncoder | None = None


def _init_worker(model_proto: bytes) -> None:
    global _WORKER
    # A terminal's Ctrl-C reaches the whole process group: the parent stops the pool, and the workers,
    # interrupted mid-chunk, would each print a traceback first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()  # a parent killed outright (kill -9) stops nothing itself
    _WORKER = ChunkEncoder(spm.SentencePieceProcessor(model_proto=model_proto))
    _WORKER.segmenter.segment("")  # load jieba's dictionary now, not inside the first chunk


def _worker_pid(delay: float) -> int:
    time.sleep(delay)
    return os.getpid()


def _encode_ids(texts: list[str]) -> list[list[int]]:
    assert _WORKER is not None
    return _WORKER.ids(texts)


def _encode_arrays(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER is not None
    return _WORKER.arrays(texts)


def chunk_texts(texts: Iterable[str], chunk_chars: int, chunk_docs: int) -> Iterator[list[str]]:
    """Consecutive documents grouped until a chunk holds `chunk_chars` characters or `chunk_docs` documents."""
    chunk: list[str] = []
    chars = 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if chars >= chunk_chars or len(chunk) >= chunk_docs:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def ordered_map(submit: Callable[[T], Future], items: Iterable[T], max_in_flight: int) -> Iterator[R]:
    """Results of `submit(item)` in input order, with at most `max_in_flight` outstanding."""
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(submit(item))
            if len(pending) >= max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


class EncoderPool:
    """A process pool of `ChunkEncoder`s for one sentencepiece model."""

    def __init__(self, model_proto: bytes, workers: int, start_method: str = "spawn") -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context(start_method),
            initializer=_init_worker,
            initargs=(model_proto,),
        )
        self._start_all()

    def _start_all(self, timeout: float = 120.0) -> None:
        """Start every worker now (the executor would start them one submit at a time, inside the
        first encoding), and surface an initialisation failure here rather than mid-stream."""
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        try:
            while len(seen) < self.workers and time.monotonic() < deadline:
                futures = [self._executor.submit(_worker_pid, 0.05) for _ in range(self.workers)]
                seen.update(f.result() for f in futures)
        except BrokenProcessPool as exc:
            self._executor.shutdown(wait=False, cancel_futures=True)
            raise RuntimeError(f"encoder workers failed to start ({exc})") from exc

    def map_ids(self, chunks: Iterable[list[str]]) -> Iterator[list[list[int]]]:
        return self._map(_encode_ids, chunks)

    def map_arrays(self, chunks: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self._map(_encode_arrays, chunks)

    def _map(self, fn: Callable, chunks: Iterable[list[str]]) -> Iterator:
        try:
            # Two chunks per worker keep every worker busy while the parent collects results.
            yield from ordered_map(lambda c: self._executor.submit(fn, c), chunks, 2 * self.workers)
        except BrokenProcessPool as exc:
            raise RuntimeError(f"an encoder worker process died ({exc}); see its output above") from exc

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
