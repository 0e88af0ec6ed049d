"""The corpus build as restartable stages that talk through files.

    plan      inputs → numbered shards with content hashes
    clean     per shard: read → rules → filters → candidates + rejected + id keys (map)
    dedup     per shard signatures → per-partition buckets → clusters          (map-reduce)
    finalize  per shard: candidates minus duplicates → data and duplicates files  (map)
    manifest  input = kept + rejected checked against the rows in the Parquet footers; only then
              are the files linked into OUTPUT and manifest.json written last

Every stage writes under the work directory (`OUTPUT/_work/`, or a versioned root's shared
`ROOT/_work/`) with a completion marker written last, so a rerun after a kill skips finished work
and never reads a partial file. The work directory is a cache keyed by content, shared by every
version built there:

    clean/<input content, name, rules>/     candidates, rejected, ids (the clean stage)
    minhash/<cleaned content, dedup config>/ signatures and bucket records (cleaning.dedup_index)
    index/                                   the versions' dedup indexes (cleaning.dedup_index)
    kept/<cleaned content, duplicate rows>/  a shard's data file
    dups/<cleaned content, duplicates>/      a shard's duplicates file

so a version whose shard did not change, and whose duplicates did not change, finds all of that
shard's files made. Publishing links each file into OUTPUT (`writers.link_or_copy`: a hard link
on a local file system, so versions share unchanged shards' bytes; a copy on object stores).
Nothing reaches OUTPUT before the accounting check passes: a failed check publishes nothing and
leaves an earlier build there as it was. The orchestrator (the Prefect flow, or `run_local`) only
decides where each call runs.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import time
from array import array
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from cleaning import dedup, dedup_index, ids
from cleaning.config import CorpusConfig
from cleaning.document import (KEPT_SCHEMA, REJECTED_SCHEMA, Document, Rejection, document_from_row,
                               kept_row, rejected_row)
from cleaning.inputs import (InputShard, content_hash, expand_inputs, file_signature, hash_and_split, input_names,
                             describe_unsupported, require_some_input, unsupported_summary)
from cleaning.pipeline import CleaningChain
from cleaning.readers import READER_REVISION, FieldMap, ReadFault, RecordReader, ShardReadError, shard_name
from cleaning.stats import ShardStats
from cleaning.temporaries import remove_orphaned_temporaries
from cleaning.writers import ParquetShardWriter, link_or_copy, read_json, write_json_atomic


class AccountingError(RuntimeError):
    """input ≠ kept + rejected for some source or shard: a document went missing."""


MAX_FAULTS = 20  # fault messages kept per input in the summary and manifest (all are counted)


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
    share a work directory share every cleaned shard, signature and final shard whose content did
    not change. `previous` is an earlier version's OUTPUT (built in the same work directory) whose
    dedup index this build extends, so that only new documents are looked up; by default OUTPUT
    itself, when it holds a version. Files under OUTPUT, `work`, `previous` and `exclude` (the directory of
    a corpus's versions, a pipeline's root) are never read as input, where an input directory holds them."""

    inputs: Sequence[str]
    output: str
    config: CorpusConfig
    work: str | None = None
    previous: str | None = None
    exclude: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.output = self.output.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.output)
        self.work = (self.work or f"{self.output}/_work").rstrip("/")
        self.previous = (self.previous or self.output).rstrip("/")
        self.unsupported: list[str] = []  # files the inputs hold that no reader takes (`list_inputs`)
        self.own_files: list[str] = []  # files an input directory holds under this build's outputs: not read

    # -- plan ------------------------------------------------------------------------------
    def remove_leftovers(self) -> list[str]:
        """The temporary files a killed build left in OUTPUT and the work directory. A rerun does
        not redo every piece of work that was killed (a cache entry may since have been finished by
        another shard or version), so the driver removes them before the stages start."""
        roots = [self.output] + ([] if self.work.startswith(self.output + "/") else [self.work])
        return [p for root in roots for p in remove_orphaned_temporaries(root)]

    def clean_fingerprint(self) -> str:
        """What changes the clean stage's output: rules, per-source overrides, reader options, and how the
        readers read (`READER_REVISION`: a cleaned shard cached by an older reader is read again)."""
        cfg = self.config.model_dump(mode="json")
        return _hash_json({**{k: cfg[k] for k in ("rules", "sources", "reader")}, "reader_revision": READER_REVISION})

    def list_inputs(self) -> list[tuple[str, str | None, str]]:
        """(uri, error, name) of every input file, in order: a listing only, which the driver does.
        Raises FileNotFoundError when no input is found at all (`inputs.require_some_input`)."""
        unsupported: list[str] = []
        own: list[str] = []
        outputs = [root for root in (self.output, self.work, self.previous, *self.exclude) if root]
        entries = expand_inputs(self.inputs, unsupported=unsupported, exclude=outputs, excluded=own)
        self.unsupported = sorted(unsupported)
        self.own_files = sorted(set(own))
        require_some_input(self.inputs, entries)
        names = input_names(self.inputs, entries, earlier=self.earlier_names())
        return [(uri, error, names[uri]) for uri, error in entries]

    def hash_input(self, uri: str) -> dict[str, Any]:
        """Content hash, size and parts of one input file (`inputs.hash_and_split`): the plan's
        task that reads the whole file. Cached in `inputs/` by the file's size and modification time
        (or ETag), so a rerun or a refresh reads only new or changed files."""
        shard_bytes = self.config.shard_bytes
        try:
            cached = self.cached_input(uri)
            if cached is not None:
                return cached
            signature = file_signature(uri)
            digest, size, parts = hash_and_split(uri, shard_bytes)
        except (OSError, ValueError, ShardReadError) as err:
            why = str(err) if isinstance(err, ShardReadError) else f"{type(err).__name__}: {err}"  # names the file
            return {"uri": uri, "error": why}
        found = {"uri": uri, "signature": signature, "shard_bytes": shard_bytes, "hash": digest, "size": size,
                 "parts": [list(part) for part in parts]}
        write_json_atomic(f"{self.work}/{self.input_entry(uri)}", found)
        return found

    def cached_input(self, uri: str) -> dict[str, Any] | None:
        """What `hash_input` found for `uri` when the file has not changed since (same size and
        modification time or ETag, same shard size); None otherwise. A stat and a small read."""
        cache = f"{self.work}/{self.input_entry(uri)}"
        try:
            signature = file_signature(uri)
            cached = read_json(cache) if self._exists(cache) else {}
        except (OSError, ValueError):
            return None
        fresh = (cached.get("uri"), cached.get("signature"), cached.get("shard_bytes")) == \
            (uri, signature, self.config.shard_bytes) and signature.split(":", 1)[1]
        return cached if fresh else None

    @staticmethod
    def input_entry(uri: str) -> str:
        """The cache entry of an input file's hash and parts, under the work directory."""
        return f"inputs/{xxhash.xxh3_64_hexdigest(uri.encode())}.json"

    @staticmethod
    def shards(listed: Sequence[tuple[str, str | None, str]], hashed: dict[str, dict[str, Any]]) -> list[InputShard]:
        """The build's shards: one per input file, or one per part of a file larger than the shard
        size; `hashed` maps the uri of every input that was found to what `hash_input` returned."""
        shards: list[InputShard] = []
        for uri, error, name in listed:
            found = hashed.get(uri, {})
            error = error or found.get("error")
            if error:
                shards.append(InputShard(len(shards), uri, "", 0, error, name))
                continue
            for part in found["parts"] or [None]:
                shards.append(InputShard(len(shards), uri, found["hash"], found["size"] if part is None else part[3],
                                         name=name, part=None if part is None else tuple(part)))
        return shards

    def plan(self) -> list[InputShard]:
        """`list_inputs`, `hash_input` for each, `shards`: the plan in this process."""
        listed = self.list_inputs()
        return self.shards(listed, {uri: self.hash_input(uri) for uri, error, _ in listed if not error})

    def run_key(self, shards: Sequence[InputShard]) -> str:
        """Identity of one build: the config and the ordered input contents and names (ids)."""
        return _hash_json({"config": self.config.fingerprint(),
                           "inputs": [(s.uri, s.name, s.content_hash, s.error) + ((s.part,) if s.part else ())
                                      for s in shards]})[:16]

    # -- paths -----------------------------------------------------------------------------
    def _exists(self, uri: str) -> bool:
        return self.fs.exists(fsspec.core.url_to_fs(uri)[1])

    def clean_dir(self, shard: InputShard) -> str:
        """Keyed by content and name (the name is in every generated id the shard holds), part, and the source
        and domain its documents take when they name none (`shard_name`: a `part-00000.jsonl` takes its
        folder's name, which its relative name need not hold)."""
        key = _hash_json([shard.content_hash or shard.uri, shard.name, shard_name(shard.uri)]
                         + ([list(shard.part)] if shard.part else []))[:24]
        return f"{self.work}/clean/{key}-{self.clean_fingerprint()[:12]}"

    def relative(self, uri: str) -> str:
        """A path under the work directory, as manifests record it."""
        return uri[len(self.work) + 1:]

    @staticmethod
    def outputs(shard: InputShard) -> dict[str, str]:
        """What a shard publishes: file name in the work directory → path under OUTPUT."""
        return {"data.parquet": f"data/part-{shard.index:05d}.parquet",
                "rejected.parquet": f"rejected/part-{shard.index:05d}.parquet",
                "duplicates.parquet": f"rejected/dup-{shard.index:05d}.parquet"}

    def previous_manifest(self) -> dict[str, Any] | None:
        uri = f"{self.previous}/manifest.json"
        return read_json(uri) if self._exists(uri) else None

    def earlier_names(self) -> dict[str, str]:
        """The name each input of the previous version had (uri → name), which it keeps in this one."""
        return {entry["uri"]: entry["name"] for entry in (self.previous_manifest() or {}).get("inputs", [])
                if entry.get("name")}

    # -- clean -----------------------------------------------------------------------------
    def clean(self, shard: InputShard) -> dict[str, Any]:
        """Stage 1 for one shard; returns its summary (read from the marker when already done)."""
        directory = self.clean_dir(shard)
        marker = f"{directory}/summary.json"
        if self._exists(marker):
            return {**read_json(marker), "skipped": True}
        # Left by a worker killed mid-write; not another build's, which may be cleaning the same content now
        remove_orphaned_temporaries(directory)
        started = time.perf_counter()
        chain = CleaningChain(self.config)
        error: str | None = shard.error
        errors: list[ShardReadError] = []
        faults: list[ReadFault] = []
        records: Iterator[Document | Rejection] = iter(())
        if shard.error is None:
            records = self._guarded(self._reader().read(shard.uri, name=shard.name or None, part=shard.part),
                                    on_error=errors.append, on_fault=faults.append)
        keys = array("Q")  # the id key of every record, for the check that ids are unique
        candidates = _Candidates() if self.dedup_enabled else None
        with ParquetShardWriter(f"{directory}/candidates.parquet", KEPT_SCHEMA) as kept, \
                ParquetShardWriter(f"{directory}/rejected.parquet", REJECTED_SCHEMA) as rejected:
            for item in chain.run(records):
                if isinstance(item, Rejection):
                    row = rejected_row(item)
                    rejected.write(row)
                else:
                    row = kept_row(item)
                    kept.write(row)
                    if candidates is not None:
                        candidates.add(row)
                keys.append(ids.id_key(row["id"]))
        ids.save_keys(f"{directory}/ids.npy", keys)
        if errors:
            error = str(errors[0])
        elif faults:
            error = f"{len(faults)} unreadable part(s): " + "; ".join(str(f) for f in faults[:3])
        read = sum(chain.counts.input.values())
        cleaned_hash = content_hash(f"{directory}/candidates.parquet")[0]
        summary = {
            "shard": shard.to_json(),
            "status": ("unreadable" if shard.error is not None or (errors and not read and not faults)
                       else "truncated" if errors else "damaged" if faults else "ok"),
            "error": error,
            "unreadable": {"parts": len(faults), "rows": sum(f.rows for f in faults),
                           "bytes": sum(f.bytes for f in faults),
                           "faults": [str(f) for f in faults[:MAX_FAULTS]]},
            "counts": chain.counts.to_json(),
            # what the signatures and final shards are keyed by: the cleaned documents themselves
            "cleaned_hash": cleaned_hash,
            # documents signed here (None: not signed here, the dedup-map stage signs or finds them)
            "signed_documents": self._sign(cleaned_hash, candidates) if candidates is not None else None,
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_json_atomic(marker, summary)
        return {**summary, "skipped": False}

    def _sign(self, cleaned_hash: str, candidates: "_Candidates") -> int | None:
        """Signs the shard's candidates while they are still in memory, so that the dedup-map stage
        finds them signed and does not read the shard back: the documents signed, or None when a
        version had signed this content already (the signatures are cached by it)."""
        entry = dedup_index.minhash_entry(cleaned_hash, self.config.dedup)
        if dedup_index.signed_documents(self.work, entry) is not None:
            return None
        dedup_index.sign_shard(self.work, entry, candidates.texts, self.config.dedup, candidates.sources,
                               candidates.qualities)
        return len(candidates.texts)

    def cleaned_hash(self, shard: InputShard) -> str:
        """Content hash of the shard's cleaned candidates (added to a marker written before it existed)."""
        marker = f"{self.clean_dir(shard)}/summary.json"
        summary = read_json(marker)
        if "cleaned_hash" not in summary:
            summary["cleaned_hash"] = content_hash(f"{self.clean_dir(shard)}/candidates.parquet")[0]
            write_json_atomic(marker, summary)
        return summary["cleaned_hash"]

    @staticmethod
    def _guarded(records: Iterator[Document | Rejection | ReadFault], on_error: Callable[[ShardReadError], None],
                 on_fault: Callable[[ReadFault], None] = lambda fault: None) -> Iterator[Document | Rejection]:
        """Ends the stream cleanly at a read error, so records already read are still processed;
        parts that could not be read go to `on_fault`, and reading goes on."""
        try:
            for item in records:
                if isinstance(item, ReadFault):
                    on_fault(item)
                else:
                    yield item
        except ShardReadError as err:
            on_error(err)

    def _reader(self) -> RecordReader:
        r = self.config.reader
        return RecordReader(fields=FieldMap(r.text_field, r.id_field, r.domain_field, r.source_field, r.url_field),
                            txt_split=r.txt_split, txt_max_chars=r.txt_max_chars, html=r.html,
                            html_favor=r.html_favor, html_fallback=r.html_fallback,
                            max_record_bytes=r.max_record_bytes)

    # -- dedup -----------------------------------------------------------------------------
    @property
    def dedup_enabled(self) -> bool:
        return self.config.dedup.exact or self.config.dedup.fuzzy

    def dedup_map(self, shard: InputShard, run_key: str) -> dict[str, Any]:
        """Signatures of the shard's cleaned documents, computed only when no version has them yet
        (they are cached by the cleaned content). Returns the shard's entry of the dedup plan and
        whether it was signed now."""
        entry = dedup_index.minhash_entry(self.cleaned_hash(shard), self.config.dedup)
        documents = dedup_index.signed_documents(self.work, entry)
        signed = documents is None
        if signed:
            table = pq.read_table(self._open(f"{self.clean_dir(shard)}/candidates.parquet"),
                                  columns=["text", "source", "quality"])
            texts = table.column("text").to_pylist()
            dedup_index.sign_shard(self.work, entry, texts, self.config.dedup,
                                   table.column("source").to_pylist(), table.column("quality").to_pylist())
            documents = len(texts)
        return {"name": self.clean_dir(shard).rsplit("/", 1)[1], "minhash": entry, "documents": documents,
                "signed": signed, "input": self._input_name(shard) + (f" part {shard.part[0]}-{shard.part[1]}"
                                                                       if shard.part else "")}

    def dedup_plan(self, mapped: Sequence[dict[str, Any]], run_key: str) -> dict[str, Any]:
        """The version's shards for the dedup index, and the previous version's index to extend."""
        previous = (self.previous_manifest() or {}).get("dedup_index")
        shards = [{k: m[k] for k in ("name", "minhash", "documents")} for m in mapped]
        return dedup_index.write_plan(self.work, run_key, shards, previous, self.config.dedup)

    def dedup_reduce(self, partition: int, run_key: str) -> dict[str, Any]:
        return dedup_index.reduce_partition(self.work, run_key, partition, self.config.dedup)

    def dedup_cluster(self, run_key: str) -> dict[str, Any]:
        """The version's duplicates; returns index.json (summary, work done, segments)."""
        return dedup_index.cluster(self.work, run_key, self.config.dedup)

    def _open(self, uri: str):
        return fsspec.open(uri, "rb").open()

    # -- finalize --------------------------------------------------------------------------
    def final_entries(self, shard: InputShard, shards: Sequence[InputShard],
                      duplicates: dict[int, tuple[int, int, str]]) -> dict[str, str]:
        """The cache entries of the shard's data and duplicates files. The data file depends on the
        cleaned content and which rows are duplicates; the duplicates file also on their survivors
        (the survivor's input name and row, which its `detail` names, and its shard's cleaned
        content, which fixes the `dup_of` id). So a shard keeps its files across versions while
        neither changes, even when a new input sorted before it shifts the shard numbers."""
        cleaned = self.cleaned_hash(shard)
        survivors = {index: (self._input_name(shards[index]), self.cleaned_hash(shards[index]))
                     for index in {s for s, _, _ in duplicates.values()}}
        dup_rows = sorted((row, *survivors[s], r, kind) for row, (s, r, kind) in duplicates.items())
        return {"kept": f"{self.work}/kept/{_hash_json(['kept', cleaned, sorted(duplicates)])[:32]}",
                "dups": f"{self.work}/dups/{_hash_json(['dups', cleaned, dup_rows])[:32]}"}

    def finalize(self, shard: InputShard, shards: Sequence[InputShard], run_key: str) -> dict[str, Any]:
        """Stage 3: candidates minus duplicates → data, the duplicates → their file, each written
        only when no earlier build made it (`final_entries`); the clean stage's rejected file is
        published as it is. Returns the counts, the statistics of the kept documents, the files to
        publish and the markers that vouch for them."""
        clean = self.clean_dir(shard)
        duplicates = dedup.load_duplicates(dedup_index.version_dir(self.work, run_key), shard.index) \
            if self.dedup_enabled else {}
        entries = self.final_entries(shard, shards, duplicates)
        files = {"data.parquet": f"{entries['kept']}/data.parquet", "rejected.parquet": f"{clean}/rejected.parquet",
                 "duplicates.parquet": f"{entries['dups']}/duplicates.parquet"}
        markers = {"kept": f"{entries['kept']}/summary.json", "dups": f"{entries['dups']}/summary.json"}
        made = {"kept": self._exists(markers["kept"]) and self._exists(files["data.parquet"]),
                "dups": self._exists(markers["dups"]) and self._exists(files["duplicates.parquet"])}
        if not all(made.values()):
            self._write_final(clean, shard, shards, duplicates, files, markers, made)
        kept, dups = read_json(markers["kept"]), read_json(markers["dups"])
        return {"kept": kept["kept"], "stats": kept["stats"], "duplicates": dups["duplicates"], "files": files,
                "markers": list(markers.values()), "entries": [self.relative(e) for e in entries.values()],
                "skipped": all(made.values())}

    def _write_final(self, clean: str, shard: InputShard, shards: Sequence[InputShard],
                     duplicates: dict[int, tuple[int, int, str]], files: dict[str, str],
                     markers: dict[str, str], made: dict[str, bool]) -> None:
        """One pass over the candidates writes whichever of the two files is missing."""
        # Entries are shared by every shard with the same cleaned content (all-rejected shards have one):
        # another task may be writing this one now, so only the temporaries of dead writers go.
        for entry in markers.values():
            remove_orphaned_temporaries(entry.rsplit("/", 1)[0])
        survivor_ids = self._survivor_ids(duplicates, shards) if not made["dups"] else {}
        stats = ShardStats()
        dup_counts: dict[str, Counter] = defaultdict(Counter)
        kept_counts: Counter = Counter()
        with ExitStack() as stack:
            kept = None if made["kept"] else stack.enter_context(
                ParquetShardWriter(files["data.parquet"], KEPT_SCHEMA))
            dups = None if made["dups"] else stack.enter_context(
                ParquetShardWriter(files["duplicates.parquet"], REJECTED_SCHEMA))
            start = 0
            for batch in pq.ParquetFile(self._open(f"{clean}/candidates.parquet")).iter_batches(batch_size=2048):
                rows = np.arange(start, start + batch.num_rows)
                start += batch.num_rows
                is_dup = np.fromiter((row in duplicates for row in rows.tolist()), dtype=bool, count=rows.size)
                if kept is not None:
                    # Kept rows go through in Arrow form: no Python object per document.
                    survivors = batch.filter(pa.array(~is_dup))
                    kept.write_table(survivors)
                    kept_counts.update(survivors.column("source").to_pylist())
                    quality = survivors.column("quality").to_numpy(zero_copy_only=False).astype(np.float64)
                    stats.add_many(survivors.column("domain").to_pylist(),
                                   pc.utf8_length(survivors.column("text")).to_numpy(zero_copy_only=False), quality)
                if dups is None or not is_dup.any():
                    continue
                for row, record in zip(rows[is_dup].tolist(), batch.filter(pa.array(is_dup)).to_pylist()):
                    survivor_shard, survivor_row, kind = duplicates[row]
                    reason = f"{kind}_duplicate"
                    dup_counts[record["source"]][reason] += 1
                    dups.write(rejected_row(Rejection(
                        document_from_row(record), reason,
                        f"copy of {self._input_name(shards[survivor_shard])} row {survivor_row}",
                        dup_of=survivor_ids[(survivor_shard, survivor_row)])))
        if not made["kept"]:
            write_json_atomic(markers["kept"], {"kept": dict(kept_counts), "stats": stats.to_json()})
        if not made["dups"]:
            write_json_atomic(markers["dups"], {"duplicates": {s: dict(c) for s, c in dup_counts.items()}})

    @staticmethod
    def _input_name(shard: InputShard) -> str:
        """How a detail names an input: its name under the input root (stable across versions)."""
        return shard.name or shard.uri

    def _survivor_ids(self, duplicates: dict[int, tuple[int, int, str]],
                      shards: Sequence[InputShard]) -> dict[tuple[int, int], str]:
        """Ids of the surviving documents, reading only the `id` column of the shards involved."""
        wanted: dict[int, set[int]] = defaultdict(set)
        for survivor_shard, survivor_row, _ in duplicates.values():
            wanted[survivor_shard].add(survivor_row)
        ids: dict[tuple[int, int], str] = {}
        for index, rows in wanted.items():
            column = self._candidate_ids(f"{self.clean_dir(shards[index])}/candidates.parquet")
            for r in rows:
                ids[(index, r)] = column[r].as_py()
        return ids

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _candidate_ids(uri: str) -> pa.ChunkedArray:
        """The `id` column of a committed candidates file (its clean directory is named by content:
        it never changes). Cached in the process: every shard's duplicates name survivors in many
        other shards, and a worker finalizing shard after shard read the same columns again, the
        stage's main cost at 1 GB of input."""
        with fsspec.open(uri, "rb") as fh:
            return pq.ParquetFile(fh).read(columns=["id"]).column("id")

    # -- manifest --------------------------------------------------------------------------
    def write_manifest(self, shards: Sequence[InputShard], cleaned: Sequence[dict[str, Any]],
                       finals: Sequence[dict[str, Any]], dedup_done: dict[str, Any] | None,
                       run_key: str, seconds: float,
                       mapped: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """Checks the accounting, then publishes: links the files into OUTPUT and writes stats.json
        and, last, manifest.json. A failed check raises `AccountingError` before anything in OUTPUT
        changes. `dedup_done` is what `dedup_cluster` returned, `mapped` what `dedup_map` did."""
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
        files, written = self._check_written(shards, cleaned, finals, problems)
        if problems:
            raise AccountingError("documents unaccounted for: " + "; ".join(problems))
        totals = {"input": sum(e["input"] for e in per_source.values()), "kept": written["data.parquet"]}
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
                 "documents": sum(summary["counts"]["input"].values()),
                 "unreadable": summary.get("unreadable", {"parts": 0, "rows": 0, "bytes": 0, "faults": []})}
                for shard, summary in zip(shards, cleaned)
            ],
            "totals": totals,
            "unreadable": {key: sum(s.get("unreadable", {}).get(key, 0) for s in cleaned)
                           for key in ("parts", "rows", "bytes")},
            "unsupported_files": unsupported_summary(self.unsupported),
            "ids": self._id_report(shards, totals["input"]),
            "rejected_by_rule": dict(by_rule.most_common()),
            "sources": {s: {"input": e["input"], "kept": e["kept"], "rejected": dict(e["rejected"])}
                        for s, e in sorted(per_source.items())},
            "transforms_applied": dict(modified),
            "dedup": dedup_done["summary"] if dedup_done else None,
            "dedup_index": run_key if dedup_done else None,
            "outputs": {
                "data": [f"data/part-{s.index:05d}.parquet" for s in shards],
                "rejected": [f"rejected/part-{s.index:05d}.parquet" for s in shards]
                + [f"rejected/dup-{s.index:05d}.parquet" for s in shards],
            },
            "seconds": round(seconds, 3),
        }
        previous = self.previous_manifest()
        previous = previous if previous and previous.get("version") != run_key else None
        manifest["previous"] = previous["version"] if previous else None
        manifest["cache"] = self._cache_record(shards, files, finals, mapped, dedup_done, run_key)
        stats = ShardStats.merge([f["stats"] for f in finals])
        published = self._publish(shards, files)
        manifest["work"] = self._work_record(cleaned, mapped, finals, dedup_done, published, manifest, previous)
        write_json_atomic(f"{self.output}/stats.json", stats)
        write_json_atomic(f"{self.output}/manifest.json", manifest)
        return manifest

    def _cache_record(self, shards: Sequence[InputShard], files: Sequence[dict[str, str]],
                      finals: Sequence[dict[str, Any]], mapped: Sequence[dict[str, Any]],
                      dedup_done: dict[str, Any] | None, run_key: str) -> dict[str, Any]:
        """What of the work directory the version uses: `files`, each published file's cache file
        (the same cache file in two versions is the same bytes, one inode on a local disk), and
        `entries`, every cache entry it needs, which `pangu corpus gc` keeps while the version lives."""
        entries = {self.relative(self.clean_dir(s)) for s in shards}
        entries.update(self.input_entry(s.uri) for s in shards if not s.error)
        entries.update(e for f in finals for e in f["entries"])
        entries.update(f"{dedup_index.MINHASH}/{m['minhash']}" for m in mapped)
        if dedup_done:
            entries.add(self.relative(dedup_index.version_dir(self.work, run_key)))
            entries.update(f"{dedup_index.SEGMENTS}/{name}" for names in dedup_done["segments"] for name in names)
        return {"files": {self.outputs(shard)[name]: self.relative(uri)
                          for shard, found in zip(shards, files) for name, uri in found.items()},
                "entries": sorted(entries)}

    @staticmethod
    def _work_record(cleaned: Sequence[dict[str, Any]], mapped: Sequence[dict[str, Any]],
                     finals: Sequence[dict[str, Any]], dedup_done: dict[str, Any] | None,
                     published: Counter, manifest: dict[str, Any],
                     previous: dict[str, Any] | None) -> dict[str, Any]:
        """What this build did and what it found done: a refresh with one new input cleans, signs
        and finalizes one shard (plus any old shard whose duplicates changed)."""
        before = set((previous or {}).get("cache", {}).get("files", {}).values())
        data = [cache for path, cache in manifest["cache"]["files"].items() if path.startswith("data/")]
        # signed in the clean stage (this build's cleaning only) or in the dedup-map stage
        signed = [s["signed_documents"] for s in cleaned if not s.get("skipped") and s.get("signed_documents") is not None]
        signed += [m["documents"] for m in mapped if m["signed"]]
        return {"shards": len(cleaned),
                "cleaned": sum(not s.get("skipped") for s in cleaned),
                "signed_shards": len(signed),
                "signed_documents": sum(signed),
                "finalized": sum(not f.get("skipped") for f in finals),
                "data_files_from_previous": sum(cache in before for cache in data),
                "published": {"linked": published["link"], "copied": published["copy"]},
                "dedup": dedup_done["work"] if dedup_done else None}

    def _check_written(self, shards: Sequence[InputShard], cleaned: Sequence[dict[str, Any]],
                       finals: Sequence[dict[str, Any]],
                       problems: list[str]) -> tuple[list[dict[str, str]], Counter]:
        """Per shard, documents read = rows in the Parquet footers of the files to publish, and each
        file holds what its stage counted. Returns those files and the rows per kind of file."""
        files: list[dict[str, str]] = []
        written: Counter = Counter()
        for shard, summary, final in zip(shards, cleaned, finals):
            found = final["files"]
            if not all(self._exists(uri) for uri in found.values()):
                problems.append(f"shard {shard.index} ({shard.uri}): finalized outputs are missing")
                for marker in final["markers"]:
                    self._remove(marker)
                continue
            files.append(found)
            rows = {name: self._rows(uri) for name, uri in found.items()}
            written.update(rows)
            read = sum(summary["counts"]["input"].values())
            expected = {"data.parquet": sum(final["kept"].values()),
                        "rejected.parquet": sum(sum(r.values()) for r in summary["counts"]["rejected"].values()),
                        "duplicates.parquet": sum(sum(r.values()) for r in final["duplicates"].values())}
            if read != sum(rows.values()) or rows != expected:
                problems.append(f"shard {shard.index} ({shard.uri}): read {read}, written {rows}, counted {expected}")
                # What was written is wrong: a rerun must redo it, not skip it behind its markers.
                for marker in final["markers"]:
                    self._remove(marker)
                # The clean stage's outputs too, when they hold fewer records than it read.
                if rows["rejected.parquet"] != expected["rejected.parquet"] or read != sum(expected.values()):
                    self._remove(f"{self.clean_dir(shard)}/summary.json")
        return files, written

    @staticmethod
    def _rows(uri: str) -> int:
        """Rows of a Parquet file, from its footer."""
        with fsspec.open(uri, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows

    def _remove(self, uri: str) -> None:
        path = fsspec.core.url_to_fs(uri)[1]
        if self.fs.exists(path):
            self.fs.rm(path)

    def _publish(self, shards: Sequence[InputShard], files: Sequence[dict[str, str]]) -> Counter:
        """Links the files into OUTPUT (copies where the store has no links); returns how many of
        each. The old manifest goes first, so that a kill in the middle never leaves a manifest.json
        beside files it does not describe. Files are never changed in place (every writer renames a
        new file over the old name), so a file shared by two versions cannot change under either."""
        self._remove(f"{self.output}/manifest.json")
        how: Counter = Counter()
        for shard, found in zip(shards, files):
            for name, uri in found.items():
                how[link_or_copy(uri, f"{self.output}/{self.outputs(shard)[name]}")] += 1
        self._remove_stale_outputs(shards)
        return how

    def _id_report(self, shards: Sequence[InputShard], documents: int) -> dict[str, Any]:
        """Explicit ids held by more than one document (generated ones are unique by construction):
        reported with where they occur; both documents stay."""
        key_files = [f"{self.clean_dir(s)}/ids.npy" for s in shards]
        found = ids.find_collisions([uri if self._exists(uri) else None for uri in key_files], documents)
        examples = []
        for key, holders in found.examples.items():
            where: list[str] = []
            doc_id = None
            for index in holders:
                for name in ("candidates.parquet", "rejected.parquet"):
                    with fsspec.open(f"{self.clean_dir(shards[index])}/{name}", "rb") as fh:
                        table = pq.read_table(fh, columns=["id", "meta"])
                    for row_id, meta in zip(table.column("id").to_pylist(), table.column("meta").to_pylist()):
                        if ids.id_key(row_id) == key:
                            doc_id = row_id
                            line = json.loads(meta).get("line") if meta else None
                            where.append(f"{shards[index].name or shards[index].uri}"
                                         + (f", line {line}" if line is not None else ""))
            examples.append({"id": doc_id, "where": where[:10]})
        return {"colliding_ids": found.ids, "extra_documents": found.documents, "examples": examples}

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


def describe_work(work: dict[str, Any]) -> str:
    """One line for logs and summaries: what a build did, and what it found done."""
    n = work["shards"]
    line = (f"cleaned {work['cleaned']} of {n} shards, signed {work['signed_documents']} documents "
            f"({work['signed_shards']} shards), finalized {work['finalized']} shards; "
            f"{work['data_files_from_previous']} data files the same as the previous version's")
    dedup = work.get("dedup") or {}
    # Said when a previous version's index could not be extended (not of every first build and its reruns)
    if dedup and not dedup["previous"] and dedup.get("not_extended_because") != dedup_index.NO_PREVIOUS_INDEX:
        line += f"; dedup index built afresh ({dedup['not_extended_because']})"
    return line


def input_problems(manifest: dict[str, Any], shown: int = 5, unsupported: bool = True,
                   empty: bool = True) -> list[str]:
    """Lines for the closing summary of a build, naming the inputs that were not read in full (status:
    error, as the log said shard by shard), with `unsupported` the files no reader takes, and a corpus
    that kept no document (its inputs held none, or every one was rejected: a build that exits 0 with
    an empty corpus must say so); [] when every input was read and some document kept."""
    problems = [entry for entry in manifest["inputs"] if entry.get("error")]
    lines = [f"{entry['status']}: {entry['error']}" for entry in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"... and {len(problems) - shown} more (manifest.json, inputs[].error)")
    found = manifest.get("unsupported_files") or {}
    if unsupported and found.get("files"):
        lines.append(f"not read: {describe_unsupported(found)}")
    said = empty_corpus(manifest) if empty else None
    return lines + ([said] if said else [])


def empty_corpus(manifest: dict[str, Any]) -> str | None:
    """One line when the build kept no document (its inputs held none, or every one was rejected), else None."""
    totals = manifest["totals"]
    if not totals["input"]:
        return "empty corpus: the inputs hold no document"
    if not totals["kept"]:
        reasons = ", ".join(f"{reason} {n}" for reason, n in list(manifest["rejected_by_rule"].items())[:3])
        return (f"empty corpus: all {totals['input']} documents were rejected ({reasons}; "
                "manifest.json, rejected_by_rule)")
    return None


class _Candidates:
    """The columns of a shard's kept rows that its signatures and rank facts are made from."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.sources: list[str | None] = []
        self.qualities: list[float | None] = []

    def add(self, row: dict[str, Any]) -> None:
        self.texts.append(row["text"])
        self.sources.append(row["source"])
        self.qualities.append(row["quality"])
