"""``heimdex-clip backfill``: a progress bar over the embedding engine, and a line per failure."""

from __future__ import annotations

import argparse

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from heimdex_clip_assets import services
from heimdex_clip_assets.pipeline.backfill import plan_backfill, run_backfill
from heimdex_clip_contract.errors import ConfigError

from .common import console, require_weights, settings_from_args


def cmd_backfill(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.clip_timeout:
        settings = settings.replace(runpod_timeout_s=args.clip_timeout)
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        settings = settings.replace(clip_batch_size=args.batch_size)
    if settings.clip_backend == "off":
        raise ConfigError("CLIP is off (CLIP_INFERENCE_BACKEND=off); set it to runpod or local to backfill")
    store = services.vector_store(settings)
    plan = plan_backfill(store, settings.clip_model_version, force=args.force_regenerate)
    console.print(
        f"{plan.scenes} scene(s) in {plan.videos} video(s) to embed with backend={settings.clip_backend}, "
        f"model_version={settings.clip_model_version}, {settings.clip_batch_size} images per job, "
        f"{settings.max_in_flight} job(s) in flight" + (" (forced)" if args.force_regenerate else "")
    )
    if args.dry_run:
        for video_id, scenes in plan.first:
            console.print(f"  {video_id}: {scenes} scene(s)")
        if plan.videos > len(plan.first):
            console.print(f"  ... and {plan.videos - len(plan.first)} more video(s)")
        return 0

    require_weights(settings)
    backend = services.clip_backend(settings, services.storage(settings))
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("embedding", total=plan.scenes)
        report = run_backfill(
            settings,
            store,
            backend,
            force=args.force_regenerate,
            on_progress=lambda n: progress.advance(task, n),
        )
    for video_id, index, err in report.failures:
        console.print(f"[red]✗[/red] video {video_id} scene {index}: {err.message}")
    if report.failed > len(report.failures):
        console.print(f"[red]✗[/red] ... and {report.failed - len(report.failures)} more")
    console.print(
        f"Done: {report.embedded} embedded, {report.failed} failed, "
        f"{store.count_scenes_without_thumbnail()} skipped without a thumbnail "
        f"({report.cache_hits} from the cache, "
        f"{report.jobs} jobs in {report.wall_s:.1f}s)"
        + ("; run the same command again to retry the failures" if report.failed else "")
    )
    return 1 if report.failed else 0
