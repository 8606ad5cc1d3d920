"""Search with ``CLIP_INFERENCE_BACKEND=runpod``: the text tower runs in the worker (the RunPod SDK's
local API serving the real handler), and the search host never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from heimdex_clip_assets.adapters.runpod_client import RunPodClient
from heimdex_clip_assets.devservices.net import NotReadyError, answers, free_port, wait_until
from heimdex_clip_assets.devservices.storage_server import EmbeddedStorage
from heimdex_clip_assets.devservices.synthetic import jpeg
from heimdex_clip_assets.pipeline.search import RunPodQueryEncoder
from tests.serve.conftest import Library, MakeClient

if TYPE_CHECKING:
    from runpod_worker.encoder import ClipEncoder

ROOT = Path(__file__).resolve().parents[2]
RSS_GOAL_MB = 250


@pytest.fixture
def worker_client(worker_url: str, worker_secret: str, worker_encoder: ClipEncoder) -> RunPodClient:
    return RunPodClient(
        worker_url,
        api_key=None,
        hmac_secret=worker_secret,
        model_name="ViT-B-32",
        dim=512,
        model_version=worker_encoder.model_version,
    )


def test_text_and_image_search_through_the_worker(
    make_client: MakeClient, library: Library, worker_client: RunPodClient
) -> None:
    client = make_client(encoder=RunPodQueryEncoder(worker_client, library.storage))
    reply = client.get("/v1/search", params={"q": "a dog on a beach", "user_id": library.alice.user_id})
    assert reply.status_code == 200, reply.text
    top = reply.json()["hits"][0]
    assert (top["video_id"], top["index"]) == (library.alice.video_id, 1)
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
    embedded = client.post("/v1/embed/text", json={"text": "a dog on a beach"}).json()
    assert embedded["dim"] == 512 and embedded["cached"]
    # An uploaded picture goes to the worker as a short-lived signed URL to a temporary object.
    image = client.post("/v1/search/image", files={"file": ("q.jpg", jpeg(seed=2), "image/jpeg")})
    assert image.status_code == 200, image.text
    assert image.json()["hits"]


def test_serve_on_runpod_imports_no_torch(
    library: Library,
    storage_server: EmbeddedStorage,
    worker_url: str,
    worker_secret: str,
    clip_checkpoint: Path,
    tmp_path: Path,
    record_property: pytest.RecordProperty,
) -> None:
    """``heimdex-clip serve`` as an operator runs it: its memory stays small and no torch is mapped."""
    port = free_port()
    env = {
        **os.environ,
        "HEIMDEX_HOME": str(tmp_path / "home"),
        "DATABASE_URL": library.store.dsn,
        "SUPABASE_URL": storage_server.url,
        "SUPABASE_SERVICE_ROLE_KEY": storage_server.service_key,
        "SUPABASE_BUCKET": library.storage.bucket,
        "CLIP_INFERENCE_BACKEND": "runpod",
        "RUNPOD_CLIP_ENDPOINT_URL": worker_url,
        "EMBEDDING_HMAC_SECRET": worker_secret,
        "CLIP_PRETRAINED": str(clip_checkpoint),  # only to name the model version the worker has
    }
    for name in ("SEARCH_API_KEYS", "SUPABASE_JWT_SECRET"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "heimdex_clip_assets.cli", "serve", "--port", str(port), "--host", "0.0.0.0"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until("serve", lambda: answers(f"{base}/healthz"), timeout_s=60, proc=proc, interval_s=0.2)
        except NotReadyError as exc:
            pytest.fail(f"{exc}\n{proc.stdout.read() if exc.exited is not None and proc.stdout else ''}")
        for q in ["a dog on a beach", "a red car", "a city at night"]:
            hits = httpx.get(f"{base}/v1/search", params={"q": q}, timeout=30).json()["hits"]
            assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_mb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    record_property("serve_rss_mb", round(rss_mb, 1))
    print(f"heimdex-clip serve (runpod backend) RSS after 3 searches: {rss_mb:.0f} MB")
    assert "libtorch" not in maps and "open_clip" not in maps
    assert rss_mb <= RSS_GOAL_MB
    # Without credentials it bound to loopback only, whatever --host said, and said so.
    assert "WITHOUT authentication, on 127.0.0.1 only" in out
