"""``heimdex-clip backfill``: a progress bar over the backfill, and a line per failure."""

from __future__ import annotations

import argparse
from collections import defaultdict

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from heimdex_clip_assets import services
from heimdex_clip_assets.adapters.db import SceneRecord
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.pipeline import embed
from heimdex_clip_assets.pipeline.backfill import ForcedRun
from heimdex_clip_contract.errors import ConfigError

from .common import (
    console,
    require_weights,
    settings_from_args,
)


def cmd_backfill(args: argparse.Namespace) -> int:
    settings = (
        settings_from_args(args).replace(runpod_timeout_s=args.clip_timeout)
        if args.clip_timeout
        else settings_from_args(args)
    )
    if not args.dry_run:
        require_weights(settings)
    return run_backfill(
        settings,
        batch_size=args.batch_size,
        force=args.force_regenerate,
        dry_run=args.dry_run,
        console=console,
    )


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
                report = embed.embed_scenes(
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
