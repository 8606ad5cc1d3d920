"""The README's SQL runs verbatim against our schema (the seed's Step 7 and monitoring queries)."""

import re
from pathlib import Path

import numpy as np

from heimdex_clip_assets.adapters.db import EmbeddingRow, VectorStore
from tests.fixtures.rows import add_video, clip_metadata

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_sql_runs_verbatim(store: VectorStore) -> None:
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    video_id = add_video(store, 2)
    vector = np.ones(512, dtype=np.float32) / np.sqrt(512)
    store.write_embeddings(video_id, [EmbeddingRow(0, vector, clip_metadata(inference_ms=45.2))])

    step7 = store.query(blocks[0].replace("<test-video-uuid>", video_id))
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
