"""The three assets materialized in-process on embedded Postgres + embedded storage + real CLIP."""

from pathlib import Path

import numpy as np

from heimdex_clip_assets.cli import STEP7_SQL
from heimdex_clip_assets.lib import services
from heimdex_clip_assets.lib.config import Settings


def _checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_local_backend_end_to_end(local_env: Settings, sample_video: Path, register, materialize) -> None:
    video_id = register(sample_video)
    result = materialize(video_id)
    assert result.success
    store = services.vector_store(local_env)
    scenes = store.scenes(video_id)
    assert len(scenes) == 4
    for scene in scenes:
        assert scene.embedding is not None and scene.embedding.shape == (512,)
        assert abs(np.linalg.norm(scene.embedding) - 1) < 1e-3
        assert scene.metadata["backend"] == "local"
        assert services.storage(local_env).exists(scene.thumbnail_path)
    assert _checks(result) == dict.fromkeys(
        ["every_scene_embedded", "dimension_matches", "norms_are_unit", "one_model_version"], True
    )
    mats = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    meta = mats["scene_clip_embeddings"]
    assert meta["scene_count"].value == 4 and meta["backend"].value == "local"
    assert "inference_p95_ms" in meta and meta["failures"].value == 0
    assert "contact_sheet" in mats["scene_keyframes"]
    with store._connect() as conn:
        rows = conn.execute(STEP7_SQL, (video_id,)).fetchall()
    assert [r["has_clip"] for r in rows] == [True] * 4
