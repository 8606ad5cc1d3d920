"""The real worker's handler behind RunPod's local routes, for benches where the RunPod SDK is not installed.

    python bench/worker_api.py --port-file FILE    (the worker's environment: EMBEDDING_HMAC_SECRET, ...)

``POST /runsync`` runs ``runpod_worker.handler.handler`` on the job, exactly as the SDK's local API does
(verify, SSRF-checked downloads, decode, encode), with jobs overlapping as WORKER_CONCURRENCY allows on
RunPod; ``GET /stats`` counts jobs and the most in flight at once. Not for production: RunPod's SDK is.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from runpod_worker.handler import get_state, handler

stats = {"jobs": 0, "in_flight": 0, "max_in_flight": 0}


def create_app() -> Starlette:
    limit = asyncio.Semaphore(get_state().config.job_concurrency)

    async def runsync(request: Request) -> JSONResponse:
        body = await request.json()
        async with limit:
            stats["in_flight"] += 1
            stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
            try:
                output = await handler({"id": uuid.uuid4().hex, "input": body.get("input")})
            finally:
                stats["in_flight"] -= 1
        stats["jobs"] += 1
        if "error" in output:
            return JSONResponse({"id": "j", "status": "FAILED", "error": output["error"]})
        return JSONResponse({"id": "j", "status": "COMPLETED", "output": output})

    async def get_stats(request: Request) -> JSONResponse:
        return JSONResponse(stats)

    return Starlette(routes=[Route("/runsync", runsync, methods=["POST"]), Route("/stats", get_stats)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    app = create_app()  # loads the model before the port is announced
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    with open(args.port_file, "w") as fh:
        fh.write(str(sock.getsockname()[1]))
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
