"""``heimdex-clip backfill``: embed every scene that lacks a current embedding, resumably.

Work is committed per batch (one transaction each), so a crash or Ctrl-C loses at most one batch, and
running the same command again continues where it stopped. ``--force-regenerate`` re-embeds every
scene: its start time is kept in ``HEIMDEX_HOME/backfill.json`` so a resumed forced run skips the
scenes it already redid (their metadata carries ``embedded_at``).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import pipeline, services
from .config import Settings
from .db import SceneRecord
from .errors import ConfigError


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

    def pending(self, scene: SceneRecord) -> bool:
        embedded_at = (scene.metadata or {}).get("embedded_at")
        return scene.embedding is None or embedded_at is None or float(embedded_at) < self.started_at


def run_backfill(settings: Settings, *, batch_size: int, force: bool, dry_run: bool, console: Console) -> int:
    if batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if settings.clip_backend == "off":
        raise ConfigError("CLIP is off (CLIP_INFERENCE_BACKEND=off); set it to runpod or local to backfill")
    store = services.vector_store(settings)
    scenes = store.scenes_needing_embeddings(settings.clip_model_version, force=force)
    forced = ForcedRun.load_or_start(settings) if force and not dry_run else None
    if forced:
        scenes = [s for s in scenes if forced.pending(s)]
    by_video: dict[str, list[SceneRecord]] = defaultdict(list)
    for scene in scenes:
        by_video[str(scene.video_id)].append(scene)

    console.print(
        f"{len(scenes)} scene(s) in {len(by_video)} video(s) to embed with backend={settings.clip_backend}, "
        f"model_version={settings.clip_model_version}" + (" (forced)" if force else "")
    )
    if dry_run:
        for video_id, items in by_video.items():
            console.print(f"  {video_id}: {len(items)} scene(s)")
        return 0

    storage = services.storage(settings)
    backend = services.clip_backend(settings, storage)
    failures = 0
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("embedding", total=len(scenes))
        for items in by_video.values():
            for start in range(0, len(items), batch_size):
                report = pipeline.embed_scenes(
                    items[start : start + batch_size],
                    store=store,
                    storage=storage,
                    backend=backend,
                    expires_in=settings.signed_url_expires_s,
                    use_cache=not force,
                    on_progress=lambda n: progress.advance(task, n),
                )
                failures += len(report.failures)
                for index, err in sorted(report.failures.items()):
                    console.print(f"[red]✗[/red] video {items[0].video_id} scene {index}: {err.message}")
    if forced and not failures:
        ForcedRun.path(settings).unlink(missing_ok=True)
    console.print(
        f"Done: {len(scenes) - failures} embedded, {failures} failed"
        + ("; run the same command again to retry the failures" if failures else "")
    )
    return 1 if failures else 0
