"""ClipEncoder on CPU with the random-init checkpoint, loaded through CLIP_PRETRAINED=<path>."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from heimdex_clip_assets.devservices.synthetic import jpeg
from heimdex_clip_contract.errors import ConfigError, InvalidImageError
from runpod_worker.encoder import ClipEncoder, jpeg_frame


def test_loaded_once_with_public_fields(worker_encoder: ClipEncoder) -> None:
    e = worker_encoder
    assert (e.model_name, e.dim, e.device.type, e.precision) == ("ViT-B-32", 512, "cpu", "fp32")
    assert e.model_version == "vit-b-32-random-vit-b-32-v1"


def test_loading_weights_skips_random_init_and_gives_open_clips_model(
    worker_encoder: ClipEncoder, clip_checkpoint: Path
) -> None:
    # The load leaves the random initialisation out (the checkpoint replaces every weight): the model is
    # open_clip's own load of the same file, tensor for tensor, computed buffers included.
    import open_clip

    reference = open_clip.create_model("ViT-B-32", pretrained=str(clip_checkpoint)).eval()
    ours = dict(worker_encoder.model.state_dict(keep_vars=True)) | dict(worker_encoder.model.named_buffers())
    theirs = dict(reference.state_dict(keep_vars=True)) | dict(reference.named_buffers())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # And torch.nn.init is itself again once the load is over.
    assert torch.nn.init.normal_(torch.zeros(1000)).std() > 0.5


def test_decode_matches_open_clip_preprocess(worker_encoder: ClipEncoder) -> None:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg(400, 300))).save(buf, "PNG")  # PNG: no draft, so exactly open_clip's path
    png = buf.getvalue()
    expected = worker_encoder.preprocess(Image.open(io.BytesIO(png)).convert("RGB"))
    assert torch.equal(worker_encoder.decode(png), expected)


@pytest.mark.parametrize("size", [(480, 270), (270, 480), (224, 224), (100, 50), (1280, 720), (333, 211)])
def test_cpu_preprocessing_is_open_clips_exactly(worker_encoder: ClipEncoder, size: tuple[int, int]) -> None:
    # The CPU path resizes, crops and normalises in PIL + numpy instead of open_clip's torch transform:
    # thumbnails (draft is a no-op at 480x270), portrait, exact size, upscaled, and drafted frames.
    data = jpeg(*size)
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (224, 224))
    expected = worker_encoder.preprocess(image.convert("RGB"))
    assert torch.equal(worker_encoder.decode(data), expected)
    # Models preprocessed otherwise (no shortest-side resize) go through open_clip's transform itself.
    assert torch.equal(dataclasses.replace(worker_encoder, resample=None).decode(data), expected)


def test_encode_bytes_is_encode_tensors_on_decoded_images(worker_encoder: ClipEncoder) -> None:
    images = [jpeg(480, 270), b"junk", jpeg(640, 360)]
    out = worker_encoder.encode_bytes(images)
    # The batch array encode_bytes fills row by row is what decode + stack would give the model.
    expected = worker_encoder.encode_tensors(torch.stack([worker_encoder.decode(images[i]) for i in (0, 2)]))
    assert isinstance(out[1], InvalidImageError)
    assert np.array_equal(out[0], expected[0]) and np.array_equal(out[2], expected[1])
    # No decodable image: errors only, and no forward pass on an empty batch.
    assert isinstance(worker_encoder.encode_bytes([b"junk"])[0], InvalidImageError)


def test_jpeg_draft_stays_close(worker_encoder: ClipEncoder) -> None:
    data = jpeg(1280, 720)
    full = worker_encoder.encode_tensors(
        worker_encoder.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))[None]
    )
    drafted = worker_encoder.encode_bytes([data])[0]
    assert isinstance(drafted, np.ndarray) and float(full[0] @ drafted) > 0.99


def test_encode_bytes_slots_and_normalisation(worker_encoder: ClipEncoder, frame_jpeg: bytes) -> None:
    out = worker_encoder.encode_bytes([frame_jpeg, b"not an image", frame_jpeg[: len(frame_jpeg) // 2]])
    assert isinstance(out[0], np.ndarray) and out[0].shape == (512,) and out[0].dtype == np.float32
    assert abs(float(np.linalg.norm(out[0])) - 1) < 1e-5
    assert isinstance(out[1], InvalidImageError) and isinstance(out[2], InvalidImageError)
    assert "truncated" in out[2].message
    raw = worker_encoder.encode_bytes([frame_jpeg], normalize=False)[0]
    assert isinstance(raw, np.ndarray) and np.allclose(raw / np.linalg.norm(raw), out[0], atol=1e-5)


def test_decompression_bomb_refused(worker_encoder: ClipEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, "PNG")  # 9 Mpx of zeros: a few KB on the wire
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)
    with pytest.raises(InvalidImageError, match="pixel"):
        worker_encoder.decode(buf.getvalue())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # over 2x: Pillow's own error
    with pytest.raises(InvalidImageError, match="pixels"):
        worker_encoder.decode(buf.getvalue())


def test_encode_text(worker_encoder: ClipEncoder) -> None:
    out = worker_encoder.encode_text(["a dog on a beach", "a city at night"])
    assert out.shape == (2, 512) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_encode_text_reads_only_up_to_the_end_token(worker_encoder: ClipEncoder) -> None:
    """The trimmed text tower equals open_clip's full 77-position pass, short and long texts mixed."""
    import torch

    texts = ["a red car", "x", "a crowded market street at night with neon signs and rain " * 4]
    tokens = worker_encoder.tokenizer(texts)
    with torch.inference_mode():
        full = worker_encoder.model.encode_text(tokens, normalize=True).numpy()
    np.testing.assert_allclose(worker_encoder.encode_text(texts), full, atol=1e-5)
    np.testing.assert_allclose(worker_encoder.encode_text(texts[:1])[0], full[0], atol=1e-5)


def test_missing_weights_say_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        ClipEncoder.load(pretrained=str(tmp_path / "nope.safetensors"), device="cpu")
    with pytest.raises(ConfigError, match=r"CLIP_PRETRAINED=<file>.*HF_HUB_OFFLINE=1") as caught:
        ClipEncoder.load("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    assert ".." not in caught.value.message and "bake" not in caught.value.message


@pytest.mark.parametrize(
    ("precision", "match"), [("fp8", "CLIP_PRECISION must be one of"), ("fp16", "fp16 is for CUDA only")]
)
def test_bad_precision_is_a_config_error(precision: str, match: str) -> None:
    # Checked before any weights load, so no network or checkpoint is needed.
    with pytest.raises(ConfigError, match=match) as info:
        ClipEncoder.load(pretrained="none", device="cpu", precision=precision)
    assert info.value.code == "config_error" and not info.value.retryable


@pytest.mark.parametrize(
    "options",
    [{}, {"progressive": True}, {"exif": Image.Exif().tobytes()}, {"subsampling": 0, "quality": 95}],
    ids=["baseline", "progressive", "exif", "444"],
)
def test_jpeg_frame_matches_pil(options: dict[str, object]) -> None:
    # The GPU path sizes JPEGs (pixel limit, nvJPEG support) from this parser instead of PIL.
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg(333, 211))).save(buf, "JPEG", **options)
    frame = jpeg_frame(buf.getvalue())
    assert frame is not None and frame[1:] == (333, 211)
    assert frame[0] == (0xC2 if options.get("progressive") else 0xC0)


@pytest.mark.parametrize(
    "data", [b"\xff\xd8", b"\xff\xd8\xff\xe0\x00", b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8xx"]
)
def test_jpeg_frame_gives_up_on_malformed_headers(data: bytes) -> None:
    assert jpeg_frame(data) is None


def test_batched_jpeg_path_runs_on_cpu_too(worker_encoder: ClipEncoder) -> None:
    # The GPU path's logic (header sizing, grouping, fallbacks, per-image errors) with torchvision's
    # CPU decoder standing in for nvJPEG; the H200 run of bench/worker.py covers the device itself.
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg(400, 300))).save(png, "PNG")
    images = [jpeg(640, 360), png.getvalue(), b"\xff\xd8\xff\xe0junk", jpeg(480, 270), jpeg(640, 360)]
    out = worker_encoder.decode_batch(images)
    assert isinstance(out[2], InvalidImageError)
    for data, got in zip(images, out, strict=True):
        if data is images[2]:
            continue
        assert isinstance(got, torch.Tensor) and got.shape == (3, 224, 224)
        pair = worker_encoder.encode_tensors(torch.stack([got, worker_encoder.decode(data)]))
        assert float(pair[0] @ pair[1]) > 0.99
