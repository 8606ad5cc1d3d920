"""Made-up inputs for the smoke test, tests and benches: frame-like JPEGs, and random-init CLIP weights
(no weights can be downloaded where they run; random ones cost the same compute as real ones)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(width: int = 320, height: int = 180, *, seed: int = 0, quality: int = 90) -> bytes:
    """A ``width`` x ``height`` JPEG, distinct per ``seed``: a smooth gradient plus noise, so it
    compresses and decodes like a video frame, not like pure noise."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def random_checkpoint(path: Path, model_name: str = "ViT-B-32", *, seed: int = 0) -> Path:
    """Write a random-init ``model_name`` as a safetensors file at ``path`` (the same ``seed``, the same
    weights), for ``CLIP_PRETRAINED=<path>``: the loading code real weights take. Returns ``path``."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
