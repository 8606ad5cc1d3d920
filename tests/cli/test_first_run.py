"""The first ten minutes of a new user, as subprocesses on a machine without the model hub.

Each test starts from a fresh ``HEIMDEX_HOME`` (its commands start, and then stop, their own embedded
services), with no weights in the Hugging Face cache and the hub either switched off
(``HF_HUB_OFFLINE=1``) or replaced by an endpoint that accepts connections and never answers, the worst
case for a client: nothing refuses, so only a deadline ends the wait.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdex_clip_assets.adapters.weights import HUB_FILES, PROBE_TIMEOUT_S, hub_files
from heimdex_clip_assets.cli import build_parser
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.postgres import postgres_running
from heimdex_clip_assets.devservices.storage_server import storage_server_running
from tests.fixtures.services import reachable_dir

ROOT = Path(__file__).resolve().parents[2]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
FAST_S = 5.0  # the bound for a command that cannot have its weights
RANDOM_CAPTION = "random weights: vectors mean nothing"


@pytest.fixture(scope="module")
def silent_hub() -> Iterator[str]:
    """An endpoint that accepts TCP connections (the kernel's backlog) and never sends a byte."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as server:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def fresh_env(silent_hub: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A new user's environment: embedded defaults, default weights (``openai``), an empty hub cache,
    and a hub that never answers."""
    drop = ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "CLIP_PRETRAINED", "HF_HUB_OFFLINE")
    with reachable_dir("heimdex-first-") as home:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in drop and not k.startswith(("RUNPOD_", "DAGSTER_", "CLIP_"))
        }
        env |= {"HEIMDEX_HOME": str(home), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": silent_hub}
        yield env
        assert not _running(env), "a command left embedded services running"


def _running(env: dict[str, str]) -> list[str]:
    home = Settings.from_env(env).home
    checks = (("postgres", postgres_running), ("storage", storage_server_running))
    return [name for name, up in checks if up(home)]


def run(env: dict[str, str], *args: str, **extra: str) -> tuple[int, list[tuple[float, str]], str]:
    """Run ``heimdex-clip ARGS`` in an 80-column terminal; (exit code, (seconds, line) of stdout, stderr)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "heimdex_clip_assets.cli", *args],
        env={**env, **extra, "COLUMNS": "80"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines = [(time.monotonic() - started, line.rstrip("\n")) for line in proc.stdout]
    stderr = proc.stderr.read()
    code = proc.wait(timeout=300)
    lines.append((time.monotonic() - started, ""))  # when it ended
    return code, lines, stderr


def text(lines: list[tuple[float, str]]) -> str:
    return "\n".join(line for _, line in lines)


# ------------------------------------------------------------------------------------- no weights
def test_demo_without_weights_says_so_at_once_and_completes_on_random_weights(
    fresh_env: dict[str, str],
) -> None:
    code, lines, stderr = run(fresh_env, "demo", "--scenes", "2", "--scene-seconds", "1.0")
    assert code == 0, text(lines) + stderr
    first_s, first = lines[0]
    assert first.startswith("Random CLIP weights (openai: the Hugging Face hub does not answer)"), first
    assert "vectors mean nothing" in first and "CLIP_PRETRAINED=<file>" in first
    # A probe, not the hub client's retries (~50 s); within FAST_S on an idle machine, more on a busy one.
    assert first_s < 3 * FAST_S, f"the first line came after {first_s:.1f} s"
    out = text(lines)
    assert len(re.findall(r"│ \d+\s+│ true\s+│ local", out)) == 2
    assert RANDOM_CAPTION in out.split("Step 7")[1]  # in the final table, under its rows
    assert "x realtime" in out and not stderr


@pytest.mark.parametrize(
    "args",
    [
        ["search", "a red car"],
        ["smoke"],
        ["process-video", "--video-id", "1a891027-872e-51ae-924e-d910f272cdaf"],
        ["backfill"],
    ],
    ids=lambda args: args[0],
)
def test_other_commands_without_weights_fail_fast_naming_what_to_set(
    fresh_env: dict[str, str], args: list[str]
) -> None:
    took = {}
    for hub, extra in (("offline", {"HF_HUB_OFFLINE": "1"}), ("silent", {})):
        code, lines, stderr = run(fresh_env, *args, **extra)
        assert code == 2, text(lines) + stderr
        assert len(stderr.strip().splitlines()) == 1, stderr  # one sentence, not wrapped at 80 columns
        assert "CLIP_PRETRAINED=<file>" in stderr and "HF_HUB_OFFLINE=1" in stderr
        assert "Traceback" not in stderr and ".." not in stderr
        took[hub] = lines[-1][0]
    # A hub that never answers costs one probe's deadline, not the hub client's retries (~50 s). The
    # bound is relative to the offline run in the same test, so a busy machine slows both alike; on an
    # idle one both end within FAST_S.
    assert took["silent"] - took["offline"] < PROBE_TIMEOUT_S + 1.5, took
    assert took["offline"] < 3 * FAST_S, took


@pytest.mark.parametrize("command", ["demo", "smoke"])
def test_a_missing_weights_file_is_a_mistake_even_for_demo(fresh_env: dict[str, str], command: str) -> None:
    """A CLIP_PRETRAINED file that is not there stops the command before any work (demo registers no
    video and does not fall back to random weights)."""
    code, lines, stderr = run(fresh_env, command, CLIP_PRETRAINED="/no/such/weights.safetensors")
    assert code == 2, text(lines) + stderr
    assert stderr.strip() == "error: CLIP_PRETRAINED file not found: /no/such/weights.safetensors"
    assert "registered" not in text(lines) and "Random CLIP weights" not in text(lines)


def test_cached_weights_change_nothing(fresh_env: dict[str, str], clip_checkpoint: Path) -> None:
    """Weights in the hub's cache load as before, offline, with no word about random weights."""
    found = hub_files("ViT-B-32", "openai")
    assert found is not None and found[1] == HUB_FILES
    repo, files = found
    # The hub cache's own layout: models--org--name/{refs/main, snapshots/<commit>/<file>}.
    cached = Path(fresh_env["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text(commit)
    (cached / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(clip_checkpoint, cached / "snapshots" / commit / files[0])

    code, lines, stderr = run(fresh_env, "smoke", HF_HUB_OFFLINE="1")
    out = text(lines)
    assert code == 0, out + stderr
    assert "✓ Local CLIP encoder loaded (ViT-B-32, openai" in out
    assert "random" not in out.lower() and "✗" not in out


# ------------------------------------------------------------------------------ random weights
def test_random_weights_are_marked_in_demo_search_and_smoke(fresh_env: dict[str, str]) -> None:
    env = {**fresh_env, "CLIP_PRETRAINED": "none", "HF_HUB_OFFLINE": "1"}
    code, lines, stderr = run(env, "demo", "--scenes", "2", "--scene-seconds", "1.0")
    demo = text(lines)
    assert code == 0, demo + stderr
    assert lines[0][1].startswith("Random CLIP weights (CLIP_PRETRAINED=none)")
    assert RANDOM_CAPTION in demo.split("Step 7")[1]
    video_id = UUID.search(demo).group(0)  # type: ignore[union-attr]

    code, lines, stderr = run(env, "search", "a red square", "--limit", "2")
    found = text(lines)
    assert code == 0, found + stderr
    assert f"({RANDOM_CAPTION})" in lines[0][1]
    # 80 columns: whole ids and whole paths, nothing cut short with an ellipsis.
    assert re.search(rf"^ *-?[\d.]+ +\d+ +[\d.]+-[\d.]+s +{video_id}$", found, re.M), found
    assert re.search(rf"^ +[0-9a-f-]{{36}}/{video_id}/thumbnails/scene_\d+\.jpg$", found, re.M), found
    assert "…" not in found

    code, lines, stderr = run(env, "smoke")
    smoke = text(lines)
    assert code == 0, smoke + stderr
    assert "! Random weights: vectors mean nothing (CLIP_PRETRAINED=none)" in smoke


# ------------------------------------------------------------------------------------ user input
@pytest.mark.parametrize(
    "args",
    [["process-video", "--video-id", "does-not-exist"], ["search", "a cat", "--video-id", "12"]],
    ids=["process-video", "search"],
)
def test_an_id_that_is_not_a_uuid_is_not_a_video_id(fresh_env: dict[str, str], args: list[str]) -> None:
    code, lines, stderr = run(fresh_env, *args, CLIP_PRETRAINED="none")
    assert code == 2, text(lines) + stderr
    assert re.fullmatch(r"error: '[\w-]+' is not a video id \(.*\)\n", stderr), stderr
    assert "CONTEXT" not in stderr and "uuid" not in stderr.lower().replace("uuids", "")


# ------------------------------------------------------------------------------------- services
def test_commands_stop_the_services_they_started_unless_kept(fresh_env: dict[str, str]) -> None:
    code, lines, stderr = run(fresh_env, "backfill", "--dry-run")
    assert code == 0, text(lines) + stderr
    assert not _running(fresh_env)

    code, lines, stderr = run(fresh_env, "backfill", "--dry-run", "--keep-services")
    assert code == 0 and _running(fresh_env) == ["postgres"], text(lines) + stderr
    # A command that finds a service running leaves it so, whoever started it.
    code, lines, stderr = run(fresh_env, "storage-server")
    assert code == 0 and _running(fresh_env) == ["postgres", "storage"], text(lines) + stderr
    run(fresh_env, "backfill", "--dry-run")
    assert _running(fresh_env) == ["postgres", "storage"]

    code, lines, _ = run(fresh_env, "stop")
    assert code == 0 and lines[0][1] == "Stopped: storage server, PostgreSQL."
    assert not _running(fresh_env)
    assert run(fresh_env, "stop")[1][0][1].startswith("Nothing runs in ")


# ------------------------------------------------------------------------------------------ help
def test_help_says_what_the_tool_and_every_option_do(fresh_env: dict[str, str]) -> None:
    code, lines, _ = run(fresh_env, "--help")
    top = text(lines)
    assert code == 0 and "``" not in top
    assert "cuts videos into scenes" in top and "searchable" not in top.split("\n")[0]

    parser = build_parser()
    (sub,) = (a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():  # type: ignore[union-attr]
        code, lines, _ = run(fresh_env, name, "--help")
        shown = text(lines)
        assert code == 0 and "seed" not in shown.lower(), shown
        for action in command._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.nargs != 0 and action.option_strings and action.default is not None:
                assert "default:" in action.help, f"{name} {action.option_strings} shows no default"
    code, lines, _ = run(fresh_env, "storage-server", "--help")
    assert "--backend" not in text(lines)
    code, _, stderr = run(fresh_env, "storage-server", "--backend", "local")
    assert code == 2 and "unrecognized arguments: --backend" in stderr
