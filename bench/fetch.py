"""The worker's downloads: signed thumbnail URLs from the embedded storage, images/s, in one run.

    .venv/bin/python bench/fetch.py [--images 1024] [--concurrency 16 64] [--size 480x270]

Thumbnails (one JPEG each, distinct paths) are uploaded to the embedded storage and signed as the
pipeline signs them; then the worker's own fetcher (``runpod_worker.handler.http_fetcher``: SSRF checks,
pinned addresses, size caps) downloads them all, at each ``--concurrency``, against the way it fetched
before: every download of a job through one shared httpx pool of that many connections. Both run the
same ``fetch_image`` on the same URLs, machine and minute; the ratio is lanes / shared pool.

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

from _common import isolated_home, load_note

from heimdex_clip_assets import services
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.synthetic import jpeg
from runpod_worker.config import WorkerConfig
from runpod_worker.fetch import FetchPolicy, fetch_image, make_client
from runpod_worker.handler import http_fetcher


async def shared_pool(urls: Sequence[str], policy: FetchPolicy, concurrency: int) -> int:
    """The fetcher before lanes: one client, ``concurrency`` connections, a semaphore; images fetched."""
    limit = asyncio.Semaphore(concurrency)
    async with make_client(policy, max_connections=concurrency) as client:

        async def one(url: str) -> bool:
            async with limit:
                return isinstance(await fetch_image(client, url, policy), bytes)

        return sum(await asyncio.gather(*(one(u) for u in urls)))


async def lanes(urls: Sequence[str], config: WorkerConfig) -> int:
    """The worker's fetcher as it is; images fetched."""
    return sum(isinstance(data, bytes) for data, _ in await http_fetcher(config)(urls))


def images_per_s(images: int, run: Coroutine[Any, Any, int]) -> float:
    started = time.perf_counter()
    fetched = asyncio.run(run)
    assert fetched == images, f"{images - fetched} downloads failed"
    return images / (time.perf_counter() - started)


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
        for concurrency in args.concurrency:
            config = WorkerConfig.from_env({**env, "IMAGE_DOWNLOAD_CONCURRENCY": str(concurrency)})
            policy = FetchPolicy.from_config(config)
            before = images_per_s(len(urls), shared_pool(urls, policy, concurrency))
            after = images_per_s(len(urls), lanes(urls, config))
            print(
                f"concurrency {concurrency:3d}: shared pool {before:7,.0f} images/s, lanes {after:7,.0f} "
                f"images/s (x{after / before:.1f})"
            )
        print(load_note())


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
