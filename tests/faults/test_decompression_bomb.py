"""Issue 9, item 5: a decompression bomb by aspect ratio, served over HTTP to the real worker.

A 20000x1 image is a few hundred bytes; resizing its short side to 224 made it 4,480,000x224 (28 s and
9 GB). Every extreme aspect ratio is refused as ``invalid_image`` before decoding, on the CPU path (the
worker subprocess) and on the GPU path (nvJPEG sizing from the JPEG header; run where CUDA is).
"""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest
import torch
from PIL import Image

from heimdex_clip_assets.devservices.image_server import ImageServer
from heimdex_clip_contract.errors import InvalidImageError
from heimdex_clip_contract.schema import ImageItem, build_batch_request
from runpod_worker.encoder import ClipEncoder


def image(width: int, height: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


BOMBS = {
    "png-20000x1": image(20000, 1, "PNG"),
    "png-1x20000": image(1, 20000, "PNG"),
    "jpeg-20000x1": image(20000, 1, "JPEG"),
    "png-4481x224": image(4481, 224, "PNG"),
}


def test_extreme_aspect_ratios_are_invalid_images(
    worker_url: str, worker_secret: str, image_server: ImageServer, frame_jpeg: bytes
) -> None:
    assert len(BOMBS["png-20000x1"]) < 200
    items = [ImageItem(image_server.add(f"/bomb/{name}", body), name) for name, body in BOMBS.items()]
    # An ordinary ultra-wide frame (20:1 exactly) still embeds.
    items.append(ImageItem(image_server.add("/bomb/wide-ok.png", image(4480, 224, "PNG")), "wide-ok"))
    items.append(ImageItem(image_server.add("/bomb/frame.jpg", frame_jpeg), "frame"))
    started = time.monotonic()
    body = {"input": build_batch_request(items, worker_secret)}
    reply = httpx.post(f"{worker_url}/runsync", json=body, timeout=120).json()
    assert reply["status"] == "COMPLETED", reply
    results = {r["request_id"]: r for r in reply["output"]["results"]}
    for name in BOMBS:
        assert results[name]["error"]["code"] == "invalid_image", json.dumps(results[name])
        assert "20:1" in results[name]["error"]["message"]
    assert "embedding" in results["wide-ok"] and "embedding" in results["frame"]
    assert time.monotonic() - started < 30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU decode path needs CUDA")
def test_gpu_path_refuses_them_too(clip_checkpoint: object, frame_jpeg: bytes) -> None:
    encoder = ClipEncoder.load("ViT-B-32", str(clip_checkpoint), device="cuda")
    slots = encoder.encode_bytes([*BOMBS.values(), frame_jpeg])
    assert all(isinstance(s, InvalidImageError) and "20:1" in s.message for s in slots[:-1])
    assert slots[-1].shape == (512,)
