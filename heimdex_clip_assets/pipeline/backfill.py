"""The backfill: embed every scene of the library that lacks a current embedding, resumably.

Scenes stream from the database a page at a time into the embedding engine, and every job's vectors are
committed as they come back, so a crash or Ctrl-C loses at most the jobs in flight, memory does not grow
with the library, and running the same command again continues where it stopped. ``--force-regenerate``
re-embeds every scene: its start time is kept in ``HEIMDEX_HOME/backfill.json`` so a resumed forced run
skips the scenes it already redid (their metadata carries ``embedded_at``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from heimdex_clip_assets.adapters.clip_backends import ClipBackend
from heimdex_clip_assets.adapters.db import SceneToEmbed, VectorStore
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.pipeline.embed import EngineReport, engine_for

STATUS_CHUNK = 1000  # videos per status update: one statement, bounded parameters
SHOWN_VIDEOS = 20


@dataclass
class ForcedRun:
    """The marker of a forced regeneration in progress."""

    model_version: str
    started_at: float

    @staticmethod
    def path(settings: Settings) -> Path:
        return settings.home / "backfill.json"

    @classmethod
    def load_or_start(cls, settings: Settings) -> ForcedRun:
        path = cls.path(settings)
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("model_version") == settings.clip_model_version:
                return cls(data["model_version"], float(data["started_at"]))
        run = cls(settings.clip_model_version, time.time())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model_version": run.model_version, "started_at": run.started_at}))
        return run

    def pending(self, scene: SceneToEmbed) -> bool:
        return scene.embedded_at is None or scene.embedded_at < self.started_at


@dataclass
class BackfillPlan:
    """What a backfill would do: counts for the whole library, and the first videos by id."""

    scenes: int = 0
    videos: int = 0
    first: list[tuple[str, int]] = field(default_factory=list)


def plan_backfill(store: VectorStore, model_version: str, *, force: bool) -> BackfillPlan:
    """Counted by the database, one row per video streamed: a library of any size answers in one scan."""
    plan = BackfillPlan()
    for video_id, scenes in store.embedding_backlog(model_version, force=force):
        plan.scenes += scenes
        plan.videos += 1
        if len(plan.first) < SHOWN_VIDEOS:
            plan.first.append((video_id, scenes))
    return plan


def run_backfill(
    settings: Settings,
    store: VectorStore,
    backend: ClipBackend,
    *,
    force: bool,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> EngineReport:
    """Embed the library's backlog through the engine; each touched video's status then says what its
    scenes hold."""
    forced = ForcedRun.load_or_start(settings) if force else None
    pages: Iterator[list[SceneToEmbed]] = store.iter_scenes_to_embed(backend.model_version, force=force)
    if forced is not None:
        pages = ([s for s in page if forced.pending(s)] for page in pages)
    # The cache would answer a forced run with the vectors it is meant to replace.
    engine = engine_for(settings, store, backend, use_cache=not force, logger=logger, on_progress=on_progress)
    report = engine.run(pages)
    videos = sorted(report.videos)
    for start in range(0, len(videos), STATUS_CHUNK):
        store.refresh_embedding_status(videos[start : start + STATUS_CHUNK], backend.model_version)
    if forced is not None and not report.failed:
        ForcedRun.path(settings).unlink(missing_ok=True)
    return report
