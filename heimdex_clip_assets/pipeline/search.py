"""Search: a text or an image in, the closest scenes out, each with short-lived signed URLs.

The vector comes from the text (or image) tower of the model that embedded the scenes, wherever it
runs: in this process (``local``) or in the RunPod worker (``runpod``), so a search host of the runpod
kind never imports torch. Three things keep a query fast under load:

- concurrent text queries are encoded in one forward pass (or one worker job): :class:`TextBatcher`;
- a repeated query skips the encoder: a small LRU of query vectors;
- signed URLs are reused while most of their lifetime is left: :class:`SignedUrlCache`.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from queue import SimpleQueue
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from heimdex_clip_assets.adapters.db import VectorStore
from heimdex_clip_assets.adapters.storage import Storage
from heimdex_clip_contract.errors import ClipError, InvalidImageError, InvalidRequestError, NotFoundError

if TYPE_CHECKING:  # the encoder imports torch: only the local kind loads it
    from heimdex_clip_assets.adapters.runpod_client import RunPodClient
    from runpod_worker.encoder import ClipEncoder
    from runpod_worker.fetch import FetchPolicy

MAX_QUERY_CHARS = 1000  # CLIP reads 77 tokens; anything this long is a mistake, not a query
MAX_LIMIT = 100
QUERY_PREFIX = "_search-queries"  # uploaded query images, for the worker to fetch; removed after use


# ------------------------------------------------------------------------------------- encoders
class QueryEncoder(Protocol):
    """The model's two towers, as search needs them. Vectors are float32 and unit length."""

    backend: str
    model_version: str

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_image(self, data: bytes) -> np.ndarray: ...

    def encode_image_url(self, url: str) -> np.ndarray: ...


class LocalQueryEncoder:
    """The in-process encoder (loaded once per process by the caller)."""

    backend = "local"

    def __init__(self, encoder: ClipEncoder, model_version: str, fetch_policy: FetchPolicy) -> None:
        self.encoder = encoder
        self.model_version = model_version
        self.fetch_policy = fetch_policy

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_text(texts)

    def encode_image(self, data: bytes) -> np.ndarray:
        result = self.encoder.encode_bytes([data])[0]
        if isinstance(result, ClipError):
            raise result
        return result

    def encode_image_url(self, url: str) -> np.ndarray:
        # The worker's own SSRF-checked download: a URL from a user must not reach private addresses.
        # Imported here: aiohttp costs every command ~0.1 s of start-up, and few searches fetch a URL.
        from runpod_worker.fetch import ImageClient, fetch_image

        policy = self.fetch_policy

        async def fetch() -> bytes:
            async with ImageClient(policy) as client:
                return await fetch_image(client, url)

        return self.encode_image(asyncio.run(fetch()))


class RunPodQueryEncoder:
    """Text jobs and image jobs on the RunPod worker; an uploaded image travels as a signed URL."""

    backend = "runpod"

    def __init__(self, client: RunPodClient, storage: Storage, url_ttl_s: int = 120) -> None:
        self.client = client
        self.storage = storage
        self.model_version = str(client.model_version)
        self.url_ttl_s = url_ttl_s

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.client.embed_texts(texts)

    def encode_image(self, data: bytes) -> np.ndarray:
        path = f"{QUERY_PREFIX}/{uuid.uuid4().hex}"
        with Image.open(io.BytesIO(data)) as image:  # the worker fetches only image/* content
            content_type = image.get_format_mimetype() or "image/jpeg"
        self.storage.upload(path, data, content_type=content_type)
        try:
            return self.encode_image_url(self.storage.create_signed_url(path, self.url_ttl_s))
        finally:
            self.storage.remove([path])

    def encode_image_url(self, url: str) -> np.ndarray:
        return self.client.embed_one(url).vector


# ------------------------------------------------------------------------------------- batching
class TextBatcher:
    """Encodes queries that arrive together in one call: under load a forward pass (or a worker job)
    serves every waiting query, so sixteen concurrent queries cost about one batch, not sixteen calls.

    Nothing waits for a batch to fill: a lone query is encoded at once.
    """

    def __init__(self, encode: Callable[[list[str]], np.ndarray], *, max_batch: int = 64, threads: int = 1):
        self._encode = encode
        self._max_batch = max_batch
        self._queue: SimpleQueue[tuple[str, Future[np.ndarray]] | None] = SimpleQueue()
        self._threads = threads
        self.batches = 0  # encoder calls
        self.texts = 0  # texts they encoded
        for i in range(threads):
            threading.Thread(target=self._run, name=f"text-batcher-{i}", daemon=True).start()

    def submit(self, text: str) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        self._queue.put((text, future))
        return future

    def close(self) -> None:
        for _ in range(self._threads):
            self._queue.put(None)

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:  # closing: finish this batch, then let another thread stop
                    self._queue.put(None)
                    break
                batch.append(item)
            self.batches += 1
            self.texts += len(batch)
            try:
                vectors = self._encode([text for text, _ in batch])
            except Exception as exc:  # every waiter hears why; the thread lives on
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), vector in zip(batch, vectors, strict=True):
                future.set_result(vector)


class LruCache:
    """A small thread-safe LRU of query vectors."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class SignedUrlCache:
    """Signed URLs by storage path, reused while more than half their lifetime is left.

    A result page signs its thumbnails in one storage request; a popular scene is signed once per
    half-lifetime rather than per search. Paths missing from storage get no URL (and are not cached).
    """

    def __init__(self, storage: Storage, ttl_s: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.storage = storage
        self.ttl_s = ttl_s
        self._clock = clock
        self._urls: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def sign(self, paths: Sequence[str]) -> dict[str, str]:
        now = self._clock()
        with self._lock:
            fresh = {p: u for p in paths if (hit := self._urls.get(p)) and hit[1] > now for u in (hit[0],)}
        todo = sorted({p for p in paths if p not in fresh})
        if todo:
            signed = self.storage.create_signed_urls(todo, self.ttl_s, missing_ok=True)
            reuse_until = now + self.ttl_s / 2
            with self._lock:
                if len(self._urls) > 10_000:  # bounded: expired entries go first, then everything
                    self._urls = {p: e for p, e in self._urls.items() if e[1] > now} or {}
                    if len(self._urls) > 10_000:
                        self._urls.clear()
                self._urls.update({p: (u, reuse_until) for p, u in signed.items()})
            fresh.update(signed)
        return fresh


# ------------------------------------------------------------------------------------- the service
@dataclass(frozen=True)
class Hit:
    scene_id: str
    video_id: str
    filename: str | None
    index: int
    start_s: float
    end_s: float
    score: float
    thumbnail_url: str | None
    video_url: str | None  # signed, ending in #t=<start_s>: a browser starts playing at the scene


def check_query(text: str) -> str:
    query = " ".join(text.split())
    if not query:
        raise InvalidRequestError("The query is empty; type a few words describing the scene")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidRequestError(
            f"The query is {len(query):,} characters; keep it under {MAX_QUERY_CHARS} (CLIP reads ~75 words)"
        )
    return query


def check_uuid(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidRequestError(f"{name} must be a UUID, got {value[:64]!r}") from None


def check_image(data: bytes) -> bytes:
    """Refuse what is not a picture before it reaches a model (or a worker job)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImageError("The upload is not an image we can read; send a JPEG, PNG or WebP") from exc
    return data


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequestError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


class SearchService:
    """Text or image -> vector -> the caller's closest scenes -> hits with signed URLs."""

    def __init__(
        self,
        store: VectorStore,
        storage: Storage,
        encoder: QueryEncoder,
        *,
        cache_size: int = 1024,
        thumbnail_ttl_s: int = 600,
        video_ttl_s: int = 3600,
        batch_threads: int = 1,
    ) -> None:
        self.store = store
        self.encoder = encoder
        self.cache = LruCache(cache_size)
        self.batcher = TextBatcher(encoder.encode_texts, threads=batch_threads)
        self.thumbnails = SignedUrlCache(storage, thumbnail_ttl_s)
        self.videos = SignedUrlCache(storage, video_ttl_s)
        self.images_encoded = 0

    def close(self) -> None:
        self.batcher.close()
        self.store.close()

    def image_vector(self, data: bytes) -> np.ndarray:
        self.images_encoded += 1
        return self.encoder.encode_image(check_image(data))

    def image_url_vector(self, url: str) -> np.ndarray:
        self.images_encoded += 1
        return self.encoder.encode_image_url(url)

    def text_vector(self, text: str) -> tuple[Future[np.ndarray], bool]:
        """The query's vector as a future (already done when cached), and whether it was cached."""
        query = check_query(text)
        cached = self.cache.get(query)
        if cached is not None:
            done: Future[np.ndarray] = Future()
            done.set_result(cached)
            return done, True
        future = self.batcher.submit(query)
        future.add_done_callback(lambda f: f.exception() is None and self.cache.put(query, f.result()))
        return future, False

    def _thumbnail_path(self, url: str | None) -> str | None:
        """The thumbnail's path in the bucket, or None for a scene without one (or a foreign URL)."""
        try:
            return self.thumbnails.storage.object_path(url) if url else None
        except ClipError:
            return None

    def search(
        self,
        vector: np.ndarray,
        *,
        limit: int,
        user_id: str | None,
        video_id: str | None = None,
        min_score: float | None = None,
    ) -> list[Hit]:
        """Scenes of ``user_id`` (every tenant's when None: API keys only) closest to ``vector``."""
        check_limit(limit)
        video_id, user_id = check_uuid(video_id, "video_id"), check_uuid(user_id, "user_id")
        if video_id is not None and not self.store.video_visible(video_id, user_id):
            # Another tenant's video reads as unknown: its existence is not the caller's business.
            raise NotFoundError(f"No video {video_id}; list yours with GET /v1/videos")
        found = self.store.search(
            vector,
            k=limit,
            video_id=video_id,
            user_id=user_id,
            model_version=self.encoder.model_version,
        )
        found = [h for h in found if min_score is None or h.score >= min_score]
        # thumbnail_url is the seed's public-form URL; the bucket is private, so each is signed.
        paths = {h.scene_id: self._thumbnail_path(h.thumbnail_url) for h in found}
        thumbs = self.thumbnails.sign([p for p in paths.values() if p])
        videos = self.videos.sign([h.video_path for h in found])
        return [
            Hit(
                scene_id=h.scene_id,
                video_id=h.video_id,
                filename=h.filename,
                index=h.index,
                start_s=h.start_s,
                end_s=h.end_s,
                score=round(h.score, 6),
                thumbnail_url=thumbs.get(paths[h.scene_id] or ""),
                video_url=f"{videos[h.video_path]}#t={h.start_s:.3f}" if h.video_path in videos else None,
            )
            for h in found
        ]
