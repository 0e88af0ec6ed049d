"""Debian packages: `apt-get download` into the cache, and reading a .deb without dpkg -i.

Debian's archive keeps only the current version of a package, so these are not pinned: the
first `apt-get download` lands in the cache and is reused from then on; the version and the
licence are read from the .deb itself (its control file and /usr/share/doc/<pkg>/copyright).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from sample_data.sources.packages import FetchError, cached_download, log

APT_GET = "apt-get"
_apt_updated = False  # `apt-get update` runs at most once per process, and only when needed


def apt_get() -> str | None:
    """The `apt-get` executable, or None where there is none (non-Debian machines)."""
    return shutil.which(APT_GET)


def cached_deb(name: str, cache: Path) -> Path | None:
    """The newest `.deb` of the package in the cache, if any."""
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
    def fetch(tmp: Path) -> Path:
        global _apt_updated
        proc = _apt_run(["download", name], tmp, f"download Debian package {name}")
        if proc.returncode != 0 and not _apt_updated:
            log("  running apt-get update ...")
            update = _apt_run(["update"], tmp, f"download Debian package {name} (apt-get update)")
            _apt_updated = True
            if update.returncode != 0:
                raise FetchError(f"download of Debian package {name} failed: apt-get update exited "
                                 f"{update.returncode}: {_apt_detail(update)}")
            proc = _apt_run(["download", name], tmp, f"download Debian package {name}")
        files = [p for p in tmp.iterdir() if p.is_file() and p.suffix == ".deb"]
        if proc.returncode != 0 or len(files) != 1:
            raise FetchError(f"download of Debian package {name} failed (exit {proc.returncode}, "
                             f"{len(files)} files): {_apt_detail(proc)}")
        return files[0]

    return cached_download(cache, f"{name} with apt-get", lambda c: cached_deb(name, c), fetch)


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
