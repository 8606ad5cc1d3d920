"""The three per-video assets: thin calls into ``heimdex_clip_assets.pipeline``, plus UI metadata."""

import base64
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from heimdex_clip_assets.adapters.db import VideoRecord
from heimdex_clip_assets.pipeline import embed, keyframes
from heimdex_clip_assets.pipeline.embed import SignedUrl
from heimdex_clip_assets.pipeline.keyframes import SceneParams
from heimdex_clip_contract.errors import ClipError

from .partitions import video_labels, videos_partitions
from .resources import ClipInferenceResource, StorageResource, VectorStoreResource

GROUP = "video_scenes"


class SceneDetectionConfig(dg.Config):
    """Launchpad overrides of ``pipeline.keyframes.SceneParams``; defaults are taken from it."""

    detector: str = SceneParams.detector
    threshold: float | None = SceneParams.threshold
    min_scene_len_s: float = SceneParams.min_scene_len_s
    thumbnail_max_side: int = SceneParams.thumbnail_max_side


@contextmanager
def _failure_says_what_to_do() -> Iterator[None]:
    """Our errors' messages already say what to do: make that the step's failure description (what the
    UI and `heimdex-clip` show), instead of the innermost library exception of a traceback."""
    try:
        yield
    except ClipError as exc:
        raise dg.Failure(
            description=exc.message, metadata={"code": exc.code, "retryable": exc.retryable}
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
    group_name=GROUP,
    kinds={"python", "supabase", "postgres"},
    description="Scenes of the video (PySceneDetect), the best keyframe of each as a JPEG thumbnail in "
    "storage (thumbnails/{video_id}/{index}.jpg), and one video_scenes row per scene.",
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
    with _failure_says_what_to_do():
        report = keyframes.extract_keyframes(
            context.partition_key,
            store=db.get(),
            storage=storage.get(),
            params=SceneParams(**config.model_dump()),
        )
    video = report.video
    context.log.info(
        f"Video {video.id}: {len(report.scenes)} scenes in {video.duration_s:.1f}s of video "
        f"({', '.join(f'{k}={v:.2f}s' for k, v in report.timings_s.items())})"
    )
    return dg.MaterializeResult(
        metadata={
            **_labels(video),
            "scene_count": len(report.scenes),
            "duration_s": video.duration_s,
            "resolution": f"{video.width}x{video.height}",
            "stage_seconds": report.timings_s,
            "contact_sheet": _jpeg_markdown(report.contact_sheet_jpeg),
        }
    )


@dg.asset(
    partitions_def=videos_partitions,
    group_name=GROUP,
    deps=[scene_keyframes],
    kinds={"supabase"},
    description="A short-lived signed URL per thumbnail (SIGNED_URL_EXPIRES_S, 5 minutes by default), "
    "for the RunPod worker to download from.",
)
def scene_signed_urls(
    context: dg.AssetExecutionContext, db: VectorStoreResource, storage: StorageResource
) -> dg.Output[dict[int, SignedUrl]]:
    expires_in = storage.settings().signed_url_expires_s
    with _failure_says_what_to_do():
        scenes = db.get().scenes(context.partition_key)
        urls = embed.sign_scene_urls(scenes, storage=storage.get(), expires_in=expires_in)
    return dg.Output(urls, metadata={"signed_urls": len(urls), "expires_in_s": expires_in})


@dg.asset(
    partitions_def=videos_partitions,
    group_name=GROUP,
    kinds={"pytorch", "postgres"},
    # Caps concurrent CLIP calls across all runs (dagster.yaml: match it to RunPod's max workers).
    pool="clip_inference",
    description="CLIP embeddings of every keyframe (video_scenes.embedding_visual_clip + "
    "visual_clip_metadata), through the configured backend: RunPod, local CPU, or off.",
)
def scene_clip_embeddings(
    context: dg.AssetExecutionContext,
    scene_signed_urls: dict[int, SignedUrl],
    db: VectorStoreResource,
    storage: StorageResource,
    clip: ClipInferenceResource,
) -> dg.MaterializeResult:
    store, store_files = db.get(), storage.get()
    with _failure_says_what_to_do():
        backend = clip.get(store_files)
        if not backend.enabled:
            context.log.warning(
                "CLIP is off (CLIP_INFERENCE_BACKEND=off or CLIP_ENABLED=false): scenes stay without "
                "CLIP embeddings"
            )
            return dg.MaterializeResult(metadata={"backend": "off", "embedded": 0})
        report = embed.embed_video(
            context.partition_key,
            store=store,
            storage=store_files,
            backend=backend,
            signed_urls=scene_signed_urls,
            expires_in=storage.settings().signed_url_expires_s,
            logger=context.log,
        )
    scene_count = len(store.scenes(context.partition_key))
    computed = report.embedded - report.cache_hits
    metadata: dict[str, object] = {
        **_labels(store.get_video(context.partition_key)),
        "status": _embedding_status(computed, report.cache_hits, scene_count),
        "scene_count": scene_count,
        "backend": report.backend,
        "model_version": report.model_version,
        "computed": computed,
        "cache_hits": report.cache_hits,
        "urls_resigned": report.resigned,
        "failures": len(report.failures),
        "wall_s": round(report.wall_s, 3),
    }
    for q in (50, 95, 99):
        value = report.percentile(q)
        if value is not None:
            metadata[f"inference_p{q}_ms"] = round(value, 2)
    if report.failures:
        raise dg.Failure(
            description=f"{len(report.failures)} scene(s) still without a CLIP embedding after retries: "
            f"{embed.failure_summary(report)}. Fix the cause and rerun: only these scenes are redone.",
            metadata=metadata,
        )
    return dg.MaterializeResult(metadata=metadata)


ingest_video_job = dg.define_asset_job(
    "ingest_video",
    selection=dg.AssetSelection.assets(scene_keyframes, scene_signed_urls, scene_clip_embeddings),
    description="Everything for one video: keyframes -> signed URLs -> CLIP embeddings (+ checks).",
)

embed_job = dg.define_asset_job(
    "embed_scenes",
    selection=dg.AssetSelection.assets(scene_signed_urls, scene_clip_embeddings),
    description="Re-embed a video whose keyframes exist (missing or stale-model embeddings only).",
)
