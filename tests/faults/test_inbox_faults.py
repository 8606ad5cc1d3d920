"""Inbox faults (issue 9.2): one file that storage refuses, or that is not a video, must not block the
others. Real sensor ticks and registration run, real database and storage server, with storage's refusal
injected at the HTTP boundary by a proxy in front of it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from email.message import Message
from pathlib import Path

import dagster as dg
import httpx
import pytest

from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.definitions import defs
from heimdex_clip_assets.defs.resources import ClipInferenceResource, StorageResource, VectorStoreResource
from heimdex_clip_assets.defs.sensors import inbox_sensor, new_videos_sensor
from heimdex_clip_assets.devservices.storage_server import EmbeddedStorage
from heimdex_clip_assets.pipeline.register import VIDEO_ID_NAMESPACE, file_sha256
from tests.fixtures.fake_servers import HttpServer

STORAGE = StorageResource()
RESOURCES = {"db": VectorStoreResource(), "storage": STORAGE, "clip": ClipInferenceResource(storage=STORAGE)}
# Names a storage key cannot hold, as users' files do have them.
AWKWARD = ["back\\slash.mp4", "%ff.mp4", "new\nline.mp4", "x" * 226 + ".mp4"]


def refusing_proxy(upstream: str, refuse: str) -> HttpServer:
    """Forwards every request to the storage server, except uploads under ``refuse`` (a key prefix),
    which get Supabase's answer to an object over the size limit."""

    def answer(method: str, path: str, headers: Message, body: bytes) -> tuple[int, bytes]:
        if method in ("POST", "PUT") and refuse in path and "/object/sign/" not in path:
            too_large = {
                "statusCode": "413",
                "error": "Payload too large",
                "message": "The object exceeded the maximum allowed size",
            }
            return 400, json.dumps(too_large).encode()
        forwarded = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")}
        reply = httpx.request(method, upstream + path, headers=forwarded, content=body)
        return reply.status_code, reply.content

    return HttpServer(answer)


def _drop(inbox: Path, source: Path, name: str) -> Path:
    inbox.mkdir(parents=True, exist_ok=True)
    target = inbox / name
    shutil.copy(source, target)
    os.utime(target, (time.time() - 60,) * 2)
    return target


def test_a_refused_file_moves_aside_and_the_rest_register_in_the_same_run(
    heimdex_env: Settings,
    monkeypatch: pytest.MonkeyPatch,
    storage_server: EmbeddedStorage,
    make_video,
    corrupt_video: Path,
) -> None:
    inbox = heimdex_env.inbox_dir
    videos = [make_video(scenes=n, scene_seconds=0.5) for n in range(2, 8)]
    for name, video in zip(AWKWARD, videos, strict=False):
        _drop(inbox, video, name)
    refused = _drop(inbox, videos[4], "refused.mp4")
    _drop(inbox, videos[5], "plain.mp4")
    _drop(inbox, corrupt_video, "broken.mp4")
    refused_id = str(uuid.uuid5(VIDEO_ID_NAMESPACE, f"{heimdex_env.owner_id}/{file_sha256(refused)}"))
    proxy = refusing_proxy(storage_server.url, refuse=f"/{heimdex_env.owner_id}/{refused_id}/")
    monkeypatch.setenv("SUPABASE_URL", proxy.url)

    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance) as context:
            assert isinstance(inbox_sensor(context), dg.RunRequest)
        run = (
            defs()
            .resolve_job_def("register_inbox")
            .execute_in_process(instance=instance, raise_on_error=False)
        )
        proxy.close()
        assert run.success
        # The run's log (what the UI shows) says which files went aside and why.
        warnings = [r.user_message for r in instance.all_logs(run.run_id) if r.level == logging.WARNING]
        with dg.build_sensor_context(instance=instance, resources=RESOURCES) as context:
            result = new_videos_sensor(context)

    assert isinstance(result, dg.SensorResult)
    assert len(result.run_requests) == 5  # the four awkward names and the plain one, from one run
    assert sorted(p.name for p in (inbox / "registered").iterdir()) == sorted([*AWKWARD, "plain.mp4"])
    rejected = inbox / "rejected"
    assert "exceeded the maximum allowed size" in (rejected / "refused.mp4.error.txt").read_text()
    assert "not a video" in (rejected / "broken.mp4.error.txt").read_text()
    assert (rejected / "refused.mp4").exists() and (rejected / "broken.mp4").exists()
    assert any("'refused.mp4'" in w and "exceeded" in w for w in warnings), warnings
    assert any("'broken.mp4'" in w and "not a video" in w for w in warnings), warnings
