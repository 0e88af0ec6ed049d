"""The corpus build as restartable stages that talk through files.

    plan      inputs → numbered shards with content hashes
    clean     per shard: read → rules → filters → candidates + rejected        (map)
    dedup     per shard signatures → per-partition buckets → clusters          (map-reduce)
    finalize  per shard: candidates minus duplicates → data/, rejected/        (map)
    manifest  counts per source and rule, input = kept + rejected checked

Every stage writes under `OUTPUT/_work/` with a completion marker written last, so a rerun
after a kill skips finished work and never reads a partial file. The orchestrator (the Prefect
flow, or `run_local`) only decides where each call runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections import Counter, defaultdict
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import fsspec
import pyarrow.parquet as pq

from cleaning import dedup
from cleaning.config import CorpusConfig
from cleaning.document import (KEPT_SCHEMA, REJECTED_SCHEMA, Document, Rejection, document_from_row,
                               kept_row, rejected_row)
from cleaning.inputs import InputShard, content_hash, expand_inputs, file_signature
from cleaning.pipeline import CleaningChain
from cleaning.readers import FieldMap, RecordReader, ShardReadError
from cleaning.stats import ShardStats
from cleaning.writers import ParquetShardWriter, read_json, remove_temporaries, write_json_atomic


class AccountingError(RuntimeError):
    """input ≠ kept + rejected for some source: a document went missing."""


def _hash_json(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("pangu-pipeline")
    except PackageNotFoundError:
        pkg = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{pkg}+{commit}" if commit else pkg


@dataclass
class CorpusBuild:
    """One corpus version. `work` (default `OUTPUT/_work`) holds the stage outputs; versions that
    share a work directory share every cleaned shard whose content and rules did not change."""

    inputs: Sequence[str]
    output: str
    config: CorpusConfig
    work: str | None = None

    def __post_init__(self) -> None:
        self.output = self.output.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.output)
        self.work = (self.work or f"{self.output}/_work").rstrip("/")

    # -- plan ------------------------------------------------------------------------------
    def clean_fingerprint(self) -> str:
        """What changes the clean stage's output: rules, per-source overrides, reader options."""
        cfg = self.config.model_dump(mode="json")
        return _hash_json({k: cfg[k] for k in ("rules", "sources", "reader")})

    def plan(self) -> list[InputShard]:
        cache_uri = f"{self.work}/input-hashes.json"
        cache: dict[str, dict[str, Any]] = read_json(cache_uri) if self._exists(cache_uri) else {}
        shards: list[InputShard] = []
        for index, (uri, error) in enumerate(expand_inputs(self.inputs)):
            if error:
                shards.append(InputShard(index, uri, "", 0, error))
                continue
            try:
                signature = file_signature(uri)
                cached = cache.get(uri)
                if cached and cached["signature"] == signature and ":" in signature and signature.split(":", 1)[1]:
                    digest, size = cached["hash"], cached["size"]
                else:
                    digest, size = content_hash(uri)
                    cache[uri] = {"signature": signature, "hash": digest, "size": size}
                shards.append(InputShard(index, uri, digest, size))
            except (OSError, ValueError) as err:
                shards.append(InputShard(index, uri, "", 0, f"unreadable: {type(err).__name__}: {err}"))
        write_json_atomic(cache_uri, cache)
        return shards

    def run_key(self, shards: Sequence[InputShard]) -> str:
        """Identity of one build: the config and the ordered input contents."""
        return _hash_json({"config": self.config.fingerprint(),
                           "inputs": [(s.uri, s.content_hash, s.error) for s in shards]})[:16]

    # -- paths -----------------------------------------------------------------------------
    def _exists(self, uri: str) -> bool:
        return self.fs.exists(fsspec.core.url_to_fs(uri)[1])

    def clean_dir(self, shard: InputShard) -> str:
        key = shard.content_hash[:24] if shard.content_hash else hashlib.sha256(shard.uri.encode()).hexdigest()[:24]
        return f"{self.work}/clean/{key}-{self.clean_fingerprint()[:12]}"

    def dedup_dir(self, run_key: str) -> str:
        return f"{self.work}/dedup/{run_key}"

    def final_marker(self, run_key: str, shard: InputShard) -> str:
        return f"{self.work}/final/{run_key}/part-{shard.index:05d}.json"

    # -- clean -----------------------------------------------------------------------------
    def clean(self, shard: InputShard) -> dict[str, Any]:
        """Stage 1 for one shard; returns its summary (read from the marker when already done)."""
        directory = self.clean_dir(shard)
        marker = f"{directory}/summary.json"
        if self._exists(marker):
            return {**read_json(marker), "skipped": True}
        remove_temporaries(directory)  # left by a worker killed mid-write
        started = time.perf_counter()
        chain = CleaningChain(self.config)
        error: str | None = shard.error
        errors: list[ShardReadError] = []
        records: Iterator[Document | Rejection] = iter(())
        if shard.error is None:
            records = self._guarded(self._reader().read(shard.uri), on_error=errors.append)
        with ParquetShardWriter(f"{directory}/candidates.parquet", KEPT_SCHEMA) as kept, \
                ParquetShardWriter(f"{directory}/rejected.parquet", REJECTED_SCHEMA) as rejected:
            for item in chain.run(records):
                if isinstance(item, Rejection):
                    rejected.write(rejected_row(item))
                else:
                    kept.write(kept_row(item))
        if errors:
            error = str(errors[0])
        summary = {
            "shard": shard.to_json(),
            "status": "ok" if error is None else ("unreadable" if not chain.counts.input else "truncated"),
            "error": error,
            "counts": chain.counts.to_json(),
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_json_atomic(marker, summary)
        return {**summary, "skipped": False}

    @staticmethod
    def _guarded(records: Iterator[Document | Rejection],
                 on_error: Callable[[ShardReadError], None]) -> Iterator[Document | Rejection]:
        """Ends the stream cleanly at a read error, so records already read are still processed."""
        try:
            yield from records
        except ShardReadError as err:
            on_error(err)

    def _reader(self) -> RecordReader:
        r = self.config.reader
        return RecordReader(fields=FieldMap(r.text_field, r.id_field, r.domain_field, r.source_field, r.url_field),
                            txt_split=r.txt_split, max_record_bytes=r.max_record_bytes)

    # -- dedup -----------------------------------------------------------------------------
    @property
    def dedup_enabled(self) -> bool:
        return self.config.dedup.exact or self.config.dedup.fuzzy

    def dedup_map(self, shard: InputShard, run_key: str) -> None:
        table = pq.read_table(self._open(f"{self.clean_dir(shard)}/candidates.parquet"), columns=["text"])
        texts = table.column("text").to_pylist()
        dedup.map_shard(self.dedup_dir(run_key), shard.index, texts, self.config.dedup)

    def dedup_reduce(self, partition: int, run_key: str) -> None:
        dedup.reduce_partition(self.dedup_dir(run_key), partition, self.config.dedup)

    def dedup_cluster(self, num_shards: int, run_key: str) -> dict[str, Any]:
        summary = dedup.cluster(self.dedup_dir(run_key), num_shards, self.config.dedup)
        return summary.to_json() if hasattr(summary, "to_json") else dict(vars(summary))

    def _open(self, uri: str):
        return fsspec.open(uri, "rb").open()

    # -- finalize --------------------------------------------------------------------------
    def finalize(self, shard: InputShard, shards: Sequence[InputShard], run_key: str) -> dict[str, Any]:
        """Stage 3: candidates minus duplicates → data/part-N; rejected (+ duplicates) → rejected/."""
        marker = self.final_marker(run_key, shard)
        if self._exists(marker):
            return {**read_json(marker), "skipped": True}
        clean = self.clean_dir(shard)
        duplicates = dedup.load_duplicates(self.dedup_dir(run_key), shard.index) if self.dedup_enabled else {}
        survivor_ids = self._survivor_ids(duplicates, shards)
        stats = ShardStats()
        dup_counts: dict[str, Counter] = defaultdict(Counter)
        kept_counts: Counter = Counter()
        name = f"part-{shard.index:05d}.parquet"
        with ParquetShardWriter(f"{self.output}/data/{name}", KEPT_SCHEMA) as kept, \
                ParquetShardWriter(f"{self.output}/rejected/dup-{shard.index:05d}.parquet", REJECTED_SCHEMA) as dups:
            row = 0
            for batch in pq.ParquetFile(self._open(f"{clean}/candidates.parquet")).iter_batches(batch_size=2048):
                for record in batch.to_pylist():
                    hit = duplicates.get(row)
                    if hit is None:
                        kept.write(record)
                        kept_counts[record["source"]] += 1
                        stats.add(document_from_row(record))
                    else:
                        survivor_shard, survivor_row, kind = hit
                        reason = f"{kind}_duplicate"
                        dup_counts[record["source"]][reason] += 1
                        dups.write(rejected_row(Rejection(
                            document_from_row(record), reason,
                            f"copy of shard {survivor_shard} row {survivor_row}",
                            dup_of=survivor_ids[(survivor_shard, survivor_row)])))
                    row += 1
        self.fs.copy(fsspec.core.url_to_fs(f"{clean}/rejected.parquet")[1],
                     fsspec.core.url_to_fs(f"{self.output}/rejected/{name}")[1])
        summary = {"kept": dict(kept_counts), "duplicates": {s: dict(c) for s, c in dup_counts.items()},
                   "stats": stats.to_json()}
        write_json_atomic(marker, summary)
        return {**summary, "skipped": False}

    def _survivor_ids(self, duplicates: dict[int, tuple[int, int, str]],
                      shards: Sequence[InputShard]) -> dict[tuple[int, int], str]:
        """Ids of the surviving documents, reading only the `id` column of the shards involved."""
        wanted: dict[int, set[int]] = defaultdict(set)
        for survivor_shard, survivor_row, _ in duplicates.values():
            wanted[survivor_shard].add(survivor_row)
        ids: dict[tuple[int, int], str] = {}
        for index, rows in wanted.items():
            column = pq.read_table(self._open(f"{self.clean_dir(shards[index])}/candidates.parquet"),
                                   columns=["id"]).column("id")
            for r in rows:
                ids[(index, r)] = column[r].as_py()
        return ids

    # -- manifest --------------------------------------------------------------------------
    def write_manifest(self, shards: Sequence[InputShard], cleaned: Sequence[dict[str, Any]],
                       finals: Sequence[dict[str, Any]], dedup_summary: dict[str, Any] | None,
                       run_key: str, seconds: float) -> dict[str, Any]:
        per_source: dict[str, dict[str, Any]] = {}

        def entry(source: str) -> dict[str, Any]:
            return per_source.setdefault(source, {"input": 0, "kept": 0, "rejected": Counter()})

        for summary in cleaned:
            counts = summary["counts"]
            for source, n in counts["input"].items():
                entry(source)["input"] += n
            for source, reasons in counts["rejected"].items():
                entry(source)["rejected"].update(reasons)
        for final in finals:
            for source, n in final["kept"].items():
                entry(source)["kept"] += n
            for source, reasons in final["duplicates"].items():
                entry(source)["rejected"].update(reasons)
        problems = []
        for source, e in per_source.items():
            rejected = sum(e["rejected"].values())
            if e["input"] != e["kept"] + rejected:
                problems.append(f"{source}: input {e['input']} ≠ kept {e['kept']} + rejected {rejected}")
        if problems:
            raise AccountingError("documents unaccounted for: " + "; ".join(problems))
        totals = {"input": sum(e["input"] for e in per_source.values()),
                  "kept": sum(e["kept"] for e in per_source.values())}
        totals["rejected"] = totals["input"] - totals["kept"]
        by_rule: Counter = Counter()
        for e in per_source.values():
            by_rule.update(e["rejected"])
        modified: Counter = Counter()
        for summary in cleaned:
            modified.update(summary["counts"]["modified"])
        manifest = {
            "version": run_key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "code_version": code_version(),
            "config_hash": self.config.fingerprint(),
            "config": self.config.model_dump(mode="json"),
            "inputs": [
                {**shard.to_json(), "status": summary["status"], "error": summary["error"],
                 "documents": sum(summary["counts"]["input"].values())}
                for shard, summary in zip(shards, cleaned)
            ],
            "totals": totals,
            "rejected_by_rule": dict(by_rule.most_common()),
            "sources": {s: {"input": e["input"], "kept": e["kept"], "rejected": dict(e["rejected"])}
                        for s, e in sorted(per_source.items())},
            "transforms_applied": dict(modified),
            "dedup": dedup_summary,
            "outputs": {
                "data": [f"data/part-{s.index:05d}.parquet" for s in shards],
                "rejected": [f"rejected/part-{s.index:05d}.parquet" for s in shards]
                + [f"rejected/dup-{s.index:05d}.parquet" for s in shards],
            },
            "seconds": round(seconds, 3),
        }
        stats = ShardStats.merge([f["stats"] for f in finals])
        write_json_atomic(f"{self.output}/stats.json", stats)
        write_json_atomic(f"{self.output}/manifest.json", manifest)
        self._remove_stale_outputs(shards)
        return manifest

    def _remove_stale_outputs(self, shards: Sequence[InputShard]) -> None:
        """Parts of an earlier build with more inputs would otherwise be read as part of this one."""
        expected = {f"part-{s.index:05d}.parquet" for s in shards} | {f"dup-{s.index:05d}.parquet" for s in shards}
        for folder in ("data", "rejected"):
            path = f"{self.root}/{folder}"
            if not self.fs.exists(path):
                continue
            for file in self.fs.ls(path, detail=False):
                if os.path.basename(file) not in expected:
                    self.fs.rm(file)


def run_local(build: CorpusBuild, executor: Executor | None = None,
              log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Runs every stage without an orchestrator (tests, benchmarks, library users)."""
    started = time.perf_counter()
    map_ = executor.map if executor is not None else map
    shards = build.plan()
    run_key = build.run_key(shards)
    log(f"{len(shards)} input shards, build {run_key}")
    cleaned = list(map_(build.clean, shards))
    dedup_summary = None
    if build.dedup_enabled:
        list(map_(build.dedup_map, shards, [run_key] * len(shards)))
        partitions = range(build.config.dedup.partitions)
        list(map_(build.dedup_reduce, partitions, [run_key] * len(partitions)))
        dedup_summary = build.dedup_cluster(len(shards), run_key)
    finals = list(map_(build.finalize, shards, [shards] * len(shards), [run_key] * len(shards)))
    return build.write_manifest(shards, cleaned, finals, dedup_summary, run_key, time.perf_counter() - started)
