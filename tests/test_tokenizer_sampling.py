"""The tokenizer's line sample: uniform over every line of the corpus, one sample per seed whatever the
number of processes that read the shards, and a damaged shard named however many read them."""
from __future__ import annotations

import multiprocessing
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenizer.corpus import CorpusError
from tokenizer.sampling import BottomK, part_generator, sample_corpus


def _corpus(tmp_path, sizes: list[int]) -> str:
    """One shard per entry of `sizes`, each with that many two-line documents tagged by shard and number,
    then a null and a blank document (which hold no lines)."""
    data = tmp_path / "corpus" / "data"
    data.mkdir(parents=True)
    for shard, size in enumerate(sizes):
        texts = [f"{shard}:{i}:甲\n\n  \n{shard}:{i}:乙" for i in range(size)] + [None, "  "]
        pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), data / f"part-{shard:05d}.parquet")
    return str(tmp_path / "corpus")


def test_one_sample_per_seed_whatever_the_number_of_readers(tmp_path) -> None:
    corpus = _corpus(tmp_path, [300, 50, 700, 10, 400])
    alone, counts = sample_corpus(corpus, "text", 500, shuffle=True, seed=5, workers=1)
    assert counts == {"documents_read": 1460 + 5, "lines_seen": 2 * 1460}  # the blank documents count, nulls not
    for workers in (2, 3, 8):
        assert sample_corpus(corpus, "text", 500, shuffle=True, seed=5, workers=workers) == (alone, counts)
    other, _ = sample_corpus(corpus, "text", 500, shuffle=True, seed=6, workers=2)
    assert len(alone) == len(set(alone)) == 500 and set(other) != set(alone)
    # it is the bottom-k of every line keyed in reading order by its shard's generator
    keyed = []
    for shard, size in enumerate([300, 50, 700, 10, 400]):
        draw = part_generator(5, shard).random
        for i in range(size):
            keyed += [(draw(), f"{shard}:{i}:甲"), (draw(), f"{shard}:{i}:乙")]
    assert alone == [line for _, line in sorted(keyed)[:500]]


def test_the_sample_is_uniform_over_shards_and_over_positions(tmp_path) -> None:
    sizes = [200, 2000, 6000]
    corpus = _corpus(tmp_path, sizes)
    lines, _ = sample_corpus(corpus, "text", 1600, shuffle=True, seed=11, workers=2)
    total = 2 * sum(sizes)
    by_shard = Counter(int(line.split(":")[0]) for line in lines)
    for shard, size in enumerate(sizes):
        p = 2 * size / total
        expected, sd = 1600 * p, (1600 * p * (1 - p)) ** 0.5
        assert abs(by_shard[shard] - expected) < 4 * sd, (shard, by_shard, expected)
    # within the largest shard: as many from its first half as from its second, not its first lines
    first_half = sum(1 for line in lines if line.startswith("2:") and int(line.split(":")[1]) < 3000)
    assert abs(first_half - by_shard[2] / 2) < 4 * (by_shard[2] / 4) ** 0.5


def test_the_first_documents_only_and_the_first_lines(tmp_path) -> None:
    corpus = _corpus(tmp_path, [30, 30, 30])
    # 32 rows per shard (a null and a blank): the first 40 rows are shard 0's and 8 of shard 1's
    lines, counts = sample_corpus(corpus, "text", 1000, shuffle=True, seed=1, workers=3, max_documents=40)
    assert sorted(lines) == sorted(f"{s}:{i}:{half}" for s, n in ((0, 30), (1, 8)) for i in range(n)
                                   for half in "甲乙")
    assert counts == {"documents_read": 30 + 1 + 8, "lines_seen": 76}
    first, counts = sample_corpus(corpus, "text", 5, shuffle=False, seed=1, workers=3)
    assert first == ["0:0:甲", "0:0:乙", "0:1:甲", "0:1:乙", "0:2:甲"] and counts["documents_read"] == 3


def test_bottom_k_merges_into_the_sample_of_the_union() -> None:
    texts = [f"{i}甲\n{i}乙" for i in range(100)]
    whole = BottomK(30)
    whole.add_documents(texts, part_generator(2, 0))
    first, second = BottomK(30), BottomK(30)
    rng = part_generator(2, 0)
    first.add_documents(texts[:37], rng)
    second.add_documents(texts[37:], rng)  # the same generator, on where the first part left it
    second.merge(first)
    assert second.sample() == whole.sample() and second.counts() == whole.counts() == {"documents_read": 100,
                                                                                       "lines_seen": 200}


@pytest.mark.parametrize("workers", [1, 3])
def test_a_damaged_shard_is_named_and_no_reader_is_left(tmp_path, workers) -> None:
    corpus = _corpus(tmp_path, [2000, 2000, 2000, 2000])
    damaged = tmp_path / "corpus" / "data" / "part-00002.parquet"
    damaged.write_bytes(damaged.read_bytes()[:500])
    with pytest.raises(CorpusError, match=re.escape(f"{damaged} is not a readable Parquet file")):
        sample_corpus(corpus, "text", 100, shuffle=True, seed=1, workers=workers)
    assert multiprocessing.active_children() == []


def test_an_interrupted_pass_stops_every_reader(tmp_path) -> None:
    """Ctrl-C (or a SIGTERM turned into an exception) in the parent while the workers read: the readers
    stop at their next report instead of reading on through the queue, and none is left."""
    corpus = _corpus(tmp_path, [20_000] * 6)

    def interrupt(message: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_corpus(corpus, "text", 100, shuffle=True, seed=1, workers=2, progress=interrupt, every_s=0.0)
    assert multiprocessing.active_children() == []


def test_a_corpus_of_many_shards_is_shared_out(tmp_path) -> None:
    """The shards were put on a queue before the readers started: with some hundreds of them the queue's pipe
    was full and the parent waited forever. (The pass runs in a thread, so that a hang fails the test.)"""
    import threading

    data = tmp_path / "corpus" / "data"
    data.mkdir(parents=True)
    for shard in range(1200):
        pq.write_table(pa.table({"text": [f"{shard}:甲\n{shard}:乙"]}), data / f"part-{shard:05d}.parquet")
    got: list = []
    reading = threading.Thread(target=lambda: got.append(
        sample_corpus(str(tmp_path / "corpus"), "text", 50, shuffle=True, seed=3, workers=2)), daemon=True)
    reading.start()
    reading.join(120)
    assert got, "the sampling pass did not end"
    lines, counts = got[0]
    assert counts == {"documents_read": 1200, "lines_seen": 2400} and len(lines) == 50
    assert lines == sample_corpus(str(tmp_path / "corpus"), "text", 50, shuffle=True, seed=3, workers=1)[0]
