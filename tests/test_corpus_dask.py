"""The corpus refresh on a multi-process Dask cluster, with its inputs and versions on an object store.

The store is a real S3 endpoint (moto's server on 127.0.0.1, through s3fs): nothing the stages
share can hide in one process's memory or on a local disk, and the two worker processes of the
cluster reach it over HTTP as a cluster's nodes would.
"""
from __future__ import annotations

import json
import random

import pytest

from cleaning.config import CorpusConfig
from tests.realtext import long_documents, substitute_chinese

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

RULES_ONLY = {"ad_word_lists": [], "sensitive_word_lists": [], "langid": False,
              "spam_model": None, "quality_model": None}


@pytest.fixture()
def s3(monkeypatch):
    """A bucket on a local S3 server; the environment (inherited by the cluster's worker processes)
    points boto at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(anon=False)
    fs.mkdir("corpus-test")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _put_jsonl(fs, path: str, records: list[dict]) -> None:
    with fs.open(path, "wb") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def test_a_scheduler_address_is_checked_before_a_build():
    """`--dask-address` used to be tried by Prefect's task runner for 30 s once the flow run had begun; a typo,
    a closed port or a worker's address is now refused up front, by `check_scheduler`."""
    import socket

    from distributed import LocalCluster

    from cleaning.dask_cluster import check_scheduler

    with pytest.raises(ValueError, match="'tcp://no-port' is not a scheduler address .*missing port"):
        check_scheduler("tcp://no-port")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"no Dask scheduler answers at tcp://127.0.0.1:{port} "):
        check_scheduler(f"tcp://127.0.0.1:{port}", timeout_s=1)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        assert check_scheduler(cluster.scheduler_address) == 1
        worker = next(iter(cluster.workers.values()))
        with pytest.raises(ValueError, match="is a Dask Worker, not the scheduler"):
            check_scheduler(worker.address)


@pytest.mark.slow
def test_refresh_runs_every_stage_on_a_multiprocess_dask_cluster_over_s3(prefect_api, s3):
    from distributed import Client, LocalCluster

    from flows.corpus import corpus_refresh

    docs = long_documents(48)
    for shard in range(3):
        records = [{"text": t, "source": "science"} for t in docs[shard * 12:(shard + 1) * 12]]
        # a near copy (of equal length: the original, first in input order, survives)
        records.append({"text": substitute_chinese(docs[0], 0.03, random.Random(0)), "source": "web"})
        _put_jsonl(s3, f"corpus-test/raw/part-{shard}.jsonl", records)
    # fuzzy and exact dedup on; the big input is cut into parts
    config = CorpusConfig.model_validate({"rules": RULES_ONLY, "shard_bytes": 16 * 1024,
                                          "dedup": {"partitions": 2, "fuzzy": True, "exact": True}})
    root = "s3://corpus-test/corpus"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        first = corpus_refresh(inputs=["s3://corpus-test/raw"], root=root, config=config,
                               dask_address=cluster.scheduler_address)
        # A new input: only its shards are cleaned and signed, on the cluster.
        _put_jsonl(s3, "corpus-test/raw/part-3.jsonl",
                   [{"text": t, "source": "science"} for t in docs[36:48]] + [{"text": docs[5], "source": "web"}])
        second = corpus_refresh(inputs=["s3://corpus-test/raw"], root=root, config=config,
                                dask_address=cluster.scheduler_address)
        # Both worker processes ran stage calls.
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
        assert len(executed) == 2 and all(n >= 3 for n in executed.values()), executed
    assert first["built"] and second["built"] and second["previous"] == first["version"]
    manifest = json.loads(s3.cat(f"corpus-test/corpus/{second['version']}/manifest.json"))
    assert len(manifest["inputs"]) > 4, manifest["inputs"]
    assert all(i["status"] == "ok" for i in manifest["inputs"]), manifest["inputs"]
    assert manifest["totals"]["input"] == 3 * 13 + 13
    assert manifest["rejected_by_rule"]["near_duplicate"] == 3
    assert manifest["rejected_by_rule"]["exact_duplicate"] == 1
    work = second["work"]
    new_parts = sum(i["uri"].endswith("part-3.jsonl") for i in manifest["inputs"])
    assert work["cleaned"] == new_parts and work["signed_shards"] == new_parts
    assert work["data_files_from_previous"] >= work["shards"] - new_parts - 1
    assert s3.exists(f"corpus-test/corpus/{second['version']}/data/part-00000.parquet")
