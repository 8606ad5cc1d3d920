"""Image bytes shared by the worker tests."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


def jpeg(width: int = 320, height: int = 180, seed: int = 0, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: compresses like a video frame, not like pure noise.
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def frame_jpeg() -> bytes:
    return jpeg()
