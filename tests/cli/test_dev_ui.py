"""The Dagster UI as a person sees it, in a real browser: `demo`, then `heimdex-clip dev`, then chromium.

Debian's chromium, driven by playwright through ``executable_path`` (``playwright install`` cannot
download browsers here; ``.ci/run`` installs the package). The page of the demo's partition must show
its contact sheet, its file name and timings a person can read; the sensor must leave the demo's finished
video alone and run a newly dropped one; and ``dev``'s own output must be free of noise.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from heimdex_clip_assets.devservices.net import answers, wait_until
from tests.fixtures.browser import needs_chromium
from tests.fixtures.cli import run_cli
from tests.fixtures.services import reachable_dir

ROOT = Path(__file__).resolve().parents[2]
PORT = 3931
UI = f"http://127.0.0.1:{PORT}"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

pytestmark = needs_chromium


class Dev:
    """A running `heimdex-clip dev`, its output so far, and its GraphQL API."""

    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc, self.log = proc, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def graphql(self, query: str, **variables: object) -> dict[str, Any]:
        response = httpx.post(f"{UI}/graphql", json={"query": query, "variables": variables}, timeout=30)
        response.raise_for_status()
        return response.json()["data"]

    def runs(self, partition: str) -> list[dict[str, Any]]:
        data = self.graphql(
            'query($p: String!) { runsOrError(filter: {tags: [{key: "dagster/partition", value: $p}]}) '
            "{ ... on Runs { results { runId status tags { key value } } } } }",
            p=partition,
        )
        return data["runsOrError"]["results"]

    def sensor_ticks(self) -> list[dict[str, Any]]:
        data = self.graphql(
            '{ sensorOrError(sensorSelector: {repositoryLocationName: "heimdex_clip", '
            'repositoryName: "__repository__", sensorName: "new_videos_sensor"}) '
            "{ ... on Sensor { sensorState { ticks(limit: 20) { status skipReason runIds "
            "logEvents { events { message level } } } } } } }"
        )
        return data["sensorOrError"]["sensorState"]["ticks"]


@pytest.fixture(scope="module")
def ui_env(clip_checkpoint: Path) -> Iterator[dict[str, str]]:
    drop = ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "DAGSTER_HOME")
    with reachable_dir("heimdex-ui-") as home:
        env = {
            k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("RUNPOD_", "CLIP_"))
        }
        # Random weights (none): the run's one warning about them is part of what is checked.
        env |= {"HEIMDEX_HOME": str(home), "CLIP_PRETRAINED": "none", "HF_HUB_OFFLINE": "1"}
        env |= {"HEIMDEX_INBOX_SETTLE_S": "0"}
        yield env


@pytest.fixture(scope="module")
def demo_id(ui_env: dict[str, str]) -> str:
    demo = run_cli(ui_env, "demo", "--scenes", "3", "--scene-seconds", "1.5")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    return UUID.search(demo.stdout).group(0)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def dev(ui_env: dict[str, str], demo_id: str) -> Iterator[Dev]:
    log = Path(ui_env["HEIMDEX_HOME"]) / "dev.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "heimdex_clip_assets.cli", "dev", "--port", str(PORT)],
            env=ui_env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    running = Dev(proc, log)
    try:
        up = lambda: answers(f"{UI}/server_info")  # noqa: E731
        wait_until("dagster dev answering", up, timeout_s=180, proc=proc, interval_s=0.5)
        yield running
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_partition_page_shows_contact_sheet_file_name_and_rounded_timings(
    dev: Dev, demo_id: str, browser: Any, tmp_path: Path
) -> None:
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(f"{UI}/assets/scene_keyframes?view=partitions&partition={demo_id}")
    skip = page.get_by_role("button", name="Skip")  # Dagster's one-time "join the community" dialog
    page.wait_for_timeout(1500)
    if skip.count():
        skip.first.click()
    page.get_by_text("stage_seconds").first.wait_for(timeout=60_000)
    body = page.inner_text("body")
    assert "file_name" in body and "sample-3x1.5s.mp4" in body, body[:3000]
    timings = re.findall(r'"(download|detect|thumbnails|upload|db)": (\d+\.?\d*)', body)
    assert {stage for stage, _ in timings} == {"download", "detect", "thumbnails", "upload", "db"}, body
    assert all(len(value.partition(".")[2]) <= 3 for _, value in timings), timings

    page.get_by_text("[Show Markdown]").first.click()
    sheet = page.locator("img[src^='data:image/jpeg']").first
    sheet.wait_for(timeout=30_000)
    # Three scenes: one row of three 160 px tiles, no empty cells.
    assert sheet.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]") == [True, 480, 90]
    shot = Path(os.environ.get("HEIMDEX_UI_SCREENSHOT", tmp_path / "partition.png"))
    page.screenshot(path=str(shot), full_page=True)
    page.close()


def test_embeddings_say_already_current_when_nothing_was_left_to_do(
    dev: Dev, demo_id: str, browser: Any, ui_env: dict[str, str]
) -> None:
    """A rerun of the demo's partition finds every scene embedded, and says so in the UI's metadata."""
    rerun = run_cli(ui_env, "process-video", "--video-id", demo_id)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(f"{UI}/assets/scene_clip_embeddings?view=partitions&partition={demo_id}")
    page.get_by_text("already current: 3 scenes").first.wait_for(timeout=60_000)
    run_tags = {t["key"]: t["value"] for run in dev.runs(demo_id) for t in run["tags"]}
    assert run_tags.get("heimdex/file_name") == "sample-3x1.5s.mp4"
    page.close()


def test_sensor_leaves_done_videos_alone_and_runs_new_ones_quietly(
    dev: Dev, demo_id: str, ui_env: dict[str, str], make_video: Any
) -> None:
    inbox = Path(ui_env["HEIMDEX_HOME"]) / "inbox"
    inbox.mkdir(exist_ok=True)
    shutil.copy(make_video(scenes=2, scene_seconds=1.0), inbox / "dropped.mp4")
    ticks = wait_until(
        "a sensor tick that requested a run",
        lambda: [t for t in dev.sensor_ticks() if t["runIds"]],
        timeout_s=240,
        interval_s=1,
    )
    (new_id,) = {run_id for t in ticks for run_id in t["runIds"]}
    succeeded = lambda: any(r["status"] == "SUCCESS" for r in _runs_of(dev, new_id))  # noqa: E731
    wait_until("the new video's run", succeeded, timeout_s=180, interval_s=1)
    # The demo's video was finished before `dev` started: no sensor run for it.
    assert all(r["runId"] != new_id for r in dev.runs(demo_id))
    sensor_runs = [r for r in dev.runs(demo_id) if any(t["key"] == "dagster/sensor_name" for t in r["tags"])]
    assert not sensor_runs, sensor_runs
    output = dev.output()
    assert "SupersessionWarning" not in output
    assert output.count("random weights") == 1, output[-5000:]


def _runs_of(dev: Dev, run_id: str) -> list[dict[str, Any]]:
    data = dev.graphql("query($r: ID!) { runOrError(runId: $r) { ... on Run { runId status } } }", r=run_id)
    return [data["runOrError"]] if data["runOrError"] else []
