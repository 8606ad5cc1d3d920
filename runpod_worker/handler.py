"""RunPod serverless handler: verify the HMAC, fetch the image(s), return CLIP embeddings.

Run ``python -m runpod_worker.handler`` (RunPod), add ``--rp_serve_api`` for a local HTTP API or
``--test_input '{"input": ...}'`` for one job. The model loads once at start, never per job.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from heimdex_clip_contract.codec import encode_embedding
from heimdex_clip_contract.errors import ClipError, InternalError, ModelMismatchError, encode_job_error
from heimdex_clip_contract.schema import (
    EmbedRequest,
    TextRequest,
    is_text_request,
    parse_request,
    parse_text_request,
)
from heimdex_clip_contract.signing import Verifier
from runpod_worker.config import WorkerConfig
from runpod_worker.encoder import ClipEncoder
from runpod_worker.fetch import FetchPolicy, fetch_all

logger = logging.getLogger("runpod_worker")

# Downloads a URL list; returns one (bytes or that URL's error, download ms) per URL, in order. The
# seam lets the bench time the handler with the bytes already in memory.
Fetched = tuple[bytes | ClipError, float]
Fetcher = Callable[[Sequence[str]], Awaitable[list[Fetched]]]


@dataclass(frozen=True)
class WorkerState:
    config: WorkerConfig
    encoder: ClipEncoder
    verifier: Verifier | None  # None only when WORKER_ALLOW_INSECURE_NO_AUTH=true and no secret is set
    # Model calls run on these long-lived threads, one per concurrent job. asyncio.to_thread would use
    # the event loop's default pool, which is new for every asyncio.run (the bench, the local API's
    # tests) and per thread CUDA keeps state (cuBLAS/cuDNN handles, streams) that a fresh thread sets
    # up again; a fixed pool pays that once per process.
    executor: ThreadPoolExecutor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pool = ThreadPoolExecutor(max_workers=max(1, self.config.job_concurrency), thread_name_prefix="clip")
        object.__setattr__(self, "executor", pool)

    @classmethod
    def create(cls, config: WorkerConfig, encoder: ClipEncoder | None = None) -> WorkerState:
        if config.allow_insecure_no_auth:
            logger.warning(
                "!!! WORKER_ALLOW_INSECURE_NO_AUTH=true and no EMBEDDING_HMAC_SECRET: accepting UNSIGNED "
                "jobs. Never deploy this. !!!"
            )
        encoder = encoder or ClipEncoder.load(
            config.clip_model_name,
            config.clip_pretrained,
            device=config.device,
            precision=config.clip_precision,
            model_version=config.clip_model_version,
        )
        verifier = (
            Verifier(config.hmac_secrets, config.auth_window_s, config.auth_min_version)
            if config.hmac_secrets
            else None
        )
        logger.info(
            "CLIP worker ready (model=%s, pretrained=%s, version=%s, device=%s, precision=%s, secrets=%d)",
            encoder.model_name,
            os.path.basename(encoder.pretrained),
            encoder.model_version,
            encoder.device,
            encoder.precision,
            len(config.hmac_secrets),
        )
        return cls(config, encoder, verifier)


_state: WorkerState | None = None


def get_state() -> WorkerState:
    """The process's worker state, built from the environment on first use."""
    global _state
    if _state is None:
        _state = WorkerState.create(WorkerConfig.from_env(os.environ))
    return _state


def set_state(state: WorkerState) -> None:
    """Install a prepared state (tests and the bench reuse one loaded encoder)."""
    global _state
    _state = state


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def http_fetcher(config: WorkerConfig) -> Fetcher:
    """Concurrent, SSRF-checked downloads (:func:`~runpod_worker.fetch.fetch_all`):
    ``IMAGE_DOWNLOAD_CONCURRENCY`` at once per job."""
    return functools.partial(
        fetch_all, policy=FetchPolicy.from_config(config), concurrency=config.download_concurrency
    )


async def embed_downloaded(
    state: WorkerState, request: EmbedRequest, fetched: Sequence[Fetched], download_ms: float
) -> dict[str, Any]:
    """Bytes -> output dict. Raises :class:`ClipError` only for a failed single-image job."""
    started = time.perf_counter()
    payloads = [payload for payload, _ in fetched]
    good = [p for p in payloads if isinstance(p, bytes)]
    # The model call is seconds of CPU (or a GPU sync): off the event loop so other jobs' downloads
    # and RunPod's heartbeat keep running.
    encoded = await asyncio.get_running_loop().run_in_executor(
        state.executor, functools.partial(state.encoder.encode_bytes, good, normalize=request.normalize)
    )
    rows = iter(encoded)
    slots: list[np.ndarray | ClipError] = [p if isinstance(p, ClipError) else next(rows) for p in payloads]
    inference_ms = _ms(started)
    head = _model_fields(state, request.encoding)
    timings = {"download_ms": download_ms, "inference_ms": inference_ms}
    if not request.batch:
        result = slots[0]
        if isinstance(result, ClipError):
            raise result
        return {
            "embedding": encode_embedding(result, request.encoding),
            **head,
            "request_id": request.items[0].request_id,
            "timings": timings,
        }
    # Per image: its own download time and an even share of the batched model time.
    share = round(inference_ms / max(len(good), 1), 2)
    results: list[dict[str, Any]] = []
    for item, result, (_, item_download_ms) in zip(request.items, slots, fetched, strict=True):
        if isinstance(result, ClipError):
            results.append({"request_id": item.request_id, "error": result.to_dict()})
        else:
            results.append(
                {
                    "request_id": item.request_id,
                    "embedding": encode_embedding(result, request.encoding),
                    "timings": {"download_ms": item_download_ms, "inference_ms": share},
                }
            )
    return {**head, "results": results, "timings": timings}


def _check_model(state: WorkerState, model: str | None) -> None:
    if model is not None and model != state.encoder.model_name:
        raise ModelMismatchError(
            f"Request asks for model {model!r}; this worker serves {state.encoder.model_name!r}"
        )


def _model_fields(state: WorkerState, encoding: str) -> dict[str, Any]:
    encoder = state.encoder
    return {
        "dim": encoder.dim,
        "model": encoder.model_name,
        "pretrained": encoder.pretrained,
        "model_version": encoder.model_version,
        "encoding": encoding,
    }


async def embed_texts(state: WorkerState, request: TextRequest, started: float) -> dict[str, Any]:
    """A text job: the text tower on every text in one forward pass (a search host's queries)."""
    if state.verifier is not None:
        state.verifier.verify(request.message, request.ts, request.sig, version=2, nonce=request.nonce)
    _check_model(state, request.model)
    inference_started = time.perf_counter()
    vectors = await asyncio.get_running_loop().run_in_executor(
        state.executor,
        functools.partial(state.encoder.encode_text, request.texts, normalize=request.normalize),
    )
    return {
        **_model_fields(state, request.encoding),
        "embeddings": [encode_embedding(v, request.encoding) for v in vectors],
        "timings": {"inference_ms": _ms(inference_started), "total_ms": _ms(started)},
    }


async def handle_input(job_input: Any, state: WorkerState, fetch: Fetcher | None = None) -> dict[str, Any]:
    """Parse, authenticate, fetch, embed. Raises :class:`ClipError` for a failed job."""
    started = time.perf_counter()
    if is_text_request(job_input):
        return await embed_texts(state, parse_text_request(job_input), started)
    request = parse_request(job_input)
    # Authenticate before anything else, so an unsigned caller learns nothing about the worker.
    if state.verifier is not None:
        state.verifier.verify(
            request.message, request.ts, request.sig, version=request.version, nonce=request.nonce
        )
    _check_model(state, request.model)
    fetch = fetch or http_fetcher(state.config)
    fetch_started = time.perf_counter()
    fetched = await fetch([item.image_url for item in request.items])
    output = await embed_downloaded(state, request, fetched, _ms(fetch_started))
    output["timings"]["total_ms"] = _ms(started)
    return output


async def handler(job: Mapping[str, Any]) -> dict[str, Any]:
    """RunPod entry: never raises (a raised exception would hand the caller our traceback)."""
    request_id = None
    try:
        job_input = job.get("input")
        if isinstance(job_input, Mapping):
            request_id = job_input.get("request_id")
        output = await handle_input(job_input, get_state())
    except ClipError as err:
        logger.warning("Job failed (request_id=%s): %s: %s", request_id, err.code, err.message)
        return encode_job_error(err)
    except Exception:
        # Full detail stays in our log; the caller gets a stable code and no internals.
        logger.exception("Job failed unexpectedly (request_id=%s)", request_id)
        return encode_job_error(InternalError("Internal worker error; see the worker logs"))
    t = output["timings"]
    if "embeddings" in output:
        logger.info(
            "CLIP text embedded (texts=%d, dim=%d, inference=%.1fms, total=%.1fms)",
            len(output["embeddings"]),
            output["dim"],
            t["inference_ms"],
            t["total_ms"],
        )
    elif "results" in output:
        failed = sum("error" in r for r in output["results"])
        logger.info(
            "CLIP batch embedded (images=%d, failed=%d, dim=%d, download=%.1fms, inference=%.1fms, "
            "total=%.1fms)",
            len(output["results"]),
            failed,
            output["dim"],
            t["download_ms"],
            t["inference_ms"],
            t["total_ms"],
        )
    else:
        logger.info(
            "CLIP embedding generated (request_id=%s, dim=%d, download=%.1fms, inference=%.1fms, "
            "total=%.1fms)",
            request_id,
            output["dim"],
            t["download_ms"],
            t["inference_ms"],
            t["total_ms"],
        )
    return output


def concurrency_modifier(current: int) -> int:
    """Jobs one worker takes at once: downloads of one overlap the model run of another."""
    return get_state().config.job_concurrency


def main() -> None:
    # Configure logging before `import runpod`, whose basicConfig(level=INFO) then changes nothing.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        get_state()
    except ClipError as err:
        logger.error("CLIP worker cannot start: %s", err.message)
        sys.exit(2)
    import runpod  # imported late: ~1.5 s, and only the RunPod entry point needs it

    runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency_modifier})


if __name__ == "__main__":
    main()
