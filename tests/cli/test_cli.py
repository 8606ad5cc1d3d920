"""Every ``heimdex-clip`` command end to end, as a user runs it: a subprocess on embedded defaults
(embedded Postgres + embedded storage server under HEIMDEX_HOME, local CPU CLIP)."""

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdex_clip_assets import services
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.net import answers, wait_until
from heimdex_clip_assets.pipeline.keyframes import thumbnail_path
from tests.fixtures.cli import run_cli
from tests.fixtures.services import reachable_dir

ROOT = Path(__file__).resolve().parents[2]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture(scope="module")
def cli_env(clip_checkpoint: Path) -> Iterator[dict[str, str]]:
    """Nothing but HEIMDEX_HOME and the weights: every service is the embedded default."""
    drop = (
        "DATABASE_URL",
        "SUPABASE_URL",
        "SUPABASE_SERVICE_ROLE_KEY",
        "CLIP_INFERENCE_BACKEND",
        "DAGSTER_HOME",
    )
    with reachable_dir("heimdex-cli-") as home:
        env = {
            k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("RUNPOD_", "DAGSTER_"))
        }
        env |= {"HEIMDEX_HOME": str(home), "CLIP_PRETRAINED": str(clip_checkpoint), "HF_HUB_OFFLINE": "1"}
        # Started here, so every command finds them running and leaves them (a command stops only the
        # services it started): one start for the module, not one per command.
        settings = Settings.from_env(env)
        services.vector_store(settings)
        services.storage(settings)
        yield env
        services.stop_embedded(settings)


def cli(env: dict[str, str], *args: str, ok: bool = True, **extra: str) -> subprocess.CompletedProcess[str]:
    result = run_cli(env, *args, **extra, COLUMNS="200")
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    if not ok:
        assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def demo(cli_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return cli(cli_env, "demo", "--scenes", "3", "--scene-seconds", "1.5")


def test_demo_prints_the_step7_table(demo: subprocess.CompletedProcess[str]) -> None:
    assert "Step 7" in demo.stdout
    rows = re.findall(r"│ (\d+)\s+│ (true|false)\s+│ (\w+)\s+│ ([\d.]+)", demo.stdout)
    assert [(r[0], r[1], r[2]) for r in rows] == [(str(i), "true", "local") for i in range(3)]
    assert "x realtime" in demo.stdout


def test_add_video_then_process_video(cli_env: dict[str, str], make_video) -> None:
    added = cli(cli_env, "add-video", str(make_video(scenes=2, scene_seconds=1.5)))
    (video_id,) = set(UUID.findall(added.stdout))
    # --backend wins over the environment, even one whose RunPod settings are incomplete.
    processed = cli(
        cli_env,
        "process-video",
        "--video-id",
        video_id,
        "--backend",
        "local",
        CLIP_INFERENCE_BACKEND="runpod",
    )
    assert len(re.findall(r"│ \d+\s+│ [\d.]+-[\d.]+s\s+│ true", processed.stdout)) == 2


def test_search_by_text_and_image(cli_env: dict[str, str], demo: subprocess.CompletedProcess[str]) -> None:
    found = cli(cli_env, "search", "a red square", "--limit", "2")
    paths = re.findall(r"^ +[0-9a-f-]{36}/[0-9a-f-]{36}/thumbnails/scene_\d+\.jpg$", found.stdout, re.M)
    assert len(paths) == 2
    video_id = UUID.search(demo.stdout).group(0)
    settings = Settings.from_env(cli_env)
    thumb = services.storage(settings).download(thumbnail_path(settings.owner_id, video_id, 1))
    image = Path(cli_env["HEIMDEX_HOME"]) / "query.jpg"
    image.write_bytes(thumb)
    by_image = cli(cli_env, "search", "--image", str(image), "--video-id", video_id, "--limit", "1")
    assert re.search(rf"^ 1\.000 +1 +[\d.]+-[\d.]+s +{video_id}$", by_image.stdout, re.M), by_image.stdout


def test_search_with_the_runpod_backend_uses_the_worker(
    cli_env: dict[str, str], demo: subprocess.CompletedProcess[str], worker_url: str, worker_secret: str
) -> None:
    """A text query goes to the worker's text tower: the same scenes as in-process, no local model."""
    runpod = {"RUNPOD_CLIP_ENDPOINT_URL": worker_url, "EMBEDDING_HMAC_SECRET": worker_secret}
    local = cli(cli_env, "search", "a red square", "--limit", "2")
    remote = cli(cli_env, "search", "a red square", "--limit", "2", "--backend", "runpod", **runpod)
    assert remote.stdout.splitlines()[1:] == local.stdout.splitlines()[1:]


def test_backfill_dry_run_then_forced(
    cli_env: dict[str, str], demo: subprocess.CompletedProcess[str]
) -> None:
    dry = cli(cli_env, "backfill", "--dry-run")
    assert "0 scene(s)" in dry.stdout
    forced = cli(cli_env, "backfill", "--force-regenerate", "--batch-size", "2", "--clip-timeout", "30")
    assert re.search(r"Done: \d+ embedded, 0 failed", forced.stdout)
    assert not (Path(cli_env["HEIMDEX_HOME"]) / "backfill.json").exists()


def test_smoke_local(cli_env: dict[str, str]) -> None:
    out = cli(cli_env, "smoke").stdout
    assert "✗" not in out
    assert "Signed URL generation working" in out and "Embedding generated: 512 dimensions" in out


def test_smoke_runpod(cli_env: dict[str, str], worker_url: str, worker_secret: str) -> None:
    runpod = {"CLIP_INFERENCE_BACKEND": "runpod", "RUNPOD_CLIP_ENDPOINT_URL": worker_url}
    out = cli(cli_env, "smoke", **runpod, EMBEDDING_HMAC_SECRET=worker_secret).stdout
    for line in (
        "RunPod CLIP endpoint reachable",
        "Signed URL generation working",
        "HMAC authentication working",
        "Embedding generated: 512 dimensions",
    ):
        assert f"✓ {line}" in out
    assert re.search(r"✓ Latency: \d+ms \(download: \d+ms, inference: \d+ms\)", out)
    bad = cli(cli_env, "smoke", ok=False, **runpod, EMBEDDING_HMAC_SECRET="not-the-worker-secret")
    assert "✗ HMAC authentication failed" in bad.stdout


@pytest.mark.parametrize(
    ("args", "extra", "sentence"),
    [
        (["process-video", "--video-id", "00000000-0000-0000-0000-000000000000"], {}, "Unknown video id"),
        (["smoke"], {"CLIP_INFERENCE_BACKEND": "runpod"}, "CLIP_INFERENCE_BACKEND=runpod needs"),
        (
            ["smoke"],
            {"CLIP_INFERENCE_BACKEND": "gpu"},
            "CLIP_INFERENCE_BACKEND='gpu' is invalid: input should be 'runpod', 'local' or 'off'",
        ),
        (["add-video", "/no/such/file.mp4"], {}, "No such file"),
        (["search"], {}, "Give a text query or --image"),
    ],
)
def test_user_mistakes_get_one_sentence(
    cli_env: dict[str, str], args: list[str], extra: dict[str, str], sentence: str
) -> None:
    result = cli(cli_env, *args, ok=False, **extra)
    assert sentence in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_not_a_video_and_unreachable_endpoint(cli_env: dict[str, str], corrupt_video: Path) -> None:
    assert "not a video we can decode" in cli(cli_env, "add-video", str(corrupt_video), ok=False).stderr
    unreachable = {
        "CLIP_INFERENCE_BACKEND": "runpod",
        "RUNPOD_CLIP_ENDPOINT_URL": "http://127.0.0.1:9",
        "EMBEDDING_HMAC_SECRET": "s",
        "RUNPOD_MAX_RETRIES": "0",
    }
    out = cli(cli_env, "smoke", ok=False, **unreachable).stdout
    assert "✗ RunPod CLIP endpoint not usable: Connection error" in out


def test_dev_serves_the_ui_and_stops_on_ctrl_c(
    cli_env: dict[str, str], demo: subprocess.CompletedProcess[str]
) -> None:
    port = "3917"
    proc = subprocess.Popen(
        [sys.executable, "-m", "heimdex_clip_assets.cli", "dev", "--port", port],
        env=cli_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        ui = f"http://127.0.0.1:{port}/server_info"
        wait_until("dagster dev", lambda: answers(ui), timeout_s=120, proc=proc, interval_s=1)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
