"""Corpus Parquet shards → indexed token shards with a domain id per document (SPEC §2.1, §4).

Per input shard `data/part-NNNNN.parquet`, in the output directory:

    part-NNNNN.bin / .idx      Megatron MMIDIDX, uint16 ids, one sequence per document ending in <eot>
    part-NNNNN.domains.npy     uint16 domain id per document (same order as the index)
    part-NNNNN.done.json       completion marker: input hash, tokenizer hash, domain map, counts, file sizes

and for the whole corpus `domain_map.json` (fixed before any shard is packed, extended — never
renumbered — when later runs bring new domains) and `domains.json`: name ↔ id, documents, tokens,
unknown tokens and skipped documents per domain, natural token shares, and the tokenizer that made
the ids (`tokenizer`: its path, SHA-256 and piece count). `domains.json` is the contract the training
stage reads: the model's vocabulary and PanGu-Σ's expert groups are derived from it.

Documents stream through in record batches and are written as they are encoded, so memory is
bounded by a few chunks plus 14 bytes per document of the shard. A shard whose marker matches its
input, the tokenizer and the domain map is skipped; an interrupted one leaves only temporary files.
"""
from __future__ import annotations

import io
import json
import re
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import pyarrow.compute as pc
import xxhash

from cleaning.temporaries import remove_orphaned_temporaries
from cleaning.writers import read_json, write_bytes_atomic, write_json_atomic
from tokenizer.config import PackConfig
from tokenizer.corpus import (READ_ERRORS, CorpusError, check_text_column, iter_batches, list_shards, open_shard,
                              unreadable_shard)
from tokenizer.indexed import IndexedWriter, dtype_for_vocab
from cleaning.outputs import check_output_directory, make_output_directory, nothing_left_on_failure
from tokenizer.pangu import PanguTokenizer
from tokenizer.specials import EOT, UNK

FORMAT = "pangu-tokens/1 (Megatron MMIDIDX)"
DOMAIN_MAP_FILE = "domain_map.json"
DOMAINS_FILE = "domains.json"

# C0/C1 control characters other than tab, newline and carriage return.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def packed_with(contract: dict[str, Any]) -> str | None:
    """The fingerprint (`PanguTokenizer.fingerprint`) of the tokenizer that packed the data a `domains.json`
    (`contract`, as `summarize` writes it, also bundled in an export) describes; None when it records none."""
    record = contract.get("tokenizer")
    return contract.get("tokenizer_sha256") or (record.get("sha256") if isinstance(record, dict) else None)


def shard_stem(shard: str) -> str:
    name = shard.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


def content_hash(uri: str) -> str:
    # xxh3-64, not cleaning.inputs.content_hash's xxh3-128: pack markers record it as `input_xxh3`,
    # and another digest would make every packed shard look changed.
    h = xxhash.xxh3_64()
    with fsspec.open(uri, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# -- domain ids -------------------------------------------------------------------------------
def _domain_name(value: Any, default: str) -> str:
    return value if isinstance(value, str) and value.strip() else default


def start_packing(config: PackConfig) -> tuple[list[str], dict[str, int]]:
    """What every driver does before any shard is packed: the corpus shards (each one opened, so that a
    damaged one or one without text is refused before anything is written), the output directory
    without the temporary files a killed run left there, and the domain map."""
    shards = list_shards(config.input)
    out = Path(config.output)
    check_output_directory(out, "token shards")
    names = corpus_domains(shards, config)
    _check_holds_only_token_shards(out)
    make_output_directory(out, "token shards")
    remove_orphaned_temporaries(str(out))
    return shards, plan_domain_ids(names, config, out)


def _check_holds_only_token_shards(out: Path) -> None:
    """Packing into a folder of other files would mix them with the shards (and replace any of the same name)."""
    if not out.is_dir() or (out / DOMAIN_MAP_FILE).is_file():
        return
    # A temporary file is a killed or running packer's (start_packing removes the killed ones), not a user's.
    others = sorted(p.name for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp")))
    if others:
        raise FileExistsError(f"{out} is not empty and holds no token shards (no {DOMAIN_MAP_FILE}; it has "
                              f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); choose another "
                              "output or empty it")


def corpus_domains(shards: list[str], config: PackConfig) -> set[str]:
    """The domain names of every document (from each shard's domain column, or `default_domain` where it has
    none); raises, naming the shard, for one that is not Parquet or has no text column."""
    names: set[str] = set()
    for shard in shards:
        with fsspec.open(shard, "rb") as fh:
            pf = open_shard(shard, fh)
            check_text_column(shard, pf.schema_arrow, config.text_field)
            if config.domain_field not in pf.schema_arrow.names:
                names.add(config.default_domain)
                continue
            try:
                column = pf.read(columns=[config.domain_field]).column(0)
            except READ_ERRORS as exc:
                raise unreadable_shard(shard, exc) from exc
            for value in pc.unique(column).to_pylist():
                names.add(_domain_name(value, config.default_domain))
    return names


def plan_domain_ids(names: set[str], config: PackConfig, out: Path) -> dict[str, int]:
    """Name → id for every domain in the corpus (`names`), stable across runs (see module docstring)."""
    ids: dict[str, int] = {}
    saved = out / DOMAIN_MAP_FILE
    if saved.is_file():
        ids.update(read_json(str(saved)))
    for name, i in (config.domain_ids or {}).items():
        if ids.get(name, i) != i:
            raise ValueError(f"domain {name!r} is already packed as id {ids[name]}, not {i}")
        ids[name] = i
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"two domains share an id in {ids}")
    next_id = max(ids.values(), default=-1) + 1
    for name in sorted(names - set(ids)):
        ids[name] = next_id
        next_id += 1
    if ids and max(ids.values()) > np.iinfo(np.uint16).max:
        raise ValueError("more than 65,536 domain ids")
    write_json_atomic(saved, ids)
    return ids


# -- one shard --------------------------------------------------------------------------------
class _Counts:
    def __init__(self) -> None:
        self.by_domain: dict[str, dict[str, int]] = defaultdict(
            lambda: {"documents": 0, "tokens": 0, "unk_tokens": 0, "empty_documents": 0, "control_char_documents": 0}
        )

    def add(self, name: str, key: str, n: int) -> None:
        self.by_domain[name][key] += n


def _marker_matches(marker: Path, outputs: list[Path], expected: dict[str, Any], domain_ids: dict[str, int]) -> dict | None:
    if not marker.is_file() or not all(p.is_file() for p in outputs):
        return None
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if any(done.get(k) != v for k, v in expected.items()):
        return None
    if any(domain_ids.get(name) != stats["id"] for name, stats in done.get("domains", {}).items()):
        return None
    sizes = done.get("bytes", {})  # markers written before sizes were recorded have none: trusted as before
    if any(p.name in sizes and p.stat().st_size != sizes[p.name] for p in outputs):
        return None  # cut short or replaced after the marker was written
    return done


def pack_shard(
    shard: str, out: str | Path, tokenizer: PanguTokenizer, domain_ids: dict[str, int], config: PackConfig
) -> dict[str, Any]:
    """Pack one corpus shard (or return its marker when it is already packed); the marker's contents."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = shard_stem(shard)
    prefix = out / stem
    outputs = shard_files(out, stem)
    marker = out / f"{stem}.done.json"
    expected = {
        "input": shard,
        "input_xxh3": content_hash(shard),
        "tokenizer_sha256": tokenizer.fingerprint,
        "text_field": config.text_field,
        "domain_field": config.domain_field,
        "default_domain": config.default_domain,
    }
    if not config.force:
        done = _marker_matches(marker, outputs, expected, domain_ids)
        if done is not None:
            return {**done, "skipped": True}

    start = time.perf_counter()
    counts = _Counts()
    pending_domains: deque[np.ndarray] = deque()
    doc_domains: list[np.ndarray] = []
    characters = 0

    def chunks() -> Iterator[list[str]]:
        nonlocal characters
        texts: list[str] = []
        domains: list[int] = []
        size = 0
        for batch in iter_batches(shard, [config.text_field, config.domain_field], config.batch_rows):
            for text, domain in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                name = _domain_name(domain, config.default_domain)
                if text is None or not text.strip():
                    counts.add(name, "empty_documents", 1)
                    continue
                if _CONTROL.search(text):
                    counts.add(name, "control_char_documents", 1)
                texts.append(text)
                domains.append(domain_ids[name])
                size += len(text)
                if size >= config.chunk_chars:
                    characters += size
                    pending_domains.append(np.asarray(domains, dtype=np.uint16))
                    yield texts
                    texts, domains, size = [], [], 0
        if texts:
            characters += size
            pending_domains.append(np.asarray(domains, dtype=np.uint16))
            yield texts

    names = {i: name for name, i in domain_ids.items()}
    writer = IndexedWriter(prefix, dtype_for_vocab(tokenizer.vocab_size))
    try:
        for flat, lengths in tokenizer.encode_chunks_as_arrays(chunks(), config.workers):
            domains = pending_domains.popleft()
            # A document of nothing but what the normaliser deletes (control characters) has no ids.
            empty = lengths == 0
            for d in domains[empty]:
                counts.add(names[int(d)], "empty_documents", 1)
            lengths, domains = lengths[~empty], domains[~empty]
            if not lengths.size:
                continue
            ends = np.cumsum(lengths)
            unk_per_doc = np.add.reduceat((flat == UNK).astype(np.int64), ends - lengths)
            with_eot = np.insert(flat, ends, EOT)
            writer.add_documents(with_eot, lengths + 1)
            doc_domains.append(domains)
            for d in np.unique(domains):
                mine = domains == d
                name = names[int(d)]
                counts.add(name, "documents", int(mine.sum()))
                counts.add(name, "tokens", int(lengths[mine].sum() + mine.sum()))
                counts.add(name, "unk_tokens", int(unk_per_doc[mine].sum()))
        all_domains = np.concatenate(doc_domains) if doc_domains else np.zeros(0, dtype=np.uint16)
        buffer = _npy_bytes(all_domains)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    write_bytes_atomic(out / f"{stem}.domains.npy", buffer)
    result = {
        **expected,
        "format": FORMAT,
        "documents": int(all_domains.size),
        "tokens": writer.tokens,
        "characters": characters,
        "seconds": round(time.perf_counter() - start, 3),
        "domains": {name: {"id": domain_ids[name], **c} for name, c in sorted(counts.by_domain.items())},
        "bytes": {p.name: p.stat().st_size for p in outputs},
    }
    write_json_atomic(marker, result)
    return {**result, "skipped": False}


def shard_line(number: int, shards: int, shard: str, result: dict[str, Any]) -> str:
    """One line of progress for a packed shard (`result`: pack_shard's)."""
    done = "already packed" if result["skipped"] else f"packed in {result['seconds']:.0f} s"
    return (f"shard {number}/{shards} {shard_stem(shard)}: {result['documents']:,} documents, "
            f"{result['tokens']:,} tokens, {done}")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# -- the corpus -------------------------------------------------------------------------------
def tokenizer_record(tokenizer: PanguTokenizer, source: str | Path) -> dict[str, Any]:
    """What `domains.json` says of the tokenizer: where it is, which one it is, how many pieces it has."""
    return {"path": str(Path(source).resolve()), "sha256": tokenizer.fingerprint, "pieces": tokenizer.vocab_size}


def summarize(out: str | Path, domain_ids: dict[str, int], shard_results: list[dict[str, Any]],
              tokenizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `domains.json` from the shard markers (and the `tokenizer_record`) and return it."""
    out = Path(out)
    totals: dict[str, dict[str, int]] = {
        name: {"id": i, "documents": 0, "tokens": 0, "unk_tokens": 0, "empty_documents": 0, "control_char_documents": 0}
        for name, i in domain_ids.items()
    }
    for result in shard_results:
        for name, stats in result["domains"].items():
            for key, value in stats.items():
                if key != "id":
                    totals[name][key] += value
    all_tokens = sum(t["tokens"] for t in totals.values())
    for t in totals.values():
        t["token_share"] = t["tokens"] / all_tokens if all_tokens else 0.0
    summary = {
        "format": FORMAT,
        "dtype": "uint16",
        "eot_id": EOT,
        "unk_id": UNK,
        "tokenizer_sha256": shard_results[0]["tokenizer_sha256"] if shard_results else None,
        "tokenizer": tokenizer,
        "id_to_name": {str(i): name for name, i in sorted(domain_ids.items(), key=lambda kv: kv[1])},
        "domains": dict(sorted(totals.items(), key=lambda kv: kv[1]["id"])),
        "shards": [shard_stem(r["input"]) for r in shard_results],
        "documents": sum(r["documents"] for r in shard_results),
        "tokens": all_tokens,
    }
    write_json_atomic(out / DOMAINS_FILE, summary)
    return summary


def finish_packing(config: PackConfig, tokenizer: PanguTokenizer, domain_ids: dict[str, int],
                   results: list[dict[str, Any]]) -> dict[str, Any]:
    """After the last shard: `domains.json` (returned) with a short record of each shard's packing. A corpus
    with no text at all is refused: token shards of nothing would only fail later, in training."""
    if not any(r["documents"] for r in results):
        raise CorpusError(f"no text to pack in {config.input}: every document of its {len(results)} shard"
                          f"{'s' if len(results) != 1 else ''} is empty or blank")
    summary = summarize(config.output, domain_ids, results, tokenizer_record(tokenizer, config.tokenizer))
    summary["shard_results"] = [
        {k: r[k] for k in ("input", "documents", "tokens", "characters", "seconds", "skipped")} for r in results
    ]
    summary["removed_shards"] = remove_stale_shards(Path(config.output), set(summary["shards"]))
    return summary


def shard_files(out: Path, stem: str) -> list[Path]:
    """What packing one corpus shard writes: the Megatron pair, the documents' domain ids."""
    return [out / f"{stem}.bin", out / f"{stem}.idx", out / f"{stem}.domains.npy"]


def removed_shards_line(stems: list[str]) -> str:
    return (f"{len(stems)} token shard{'s' if len(stems) != 1 else ''} of an earlier pack whose corpus shard "
            f"this corpus does not have: {', '.join(stems[:3])}{', ...' if len(stems) > 3 else ''}")


def remove_stale_shards(out: Path, stems: set[str]) -> list[str]:
    """Removes the token shards of an earlier pack into `out` whose corpus shards this pack did not have
    (`domains.json`, written before, no longer lists them; left, they took the space of a corpus that is
    gone and read as part of the data to anything that lists the folder). Returns their stems. The marker
    goes last, so a pack killed on the way finds the rest by it."""
    stale = sorted(marker.name[: -len(".done.json")] for marker in out.glob("*.done.json")
                   if marker.name[: -len(".done.json")] not in stems)
    for stem in stale:
        for path in shard_files(out, stem):
            path.unlink(missing_ok=True)
        (out / f"{stem}.done.json").unlink(missing_ok=True)
    return stale


def pack_corpus(config: PackConfig, tokenizer: PanguTokenizer | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Pack every shard of `config.input` into `config.output`; returns `domains.json` plus per-shard results.
    A failure before any shard with text is packed leaves nothing it created; after, the packed shards stay
    for the rerun, which skips them (so does an interrupt). `progress(message)` hears each shard's end."""
    own = tokenizer is None
    # Loading here, in this process, turns a bad model file into one clear error before any worker starts.
    tokenizer = tokenizer or PanguTokenizer.load(config.tokenizer)
    if tokenizer.vocab_size > 65_536:
        raise ValueError("uint16 shards need a vocabulary of at most 65,536 pieces")
    results: list[dict[str, Any]] = []
    try:
        # Shards that hold text are kept for the rerun when a later one fails (a read error, a damaged page)
        with nothing_left_on_failure(Path(config.output), keep=lambda: any(r["documents"] for r in results)):
            shards, domain_ids = start_packing(config)
            for number, shard in enumerate(shards, 1):
                results.append(pack_shard(shard, Path(config.output), tokenizer, domain_ids, config))
                if progress is not None:
                    progress(shard_line(number, len(shards), shard, results[-1]))
            return finish_packing(config, tokenizer, domain_ids, results)
    finally:
        if own:
            tokenizer.close()
