"""Worker throughput: the handler core against the raw encoder, as ratios measured in one run.

    .venv/bin/python bench/worker.py [--device cpu|cuda] [--batch N] [--n N] [--size 1280x720]
                                     [--checkpoint PATH | --pretrained none]

For batched and one-image requests it prints images/s for: the raw encoder on already-preprocessed
tensors (the ceiling), the handler with the bytes already downloaded (parse, verify, decode, encode,
output dict), and the full handler fetching from a loopback HTTP server; then handler / raw. A second
line splits the handler's time: bytes -> preprocessed tensors on the device (decode), bytes ->
embeddings (encode_bytes), so handler - encode_bytes is the request/response work around the model.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from heimdex_clip_assets.devservices.image_server import ImageServer
from heimdex_clip_assets.devservices.synthetic import jpeg
from heimdex_clip_contract.schema import ImageItem, build_batch_request, build_single_request
from runpod_worker.config import WorkerConfig
from runpod_worker.encoder import ClipEncoder
from runpod_worker.handler import Fetched, WorkerState, handle_input

SECRET = "bench-secret"


def rate(images: int, fn: Callable[[], object], repeats: int) -> float:
    """Images per second over ``repeats`` calls of ``fn`` (one untimed warm-up call first)."""
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return images * repeats / (time.perf_counter() - started)


def decoded_on_device(encoder: ClipEncoder, images: Sequence[bytes]) -> object:
    """Bytes -> preprocessed tensors on the encoder's device, waiting for the device to finish."""
    if encoder.device.type == "cuda":
        out: object = encoder.decode_batch(images)
        torch.cuda.synchronize(encoder.device)
        return out
    return [encoder.decode(b) for b in images]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--batch", type=int, help="images per request (default 32 on CPU, 512 on CUDA)")
    parser.add_argument("--n", type=int, help="images per timed measurement (default 4 batches)")
    parser.add_argument("--size", default="1280x720", help="JPEG size, e.g. 1280x720 or 480x270")
    parser.add_argument("--checkpoint", help="weights file (default: CLIP_PRETRAINED, else none)")
    parser.add_argument("--pretrained", help="open_clip tag or 'none' (overrides --checkpoint)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"))
    args = parser.parse_args()

    cuda = args.device == "cuda"
    batch = args.batch or (512 if cuda else 32)
    repeats = max(1, (args.n or 4 * batch) // batch)
    width, height = (int(v) for v in args.size.lower().split("x"))
    pretrained = args.pretrained or args.checkpoint or os.environ.get("CLIP_PRETRAINED", "none")

    encoder = ClipEncoder.load(pretrained=pretrained, device=args.device, precision=args.precision)
    config = WorkerConfig.from_env({"EMBEDDING_HMAC_SECRET": SECRET, "IMAGE_ALLOW_PRIVATE_HOSTS": "true"})
    state = WorkerState.create(config, encoder)
    unique = [jpeg(width, height, seed=i, quality=85) for i in range(16)]
    images = [unique[i % len(unique)] for i in range(batch)]
    mean_kb = sum(len(b) for b in unique) / len(unique) / 1024
    print(f"device={encoder.device} precision={encoder.precision} size={width}x{height} jpeg~{mean_kb:.0f}KB")
    print(f"batch={batch} repeats={repeats} torch_threads={torch.get_num_threads()}")

    server = ImageServer()
    urls = [server.add(f"/img/{i}.jpg", data) for i, data in enumerate(images)]
    by_url = dict(zip(urls, images, strict=True))

    async def in_memory(request_urls: Sequence[str]) -> list[Fetched]:
        return [(by_url[u.split("?", 1)[0]], 0.0) for u in request_urls]

    calls = itertools.count()

    def handler_run(count: int, downloaded: bool) -> Callable[[], object]:
        def call() -> object:
            # A distinct query per call gives a distinct signature: a repeat would be refused as a replay.
            request_urls = [f"{u}?call={next(calls)}" for u in urls[:count]]
            if count == 1:
                body = build_single_request(request_urls[0], SECRET, encoding="base64")
            else:
                body = build_batch_request([ImageItem(u) for u in request_urls], SECRET)
            out = asyncio.run(handle_input(body, state, in_memory if downloaded else None))
            assert "error" not in out and all("error" not in r for r in out.get("results", [])), out
            return out

        return call

    for label, count, reps in (
        ("batch", batch, repeats),
        ("single", 1, max(8, min(64, repeats * batch // 8))),
    ):
        tensors = torch.stack([encoder.decode(b) for b in images[:count]]).to(encoder.device)
        raw = rate(count, lambda t=tensors: encoder.encode_tensors(t), reps)
        core = rate(count, handler_run(count, downloaded=True), reps)
        full = rate(count, handler_run(count, downloaded=False), reps)
        decode = rate(count, lambda b=images[:count]: decoded_on_device(encoder, b), reps)
        encode_bytes = rate(count, lambda b=images[:count]: encoder.encode_bytes(b), reps)
        print(
            f"{label:6s} raw encoder {raw:9.1f} img/s | handler, bytes downloaded {core:9.1f} img/s "
            f"(x{core / raw:.2f}) | handler + loopback HTTP {full:9.1f} img/s (x{full / raw:.2f})"
        )
        print(
            f"{label:6s} split: decode {decode:9.1f} img/s ({1000 * count / decode:.1f} ms/call) | "
            f"encode_bytes {encode_bytes:9.1f} img/s ({1000 * count / encode_bytes:.1f} ms/call) | "
            f"handler {1000 * count / core:.1f} ms/call"
        )
    server.close()


if __name__ == "__main__":
    main()
