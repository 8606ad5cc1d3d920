"""The worker image runs what the tests run: its pins, its Python and what it copies stay in step."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "runpod_worker"


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
    for name in ("torch", "torchvision", "open-clip-torch", "runpod"):
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


def test_the_worker_imports_only_itself_the_contract_and_its_requirements() -> None:
    allowed = {"runpod_worker", "heimdex_clip_contract"}
    for path in list(WORKER.glob("*.py")) + list((ROOT / "heimdex_clip_contract").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in {"heimdex_clip_assets", "dagster"}, f"{path.name} imports {name}"
                if path.parent.name == "heimdex_clip_contract":
                    import sys

                    assert top in sys.stdlib_module_names or top in allowed, (
                        f"{path.name}: {name} is not stdlib"
                    )
