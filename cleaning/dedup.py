"""Exact and MinHash-LSH deduplication as a multi-stage map-reduce (see DedupConfig)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact: bool = True
    fuzzy: bool = True
    ngram: int = Field(5, ge=1, le=64, description="character n-gram length of the shingles")
    bands: int = Field(20, ge=1)
    rows_per_band: int = Field(5, ge=1)
    threshold: float = Field(0.6, ge=0.0, le=1.0,
                             description="estimated Jaccard that confirms an LSH candidate pair")
    partitions: int = Field(16, ge=1, description="bucket partitions of the reduce stage")
    seed: int = 1234

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows_per_band
