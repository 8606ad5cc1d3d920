"""The worker image runs what the tests run: its pins, its Python and what it copies stay in step."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "runpod_worker"
CONTRACT = ROOT / "heimdex_clip_contract"


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+).*", line)
        if match:
            pins[match[1].lower().replace("_", "-")] = match[2]
    return pins


def test_worker_pins_match_the_tested_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    tested = _pins(project["dependencies"])
    worker = _pins((WORKER / "requirements.txt").read_text().splitlines())
    for name in ("torch", "torchvision", "open-clip-torch", "runpod", "pydantic-settings"):
        assert worker.get(name) == tested.get(name), (
            f"{name}: image {worker.get(name)} != tests {tested.get(name)}"
        )


def test_dockerfile_builds_the_worker_from_its_folder_plus_the_contract() -> None:
    dockerfile = (WORKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11[-\w.]*$", dockerfile, re.M), "the image's Python is the tests' 3.11"
    assert "pip install -r /app/runpod_worker/requirements.txt" in dockerfile
    copied = set(re.findall(r"^COPY (\S+) ", dockerfile, re.M))
    assert copied == {"runpod_worker/requirements.txt", "heimdex_clip_contract", "runpod_worker"}
    assert re.search(r'^CMD \["python", "-u", "-m", "runpod_worker.handler"\]$', dockerfile, re.M)


def _imports(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def test_the_worker_never_imports_the_pipeline_or_dagster() -> None:
    for path in [*WORKER.glob("*.py"), *CONTRACT.glob("*.py")]:
        assert not _imports(path) & {"heimdex_clip_assets", "dagster"}, path.name


def test_the_wire_contract_is_standard_library_only() -> None:
    # settings.py is the one exception: both sides read their settings with pydantic-settings.
    for path in CONTRACT.glob("*.py"):
        allowed = {"pydantic", "pydantic_settings"} if path.name == "settings.py" else set()
        outside = _imports(path) - set(sys.stdlib_module_names) - allowed
        assert not outside, f"{path.name} imports {outside}"


# Import name -> the distribution requirements.txt names, where the two differ.
_DISTRIBUTIONS = {"PIL": "pillow", "open_clip": "open-clip-torch", "pydantic": "pydantic-settings"}


def test_everything_the_worker_imports_is_in_its_requirements() -> None:
    listed = {
        re.split(r"[=<>\[;\s]", line.strip(), maxsplit=1)[0].lower()
        for line in (WORKER / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    ours = {"runpod_worker", "heimdex_clip_contract"}
    for path in WORKER.glob("*.py"):
        for name in _imports(path) - set(sys.stdlib_module_names) - ours:
            assert _DISTRIBUTIONS.get(name, name).lower() in listed, (
                f"{path.name} imports {name}, not in requirements.txt"
            )
