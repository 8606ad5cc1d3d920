"""Asset checks on ``scene_clip_embeddings``, one per rule in ``domain.checks``, over the run's videos.

They are blocking: a video whose stored vectors break a rule fails the run, so bad vectors can never be
reported as a success (nor feed anything downstream).
"""

import warnings
from collections.abc import Callable, Sequence

import dagster as dg

from heimdex_clip_assets.adapters.db import SceneRecord
from heimdex_clip_assets.domain.checks import EMBEDDING_CHECKS, CheckOutcome

from .assets import scene_clip_embeddings
from .partitions import videos_partitions
from .resources import ClipInferenceResource, VectorStoreResource


def _build_check(
    name: str, rule: Callable[[Sequence[SceneRecord], int], CheckOutcome]
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=scene_clip_embeddings,
        name=name,
        partitions_def=videos_partitions,
        blocking=True,
        description=(rule.__doc__ or name.replace("_", " ")).strip(),
    )
    def _check(
        context: dg.AssetCheckExecutionContext, db: VectorStoreResource, clip: ClipInferenceResource
    ) -> dg.AssetCheckResult:
        if clip.settings().clip_backend == "off":
            return dg.AssetCheckResult(
                passed=True, description="Skipped: CLIP is off", metadata={"skipped": True}
            )
        store = db.get()
        # One video's scenes at a time: memory follows the largest video, not the run's range.
        failing = {}
        for video_id in context.partition_keys:
            outcome = rule(store.scenes(video_id), store.dim)
            if not outcome.passed:
                failing[video_id] = outcome
        if not failing:
            return dg.AssetCheckResult(
                passed=True,
                description=outcome.description if len(context.partition_keys) == 1 else "Every video passes",
                metadata={"videos": len(context.partition_keys)},
            )
        shown = "; ".join(f"video {v}: {o.description}" for v, o in list(failing.items())[:5])
        return dg.AssetCheckResult(
            passed=False,
            description=shown + (f"; and {len(failing) - 5} more video(s)" if len(failing) > 5 else ""),
            metadata={"videos": len(context.partition_keys), "failing_videos": len(failing)},
        )

    return _check


# Per-partition checks are a Dagster preview feature; they are what lets a check read "this video" only,
# so we accept it knowingly and keep its warning out of every process that loads the code location.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.PreviewWarning)
    embedding_checks = [_build_check(name, rule) for name, rule in EMBEDDING_CHECKS.items()]
