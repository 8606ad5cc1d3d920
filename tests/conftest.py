"""Shared test setup. Fixtures live in ``tests/fixtures/`` by what they provide."""

import os
import sys
from collections.abc import Iterator

import pytest

# No model hub here, and tests must never try one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = [
    "tests.fixtures.browser",
    "tests.fixtures.clip",
    "tests.fixtures.services",
    "tests.fixtures.seed_system",
    "tests.fixtures.video",
    "tests.fixtures.worker",
]


def _defs_state_storage() -> object:
    """Dagster's current defs-state storage (a context variable each entered DagsterInstance sets), or
    None while Dagster is not imported: the guard below must not import it for tests that never do."""
    base = sys.modules.get("dagster._core.storage.defs_state.base")
    return base.DefsStateStorage.get() if base is not None else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A test must leave every DagsterInstance it entered closed. One left open (a ``build_*_context``
    used outside a ``with`` opens an instance of its own) is closed by the garbage collector at a random
    later moment, and that close resets Dagster's current defs-state storage to a disposed instance's:
    a later test then fails in ``defs()`` with "Attempted to resolve undefined DagsterInstance weakref".
    This fails the test that leaks, when it leaks, instead."""
    before = _defs_state_storage()
    result = yield
    if _defs_state_storage() is not before:
        pytest.fail(
            "This test left a DagsterInstance entered: open sensor/schedule contexts with "
            "`with dg.build_sensor_context(...) as context:` (and instances with `with`)",
            pytrace=False,
        )
    return result
