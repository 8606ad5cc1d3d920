"""Issue 9.7 (and 12.2): a video id that is not a UUID is one sentence, exit 2, before any database query.

Before: ``invalid input syntax for type uuid`` from PostgreSQL, with its ``CONTEXT:`` line.
"""

from __future__ import annotations

import os

import pytest

from tests.fixtures.cli import run_cli
from tests.fixtures.services import reachable_dir

NOT_IDS = ["does-not-exist", "12", "1a891027-872e-51ae-924e-d910f272cdaZ", "'; DROP TABLE videos; --"]


@pytest.mark.parametrize("bad", NOT_IDS)
@pytest.mark.parametrize(
    "args",
    [["process-video", "--video-id"], ["search", "a cat", "--video-id"]],
    ids=["process-video", "search"],
)
def test_an_id_that_is_not_a_uuid_is_one_sentence(args: list[str], bad: str) -> None:
    with reachable_dir("heimdex-faults-") as home:
        env = {**os.environ, "HEIMDEX_HOME": str(home), "CLIP_PRETRAINED": "none", "COLUMNS": "80"}
        result = run_cli(env, *args, bad, timeout=120)
        # Refused before the embedded PostgreSQL was even needed.
        assert not (home / "pg").exists()
    assert result.returncode == 2, result.stdout + result.stderr
    sentence = f"{bad!r} is not a video id (ids are UUIDs, as `heimdex-clip add-video` prints them)"
    assert result.stderr == f"error: {sentence}\n"
    assert "CONTEXT" not in result.stderr and "Traceback" not in result.stderr
