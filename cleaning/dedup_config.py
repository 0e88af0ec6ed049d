"""The configuration of exact and MinHash-LSH deduplication (`cleaning.dedup`, `cleaning.dedup_index`).

Its own module so that `cleaning.config` and `cleaning.minhash` can import it without the
map-reduce (and the map-reduce without them): it depends on pydantic and xxhash only.
"""
from __future__ import annotations

from typing import Literal

import xxhash
from pydantic import BaseModel, ConfigDict, Field, field_validator

#: what a survivor can be ranked by (see DedupConfig.survivor_order)
SurvivorKey = Literal["priority", "quality", "length"]
#: the fields that only choose survivors: signatures, bucket records and pairs do not depend on them
SURVIVOR_FIELDS = frozenset({"survivor_order", "source_priority"})
#: the fields that only say how the stages work (memory, I/O), never what they produce: left out of
#: both fingerprints, so changing them reuses every cached output
RUNTIME_FIELDS = frozenset({"reduce_block_records"})
#: quality of a document the quality classifier did not score: P(high quality) = 0.5, no opinion
NEUTRAL_QUALITY = 0.5
# Bumped when the map stage's files change, so that cache entries of another layout are not reused.
# 3: bucket files sorted by key (the reduce merges them block by block). 4: one permutation hashing
# (minhash.py), other signature values.
_MAP_LAYOUT = 4


class DedupConfig(BaseModel):
    """Defaults, and why (S-curve arithmetic; J = Jaccard of the character n-gram sets).

    ngram=3: measured on CLUE text (csl abstracts, iflytek descriptions, documents >= 50 chars),
    5 % random character edits give J 0.76 on average (10th percentile 0.72) with 3-grams but only
    0.64 (0.59) with 5-grams, while template-like unrelated documents (app descriptions sharing a
    boilerplate sentence) reach at most ~0.5 with 3-grams. 3-grams leave the widest gap between
    "edited copy" and "related but different", which is what recall and zero false positives need.

    bands=25 x rows_per_band=5 (125 signature values, the bins of one permutation: minhash.py): a
    pair becomes a candidate with probability
    1 - (1 - J^5)^25:
        J    0.1      0.2    0.3    0.4    0.5    0.6    0.65   0.7    0.75   0.8
        P    0.0002   0.008  0.059  0.23   0.55   0.87   0.954  0.990  0.999  1.000
    so edited copies (J >= 0.7) are candidates 99 % of the time and unrelated documents
    (J <= 0.1) almost never, which keeps the reduce work small. More rows per band would cut recall
    at J 0.7 (6 rows: 0.95 with 25 bands); fewer (4 rows) multiplies the candidates from unrelated
    pairs by ~10 at J 0.1-0.2, and at 10^8 documents those pairs dominate the reduce.

    threshold=0.6: a candidate is confirmed when the estimated J (fraction of equal signature
    values, standard error sqrt(J(1-J)/125) ~ 0.04) is >= 0.6: an edited copy at J 0.7 passes with
    probability 0.993, a template pair at J 0.5 with 0.013, an unrelated pair at J <= 0.3 never
    (> 7 standard errors).

    Survivors: the survivor of a cluster is its best-ranked member. The rank compares the keys of
    `survivor_order` in turn, higher wins: "priority" (`source_priority` of the document's source,
    0 for a source not listed), "quality" (the quality classifier's score, the `quality` column;
    NEUTRAL_QUALITY when it did not score the document), "length" (characters after the dedup
    normalisation, so the copies of an exact cluster tie on it); then (shard, row) order, i.e.
    input path order then row, so the result is deterministic. An empty list is path order alone.
    """

    model_config = ConfigDict(extra="forbid")

    exact: bool = True
    fuzzy: bool = True
    ngram: int = Field(3, ge=1, le=64, description="character n-gram length of the shingles")
    bands: int = Field(25, ge=1)
    rows_per_band: int = Field(5, ge=1)
    threshold: float = Field(0.6, ge=0.0, le=1.0,
                             description="estimated Jaccard that confirms an LSH candidate pair")
    # 16 partitions keep one reduce at ~1/16 of the band records; raise it with the corpus so that
    # a partition (docs x (bands + 1) / partitions x 16 bytes) fits in a worker's memory.
    partitions: int = Field(16, ge=1, description="bucket partitions of the reduce stage")
    seed: int = 1234
    # Not part of the fingerprints (RUNTIME_FIELDS): any value gives the same files and results.
    reduce_block_records: int = Field(
        1 << 20, ge=1,
        description="bucket records a reduce holds at once: it walks the partition's sorted bucket files "
                    "in ascending key ranges of about this many records (a bucket is never split, so one "
                    "larger bucket makes a larger block); memory is this plus a few thousand records "
                    "per open file, whatever the corpus size")
    survivor_order: list[SurvivorKey] = Field(
        default_factory=lambda: ["priority", "quality", "length"],
        description="what ranks the members of a cluster, most important first (higher wins); "
                    "ties, and an empty list, fall back to input path order, then row")
    source_priority: dict[str, int] = Field(
        default_factory=dict,
        description="source name -> priority for survivor_order's 'priority' (higher wins; a source "
                    "not listed has 0), e.g. {baike: 2, books: 1} keeps the encyclopedia over a web copy")

    @field_validator("survivor_order")
    @classmethod
    def _distinct(cls, order: list[str]) -> list[str]:
        if len(set(order)) != len(order):
            raise ValueError(f"survivor_order names a key twice: {order}")
        return order

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows_per_band

    def fingerprint(self) -> str:
        """Identifies the duplicates and survivors a configuration produces; a rerun with another
        one must not mix. The runtime fields (RUNTIME_FIELDS) are left out: they change no output."""
        return xxhash.xxh64_hexdigest(self.model_dump_json(exclude=set(RUNTIME_FIELDS)).encode())

    def pairs_fingerprint(self) -> str:
        """Identifies what the map and reduce stages produce (signatures, exact keys, per-document
        rank facts, bucket records, confirmed pairs): every field but the survivor rule, so a change
        of priorities re-ranks the clusters without hashing a document again."""
        fields = self.model_dump_json(exclude=set(SURVIVOR_FIELDS | RUNTIME_FIELDS))
        return xxhash.xxh64_hexdigest(f"{_MAP_LAYOUT}:{fields}".encode())
