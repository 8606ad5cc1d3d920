"""Shared test setup. Fixtures live in ``tests/fixtures/`` by what they provide."""

import os

# No model hub here, and tests must never try one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = [
    "tests.fixtures.clip",
    "tests.fixtures.services",
    "tests.fixtures.seed_system",
    "tests.fixtures.video",
    "tests.fixtures.worker",
]
