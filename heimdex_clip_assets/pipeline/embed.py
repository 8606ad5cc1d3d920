"""Embeddings: thumbnails -> short-lived signed URLs -> the CLIP backend -> vectors in the store."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from heimdex_clip_contract.errors import ClipError, NotFoundError

from ..adapters.clip_backends import ClipBackend, EmbeddingResult, SceneImage, log_result
from ..adapters.db import EmbeddingRow, SceneRecord, VectorStore
from ..adapters.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignedUrl:
    path: str
    url: str
    expires_at: float

    def fresh(self, margin_s: float, now: float | None = None) -> bool:
        return self.expires_at - (time.time() if now is None else now) > margin_s


def sign_scene_urls(
    scenes: Sequence[SceneRecord], *, storage: Storage, expires_in: int
) -> dict[int, SignedUrl]:
    """One short-lived signed URL per thumbnail (one batch call to storage)."""
    paths = [s.thumbnail_path for s in scenes]
    issued = time.time()
    urls = storage.create_signed_urls(paths, expires_in)
    return {s.index: SignedUrl(s.thumbnail_path, urls[s.thumbnail_path], issued + expires_in) for s in scenes}


def refresh_signed_urls(
    urls: dict[int, SignedUrl], *, storage: Storage, expires_in: int, margin_s: float
) -> tuple[dict[int, SignedUrl], int]:
    """Re-sign the URLs that expire within ``margin_s``; returns the new map and how many were re-signed."""
    stale = {i: u for i, u in urls.items() if not u.fresh(margin_s)}
    if not stale:
        return urls, 0
    issued = time.time()
    fresh = storage.create_signed_urls([u.path for u in stale.values()], expires_in)
    out = dict(urls)
    for i, u in stale.items():
        out[i] = SignedUrl(u.path, fresh[u.path], issued + expires_in)
    return out, len(stale)


# --------------------------------------------------------------------------------------- embeddings
@dataclass
class EmbedReport:
    backend: str
    model_version: str
    embedded: int = 0
    cache_hits: int = 0
    resigned: int = 0
    failures: dict[int, ClipError] = field(default_factory=dict)
    inference_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.inference_ms, q)) if self.inference_ms else None


def embed_scenes(
    scenes: Sequence[SceneRecord],
    *,
    store: VectorStore,
    storage: Storage,
    backend: ClipBackend,
    signed_urls: dict[int, SignedUrl] | None = None,
    expires_in: int = 300,
    url_margin_s: float = 120.0,
    attempts: int = 2,
    use_cache: bool = True,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> EmbedReport:
    """Embed the given scenes of ONE video and store the vectors in one transaction.

    The sha256 cache (unless ``use_cache`` is off) answers scenes whose thumbnail was embedded before by
    the same model version. A scene whose embedding fails with a retryable error gets another attempt
    (with a fresh URL); what still fails is in ``report.failures`` and stays without an embedding, so a
    rerun does exactly those. Successful vectors are written even when others fail, each with an
    ``embedded_at`` in its metadata (what a resumed forced backfill reads).
    """
    logger = logger or log
    started = time.perf_counter()
    report = EmbedReport(backend=backend.name, model_version=backend.model_version)
    if not scenes:
        return report
    video_ids = {s.video_id for s in scenes}
    if len(video_ids) != 1:
        raise ValueError("embed_scenes works on the scenes of one video at a time")
    (video_id,) = video_ids

    rows: list[EmbeddingRow] = []
    cached = (
        store.cached_embeddings([s.thumbnail_sha256 for s in scenes], backend.model_version)
        if use_cache
        else {}
    )
    todo: list[SceneRecord] = []
    for scene in scenes:
        hit = cached.get(scene.thumbnail_sha256)
        if hit is None:
            todo.append(scene)
            continue
        vector, meta = hit
        rows.append(
            EmbeddingRow(scene.index, vector, {**meta, "cache_hit": True, "embedded_at": time.time()})
        )
        report.cache_hits += 1
    if on_progress and report.cache_hits:
        on_progress(report.cache_hits)

    # Only the scenes still to embed: re-signing the cache hits' URLs would be wasted calls.
    urls = {s.index: signed_urls[s.index] for s in todo if signed_urls and s.index in signed_urls}
    for attempt in range(1, attempts + 1):
        if not todo:
            break
        if backend.needs_urls:
            missing = [s for s in todo if s.index not in urls]
            if missing:
                urls.update(sign_scene_urls(missing, storage=storage, expires_in=expires_in))
            urls, resigned = refresh_signed_urls(
                urls, storage=storage, expires_in=expires_in, margin_s=url_margin_s
            )
            report.resigned += resigned
        images = [
            SceneImage(
                key=s.index,
                storage_path=s.thumbnail_path,
                url=urls[s.index].url if s.index in urls else None,
            )
            for s in todo
        ]
        for scene in todo:
            logger.info(
                f"Scene {scene.index}: Generating CLIP embedding from best frame (backend={backend.name})"
            )
        results = backend.embed(images)
        retry: list[SceneRecord] = []
        for scene, result in zip(todo, results, strict=True):
            logger.log(
                logging.INFO if isinstance(result, EmbeddingResult) else logging.WARNING,
                log_result(scene.index, backend.name, result),
            )
            if isinstance(result, EmbeddingResult):
                rows.append(
                    EmbeddingRow(scene.index, result.vector, {**result.metadata, "embedded_at": time.time()})
                )
                report.inference_ms.append(float(result.metadata.get("inference_time_ms", 0.0)))
                report.failures.pop(scene.index, None)
            else:
                report.failures[scene.index] = result
                if result.retryable and attempt < attempts:
                    retry.append(scene)
        if on_progress:
            on_progress(len(todo) - len(retry))
        # Force a fresh URL for retried scenes: an expired or consumed URL is a common cause.
        for scene in retry:
            urls.pop(scene.index, None)
        todo = retry

    store.write_embeddings(video_id, rows)
    report.embedded = len(rows)
    report.wall_s = time.perf_counter() - started
    return report


def embed_video(
    video_id: str,
    *,
    store: VectorStore,
    storage: Storage,
    backend: ClipBackend,
    force: bool = False,
    signed_urls: dict[int, SignedUrl] | None = None,
    expires_in: int = 300,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> EmbedReport:
    """Embed exactly the scenes of a video that lack a current embedding (all of them with ``force``)."""
    if store.get_video(video_id) is None:
        raise NotFoundError(f"Unknown video id {video_id}; check it with `heimdex-clip search` or add-video")
    scenes = store.scenes_needing_embeddings(backend.model_version, video_id=video_id, force=force)
    report = embed_scenes(
        scenes,
        store=store,
        storage=storage,
        backend=backend,
        signed_urls=signed_urls,
        expires_in=expires_in,
        logger=logger,
    )
    status = "embedded" if not report.failures else "embedding_incomplete"
    store.set_video_status(video_id, status, None if not report.failures else failure_summary(report))
    return report


def failure_summary(report: EmbedReport) -> str:
    return "; ".join(f"scene {i}: {err.code}: {err.message}" for i, err in sorted(report.failures.items()))
