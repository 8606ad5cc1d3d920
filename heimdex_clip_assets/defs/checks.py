"""Asset checks on ``scene_clip_embeddings``, one per rule in ``domain.checks``, over the run's videos.

They are blocking: a video whose stored vectors break a rule fails the run, so bad vectors can never be
reported as a success (nor feed anything downstream).
"""

import warnings
from collections.abc import Iterator

import dagster as dg

from heimdex_clip_assets.domain.checks import EMBEDDING_CHECKS, CheckOutcome

from .assets import scene_clip_embeddings
from .partitions import videos_partitions
from .resources import ClipInferenceResource, VectorStoreResource


def _result(
    name: str, videos: int, outcomes: dict[str, CheckOutcome], failing: dict[str, CheckOutcome]
) -> dg.AssetCheckResult:
    """One rule's verdict over the run's videos (``outcomes``: the last video's, for a one-video run)."""
    if not failing:
        last = next(reversed(outcomes.values()), None)
        return dg.AssetCheckResult(
            check_name=name,
            asset_key=scene_clip_embeddings.key,
            passed=True,
            description=last.description if videos == 1 and last is not None else "Every video passes",
            metadata={"videos": videos},
        )
    shown = "; ".join(f"video {v}: {o.description}" for v, o in list(failing.items())[:5])
    return dg.AssetCheckResult(
        check_name=name,
        asset_key=scene_clip_embeddings.key,
        passed=False,
        description=shown + (f"; and {len(failing) - 5} more video(s)" if len(failing) > 5 else ""),
        metadata={"videos": videos, "failing_videos": len(failing)},
    )


# Per-partition checks are a Dagster preview feature; they are what lets a check read "this video" only,
# so we accept it knowingly and keep its warning out of every process that loads the code location.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.PreviewWarning)
    SPECS = [
        dg.AssetCheckSpec(
            name,
            asset=scene_clip_embeddings,
            partitions_def=videos_partitions,
            blocking=True,
            description=(rule.__doc__ or name.replace("_", " ")).strip(),
        )
        for name, rule in EMBEDDING_CHECKS.items()
    ]

    # The four rules in one step: one read of each video's scenes instead of four, and one step to start
    # instead of four (each costs Dagster ~0.1 s of events and setup, a share of the demo's time).
    @dg.multi_asset_check(
        specs=SPECS,
        name="scene_clip_embeddings_checks",
        can_subset=True,  # the UI (or a test) may run one check alone
        description="Every rule of domain.checks on the stored vectors of the run's videos.",
    )
    def embedding_checks(
        context: dg.AssetCheckExecutionContext, db: VectorStoreResource, clip: ClipInferenceResource
    ) -> Iterator[dg.AssetCheckResult]:
        selected = {key.name for key in context.selected_asset_check_keys}
        rules = {name: rule for name, rule in EMBEDDING_CHECKS.items() if name in selected}
        if clip.settings().clip_backend == "off":
            for name in rules:
                yield dg.AssetCheckResult(
                    check_name=name,
                    asset_key=scene_clip_embeddings.key,
                    passed=True,
                    description="Skipped: CLIP is off",
                    metadata={"skipped": True},
                )
            return
        store = db.get()
        outcomes: dict[str, dict[str, CheckOutcome]] = {name: {} for name in rules}
        # One video's scenes at a time: memory follows the largest video, not the run's range.
        for video_id in context.partition_keys:
            scenes = store.scenes(video_id)
            for name, rule in rules.items():
                outcomes[name][video_id] = rule(scenes, store.dim)
        for name in rules:
            failing = {v: o for v, o in outcomes[name].items() if not o.passed}
            yield _result(name, len(context.partition_keys), outcomes[name], failing)
