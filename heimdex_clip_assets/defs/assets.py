"""The per-video assets: thin calls into ``heimdex_clip_assets.pipeline``, plus UI metadata.

Each run covers one video (the sensor's runs) or a range of them (a backfill from the UI, the schedule):
the assets work through ``context.partition_keys`` and keep their state in Postgres and storage, so they
return ``MaterializeResult``s, never values for an IO manager (which cannot store partition ranges).
"""

import base64
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import dagster as dg
from pydantic import Field

from heimdex_clip_assets.adapters.db import VideoRecord
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.pipeline import embed, keyframes
from heimdex_clip_assets.pipeline.keyframes import SceneParams
from heimdex_clip_contract.errors import ClipError, InvalidVideoError

from .partitions import video_labels, videos_partitions
from .resources import ClipInferenceResource, StorageResource, VectorStoreResource

GROUP = "video_scenes"
# BackfillPolicy is what turns a UI backfill of many videos into a few runs; beta in Dagster 1.13, used
# knowingly, so its warning stays out of every process that loads the code location.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)
# Videos per run of a backfill (UI or schedule): read when the code location loads.
PARTITIONS_PER_RUN = Settings.from_env().partitions_per_run
# A whole-step retry for what passes (a database restart, storage or RunPod briefly away); failures
# that will not pass are raised with allow_retries=False.
STEP_RETRY = dg.RetryPolicy(
    max_retries=2, delay=15, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


class SceneDetectionConfig(dg.Config):
    """Launchpad overrides of ``pipeline.keyframes.SceneParams``; defaults are taken from it."""

    detector: str = SceneParams.detector
    threshold: float | None = SceneParams.threshold
    min_scene_len_s: float = SceneParams.min_scene_len_s
    thumbnail_max_side: int = SceneParams.thumbnail_max_side
    embed_while_detecting: bool = Field(
        default=False,
        description="With the local backend, embed each keyframe as soon as its scene ends, while the video "
        "is still being decoded (what process-video and demo ask for: the model's load and its forward "
        "passes overlap with decoding); scene_clip_embeddings then does only what is left. Off for the "
        "sensor's and backfills' runs, whose embedding waits for a clip_inference slot.",
    )


INTERRUPTED = (
    "Interrupted (Ctrl-C, SIGTERM or a run termination): the run is marked failed and its clip_inference "
    "slot is free again; run the video again to finish it (scenes already embedded are kept)"
)


@contextmanager
def _failure_says_what_to_do() -> Iterator[None]:
    """Our errors' messages already say what to do: make that the step's failure description (what the
    UI and `heimdex-clip` show), instead of the innermost library exception of a traceback."""
    try:
        yield
    except ClipError as exc:
        raise dg.Failure(
            description=exc.message,
            metadata={"code": exc.code, "retryable": exc.retryable},
            allow_retries=exc.retryable,
        ) from exc
    except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError) as exc:
        # Dagster would retry an interrupted step under its retry policy: Ctrl-C, SIGTERM or a run
        # termination would then start the step again. Someone asked it to stop, so it stops, saying so.
        raise dg.Failure(
            description=INTERRUPTED,
            metadata={"code": "interrupted", "retryable": True},
            allow_retries=False,
        ) from exc


def _labels(video: VideoRecord | None) -> dict[str, str]:
    """The video's file name (and owner) as metadata keys: what the partition's bare uuid stands for."""
    return {key.removeprefix("heimdex/"): value for key, value in video_labels(video).items()}


def _embedding_status(computed: int, cache_hits: int, scene_count: int) -> str:
    """One line for the UI: what this materialization did, including why it did nothing."""
    if computed == cache_hits == 0:
        return f"already current: {scene_count} scenes"
    return f"embedded {computed + cache_hits} of {scene_count} scenes ({cache_hits} from the cache)"


def _jpeg_markdown(jpeg: bytes) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![keyframes](data:image/jpeg;base64,{base64.b64encode(jpeg).decode()})")


@dg.asset(
    partitions_def=videos_partitions,
    backfill_policy=dg.BackfillPolicy.multi_run(PARTITIONS_PER_RUN),
    retry_policy=STEP_RETRY,
    group_name=GROUP,
    kinds={"python", "supabase", "postgres"},
    description="The video's scenes: those that exist are adopted as they are; a video without any gets "
    "them detected (PySceneDetect), the best keyframe of each as a JPEG thumbnail in storage "
    "({owner_id}/{video_id}/thumbnails/scene_{index}.jpg), and one video_scenes row per scene.",
)
def scene_keyframes(
    context: dg.AssetExecutionContext,
    config: SceneDetectionConfig,
    db: VectorStoreResource,
    storage: StorageResource,
    clip: ClipInferenceResource,
) -> dg.MaterializeResult:
    # Decoding mostly releases the GIL, so importing torch and loading the model (~4 s of CPU) overlaps
    # with it; the embedding step then finds the model ready in this process.
    clip.preload()
    store, files = db.get(), storage.get()
    params = SceneParams(**config.model_dump(exclude={"embed_while_detecting"}))
    settings = clip.settings()
    embedder: Callable[[], embed.KeyframeEmbedder] | None = None
    if config.embed_while_detecting and settings.clip_backend == "local":
        # The backend is asked for in the embedder's own thread: detection starts while the model loads.
        embedder = partial(
            embed.KeyframeEmbedder,
            clip.get,
            batch_size=settings.clip_batch_size,
            wait_for_model=not clip.model_in_child(),
            logger=context.log,
        )

    scene_count, embedded, rejected = 0, 0, {}
    report = None
    for video_id in context.partition_keys:
        try:
            with _failure_says_what_to_do():
                report = keyframes.extract_keyframes(
                    video_id, store=store, storage=files, params=params, embedder=embedder
                )
        except dg.Failure as failure:
            # A video we cannot decode is marked failed; the others of the range go on.
            if not isinstance(failure.__cause__, InvalidVideoError):
                raise
            rejected[video_id] = failure.description
            context.log.warning(f"Video {video_id}: {failure.description}")
            continue
        video = report.video
        scene_count += len(report.scenes)
        embedded += report.embedded
        if report.adopted:
            context.log.info(
                f"Video {video.id}: adopted its {len(report.scenes)} existing scenes "
                f"({report.without_thumbnail} without a thumbnail, which cannot be embedded)"
            )
        else:
            context.log.info(
                f"Video {video.id}: {len(report.scenes)} scenes in {video.duration_s or 0:.1f}s of video "
                f"({', '.join(f'{k}={v:.2f}s' for k, v in report.timings_s.items())})"
            )
    if rejected:
        raise dg.Failure(
            description=f"{len(rejected)} video(s) could not be decoded: "
            + "; ".join(f"{v}: {why}" for v, why in list(rejected.items())[:5]),
            allow_retries=False,
        )
    metadata: dict[str, object] = {"videos": len(context.partition_keys), "scene_count": scene_count}
    if embedder is not None:
        metadata["embedded_while_detecting"] = embedded
    if report is not None and len(context.partition_keys) == 1:
        video = report.video
        metadata |= {
            **_labels(video),
            "duration_s": video.duration_s,
            "resolution": f"{video.width}x{video.height}",
            "stage_seconds": report.timings_s,
            "adopted": report.adopted,
            "without_thumbnail": report.without_thumbnail,
        }
        if report.contact_sheet_jpeg is not None:
            metadata["contact_sheet"] = _jpeg_markdown(report.contact_sheet_jpeg)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    partitions_def=videos_partitions,
    backfill_policy=dg.BackfillPolicy.multi_run(PARTITIONS_PER_RUN),
    retry_policy=STEP_RETRY,
    group_name=GROUP,
    deps=[scene_keyframes],
    kinds={"pytorch", "postgres"},
    # Caps how many runs embed at once; each keeps RUNPOD_MAX_IN_FLIGHT jobs in flight (dagster.yaml).
    pool="clip_inference",
    description="CLIP embeddings of every keyframe (video_scenes.embedding_visual_clip + "
    "visual_clip_metadata) through the embedding engine: scenes of all the run's videos packed into jobs "
    "of CLIP_BATCH_SIZE images, RUNPOD_MAX_IN_FLIGHT of them at once, each signed right before it is "
    "sent; RunPod, local CPU, or off.",
)
def scene_clip_embeddings(
    context: dg.AssetExecutionContext,
    db: VectorStoreResource,
    clip: ClipInferenceResource,
) -> dg.MaterializeResult:
    settings = clip.settings()
    with _failure_says_what_to_do():
        backend = clip.get()
        if not backend.enabled:
            context.log.warning(
                "CLIP is off (CLIP_INFERENCE_BACKEND=off or CLIP_ENABLED=false): scenes stay without "
                "CLIP embeddings"
            )
            return dg.MaterializeResult(metadata={"backend": "off", "embedded": 0})
        report = embed.embed_videos(
            context.partition_keys, settings=settings, store=db.get(), backend=backend, logger=context.log
        )
    computed = report.embedded - report.cache_hits
    metadata: dict[str, object] = {"videos": len(context.partition_keys)}
    if len(context.partition_keys) == 1:
        store, (video_id,) = db.get(), context.partition_keys
        scene_count = len(store.scenes(video_id))
        metadata |= {
            **_labels(store.get_video(video_id)),
            "status": _embedding_status(computed, report.cache_hits, scene_count),
            "scene_count": scene_count,
        }
    metadata |= {
        "backend": report.backend,
        "model_version": report.model_version,
        "computed": computed,
        "cache_hits": report.cache_hits,
        "failures": report.failed,
        "jobs": report.jobs,
        "batch_size": report.batch_size,
        "peak_jobs_in_flight": report.peak_in_flight,
        "images_per_s": round(report.images_per_s, 1),
        "wall_s": round(report.wall_s, 3),
    }
    if report.failed:
        # The client retried these already (the one retry layer): a step retry would only repeat it.
        raise dg.Failure(
            description=f"{report.failed} scene(s) still without a CLIP embedding after retries: "
            f"{report.failure_summary()}. Fix the cause and rerun: only these scenes are redone.",
            metadata=metadata,
            allow_retries=False,
        )
    return dg.MaterializeResult(metadata=metadata)


ingest_video_job = dg.define_asset_job(
    "ingest_video",
    selection=dg.AssetSelection.assets(scene_keyframes, scene_clip_embeddings),
    description="Everything for one video (or a range): keyframes -> CLIP embeddings (+ checks).",
)

embed_job = dg.define_asset_job(
    "embed_scenes",
    selection=dg.AssetSelection.assets(scene_clip_embeddings),
    description="Re-embed videos whose keyframes exist (missing or stale-model embeddings only).",
)
