"""Whether the configured CLIP weights can be had, answered in milliseconds and before torch loads.

open_clip turns a tag such as ``openai`` into a file on the Hugging Face hub and downloads it on first
use. Where the hub cannot be reached, huggingface_hub retries every candidate file for about a minute
before open_clip gives up, and importing open_clip alone (torch, torchvision) takes seconds. So whatever
needs the in-process model asks here first: a tag is fine when its file is in the hub's cache, or when
the hub answers one short probe; otherwise :class:`WeightsUnavailableError` says what to set, at once.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
from pathlib import Path

import httpx

from heimdex_clip_contract.errors import ConfigError
from heimdex_clip_contract.schema import weights_are_file, weights_are_random

PROBE_TIMEOUT_S = 2.0
# The files open_clip looks for in a hub repository, in its order (pretrained.download_pretrained_from_hf).
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_OFF = {"", "0", "false", "no", "off"}


class WeightsUnavailableError(ConfigError):
    """The configured CLIP weights are neither on this machine nor downloadable now; ``reason`` says
    why in a few words (for a caller that goes on without them, as ``demo`` does)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_weights(model_name: str, pretrained: str) -> None:
    """Raise :class:`WeightsUnavailableError` when ``pretrained`` is an open_clip tag whose weights are
    not in the Hugging Face cache and cannot be downloaded now (``HF_HUB_OFFLINE``, or no answer from
    the hub within ``PROBE_TIMEOUT_S``), and :class:`ConfigError` when it names a file that is not there
    (a mistake to fix, never a reason to go on with random weights)."""
    if weights_are_file(pretrained) and not os.path.isfile(pretrained):
        raise ConfigError(f"CLIP_PRETRAINED file not found: {pretrained}")
    if weights_are_random(pretrained) or weights_are_file(pretrained):
        return
    found = hub_files(model_name, pretrained)
    if found is None:  # not a hub tag (an unknown one, a URL-only one): open_clip's own error names it
        return
    repo, files = found
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in files):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in _OFF:
        why = "HF_HUB_OFFLINE is set"
    elif not _hub_answers():
        why = "the Hugging Face hub does not answer"
    else:
        return
    raise WeightsUnavailableError(
        f"The CLIP weights {pretrained!r} of {model_name} are not on this machine and {why}; set "
        f"CLIP_PRETRAINED=<file> to a local .safetensors file of them (a copy of {repo}), and "
        "HF_HUB_OFFLINE=1 where the hub cannot be reached",
        reason=why,
    )


def hub_files(model_name: str, pretrained: str) -> tuple[str, tuple[str, ...]] | None:
    """The hub repository open_clip downloads ``model_name``'s ``pretrained`` tag from, and the files
    it looks for there; None for a tag without one."""
    table = _pretrained_table()
    if table is None:  # open_clip's source changed shape: ask open_clip itself (imports torch)
        import open_clip

        hub = open_clip.get_pretrained_cfg(model_name, pretrained).get("hf_hub", "")
    else:
        # open_clip's own normalisation: "-quickgelu" models share the plain model's tags.
        tags = table.get(model_name.removesuffix("-quickgelu"), {})
        hub = tags.get(pretrained.lower().replace("-", "_"), "")
    # "org/repo/" means open_clip's default file names; "org/repo/file.bin" names one file.
    repo, _, name = hub.rpartition("/") if hub.count("/") > 1 else (hub.rstrip("/"), "", "")
    if not repo:
        return None
    if name.endswith((".bin", ".pth")):
        return repo, (name[:-4] + ".safetensors", name)
    return repo, (name,) if name else HUB_FILES


@functools.cache
def _pretrained_table() -> dict[str, dict[str, str]] | None:
    """open_clip's ``{model: {tag: hf_hub}}``, read from its ``pretrained.py`` without importing it.

    The module is a list of literal assignments: ``_VITB32 = dict(openai=_pcfg(hf_hub="timm/...",
    ...), ...)`` and ``_PRETRAINED = {"ViT-B-32": _VITB32, ...}``; parsing them takes ~10 ms.
    """
    spec = importlib.util.find_spec("open_clip")
    source = next(
        (
            Path(folder) / "pretrained.py"
            for folder in (spec and spec.submodule_search_locations) or ()
            if (Path(folder) / "pretrained.py").is_file()
        ),
        None,
    )
    if source is None:
        return None
    tags: dict[str, dict[str, str]] = {}
    models: dict[str, str] = {}
    for node in ast.parse(source.read_text()).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, value = node.targets[0], node.value
        if not isinstance(target, ast.Name):
            continue
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict":
            tags[target.id] = {
                tag.arg: field.value.value
                for tag in value.keywords
                if tag.arg and isinstance(tag.value, ast.Call)
                for field in tag.value.keywords
                if field.arg == "hf_hub" and isinstance(field.value, ast.Constant)
            }
        elif target.id == "_PRETRAINED" and isinstance(value, ast.Dict):
            models = {
                key.value: name.id
                for key, name in zip(value.keys, value.values, strict=True)
                if isinstance(key, ast.Constant) and isinstance(name, ast.Name)
            }
    table = {model: tags.get(name, {}) for model, name in models.items()}
    return table if any(table.values()) else None


def _hub_answers() -> bool:
    """One request to the hub (``HF_ENDPOINT``), bounded by ``PROBE_TIMEOUT_S``: any HTTP answer will do."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        httpx.head(f"{endpoint}/api/models", timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError:
        return False
    return True
