"""A loopback stand-in for the RunPod worker: the same wire contract, a configurable latency, no model.

For benches and tests of everything on the caller's side of RunPod (packing, jobs in flight, signing,
validation, writes): it verifies each job's signature with the contract's :class:`Verifier`, waits until
``latency_s`` after the job arrived (queue, network and GPU time of a real endpoint; its own checking and
vector making happen within that time, so they never add to it), optionally downloads every signed URL
then (as the worker does), and answers with deterministic unit vectors (seeded by each URL's path, so the
same thumbnail always gets the same vector; an expired or refused URL fails its slot with
``image_download_failed``, as on the worker). ``GET /stats`` says how many jobs and images it served and
how many jobs overlapped at most; the last jobs' request ids show which scenes travelled together.

    python -m heimdex_clip_assets.devservices.loopback_worker --port 8800 --latency-ms 200

It serves RunPod's routes without the ``/v2/{endpoint}`` prefix, like the SDK's local API:
``POST /runsync`` (and ``/run`` + ``/status/{id}``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import uuid
from collections import deque
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from heimdex_clip_assets.devservices import net
from heimdex_clip_contract.codec import encode_embedding
from heimdex_clip_contract.errors import ClipError, InvalidRequestError, encode_job_error
from heimdex_clip_contract.schema import EmbedRequest, parse_request
from heimdex_clip_contract.signing import Verifier
from runpod_worker.fetch import FetchPolicy, fetch_all

SECRET_ENV = "EMBEDDING_HMAC_SECRET"
# The worker's defaults, but on loopback: the embedded storage listens on 127.0.0.1.
FETCH_POLICY = FetchPolicy(allow_private=True)
FETCH_CONNECTIONS = 64
RECENT_JOBS = 256


@dataclass
class LoopbackConfig:
    latency_s: float = 0.2
    secret: str | None = None
    fetch: bool = False  # download every URL (and fail its slot as the worker would) before answering
    dim: int = 512
    model: str = "ViT-B-32"
    pretrained: str = "loopback"
    model_version: str = "loopback-vit-b-32-v1"
    # The guide's own worker, as its users may still run it: the single-image request only.
    single_only: bool = False


@dataclass
class LoopbackStats:
    jobs: int = 0
    images: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    recent: deque[list[str | None]] = field(default_factory=lambda: deque(maxlen=RECENT_JOBS))

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "images": self.images,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "recent_request_ids": list(self.recent),
        }


class LoopbackVectors:
    """Deterministic unit vectors, one per URL path: the sum of two rows of a fixed random table picked
    by the path's hash (16 million distinct vectors), made for a whole job at once. A generator seeded
    per URL cost ~40 us each: 10 ms of a 256-image job, which, on a small machine, delayed the other
    jobs' answers and stood in the latency the bench measures the engine against."""

    ROWS = 4096

    def __init__(self, dim: int) -> None:
        rng = np.random.default_rng(0)
        self._tables = rng.standard_normal((2, self.ROWS, dim)).astype(np.float32)

    def __call__(self, urls: list[str]) -> np.ndarray:
        picks = (
            np.array(
                [
                    np.frombuffer(hashlib.sha256(urlsplit(url).path.encode()).digest()[:4], np.uint16)
                    for url in urls
                ]
            ).reshape(len(urls), 2)
            % self.ROWS
        )
        vectors = self._tables[0, picks[:, 0]] + self._tables[1, picks[:, 1]]
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _failed(job_id: str, err: ClipError) -> bytes:
    return _json({"id": job_id, "status": "FAILED", "error": encode_job_error(err)["error"]})


def create_app(config: LoopbackConfig) -> Starlette:
    stats = LoopbackStats()
    verifier = Verifier([config.secret]) if config.secret else None
    vectors = LoopbackVectors(config.dim)
    finished: dict[str, bytes] = {}

    async def download_errors(urls: list[str]) -> list[ClipError | None]:
        """Every URL downloaded as the worker downloads it (its own client, checks and errors)."""
        fetched = await fetch_all(urls, FETCH_POLICY, FETCH_CONNECTIONS)
        return [data if isinstance(data, ClipError) else None for data, _ in fetched]

    def answer(
        job_id: str, request: EmbedRequest, embeddings: list[str], errors: list[ClipError | None]
    ) -> bytes:
        """The job's answer as RunPod sends it, JSON-encoded."""
        head = {
            "dim": config.dim,
            "model": config.model,
            "pretrained": config.pretrained,
            "model_version": config.model_version,
            "encoding": request.encoding,
        }
        results = [
            {"request_id": item.request_id, "error": err.to_dict()}
            if err is not None
            else {
                "request_id": item.request_id,
                "embedding": embedding,
                "timings": {"download_ms": 0.0, "inference_ms": 0.0},
            }
            for item, embedding, err in zip(request.items, embeddings, errors, strict=True)
        ]
        if not request.batch:
            if errors[0] is not None:
                return _failed(job_id, errors[0])
            output = {**head, **results[0], "timings": {"total_ms": config.latency_s * 1000}}
        else:
            output = {**head, "results": results, "timings": {"total_ms": config.latency_s * 1000}}
        return _json({"id": job_id, "status": "COMPLETED", "output": output})

    async def run_job(job_id: str, job_input: Any, arrived: float) -> bytes:
        """The job's answer, as JSON, ``latency_s`` after it ``arrived`` (loop time): the endpoint's own
        work (checking, vectors, the answer's JSON) happens inside that wait, so it never adds to the
        latency it stands for (only downloads, with ``fetch``, come after it, as on the worker)."""
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            if config.single_only and not (isinstance(job_input, dict) and "image_url" in job_input):
                raise InvalidRequestError("image_url is required")
            request = parse_request(job_input)
            if verifier is not None:
                verifier.verify(request.message, request.ts, request.sig)
            urls = [item.image_url for item in request.items]
            embeddings = [encode_embedding(v, request.encoding) for v in vectors(urls)]
            body = None if config.fetch else answer(job_id, request, embeddings, [None] * len(urls))
            # The wait comes first, as on RunPod: a job queues, then its worker downloads the images.
            await asyncio.sleep(max(0.0, arrived + config.latency_s - asyncio.get_running_loop().time()))
            if body is None:
                body = answer(job_id, request, embeddings, await download_errors(urls))
        except ClipError as err:
            return _failed(job_id, err)
        finally:
            stats.in_flight -= 1
        stats.jobs += 1
        stats.images += len(request.items)
        stats.recent.append([item.request_id for item in request.items])
        return body

    async def runsync(request: Request) -> Response:
        arrived = asyncio.get_running_loop().time()
        body = await request.json()
        answer = await run_job(uuid.uuid4().hex, body.get("input"), arrived)
        return Response(answer, media_type="application/json")

    async def run(request: Request) -> JSONResponse:
        arrived = asyncio.get_running_loop().time()
        job_id = uuid.uuid4().hex
        body = await request.json()
        finished[job_id] = await run_job(job_id, body.get("input"), arrived)
        return JSONResponse({"id": job_id, "status": "IN_QUEUE"})

    async def status(request: Request) -> Response:
        job = finished.pop(request.path_params["job_id"], None)
        if job is None:
            return JSONResponse({"error": "job not found"}, status_code=404)
        return Response(job, media_type="application/json")

    async def get_stats(request: Request) -> JSONResponse:
        return JSONResponse(stats.as_dict())

    async def reset_stats(request: Request) -> JSONResponse:
        nonlocal stats
        stats = LoopbackStats()
        return JSONResponse({})

    return Starlette(
        routes=[
            Route("/runsync", runsync, methods=["POST"]),
            Route("/run", run, methods=["POST"]),
            Route("/status/{job_id}", status, methods=["GET", "POST"]),
            Route("/stats", get_stats, methods=["GET"]),
            Route("/stats/reset", reset_stats, methods=["POST"]),
        ]
    )


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def serve_in_thread(config: LoopbackConfig, host: str = "127.0.0.1") -> AbstractContextManager[str]:
    """Serve on a free port in a background thread (tests); yields the endpoint URL."""
    return net.serve_in_thread(create_app(config), host)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", help="write the chosen port here once listening")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="per job (default 200)")
    parser.add_argument("--fetch", action="store_true", help="download every signed URL")
    args = parser.parse_args(argv)
    config = LoopbackConfig(
        latency_s=args.latency_ms / 1000, secret=os.environ.get(SECRET_ENV), fetch=args.fetch
    )
    sock = _bind(args.host, args.port)
    if args.port_file:
        with open(args.port_file, "w") as fh:
            fh.write(str(sock.getsockname()[1]))
    uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
