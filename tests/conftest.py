"""Session fixtures shared by tests that need registry data.

They use the default `$PANGU_HOME` cache, so after `pangu data fetch-assets` (run by `make test`)
nothing is downloaded again; on a bare machine the first test that asks fetches once.
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fetched_assets() -> dict[str, str]:
    """Asset name → path, as `pangu data fetch-assets` leaves them."""
    from cleaning.fetch import fetch_assets

    return fetch_assets()


@pytest.fixture(scope="session")
def registry_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """A small registry sample (300 documents per source) and its counts."""
    from cleaning.sample import fetch_sample

    out = tmp_path_factory.mktemp("registry-sample")
    return out, fetch_sample(str(out), max_docs_per_source=300)
