"""Fixtures shared by tests that need registry data (session) or real CLUE text.

They use the default `$PANGU_HOME` cache, so after `pangu data fetch-assets` (run by `make test`)
nothing is downloaded again; on a bare machine the first test that asks fetches once.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# `make test` runs two pytest-xdist workers on two cores. With torch's default of one OpenMP thread per core,
# each worker's team of two spun against the other's, and CPU work ran up to 30 times slower (the CHID
# chance test's 40 examples: 30 s with two threads in each of two processes, 0.9 s with one). Each worker,
# and whatever it starts (servers, flows, training ranks), computes on one thread.
_XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if _XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"  # before anything imports torch


@pytest.fixture(autouse=True)
def _one_thread_per_worker():
    """Back to one thread after a test that set more (ECSS sets its host optimizer's threads)."""
    yield
    torch = sys.modules.get("torch")
    if _XDIST_WORKER and torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fetched_assets() -> dict[str, str]:
    """Asset name → path, as `pangu data fetch-assets` leaves them."""
    from sample_data.fetch import fetch_assets

    return fetch_assets()


@pytest.fixture(scope="module")
def abstracts() -> list[str]:
    """Base documents of the dedup and MinHash tests: the FewCLUE CSL abstracts of tests/realtext.py
    of >= 100 characters, unique after normalisation (720 of them)."""
    from cleaning.minhash import normalize
    from tests.realtext import CLUE
    from tests.realtext import abstracts as csl_abstracts

    if not (CLUE / "fewclue" / "csl").is_dir():
        pytest.skip("CLUE data not available")
    first: dict[str, str] = {}  # normalised text -> its first spelling
    for text in csl_abstracts():
        first.setdefault(normalize(text), text)
    return [text for key, text in first.items() if len(key) >= 100]


@pytest.fixture(scope="session")
def registry_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """A small registry sample (300 documents per source) and its counts."""
    from sample_data.sample import fetch_sample

    out = tmp_path_factory.mktemp("registry-sample")
    return out, fetch_sample(str(out), max_docs_per_source=300)


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (SQLite, 127.0.0.1) shared by every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# The longest test files (seconds on 2 cores, summed over their tests), first. `make test` runs the suite on
# two pytest-xdist workers that take whole files in collection order (`--dist loadfile
# --no-loadscope-reorder`): started first, a long file does not run alone at the end while the other worker
# waits. Files not named keep their order, after these.
LONGEST_FIRST = (
    "test_end_to_end.py",  # one test, about 2 minutes
    "test_train_pipeline_parallel.py",
    "test_train_tensor_parallel_sigma.py",
    "test_pretrain_flow.py",
    "test_train_ecss_sharded.py",
    "test_corpus_dask.py",
    "test_deployments.py",
    "test_train_run.py",
    "test_train_tensor_parallel.py",
    "test_train_expert_parallel.py",
    "test_gpu_check.py",
    "test_cli_errors.py",
    "test_pipeline_flow.py",
    "test_corpus_build.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    place = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: place.get(item.path.name, len(place)))  # a stable sort
