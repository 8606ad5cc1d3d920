"""The local model in a child process (the demo's): the same vectors as in-process, errors in their slots,
and a model that cannot load said as it would be in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from heimdex_clip_assets.adapters.encoder_process import EncoderProcess
from heimdex_clip_contract.errors import ClipError, ConfigError, InvalidImageError
from runpod_worker.encoder import ClipEncoder


def test_the_child_gives_the_in_process_vectors(
    clip_checkpoint: Path, worker_encoder: ClipEncoder, frame_jpeg: bytes
) -> None:
    child = EncoderProcess("ViT-B-32", str(clip_checkpoint), None)
    assert (child.model_name, child.dim, child.model_version) == (
        "ViT-B-32",
        512,
        worker_encoder.model_version,
    )
    child.limit_threads(1)
    vector, bad = child.encode_bytes([frame_jpeg, b"not an image"])
    (expected,) = worker_encoder.encode_bytes([frame_jpeg])
    assert isinstance(vector, np.ndarray) and isinstance(expected, np.ndarray)
    assert float(vector @ expected) > 0.9999
    assert isinstance(bad, InvalidImageError)


def test_a_model_that_cannot_load_is_said_on_first_use(tmp_path: Path) -> None:
    child = EncoderProcess("ViT-B-32", str(tmp_path / "missing.safetensors"), None)
    for _ in range(2):  # the same sentence each time, not "the process ended"
        with pytest.raises(ClipError) as info:
            child.encode_bytes([b""])
        assert isinstance(info.value, ConfigError) and "CLIP_PRETRAINED" in info.value.message
