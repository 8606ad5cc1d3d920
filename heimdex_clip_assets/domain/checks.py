"""Data-quality rules for a video's stored embeddings, as plain functions (Dagster wraps them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from heimdex_clip_assets.adapters.db import SceneRecord
from heimdex_clip_contract.codec import NORM_TOLERANCE


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict[str, object] = field(default_factory=dict)


def _embedded(scenes: Sequence[SceneRecord]) -> list[SceneRecord]:
    return [s for s in scenes if s.embedding is not None]


def every_scene_embedded(scenes: Sequence[SceneRecord], dim: int) -> CheckOutcome:
    """Every scene of the video that has a thumbnail has a CLIP embedding (one without cannot have one)."""
    missing = [s.index for s in scenes if s.embedding is None and s.thumbnail_url is not None]
    if not scenes:
        return CheckOutcome(False, "The video has no scenes", {"scenes": 0})
    without_thumbnail = sum(s.thumbnail_url is None for s in scenes)
    return CheckOutcome(
        not missing,
        "Every scene with a thumbnail has a CLIP embedding"
        if not missing
        else f"Scenes without an embedding: {missing}",
        {"scenes": len(scenes), "missing": len(missing), "without_thumbnail": without_thumbnail},
    )


def dimension_matches(scenes: Sequence[SceneRecord], dim: int) -> CheckOutcome:
    """Every embedding has the model's dimension (512 for ViT-B-32)."""
    wrong = [s.index for s in _embedded(scenes) if len(s.embedding) != dim]  # type: ignore[arg-type]
    return CheckOutcome(
        not wrong,
        f"All embeddings have {dim} dimensions"
        if not wrong
        else f"Scenes with a dimension != {dim}: {wrong}",
        {"expected_dim": dim, "wrong": len(wrong)},
    )


def norms_are_unit(scenes: Sequence[SceneRecord], dim: int) -> CheckOutcome:
    """Every embedding is L2-normalised (norm within 1e-2 of 1)."""
    norms = {s.index: float(np.linalg.norm(s.embedding)) for s in _embedded(scenes)}
    off = {i: round(n, 4) for i, n in norms.items() if abs(n - 1.0) > NORM_TOLERANCE}
    return CheckOutcome(
        not off,
        "All embeddings are L2-normalised" if not off else f"Scenes whose norm is not ~1: {off}",
        {"min_norm": min(norms.values(), default=0.0), "max_norm": max(norms.values(), default=0.0)},
    )


def one_model_version(scenes: Sequence[SceneRecord], dim: int) -> CheckOutcome:
    """All of the video's embeddings come from one model version."""
    versions = sorted({str((s.metadata or {}).get("model_version")) for s in _embedded(scenes)})
    return CheckOutcome(
        len(versions) <= 1,
        f"One model version: {versions[0] if versions else 'none yet'}"
        if len(versions) <= 1
        else f"Embeddings from several model versions: {versions}; run the backfill to re-embed",
        {"model_versions": ", ".join(versions)},
    )


EMBEDDING_CHECKS: dict[str, Callable[[Sequence[SceneRecord], int], CheckOutcome]] = {
    "every_scene_embedded": every_scene_embedded,
    "dimension_matches": dimension_matches,
    "norms_are_unit": norms_are_unit,
    "one_model_version": one_model_version,
}
