"""A seeded uniform sample of a corpus's lines, read by any number of processes (SPEC §4).

Every non-blank line gets a key, uniform in [0, 1), drawn in reading order from a generator seeded by the
seed and the line's part (a shard's position in the sorted shard list; a plain iterable of documents is
part 0). The sample is the `size` lines with the smallest keys ("bottom-k"), a uniform sample without
replacement of all the lines. The smallest `size` keys of a union are the smallest `size` of the parts'
smallest `size`, so the shards can be read by any number of processes, in any grouping and order, and the
sample (in key order) is the same: a seed names one sample whatever the worker count.

The pass reads every document (hours at a terabyte on one process); each worker keeps one bottom-k over
the shards it claims, one at a time, from a counter they share, so what comes back to the parent is `workers × size` lines at
most, whatever the corpus size.
"""
from __future__ import annotations

import functools
import multiprocessing
import signal
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from cleaning.orphans import exit_with_parent
from tokenizer.corpus import count_documents, list_shards, shard_texts

Progress = Callable[[str], None]

# Documents between a reader's reports of how far it is (a shared counter, or the progress callback).
REPORT_EVERY_DOCUMENTS = 1024
# Lines keyed in one array: the keys are the same for any batching (the generator's doubles are).
KEY_BATCH_LINES = 16_384


def document_lines(texts: Iterable[str | None],
                   tick: Callable[[int, int], None] | None = None) -> Iterator[list[str]]:
    """The non-blank lines of each document of `texts` (None: a null document, skipped); `tick(documents,
    characters)` hears every REPORT_EVERY_DOCUMENTS documents and at the end."""
    documents = characters = 0
    for text in texts:
        if text is None:
            continue
        documents += 1
        characters += len(text)
        yield [line for line in text.split("\n") if line and not line.isspace()]
        if tick is not None and documents == REPORT_EVERY_DOCUMENTS:
            tick(documents, characters)
            documents = characters = 0
    if tick is not None and documents:
        tick(documents, characters)


def part_generator(seed: int, part: int) -> np.random.Generator:
    """The keys' generator of one part (PCG64 from the seed and the part: the same in every process). Its
    doubles come out the same whether drawn one at a time or in arrays of any length."""
    return np.random.default_rng([seed, part])


class BottomK:
    """The `size` lines with the smallest keys seen so far, and how many documents and lines were read.

    Lines whose key is below the threshold (the largest kept key, once `size` are kept) are appended to a
    buffer, which is cut back to the smallest `size` when it holds twice as many: a line costs a key and
    a comparison, in arrays of KEY_BATCH_LINES lines, not a heap operation in Python.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.key_parts: list[np.ndarray] = []  # the keys of `kept`, in arrays joined when cut
        self.kept: list[str] = []
        self.threshold = 1.0  # keys are in [0, 1): every line enters until `size` are kept
        self.documents = 0
        self.lines = 0

    def add_documents(self, texts: Iterable[str | None], rng: np.random.Generator,
                      tick: Callable[[int, int], None] | None = None) -> None:
        """Read `texts` (None: a null document, skipped), keying their lines with `rng` in order.
        `tick(documents, characters)` hears every REPORT_EVERY_DOCUMENTS documents."""
        batch: list[str] = []
        for lines in document_lines(texts, tick):
            self.documents += 1
            batch += lines
            if len(batch) >= KEY_BATCH_LINES:
                self._add_lines(batch, rng)
                batch = []
        self._add_lines(batch, rng)

    def _add_lines(self, lines: list[str], rng: np.random.Generator) -> None:
        self.lines += len(lines)
        keys = rng.random(len(lines))
        entering = np.flatnonzero(keys < self.threshold)
        if len(entering):
            self._append(keys[entering], [lines[i] for i in entering])

    def _append(self, keys: np.ndarray, lines: list[str]) -> None:
        self.key_parts.append(keys)
        self.kept += lines
        if len(self.kept) >= 2 * self.size:
            self.cut()

    def cut(self) -> None:
        """Keep the `size` smallest keys, and lower the threshold to the largest of them."""
        keys = np.concatenate(self.key_parts) if self.key_parts else np.empty(0)
        if len(self.kept) > self.size:
            smallest = np.argpartition(keys, self.size - 1)[:self.size]
            keys = keys[smallest]
            self.kept = [self.kept[i] for i in smallest]
        if len(self.kept) == self.size:
            self.threshold = float(keys.max())
        self.key_parts = [keys]

    def merge(self, other: BottomK) -> None:
        self._append(np.concatenate(other.key_parts) if other.key_parts else np.empty(0), other.kept)
        self.cut()
        self.documents += other.documents
        self.lines += other.lines

    def sample(self) -> list[str]:
        """The kept lines in key order (a random order)."""
        self.cut()
        return [self.kept[i] for i in np.argsort(self.key_parts[0], kind="stable")]

    def counts(self) -> dict[str, int]:
        return {"documents_read": self.documents, "lines_seen": self.lines}


def first_lines(texts: Iterable[str | None], size: int,
                tick: Callable[[int, int], None] | None = None) -> tuple[list[str], dict[str, int]]:
    """The first `size` non-blank lines (no shuffling), read only as far as they go."""
    sample: list[str] = []
    documents = 0
    for lines in document_lines(texts, tick):
        documents += 1
        sample += lines[:size - len(sample)]
        if len(sample) == size:
            break
    return sample, {"documents_read": documents, "lines_seen": len(sample)}


def sample_lines(texts: Iterable[str | None], size: int, shuffle: bool, seed: int,
                 progress: Progress | None = None, every_s: float = 60.0) -> tuple[list[str], dict[str, int]]:
    """Up to `size` non-blank lines of `texts` (one part; None: a null document, skipped), and how many
    documents and lines were read. `progress` hears a line every `every_s` seconds."""
    tick = SamplingProgress(progress, lambda: None, every_s).add if progress is not None else None
    if not shuffle:
        return first_lines(texts, size, tick)
    kept = BottomK(size)
    kept.add_documents(texts, part_generator(seed, 0), tick)
    return kept.sample(), kept.counts()


def document_limits(shards: list[str], max_documents: int | None) -> list[int | None]:
    """How many documents of each shard a pass reads that stops after `max_documents` in shard order
    (None: all of them); the shards' row counts come from their Parquet footers."""
    if max_documents is None:
        return [None] * len(shards)
    limits: list[int | None] = []
    left = max_documents
    for shard in shards:
        limits.append(min(left, count_documents(shard)) if left else 0)
        left -= limits[-1] or 0
    return limits


def read_parts(parts: Iterable[tuple[int, str, int | None]], text_field: str, size: int, seed: int,
               tick: Callable[[int, int], None] | None) -> BottomK:
    """One reader's bottom-k over the shards `(position, shard, limit)` it is given."""
    kept = BottomK(size)
    for position, shard, limit in parts:
        kept.add_documents(shard_texts(shard, text_field, limit), part_generator(seed, position), tick)
    return kept


# The counters a sampling worker process shares with the parent (set by _init_worker): documents and characters
# read, the next part to claim, and a stop flag the readers look at every report.
DOCUMENTS, CHARACTERS, NEXT, STOP = range(4)
_COUNTERS: Any = None


def _init_worker(counters: Any) -> None:
    global _COUNTERS
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool on Ctrl-C
    exit_with_parent()
    _COUNTERS = counters


class _Stopped(Exception):
    """The parent asked the readers to stop (another reader failed, or the pass was interrupted)."""


def _claimed_parts(parts: list[tuple[int, str, int | None]]) -> Iterator[tuple[int, str, int | None]]:
    """The parts this reader claims, one at a time, until none is left (or the parent says stop): the readers
    share them out as they go, whatever their sizes. (A queue filled up front blocked the parent once its
    pipe held 64 KiB of parts: some hundreds of shards.)"""
    while True:
        with _COUNTERS.get_lock():
            if _COUNTERS[STOP] or _COUNTERS[NEXT] >= len(parts):
                return
            claimed = _COUNTERS[NEXT]
            _COUNTERS[NEXT] += 1
        yield parts[claimed]


def _count(documents: int, characters: int) -> None:
    with _COUNTERS.get_lock():
        _COUNTERS[DOCUMENTS] += documents
        _COUNTERS[CHARACTERS] += characters
        if _COUNTERS[STOP]:
            raise _Stopped


def _read_claimed(parts: list[tuple[int, str, int | None]], text_field: str, size: int, seed: int) -> BottomK:
    kept = read_parts(_claimed_parts(parts), text_field, size, seed, _count)
    kept.cut()  # what goes back to the parent: `size` lines at most
    return kept


class SamplingProgress:
    """A progress line every `every_s` seconds: documents and characters read, of how many documents (asked
    of `total` when the first line is due, so that a short pass costs nothing)."""

    def __init__(self, progress: Progress, total: Callable[[], int | None], every_s: float) -> None:
        self.progress, self.total, self.every_s = progress, functools.cache(total), every_s  # asked once
        self.began = self.last = time.monotonic()
        self.documents = self.characters = 0

    def add(self, documents: int, characters: int) -> None:
        self.documents += documents
        self.characters += characters
        self.maybe_report()

    def set(self, documents: int, characters: int) -> None:
        self.documents, self.characters = documents, characters
        self.maybe_report()

    def maybe_report(self) -> None:
        if time.monotonic() - self.last < self.every_s:
            return
        of = self.total()
        share, percent = (f" of {of:,}", f" ({100 * self.documents / of:.1f} %)") if of else ("", "")
        self.last = time.monotonic()
        self.progress(f"sampling lines: {self.documents:,}{share} documents read{percent}, "
                      f"{self.characters:,} characters, {self.last - self.began:.0f} s")


def sample_corpus(corpus: str, text_field: str, size: int, shuffle: bool, seed: int, workers: int = 1,
                  max_documents: int | None = None, progress: Progress | None = None,
                  every_s: float = 60.0) -> tuple[list[str], dict[str, int]]:
    """The seeded bottom-k sample of the corpus's lines (the first `max_documents` documents only, where
    given), read by `workers` processes, and how many documents and lines were read; without `shuffle`, the
    first `size` lines, read in order by this process. `progress` hears a line every `every_s` seconds."""
    shards = list_shards(corpus)
    limits = document_limits(shards, max_documents)
    parts = [(position, shard, limit) for position, (shard, limit) in enumerate(zip(shards, limits)) if limit != 0]

    def total() -> int | None:
        try:
            return sum(limit if limit is not None else count_documents(shard) for _, shard, limit in parts)
        except (OSError, ValueError):
            return None  # a damaged shard: the pass itself stops at it and names it

    reporter = SamplingProgress(progress or (lambda message: None), total, every_s)
    if not shuffle:
        documents = (text for _, shard, limit in parts for text in shard_texts(shard, text_field, limit))
        return first_lines(documents, size, reporter.add)
    workers = max(1, min(workers, len(parts)))
    if workers == 1:
        kept = read_parts(parts, text_field, size, seed, reporter.add)
        return kept.sample(), kept.counts()

    context = multiprocessing.get_context("spawn")
    counters = context.Array("q", 4)
    kept = BottomK(size)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(counters,)) as pool:
        pending = {pool.submit(_read_claimed, parts, text_field, size, seed) for _ in range(workers)}
        try:
            while pending:
                done, pending = wait(pending, timeout=min(max(every_s, 0.5), 5.0), return_when=FIRST_EXCEPTION)
                for future in done:
                    kept.merge(future.result())  # a damaged shard's CorpusError is raised here
                reporter.set(counters[DOCUMENTS], counters[CHARACTERS])
        except BaseException:
            counters[STOP] = 1  # the other readers would go on through the parts; the pool waits for them
            raise
    return kept.sample(), kept.counts()


__all__ = ["BottomK", "sample_corpus", "sample_lines", "first_lines", "document_limits"]
