"""The worker's downloads: signed thumbnail URLs from the embedded storage, images/s and CPU, in one run.

    .venv/bin/python bench/fetch.py [--images 1024] [--concurrency 16 64] [--size 480x270]

Thumbnails (one JPEG each, distinct paths) are uploaded to the embedded storage and signed as the
pipeline signs them; then the worker's own fetcher (``runpod_worker.handler.http_fetcher``: aiohttp,
SSRF checks, pinned addresses, size caps) downloads them all at each ``--concurrency``, against bare
httpx GETs in as many lanes (no checks at all: a floor under what the worker's httpx fetcher cost
before). Both run on the same URLs, machine and minute; it prints images/s, the CPU each side spends
per image (this process), the storage server's CPU per image (all its processes:
``HEIMDEX_STORAGE_WORKERS``), and the ratios.

On a GPU machine this is what stood between the engine and the worker's 10,000 images/s from bytes:
the bench's end-to-end figure (``bench/gpu_backfill.sh``) fetches every thumbnail this way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import httpx
import psutil
from _common import isolated_home, load_note

from heimdex_clip_assets import services
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.storage_server import storage_server_pid
from heimdex_clip_assets.devservices.synthetic import jpeg
from runpod_worker.config import WorkerConfig
from runpod_worker.handler import http_fetcher


async def bare_httpx(urls: Sequence[str], concurrency: int) -> int:
    """httpx GETs in ``concurrency`` lanes of one kept-alive connection each, nothing checked."""
    todo = iter(urls)

    async def lane() -> int:
        async with httpx.AsyncClient(trust_env=False) as client:
            return sum([(await client.get(url)).status_code == 200 for url in todo])

    return sum(await asyncio.gather(*(lane() for _ in range(concurrency))))


async def worker(urls: Sequence[str], config: WorkerConfig) -> int:
    """The worker's fetcher as it is; images fetched."""
    return sum(isinstance(data, bytes) for data, _ in await http_fetcher(config)(urls))


def cpu_s(process: psutil.Process) -> float:
    """CPU seconds of ``process`` and its children (the storage server's other workers)."""
    return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children()])


def measure(images: int, run: Coroutine[Any, Any, int], server: psutil.Process) -> tuple[float, float, float]:
    """(images/s, this process's CPU ms per image, the storage server's CPU ms per image)."""
    me = psutil.Process()
    mine, theirs, started = cpu_s(me), cpu_s(server), time.perf_counter()
    fetched = asyncio.run(run)
    wall = time.perf_counter() - started
    assert fetched == images, f"{images - fetched} downloads failed"
    return images / wall, (cpu_s(me) - mine) * 1000 / images, (cpu_s(server) - theirs) * 1000 / images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--size", default="480x270", help="thumbnail size (the pipeline's default)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    with isolated_home():
        settings = Settings.from_env()
        storage = services.storage(settings)
        data = jpeg(width, height, seed=1, quality=85)
        paths = [f"bench/fetch/thumbnails/scene_{i}.jpg" for i in range(args.images)]
        for path in paths:
            storage.upload(path, data, content_type="image/jpeg")
        signed = storage.create_signed_urls(paths, 600)
        urls = [signed[p] for p in paths]
        print(f"{args.images} thumbnails of {len(data):,} bytes ({args.size}) in the embedded storage")
        env = {"EMBEDDING_HMAC_SECRET": "bench", "IMAGE_ALLOW_PRIVATE_HOSTS": "true"}
        pid = storage_server_pid(settings.home)
        assert pid is not None, "the embedded storage server is not running"
        server = psutil.Process(pid)
        for concurrency in args.concurrency:
            config = WorkerConfig.from_env({**env, "IMAGE_DOWNLOAD_CONCURRENCY": str(concurrency)})
            asyncio.run(worker(urls[:concurrency], config))  # warm: imports, first connections
            bare, bare_cpu, bare_server = measure(len(urls), bare_httpx(urls, concurrency), server)
            ours, our_cpu, our_server = measure(len(urls), worker(urls, config), server)
            print(
                f"concurrency {concurrency:3d}: bare httpx {bare:6,.0f} images/s ({bare_cpu:.2f} ms CPU/"
                f"image), worker's fetcher {ours:6,.0f} images/s ({our_cpu:.2f} ms CPU/image): "
                f"x{ours / bare:.1f} images/s, x{bare_cpu / our_cpu:.1f} less CPU; storage server "
                f"{bare_server:.2f} / {our_server:.2f} ms CPU/image"
            )
        print(load_note())


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
