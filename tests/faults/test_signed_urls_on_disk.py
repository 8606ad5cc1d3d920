"""Issue 9, item 9 (signed URLs on disk): bearer URLs never reach the files a run leaves behind.

A real run through the CLI signs a URL per thumbnail (the RunPod path); afterwards every file under
HEIMDEX_HOME's Dagster folder (stored asset values, compute logs, artifacts) is read as another user of the
machine could. URLs are signed right before each job and live only in memory.
"""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.cli import run_cli
from tests.fixtures.worker import WORKER_SECRET


def test_no_signed_url_is_stored_on_disk(
    env: dict[str, str], home: Path, video_id: str, worker_url: str
) -> None:
    done = run_cli(
        env,
        "process-video",
        "--video-id",
        video_id,
        CLIP_INFERENCE_BACKEND="runpod",
        RUNPOD_CLIP_ENDPOINT_URL=worker_url,
        EMBEDDING_HMAC_SECRET=WORKER_SECRET,
    )
    assert done.returncode == 0, done.stderr
    stored = [p for p in (home / "dagster").rglob("*") if p.is_file()]
    assert stored, "the run left no files where Dagster keeps them"
    for path in stored:
        data = path.read_bytes()
        assert b"token=" not in data and b"/object/sign/" not in data, path
