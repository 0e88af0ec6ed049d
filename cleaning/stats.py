"""Corpus statistics kept apart from decisions: distributions per domain, cheap to merge."""
from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

from cleaning.document import Document

# Upper bounds (characters) of the length histogram; the last bucket is open.
LENGTH_BOUNDS = [150, 300, 600, 1_200, 2_500, 5_000, 10_000, 20_000, 50_000]
QUALITY_BINS = 10


def length_bucket_labels() -> list[str]:
    labels, low = [], 0
    for high in LENGTH_BOUNDS:
        labels.append(f"{low}-{high - 1}")
        low = high
    labels.append(f"{low}+")
    return labels


class ShardStats:
    def __init__(self) -> None:
        self.documents: Counter = Counter()  # domain → documents
        self.characters: Counter = Counter()  # domain → characters
        self.lengths: dict[str, list[int]] = defaultdict(lambda: [0] * (len(LENGTH_BOUNDS) + 1))
        self.quality: list[int] = [0] * QUALITY_BINS

    def add(self, doc: Document) -> None:
        n = len(doc.text)
        self.documents[doc.domain] += 1
        self.characters[doc.domain] += n
        self.lengths[doc.domain][bisect.bisect_right(LENGTH_BOUNDS, n)] += 1
        if doc.quality is not None:
            self.quality[min(int(doc.quality * QUALITY_BINS), QUALITY_BINS - 1)] += 1

    def add_many(self, domains: Sequence[str], lengths: np.ndarray, quality: np.ndarray) -> None:
        """`add` for many documents at once: their domains, lengths in characters, and quality
        scores (NaN where a document has none)."""
        buckets = np.searchsorted(LENGTH_BOUNDS, lengths, side="right")
        domain_array = np.asarray(domains, dtype=object)
        for domain in dict.fromkeys(domains):
            mine = domain_array == domain
            self.documents[domain] += int(mine.sum())
            self.characters[domain] += int(lengths[mine].sum())
            histogram = np.bincount(buckets[mine], minlength=len(LENGTH_BOUNDS) + 1)
            self.lengths[domain] = [a + int(b) for a, b in zip(self.lengths[domain], histogram)]
        scored = quality[~np.isnan(quality)].astype(np.float64)
        bins = np.minimum((scored * QUALITY_BINS).astype(np.int64), QUALITY_BINS - 1)
        self.quality = [a + int(b) for a, b in zip(self.quality, np.bincount(bins, minlength=QUALITY_BINS))]

    def to_json(self) -> dict[str, Any]:
        return {"documents": dict(self.documents), "characters": dict(self.characters),
                "length_histogram": dict(self.lengths), "quality_histogram": list(self.quality)}

    @staticmethod
    def merge(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
        documents: Counter = Counter()
        characters: Counter = Counter()
        lengths: dict[str, list[int]] = defaultdict(lambda: [0] * (len(LENGTH_BOUNDS) + 1))
        quality = [0] * QUALITY_BINS
        for part in parts:
            documents.update(part["documents"])
            characters.update(part["characters"])
            for domain, hist in part["length_histogram"].items():
                lengths[domain] = [a + b for a, b in zip(lengths[domain], hist)]
            quality = [a + b for a, b in zip(quality, part["quality_histogram"])]
        total_docs = sum(documents.values())
        return {
            "documents": total_docs,
            "characters": sum(characters.values()),
            "domains": {
                domain: {"documents": documents[domain], "characters": characters[domain],
                         "share_of_characters": round(characters[domain] / max(1, sum(characters.values())), 4),
                         "mean_length": round(characters[domain] / max(1, documents[domain]), 1)}
                for domain in sorted(documents)
            },
            "length_buckets": length_bucket_labels(),
            "length_histogram": dict(lengths),
            "quality_bins": [f"{i / QUALITY_BINS:.1f}-{(i + 1) / QUALITY_BINS:.1f}" for i in range(QUALITY_BINS)],
            "quality_histogram": quality,
        }
