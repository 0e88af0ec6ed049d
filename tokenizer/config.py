"""Typed configurations of the tokenizer stage: training, packing, and the training-row dataset.

Each is one pydantic object, the same one a Prefect flow takes as its parameter (SPEC §2).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def local_directory(value: str) -> str:
    """A local path given as a path or a `file://` URI, as the path; another scheme is refused: the tokenizer
    stage writes local files (a `file://` output used to train for minutes, then fail naming `file:/...`)."""
    if value.startswith("file://"):
        return value.removeprefix("file://")
    if "://" in value:
        raise ValueError(f"{value} is not a local path: the tokenizer stage writes local files (write them to a "
                         f"local directory, then copy it)")
    return value


# sentencepiece trainer threads: every command and flow trains with this many, so that one corpus and one set
# of options make one model on any machine (the thread count changes the model; see `fingerprint`).
DEFAULT_TRAINER_THREADS = 2


class TokenizerTrainConfig(BaseModel):
    """sentencepiece on a jieba-segmented sample of the corpus (SPEC §4)."""

    model_config = ConfigDict(extra="forbid")

    input: str | None = Field(None, description="corpus version dir (DIR/data/part-*.parquet); None when texts are passed in")
    output: str = Field(..., description="the tokenizer version dir to create, e.g. tokenizer/v1")
    text_field: str = "text"
    model_type: Literal["unigram", "bpe"] = Field("unigram", description="the PanGu-α release is unigram; the paper says BPE")
    vocab_size: int = Field(40_000, gt=10, le=65_536, description="≤ 65,536 so ids fit the uint16 token shards")
    character_coverage: float = Field(0.9995, ge=0.98, le=1.0, description="sentencepiece takes 0.98 to 1")
    normalization_rule_name: str = "nmt_nfkc"
    byte_fallback: bool = False
    # Sampling happens before jieba (the slow part), over the lines of the input documents.
    input_sentence_size: int = Field(1_000_000, ge=1, description="lines sampled for training")
    shuffle_input_sentence: bool = Field(True, description="a seeded uniform sample of lines (any workers); False: the first")
    max_input_documents: int | None = Field(None, ge=1, description="read at most this many documents")
    seed: int = 1234
    max_sentence_length: int = Field(16_384, ge=256, description="bytes; longer lines are cut at jieba word boundaries")
    max_sentencepiece_length: int = Field(16, ge=1)
    split_digits: bool = False
    num_threads: int = Field(DEFAULT_TRAINER_THREADS, ge=1, description="sentencepiece trainer threads (they "
                             "change the model: part of the fingerprint)")
    workers: int = Field(1, ge=1, description="processes for the sampling pass and jieba")
    trainer_options: dict[str, Any] = Field(default_factory=dict, description="extra sentencepiece trainer flags")
    overwrite: bool = Field(False, description="replace an existing tokenizer made with another config")
    verbose: bool = False

    @field_validator("output")
    @classmethod
    def _output_is_local(cls, value: str) -> str:
        return local_directory(value)

    @field_validator("input")
    @classmethod
    def _input_as_a_path_where_local(cls, value: str | None) -> str | None:
        return value.removeprefix("file://") if value else value  # one corpus, one fingerprint

    def fingerprint(self) -> str:
        """Hash of what determines the model (not where it goes, or how many processes sample and segment).

        sentencepiece's thread count does determine it (its unigram trainer sums each thread's part of the
        corpus, and float sums depend on the grouping: 1, 2 and 4 threads give three models, each the same
        on every run). The default is left out of the payload, so the fingerprints of tokenizers trained
        before it counted stand.
        """
        payload = self.model_dump(exclude={"output", "num_threads", "workers", "overwrite", "verbose"})
        if self.num_threads != DEFAULT_TRAINER_THREADS:
            payload["num_threads"] = self.num_threads
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class PackConfig(BaseModel):
    """Corpus Parquet shards → indexed uint16 token shards with a domain id per document."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(..., description="corpus version dir (DIR/data/part-*.parquet)")
    output: str = Field(..., description="local directory for part-NNNNN.{bin,idx,domains.npy,done.json}, domains.json")
    tokenizer: str = Field(..., description="tokenizer dir or .model file")
    text_field: str = "text"
    domain_field: str = "domain"
    default_domain: str = Field("unknown", description="domain of documents whose domain is null or empty")
    domain_ids: dict[str, int] | None = Field(
        None, description="fixed name → id map (e.g. to match a PanGu-Σ model); new names get the next free ids"
    )
    workers: int = Field(1, ge=1, description="encoder processes")
    batch_rows: int = Field(1024, ge=1, description="Parquet rows read at a time")
    chunk_chars: int = Field(256_000, ge=1, description="characters per worker chunk")
    force: bool = Field(False, description="re-pack shards even when their outputs are current")

    @field_validator("output", "tokenizer")
    @classmethod
    def _local(cls, value: str) -> str:
        return local_directory(value)

    @field_validator("input")
    @classmethod
    def _input_as_a_path_where_local(cls, value: str) -> str:
        return value.removeprefix("file://")
