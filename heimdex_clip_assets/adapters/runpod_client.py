"""The pipeline's side of the RunPod worker: signed requests, polling, retries, typed errors.

The seed's "Heimdex Worker Adapter", grown to batches. One call is one RunPod job:

* ``POST {url}/runsync`` with ``Authorization: Bearer <RUNPOD_API_KEY>`` and ``{"input": <signed request>}``.
  RunPod may answer ``IN_QUEUE``/``IN_PROGRESS`` (a cold start outlives its ~90 s wait) with only a job id;
  we then poll ``{url}/status/{id}`` until a final state or the ``RUNPOD_TIMEOUT_S`` deadline. A job still
  pending at the deadline is cancelled (``POST {url}/cancel/{id}``, best effort) before any retry.
* Retryable failures (network, HTTP 429/5xx, timeouts, FAILED jobs whose error is retryable) are retried
  with exponential backoff and full jitter; everything else is raised at once. Auth failures above all:
  a bad ``RUNPOD_API_KEY`` or ``EMBEDDING_HMAC_SECRET`` will not get better by asking again.
* Every attempt is signed afresh with a strictly newer ``ts``: the worker refuses a signature it has seen
  (replay protection), and an attempt that failed on our side may still have reached it.

Neither the API key nor the HMAC secret ever appears in a log line or an error message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import httpx
import numpy as np

from heimdex_clip_assets.config import Settings
from heimdex_clip_contract.codec import decode_embedding
from heimdex_clip_contract.errors import (
    AuthError,
    ClipError,
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

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
PENDING_STATES = frozenset({"IN_QUEUE", "IN_PROGRESS"})
# The cancel is a courtesy on the way out of a timed-out attempt: it must not hold up the retry.
CANCEL_TIMEOUT_S = 5.0


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; embeddings compare by identity
class RemoteEmbedding:
    """One image's embedding as the worker returned it, with the worker's model fields and timings."""

    vector: np.ndarray  # float32, shape (dim,)
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


class RunPodClient:
    """A synchronous client for one RunPod endpoint (or a local ``--rp_serve_api`` worker).

    ``url`` is the endpoint root: ``https://api.runpod.ai/v2/<endpoint id>`` or ``http://127.0.0.1:N``.
    ``model_name``/``dim``/``model_version``, when given, are what the worker must be running; anything
    else is a :class:`ModelMismatchError`, so vectors from two models never share a column.
    ``sleep`` and ``clock`` (monotonic seconds) are injectable so tests run without waiting.
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
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
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
        self._sleep = sleep
        self._clock = clock
        self._backoff = (backoff_base_s, backoff_max_s)
        self._poll = (poll_interval_s, poll_max_interval_s)
        # RunPod's cloud polls with GET; the SDK's local server only knows POST and says 405 to GET.
        self._status_method = "GET"
        self._ts_lock = threading.Lock()
        self._last_ts = 0
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, transport=transport, follow_redirects=True)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, dim: int | None = None, transport: httpx.BaseTransport | None = None
    ) -> RunPodClient:
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
            transport=transport,
        )

    # ------------------------------------------------------------------------------------ public API
    def embed_batch(self, items: Sequence[ImageItem]) -> list[RemoteEmbedding | ClipError]:
        """Embed several images in one job; a per-image failure comes back in that image's slot.

        Raises a :class:`ClipError` when the whole job fails (after retries for retryable failures).
        """
        if not items:
            return []
        output = self._run_job(
            lambda ts: build_batch_request(
                items, self._secret, model=self.model_name, encoding="base64", ts=ts
            )
        )
        results = output.get("results")
        if not isinstance(results, list) or len(results) != len(items):
            got = len(results) if isinstance(results, list) else "no"
            raise RemoteError(
                f"RunPod worker returned {got} results for {len(items)} images; is it an old "
                "single-image worker? Deploy the current runpod_worker image",
                retryable=False,
            )
        self._check_model(output)
        out: list[RemoteEmbedding | ClipError] = []
        for item, entry in zip(items, results, strict=True):
            if isinstance(entry, Mapping) and isinstance(entry.get("error"), Mapping):
                out.append(error_from_dict(entry["error"]))
                continue
            try:
                out.append(self._embedding(output, entry, item.request_id))
            except ModelMismatchError:
                raise  # the worker's model, not this image: every other slot is wrong too
            except ClipError as err:
                out.append(err)
        return out

    def embed_one(self, image_url: str, request_id: str | None = None) -> RemoteEmbedding:
        """The seed's single-image request (JSON floats), kept for the smoke test and old workers: signed
        as the guide signs it (version 1), which the seed's own worker also accepts."""
        output = self._run_job(
            lambda ts: build_single_request(
                image_url, self._secret, request_id=request_id, model=self.model_name, ts=ts, version=1
            )
        )
        self._check_model(output)
        return self._embedding(output, output, request_id)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """The text tower on the worker: ``(len(texts), dim)`` float32, one job for all of them.

        Raises a :class:`ClipError` when the job fails (after retries for retryable failures) or
        returns anything but one finite vector of the expected width per text.
        """
        output = self._run_job(
            lambda ts: build_text_request(
                texts, self._secret, model=self.model_name, encoding="base64", ts=ts
            )
        )
        self._check_model(output)
        embeddings = output.get("embeddings")
        if not isinstance(embeddings, list) or len(embeddings) != len(texts):
            got = len(embeddings) if isinstance(embeddings, list) else "no"
            raise RemoteError(
                f"RunPod worker returned {got} embeddings for {len(texts)} texts; does it predate text "
                "jobs? Deploy the current runpod_worker image",
                retryable=False,
            )
        return np.stack([self._embedding(output, {"embedding": e}, None).vector for e in embeddings])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- one job
    def _run_job(self, build_input: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        """Run one job to its output, retrying retryable failures; each attempt is signed afresh."""
        for attempt in range(self.max_retries + 1):
            try:
                return self._attempt(build_input(self._next_ts()))
            except ClipError as err:
                if not err.retryable or attempt >= self.max_retries:
                    raise
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
                self._sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _next_ts(self) -> int:
        # Strictly increasing, so a retry within the same second still gets a signature the worker has
        # not seen; a ts a second or two ahead is well inside the worker's auth window.
        with self._ts_lock:
            self._last_ts = max(int(time.time()), self._last_ts + 1)
            return self._last_ts

    def _attempt(self, job_input: dict[str, Any]) -> dict[str, Any]:
        deadline = self._clock() + self.timeout_s
        body = self._request("POST", f"{self.url}/runsync", deadline, json={"input": job_input})
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
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise self._timeout()
                self._sleep(min(delay, remaining))
                delay = min(cap, delay * 2)
                body = self._poll_status(job_id, deadline)
        except RequestTimeoutError:
            # The retry submits a new job; without a cancel this one may still take a GPU (and bill it)
            # for a result nobody reads.
            if job_id is not None:
                self._cancel(job_id)
            raise
        return self._job_output(body)

    def _cancel(self, job_id: str) -> None:
        """Best-effort ``POST {url}/cancel/{id}``; never raises (the local SDK server has no such route)."""
        try:
            response = self._http.post(f"{self.url}/cancel/{job_id}", timeout=CANCEL_TIMEOUT_S)
        except Exception as exc:  # whatever goes wrong here, the timeout is the error to report
            log.warning("Could not cancel timed-out RunPod job %s (%s)", job_id[:80], type(exc).__name__)
            return
        log.warning("Asked RunPod to cancel timed-out job %s (HTTP %d)", job_id[:80], response.status_code)

    def _poll_status(self, job_id: str, deadline: float) -> dict[str, Any]:
        url = f"{self.url}/status/{job_id}"
        try:
            return self._request(self._status_method, url, deadline)
        except _MethodNotAllowed:
            self._status_method = "POST"
            return self._request("POST", url, deadline)

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
    def _request(self, method: str, url: str, deadline: float, **kwargs: Any) -> dict[str, Any]:
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise self._timeout()
        try:
            response = self._http.request(method, url, timeout=remaining, **kwargs)
        except httpx.TimeoutException:
            raise self._timeout() from None
        except httpx.TransportError as exc:
            raise NetworkError(
                f"Connection error: Failed to connect to {httpx.URL(url).host} ({type(exc).__name__})"
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

    def _timeout(self) -> RequestTimeoutError:
        return RequestTimeoutError(f"Request timeout after {self.timeout_s}s")

    def _redact(self, text: str) -> str:
        for secret in (self._api_key, self._secret):
            if secret:
                text = text.replace(secret, "***")
        return text

    # ---------------------------------------------------------------------------------- parsing
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

    def _embedding(self, output: Mapping[str, Any], entry: Any, request_id: str | None) -> RemoteEmbedding:
        if not isinstance(entry, Mapping):
            raise RemoteError("RunPod worker returned a result that is not an object", retryable=False)
        try:
            values = decode_embedding(entry.get("embedding"), self.dim)
        except ModelMismatchError:
            raise
        except ClipError as err:
            raise RemoteError(
                f"RunPod worker returned a bad embedding: {err.message}", retryable=False
            ) from None
        timings = entry.get("timings")
        if not isinstance(timings, Mapping):
            timings = {}
        return RemoteEmbedding(
            vector=np.asarray(values, dtype=np.float32),
            model_name=str(output.get("model") or self.model_name or ""),
            pretrained=output.get("pretrained"),
            model_version=output.get("model_version"),
            request_id=entry.get("request_id", request_id),
            download_ms=_ms(timings, "download_ms"),
            inference_ms=_ms(timings, "inference_ms"),
            total_ms=_ms(timings, "total_ms"),
        )


class _MethodNotAllowed(RemoteError):
    """HTTP 405: on the status route, the local SDK server asking for POST; anywhere else, a wrong URL."""

    retryable = False


def _ms(timings: Mapping[str, Any], key: str) -> float:
    value = timings.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
