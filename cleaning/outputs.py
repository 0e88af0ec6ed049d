"""Output directories of the commands that write one (tokenizer, classifier): refused before any work when
they cannot be written, and left as they were when a command fails.

A user's bad `--output` (a file, a path below a file, a folder without write permission) should say so in
terms of that path, not of a temporary name beside it, and before the corpus is read. A command that fails
(a damaged shard, a vocabulary the text cannot hold) should not leave an empty or partial directory behind.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def nearest_existing(path: Path) -> Path | None:
    """`path` or its nearest parent that exists: where writing `path` would begin (a file there is in the way)."""
    return next((place for place in (path, *path.parents) if place.exists()), None)


def check_output_directory(directory: Path, what: str) -> None:
    """Raise unless `directory` can be made (or exists) and written: nothing above it is a file, and the
    nearest folder that exists is writable. A file system that refuses anyway (read-only, /proc) is caught
    where the directory is made (`make_output_directory`)."""
    folder = nearest_existing(directory)
    if folder is None:
        return
    if not folder.is_dir():
        where = "it is a file" if folder == directory else f"{folder} is a file"
        raise NotADirectoryError(f"cannot write {what} to {directory}: {where}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {what} to {directory}: {folder} is not writable")


def check_output_uri(uri: str, what: str) -> None:
    """`check_output_directory` for a local path or file:// URI; another store's output (s3://, memory://) is
    left to its first write."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        check_output_directory(Path(path), what)


def check_replaceable(directory: Path, what: str, written_before: Callable[[Path], bool]) -> None:
    """Raise unless `directory` is missing, empty, or holds what the same command wrote there before
    (`written_before`), which it replaces: a command that writes a whole directory must not write over another
    one's (a trained export replaced by an import, a token directory filled with a transformers model)."""
    if not directory.is_dir():
        return
    held = sorted(entry.name for entry in directory.iterdir())
    if held and not written_before(directory):
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise FileExistsError(f"--output {directory} holds something else ({shown}): {what} goes to a new or empty "
                              f"directory, or one it was written to before; choose another output or remove it")


def write_failure(what: str, directory: Path, exc: OSError) -> OSError:
    """An OSError of writing inside or beside `directory` (a temporary file's name in it), told in terms of
    `directory` itself."""
    return OSError(f"cannot write {what} to {directory}: {exc.strerror or exc}")


def make_output_directory(directory: Path, what: str) -> None:
    """`directory` and its missing parents, or an error that names it and says why not."""
    check_output_directory(directory, what)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failure(what, directory, exc) from exc


def _first_missing(directory: Path) -> Path | None:
    """The outermost of `directory` and its parents that does not exist: what making it creates."""
    missing = None
    for folder in (directory, *directory.parents):
        if folder.exists():
            break
        missing = folder
    return missing


@contextmanager
def nothing_left_on_failure(directory: Path, keep: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """A block that makes `directory`: when it raises, what it made is removed again (the directory and the
    parents it created, or the new entries of a directory that was empty), so a failed command leaves
    nothing behind. A directory that already held something (a run being resumed) is left to the block, and
    so is everything when `keep()` says, at the failure, that finished work is there for a rerun to reuse;
    an interrupt (Ctrl-C) keeps the work done for the rerun."""
    made = _first_missing(directory)
    was_empty = made is None and directory.is_dir() and not any(directory.iterdir())
    try:
        yield
    except Exception:
        if keep():
            raise
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        elif was_empty and directory.is_dir():
            for entry in directory.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise
