"""Asset checks on ``scene_clip_embeddings``, one per rule in ``domain.checks``, run per video partition."""

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
        outcome = rule(store.scenes(context.partition_key), store.dim)
        return dg.AssetCheckResult(
            passed=outcome.passed, description=outcome.description, metadata=outcome.metadata
        )

    return _check


# Per-partition checks are a Dagster preview feature; they are what lets a check read "this video" only,
# so we accept it knowingly and keep its warning out of every process that loads the code location.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.PreviewWarning)
    embedding_checks = [_build_check(name, rule) for name, rule in EMBEDDING_CHECKS.items()]
