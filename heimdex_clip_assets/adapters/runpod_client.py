"""The pipeline's side of the RunPod worker: signed jobs, polling, the one retry layer, checked results.

The guide's "Heimdex Worker Adapter", grown to batches. One :meth:`RunPodClient.embed_batch` call is one
batch of images, sent as one RunPod job (plus retries):

* ``POST {url}/runsync`` with ``Authorization: Bearer <RUNPOD_API_KEY>`` and ``{"input": <signed request>}``.
  RunPod may answer ``IN_QUEUE``/``IN_PROGRESS`` (a cold start outlives its ~90 s wait) with only a job id;
  we then poll ``{url}/status/{id}`` until a final state.
* ``RUNPOD_TIMEOUT_S`` is a deadline for the whole call: connecting, waiting for the answer, polling,
  backoff and retries all fall within it. A job still pending at the deadline is cancelled
  (``POST {url}/cancel/{id}``, best effort, in the background).
* This is the only layer that retries. Retryable failures of the whole job (network, HTTP 429/5xx, FAILED
  jobs whose error is retryable) are retried with exponential backoff and full jitter; so are the images
  whose own slot failed retryably, and only those. Before every retry the caller's ``resign`` gives the
  images fresh signed URLs, so with a ``resign`` every ``image_download_failed`` slot is retried: the
  worker marks a refused URL (HTTP 4xx: an expired signature) final, as the same URL would fail again,
  but a fresh one heals it. Everything else is final at once; auth failures above all.
* Every result is checked before it is believed: matched to its image by ``request_id`` (never by
  position), JSON numbers or base64 float32 only, the model's width, finite, and of unit norm. A bad slot
  fails that image alone.
* Every attempt has a signature of its own (a fresh nonce; the guide's version 1, a strictly newer
  ``ts``): the worker refuses a signature it has seen (replay protection), and an attempt that failed
  on our side may still have reached it. A job's first attempt may be signed ahead of sending
  (:meth:`RunPodClient.sign_batch`, used within ``SIGNED_INPUT_MAX_AGE_S``), the retries never are.

The client is synchronous for its callers; inside, one event loop thread runs every call, so many calls
from many threads share one connection pool and each is cancelled exactly at its deadline (a sync HTTP
client can only time out per socket read, which a server dripping bytes never trips).

Neither the API key nor the HMAC secret ever appears in a log line or an error message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import httpx
import numpy as np

from heimdex_clip_assets.config import Settings
from heimdex_clip_contract.codec import NORM_TOLERANCE
from heimdex_clip_contract.errors import (
    AuthError,
    ClipError,
    ImageDownloadError,
    ModelMismatchError,
    NetworkError,
    RemoteError,
    RequestTimeoutError,
    error_from_dict,
    parse_remote_error,
)
from heimdex_clip_contract.schema import (
    ImageItem,
    build_batch_request,
    build_single_request,
    build_text_request,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
PENDING_STATES = frozenset({"IN_QUEUE", "IN_PROGRESS"})
# The cancel is a courtesy after the deadline: it runs in the background and never delays the caller.
CANCEL_TIMEOUT_S = 5.0
# A job input signed ahead (sign_batch) is sent as it is within this many seconds, a small part of the
# worker's auth window (AUTH_TIME_WINDOW_SECONDS, 120 s by default) that RunPod's queue also uses up.
SIGNED_INPUT_MAX_AGE_S = 10.0
# Gives fresh signed URLs to images about to be sent again (same order, same request ids).
Resign = Callable[[Sequence[ImageItem]], Sequence[ImageItem]]


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; embeddings compare by identity
class RemoteEmbedding:
    """One image's embedding as the worker returned it, checked, with the worker's model fields."""

    vector: np.ndarray  # float32, shape (dim,), norm within NORM_TOLERANCE of 1
    model_name: str
    pretrained: str | None
    model_version: str | None
    request_id: str | None
    download_ms: float
    inference_ms: float
    total_ms: float

    @property
    def dim(self) -> int:
        return int(self.vector.shape[0])


@dataclass(frozen=True)
class SignedBatch:
    """A batch job's input, signed ahead of sending (:meth:`RunPodClient.sign_batch`)."""

    items: tuple[ImageItem, ...]
    job_input: dict[str, Any]
    signed_at: float  # time.monotonic()

    def age_s(self) -> float:
        return time.monotonic() - self.signed_at


class RunPodClient:
    """A client for one RunPod endpoint (or a local ``--rp_serve_api`` worker), safe to share by threads.

    ``url`` is the endpoint root: ``https://api.runpod.ai/v2/<endpoint id>`` or ``http://127.0.0.1:N``.
    ``model_name``/``dim``/``model_version``, when given, are what the worker must be running; anything
    else is a :class:`ModelMismatchError`, so vectors from two models never share a column.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None,
        hmac_secret: str,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        model_name: str | None = None,
        dim: int | None = None,
        model_version: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 10.0,
        poll_interval_s: float = 0.25,
        poll_max_interval_s: float = 2.0,
    ) -> None:
        if not hmac_secret:
            raise AuthError(
                "EMBEDDING_HMAC_SECRET is empty; set the same secret on the caller and the worker"
            )
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.model_name = model_name
        self.dim = dim
        self.model_version = model_version
        self._secret = hmac_secret
        self._api_key = api_key
        self._backoff = (backoff_base_s, backoff_max_s)
        self._poll = (poll_interval_s, poll_max_interval_s)
        # RunPod's cloud polls with GET; the SDK's local server only knows POST and says 405 to GET.
        self._status_method = "GET"
        self._ts_lock = threading.Lock()
        self._last_ts = 0
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="runpod-client", daemon=True)
        self._thread.start()
        # Made now, in the background (its TLS context alone takes tens of ms), not in the first job.
        self._loop.call_soon_threadsafe(self._client)

    @classmethod
    def from_settings(cls, settings: Settings, *, dim: int | None = None) -> RunPodClient:
        settings.require_runpod()
        assert settings.hmac_secret is not None  # require_runpod checked it; this narrows the type
        return cls(
            settings.runpod_url,
            api_key=settings.runpod_api_key,
            hmac_secret=settings.hmac_secret,
            timeout_s=settings.runpod_timeout_s,
            max_retries=settings.runpod_max_retries,
            model_name=settings.clip_model_name,
            dim=settings.clip_dim if dim is None else dim,
            model_version=settings.clip_model_version,
        )

    # ------------------------------------------------------------------------------------ public API
    def sign_batch(self, items: Sequence[ImageItem]) -> SignedBatch:
        """The batch job's input for ``items``, signed now: a caller sending jobs in a stream signs the
        next while the ones before it are in flight, and :meth:`embed_batch` sends it as it is if it is
        still fresh (else it signs afresh)."""
        return SignedBatch(tuple(items), self._batch_input(items, int(time.time())), time.monotonic())

    def embed_batch(
        self, items: Sequence[ImageItem], *, resign: Resign | None = None, signed: SignedBatch | None = None
    ) -> list[RemoteEmbedding | ClipError]:
        """Embed several images as one job; one result per item, in order, an error in a failed slot.

        Items need distinct ``request_id`` values (results are matched by them). ``signed``: these items'
        input from :meth:`sign_batch`, for the first attempt. Raises a :class:`ClipError` when the whole
        job fails for good, or when nothing succeeded by the deadline.
        """
        if not items:
            return []
        ids = [item.request_id for item in items]
        if None in ids or len(set(ids)) != len(ids):
            raise ValueError("embed_batch needs a distinct request_id on every item")
        first = None
        if signed is not None and signed.items == tuple(items) and signed.age_s() < SIGNED_INPUT_MAX_AGE_S:
            first = signed.job_input
        return self._run(self._embed_batch(list(items), resign, first))

    def embed_one(self, image_url: str, request_id: str | None = None) -> RemoteEmbedding:
        """The guide's single-image request (JSON floats), kept for the smoke test and old workers: signed
        as the guide signs it (version 1), which the guide's own worker also accepts."""

        async def one() -> RemoteEmbedding:
            output = await self._with_retries(
                lambda: self._job(
                    lambda ts: build_single_request(
                        image_url,
                        self._secret,
                        request_id=request_id,
                        model=self.model_name,
                        ts=ts,
                        version=1,
                    ),
                    version_1=True,
                )
            )
            self._check_model(output)
            [result] = self._embeddings(output, [output])
            if isinstance(result, ClipError):
                raise result
            return result

        return self._run(self._within_deadline(one()))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """The text tower on the worker: ``(len(texts), dim)`` float32, one job for all of them.

        Raises a :class:`ClipError` when the job fails for good, by the deadline, or returns anything
        but one usable vector (finite, the expected width, unit norm) per text.
        """

        async def run() -> np.ndarray:
            output = await self._with_retries(
                lambda: self._job(
                    lambda ts: build_text_request(
                        texts, self._secret, model=self.model_name, encoding="base64", ts=ts
                    )
                )
            )
            self._check_model(output)
            embeddings = output.get("embeddings")
            if not isinstance(embeddings, list) or len(embeddings) != len(texts):
                got = len(embeddings) if isinstance(embeddings, list) else "no"
                raise RemoteError(
                    f"RunPod worker returned {got} embeddings for {len(texts)} texts; does it predate "
                    "text jobs? Deploy the current runpod_worker image",
                    retryable=False,
                )
            results = self._embeddings(
                output,
                [{"embedding": value, "request_id": f"text {i}"} for i, value in enumerate(embeddings)],
            )
            for result in results:
                if isinstance(result, ClipError):
                    raise result
            return np.stack([result.vector for result in results])

        return self._run(self._within_deadline(run()))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._close_http())  # on the loop, after the client made there
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _close_http(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- the deadline
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    async def _within_deadline(self, work: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await work
        except TimeoutError:
            raise self._timeout() from None

    def _timeout(self) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"Request timeout after {self.timeout_s}s (RUNPOD_TIMEOUT_S covers connecting, waiting, "
            "polling and retries); raise RUNPOD_TIMEOUT_S or add workers to the endpoint"
        )

    # ------------------------------------------------------------------------------------ retries
    async def _embed_batch(
        self, items: list[ImageItem], resign: Resign | None, first_input: dict[str, Any] | None = None
    ) -> list[RemoteEmbedding | ClipError]:
        results: list[RemoteEmbedding | ClipError | None] = [None] * len(items)
        pending = list(range(len(items)))
        try:
            async with asyncio.timeout(self.timeout_s):
                attempt = 0
                while pending:
                    batch = [items[i] for i in pending]
                    if attempt and resign is not None:
                        # Fresh URLs for exactly the images going out again; the caller's storage call
                        # must not stall the other jobs sharing this loop.
                        batch = list(await asyncio.to_thread(resign, batch))
                    try:
                        out = await self._batch_attempt(batch, first_input if attempt == 0 else None)
                    except ClipError as err:
                        if not err.retryable or attempt >= self.max_retries:
                            raise
                        await self._backoff_after(attempt, err)
                        attempt += 1
                        continue
                    retry = []
                    for i, result in zip(pending, out, strict=True):
                        results[i] = result
                        if isinstance(result, ClipError) and (
                            result.retryable
                            or (resign is not None and result.code == ImageDownloadError.code)
                        ):
                            retry.append(i)
                    if not retry or attempt >= self.max_retries:
                        break
                    first = results[retry[0]]
                    assert isinstance(first, ClipError)
                    await self._backoff_after(attempt, first)
                    attempt += 1
                    pending = retry
        except TimeoutError:
            timeout = self._timeout()
            if all(r is None for r in results):
                raise timeout from None
            # What came back stays; what was still out (or waiting for its retry) timed out.
            still_out = set(pending)
            return [
                timeout if r is None or (i in still_out and isinstance(r, ClipError)) else r
                for i, r in enumerate(results)
            ]
        return [r if r is not None else self._timeout() for r in results]

    async def _with_retries(self, attempt_fn: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.max_retries + 1):
            try:
                return await attempt_fn()
            except ClipError as err:
                if not err.retryable or attempt >= self.max_retries:
                    raise
                await self._backoff_after(attempt, err)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    async def _backoff_after(self, attempt: int, err: ClipError) -> None:
        base, cap = self._backoff
        delay = random.uniform(0, min(cap, base * 2**attempt))  # full jitter: no herd on restarts
        log.warning(
            "RunPod attempt %d/%d failed (%s: %s); retrying in %.2fs",
            attempt + 1,
            self.max_retries + 1,
            err.code,
            err.message,
            delay,
        )
        await asyncio.sleep(delay)

    def _next_ts(self) -> int:
        # For the guide's version-1 signature only: it signs the URL and ts alone, so a retry within
        # the same second needs a newer ts to get a signature the worker has not seen. Version 2 carries
        # a fresh nonce instead and uses the clock as it is: a ts bumped per job would run ahead of the
        # clock at more than one job a second and leave the worker's auth window.
        with self._ts_lock:
            self._last_ts = max(int(time.time()), self._last_ts + 1)
            return self._last_ts

    # ------------------------------------------------------------------------------------- one job
    async def _batch_attempt(
        self, batch: Sequence[ImageItem], signed_input: dict[str, Any] | None = None
    ) -> list[RemoteEmbedding | ClipError]:
        output = await self._job(lambda ts: signed_input or self._batch_input(batch, ts))
        return self._batch_results(output, batch)

    def _batch_input(self, batch: Sequence[ImageItem], ts: int) -> dict[str, Any]:
        return build_batch_request(batch, self._secret, model=self.model_name, encoding="base64", ts=ts)

    async def _job(
        self, build_input: Callable[[int], dict[str, Any]], *, version_1: bool = False
    ) -> dict[str, Any]:
        """Submit one job and wait for its output (polling if RunPod answers before it finished)."""
        ts = self._next_ts() if version_1 else int(time.time())
        body = await self._request("POST", f"{self.url}/runsync", json={"input": build_input(ts)})
        delay, cap = self._poll
        job_id: str | None = None
        try:
            while body.get("status") not in FINAL_STATES:
                job_id = body.get("id")
                status = body.get("status")
                if not isinstance(job_id, str) or (status is not None and status not in PENDING_STATES):
                    raise RemoteError(
                        f"RunPod answered an unknown job status {str(status)[:50]!r}", retryable=False
                    )
                await asyncio.sleep(delay)
                delay = min(cap, delay * 2)
                body = await self._poll_status(job_id)
        except asyncio.CancelledError:
            # The deadline: without a cancel the job may still take a GPU (and bill it) for a result
            # nobody reads. Fire and forget; the loop outlives this call.
            if job_id is not None:
                self._loop.create_task(self._cancel(job_id))
            raise
        return self._job_output(body)

    async def _cancel(self, job_id: str) -> None:
        """Best-effort ``POST {url}/cancel/{id}``; never raises (the local SDK server has no such route)."""
        try:
            response = await self._client().post(f"{self.url}/cancel/{job_id}", timeout=CANCEL_TIMEOUT_S)
        except Exception as exc:  # whatever goes wrong here, the timeout is the error reported
            log.warning("Could not cancel timed-out RunPod job %s (%s)", job_id[:80], type(exc).__name__)
            return
        log.warning("Asked RunPod to cancel timed-out job %s (HTTP %d)", job_id[:80], response.status_code)

    async def _poll_status(self, job_id: str) -> dict[str, Any]:
        url = f"{self.url}/status/{job_id}"
        try:
            return await self._request(self._status_method, url)
        except _MethodNotAllowed:
            self._status_method = "POST"
            return await self._request("POST", url)

    def _job_output(self, body: Mapping[str, Any]) -> dict[str, Any]:
        status = body["status"]
        job = str(body.get("id", "?"))[:80]
        if status == "FAILED":
            raise parse_remote_error(body.get("error"))
        if status == "CANCELLED":
            raise RemoteError(f"RunPod job {job} was cancelled", retryable=False)
        if status == "TIMED_OUT":
            raise RequestTimeoutError(
                f"RunPod job {job} hit the endpoint's execution timeout; raise it in the RunPod console"
            )
        output = body.get("output")
        if isinstance(output, Mapping) and "error" in output:
            raise parse_remote_error(output["error"])
        if not isinstance(output, Mapping):
            raise RemoteError("RunPod job completed without an output object", retryable=False)
        return dict(output)

    # -------------------------------------------------------------------------------------- HTTP
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:  # made on the loop's thread, where it is used
            # No httpx timeouts: the call's deadline cancels whatever is in progress.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
            self._http = httpx.AsyncClient(
                headers=self._headers,
                transport=self._transport,
                follow_redirects=True,
                timeout=None,
                limits=limits,
            )
        return self._http

    async def _request(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        host = httpx.URL(url).host
        try:
            response = await self._client().request(method, url, **kwargs)
        except httpx.TimeoutException:  # only a proxy's or transport's own: ours is the deadline
            raise self._timeout() from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NetworkError(
                f"Connection error: Failed to connect to {host} ({type(exc).__name__}); check "
                "RUNPOD_CLIP_ENDPOINT_URL / RUNPOD_ENDPOINT_BASE_URL and the network"
            ) from None
        except httpx.TransportError as exc:
            # Connected, then the exchange broke: not a failure to connect.
            raise NetworkError(
                f"Connection error: {host} closed the connection before answering ({type(exc).__name__}); "
                "the job is sent again"
            ) from None
        code = response.status_code
        if code in (401, 403):
            raise AuthError(
                f"RunPod rejected the API key (HTTP {code}); check RUNPOD_API_KEY and that it may call "
                "this endpoint (RUNPOD_CLIP_ENDPOINT_ID)"
            )
        if code == 405:
            raise _MethodNotAllowed(
                f"HTTP 405 from RunPod for {method} {httpx.URL(url).path}; check RUNPOD_CLIP_ENDPOINT_URL"
            )
        if code == 429 or code >= 500:
            raise RemoteError(f"HTTP {code} from RunPod: {self._redact(response.text[:200])}")
        if code >= 400:
            raise RemoteError(
                f"HTTP {code} from RunPod: {self._redact(response.text[:200])}; check "
                "RUNPOD_CLIP_ENDPOINT_ID / RUNPOD_CLIP_ENDPOINT_URL",
                retryable=False,
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise RemoteError(
                f"RunPod returned malformed JSON (HTTP {code}): {self._redact(response.text[:100])!r}",
                retryable=False,
            )
        return body

    def _redact(self, text: str) -> str:
        for secret in (self._api_key, self._secret):
            if secret:
                text = text.replace(secret, "***")
        return text

    # ---------------------------------------------------------------------------------- checking
    def _check_model(self, output: Mapping[str, Any]) -> None:
        dim = output.get("dim")
        if self.dim is not None and isinstance(dim, int) and dim != self.dim:
            raise ModelMismatchError(f"Unexpected embedding dimension: {dim} (expected {self.dim})")
        for field, expected, env in (
            ("model_version", self.model_version, "CLIP_MODEL_VERSION"),
            ("model", self.model_name, "CLIP_MODEL_NAME"),
        ):
            got = output.get(field)
            if expected is not None and got is not None and got != expected:
                raise ModelMismatchError(
                    f"RunPod worker runs {field} {str(got)[:100]!r}, expected {expected!r}; set the same "
                    f"{env} (and CLIP_MODEL_NAME/CLIP_PRETRAINED) on the pipeline and the worker"
                )

    def _batch_results(
        self, output: Mapping[str, Any], batch: Sequence[ImageItem]
    ) -> list[RemoteEmbedding | ClipError]:
        entries = output.get("results")
        if not isinstance(entries, list):
            raise RemoteError(
                "RunPod worker answered a batch without results; is it an old single-image worker? "
                "Deploy the current runpod_worker image",
                retryable=False,
            )
        self._check_model(output)
        by_id: dict[Any, Any] = {}
        repeated = set()
        for entry in entries:
            rid = entry.get("request_id") if isinstance(entry, Mapping) else None
            if rid in by_id:
                repeated.add(rid)
            by_id[rid] = entry
        sent = {item.request_id for item in batch}
        strays = [rid for rid in by_id if rid not in sent]
        if strays:
            log.warning(
                "RunPod worker returned %d result(s) for request ids never sent; ignored", len(strays)
            )
        out: list[RemoteEmbedding | ClipError | None] = []
        embedded: list[Mapping[str, Any]] = []  # the entries holding a vector, checked together below
        for item in batch:
            rid = item.request_id
            if rid in repeated:
                out.append(
                    RemoteError(f"RunPod worker returned two results for image {rid}", retryable=False)
                )
            elif rid not in by_id:
                out.append(RemoteError(f"RunPod worker returned no result for image {rid}"))
            elif isinstance(by_id[rid].get("error"), Mapping):
                out.append(error_from_dict(by_id[rid]["error"]))
            else:
                out.append(None)
                embedded.append(by_id[rid])
        vectors = iter(self._embeddings(output, embedded))
        return [next(vectors) if result is None else result for result in out]

    def _embeddings(
        self, output: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]
    ) -> list[RemoteEmbedding | ClipError]:
        """Each entry's vector if it is one we may store; otherwise why not, for that image alone."""
        model_name = str(output.get("model") or self.model_name or "")
        out: list[RemoteEmbedding | ClipError] = []
        checked = _check_vectors([entry.get("embedding") for entry in entries], self.dim)
        for entry, (problem, vector) in zip(entries, checked, strict=True):
            rid = entry.get("request_id")
            if problem:
                out.append(
                    RemoteError(
                        f"RunPod worker returned an unusable embedding for image {rid}: {problem}",
                        retryable=False,
                    )
                )
                continue
            timings = entry.get("timings")
            if not isinstance(timings, Mapping):
                timings = {}
            out.append(
                RemoteEmbedding(
                    vector=vector,
                    model_name=model_name,
                    pretrained=output.get("pretrained"),
                    model_version=output.get("model_version"),
                    request_id=rid,
                    download_ms=_ms(timings, "download_ms"),
                    inference_ms=_ms(timings, "inference_ms"),
                    total_ms=_ms(timings, "total_ms"),
                )
            )
        return out


def _check_vectors(values: Sequence[Any], dim: int | None) -> list[tuple[str | None, np.ndarray]]:
    """(what is wrong, or None; the float32 vector) per value. Requests always ask for normalized vectors.

    The checks on the numbers run once over all of a job's vectors of one width: numpy's per-call cost,
    not the arithmetic, is what a vector at a time spends (~6 ms of a 256-image job's slot).
    """
    decoded = [_decode_vector(value, dim) for value in values]
    by_width: dict[int, list[int]] = {}
    for i, (problem, vector) in enumerate(decoded):
        if problem is None:
            by_width.setdefault(vector.shape[0], []).append(i)
    for rows in by_width.values():
        matrix = np.stack([decoded[i][1] for i in rows]).astype(np.float32, copy=False)
        finite = np.isfinite(matrix).all(axis=1)
        norms = np.linalg.norm(matrix.astype(np.float64), axis=1)  # read only where finite
        for row, i in enumerate(rows):
            if not finite[row]:
                decoded[i] = "holds NaN or infinite values", _EMPTY
            elif abs(norms[row] - 1.0) > NORM_TOLERANCE:
                decoded[i] = f"norm {norms[row]:.4g}, expected 1 ± {NORM_TOLERANCE:g}", _EMPTY
            else:
                decoded[i] = None, matrix[row]
    return decoded


_EMPTY = np.zeros(0, dtype=np.float32)


def _decode_vector(value: Any, dim: int | None) -> tuple[str | None, np.ndarray]:
    """(what is wrong with its form, or None; its values, not yet checked as numbers)."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return "not base64", _EMPTY
        if len(raw) % 4:
            return "not a whole number of float32 values", _EMPTY
        vector = np.frombuffer(raw, dtype="<f4")
    elif isinstance(value, list):
        # bool is an int to Python; [true, ...] is not a vector.
        if not all(type(v) in (int, float) for v in value):
            return "holds values that are not numbers", _EMPTY
        if not all(math.isfinite(v) and abs(v) < 3.4e38 for v in value):
            return "holds NaN, infinite or out-of-range values", _EMPTY
        vector = np.asarray(value, dtype=np.float32)
    else:
        return "missing or of the wrong type", _EMPTY
    if dim is not None and vector.shape != (dim,):
        return f"{vector.shape[0]} values, expected {dim}", _EMPTY
    return None, vector


class _MethodNotAllowed(RemoteError):
    """HTTP 405: on the status route, the local SDK server asking for POST; anywhere else, a wrong URL."""

    retryable = False


def _ms(timings: Mapping[str, Any], key: str) -> float:
    value = timings.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
