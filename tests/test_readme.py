"""The README's SQL runs verbatim against our schema (the seed's Step 7 and monitoring queries)."""

import re
from pathlib import Path

import numpy as np

from heimdex_clip_assets.adapters.db import EmbeddingRow, SceneRecord, VectorStore, VideoRecord

README = Path(__file__).resolve().parents[1] / "README.md"
VIDEO_ID = "6b1f8c52-0000-4000-8000-000000000001"


def test_readme_sql_runs_verbatim(store: VectorStore) -> None:
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    store.upsert_video(VideoRecord(id=VIDEO_ID, storage_path="videos/x.mp4"))
    store.replace_scenes(
        VIDEO_ID,
        [SceneRecord(i, i, i + 1, i + 0.5, f"thumbnails/{VIDEO_ID}/{i}.jpg", f"sha{i}") for i in range(2)],
    )
    meta = {
        "backend": "runpod",
        "model_name": "ViT-B-32",
        "pretrained": "openai",
        "model_version": "openai-vit-b-32-v1",
        "inference_time_ms": 45.2,
        "download_ms": 50.0,
        "total_ms": 234.5,
    }
    vector = np.ones(512, dtype=np.float32) / np.sqrt(512)
    store.write_embeddings(VIDEO_ID, [EmbeddingRow(0, vector, meta)])

    step7 = store.query(blocks[0].replace("<test-video-uuid>", VIDEO_ID))
    assert [(r["index"], r["has_clip"], r["backend"], r["inference_ms"]) for r in step7] == [
        (0, True, "runpod", "45.2"),
        (1, False, None, None),
    ]
    (by_backend,) = store.query(blocks[1])
    assert (by_backend["backend"], by_backend["count"], by_backend["avg_inference_ms"]) == ("runpod", 1, 45.2)


def test_readme_tells_a_newcomer_about_weights_services_and_install_size() -> None:
    text = " ".join(README.read_text().split())
    assert "`CLIP_PRETRAINED=<file>`" in text and "`HF_HUB_OFFLINE=1`" in text
    assert "runs the whole pipeline on random weights" in text
    assert "`--keep-services`" in text and "`heimdex-clip stop`" in text
    assert "The install is about 6.4 GB." in text
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
