"""Corpus statistics: the batch path the finalize stage takes equals adding documents one by one."""
from __future__ import annotations

import random

import numpy as np

from cleaning.document import Document
from cleaning.stats import LENGTH_BOUNDS, ShardStats


def test_adding_many_equals_adding_one_by_one() -> None:
    rng = random.Random(8)
    lengths = [0, 1, *LENGTH_BOUNDS, *(b - 1 for b in LENGTH_BOUNDS), *(rng.randrange(60_000) for _ in range(300))]
    qualities = [None, 0.0, 1.0, 0.1, 0.7, float(np.float32(0.3)), *(rng.random() for _ in range(10))]
    docs = [Document(id=str(i), text="字" * n, domain=rng.choice(["news", "web", "百科"]), source="s",
                     quality=rng.choice(qualities)) for i, n in enumerate(lengths)]
    one = ShardStats()
    for doc in docs:
        one.add(doc)
    many = ShardStats()
    for start in (0, 100, 250):  # in three calls, as finalize gives one per row group
        part = docs[start:{0: 100, 100: 250, 250: len(docs)}[start]]
        many.add_many([d.domain for d in part], np.array([len(d.text) for d in part]),
                      np.array([np.nan if d.quality is None else d.quality for d in part]))
    assert many.to_json() == one.to_json()
    assert sum(one.quality) == sum(d.quality is not None for d in docs)
