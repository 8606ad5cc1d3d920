"""Concurrent text queries share one forward pass of the real text tower."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from heimdex_clip_assets.pipeline.search import LruCache, TextBatcher

if TYPE_CHECKING:
    from runpod_worker.encoder import ClipEncoder


def test_waiting_queries_are_encoded_together(worker_encoder: ClipEncoder) -> None:
    calls: list[int] = []
    first_call_running = threading.Event()
    release = threading.Event()

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        first_call_running.set()
        release.wait(10)  # holds the model while the other queries arrive
        return worker_encoder.encode_text(texts)

    batcher = TextBatcher(encode)
    try:
        first = batcher.submit("query 0")
        assert first_call_running.wait(10)
        rest = [batcher.submit(f"query {i}") for i in range(1, 10)]
        release.set()
        vectors = [f.result(30) for f in [first, *rest]]
    finally:
        batcher.close()
    assert calls == [1, 9] and batcher.batches == 2 and batcher.texts == 10
    np.testing.assert_allclose(vectors[7], worker_encoder.encode_text(["query 7"])[0], atol=1e-5)


def test_lru_keeps_the_most_recent() -> None:
    cache = LruCache(2)
    one, two, three = (np.full(2, i, np.float32) for i in range(3))
    cache.put("a", one)
    cache.put("b", two)
    assert cache.get("a") is one  # "a" is now the most recent
    cache.put("c", three)
    assert cache.get("b") is None and cache.get("a") is one and cache.get("c") is three
