"""Where CLIP runs, behind one interface: ``runpod`` (the GPU worker), ``local`` (in-process) or ``off``.

The local backend runs the worker's own :class:`~runpod_worker.encoder.ClipEncoder`, so both backends
produce the same vector for the same image and checkpoint; ``model_version`` says which model made a
vector, and the vector store keeps versions apart.

Search queries go to the same place (``services.query_encoder``): the worker's text jobs with
``runpod``, so a search host needs no model, and this encoder's text tower with ``local``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from heimdex_clip_assets.adapters.runpod_client import RemoteEmbedding, RunPodClient, SignedBatch
from heimdex_clip_assets.adapters.weights import check_weights
from heimdex_clip_assets.config import Settings
from heimdex_clip_contract.errors import (
    AuthError,
    ClipError,
    ConfigError,
    InvalidRequestError,
    ModelMismatchError,
    NotFoundError,
    RemoteError,
    RequestTimeoutError,
)
from heimdex_clip_contract.schema import ImageItem

if TYPE_CHECKING:  # the encoder imports torch; only the local backend and text search need it at runtime
    from heimdex_clip_assets.adapters.storage import Storage
    from runpod_worker.encoder import ClipEncoder

DOWNLOAD_THREADS = 8  # thumbnail downloads are I/O bound; the model, not the network, should be the limit
# One failed job of these means every other job fails the same way: stop instead of logging each scene.
SYSTEMIC_ERRORS = (AuthError, ModelMismatchError, ConfigError)
# A prepared job whose URLs have used more than this part of their life waiting for a slot is signed again.
RESIGN_AFTER = 0.1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SceneImage:
    """One image to embed: its thumbnail's ``storage_path`` (signed for the runpod backend right before
    its job is sent, downloaded by the local one), or its bytes in ``data``."""

    key: int | str
    storage_path: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class PreparedJob:
    """A job's images and what the backend prepared for them ahead of sending (signed URLs by path)."""

    images: Sequence[SceneImage]
    urls: dict[str, str] | None = None
    prepared_at: float = 0.0  # time.monotonic() when the URLs were signed
    prepare_s: float = 0.0
    signed: SignedBatch | None = None  # the RunPod job's input, signed with the URLs


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; results compare by identity
class EmbeddingResult:
    vector: np.ndarray  # float32, unit length
    metadata: dict[str, Any]  # stored as video_scenes.visual_clip_metadata


# --------------------------------------------------------------------------------- encoder cache
_ENCODERS: dict[tuple[str, str, str | None], ClipEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def load_encoder(
    model_name: str, pretrained: str, precision: str | None = None, *, in_child: bool = False
) -> ClipEncoder:
    """The process's one encoder for these weights: a load takes seconds and hundreds of MB.

    ``in_child``: the model loads in a child process (:mod:`.encoder_process`) and this returns at once;
    the encoder's forward passes then run there, for every later caller too.
    ``CLIP_MODEL_VERSION`` is only a label, so it is not part of the key; backends carry their own.
    """
    key = (model_name, pretrained, precision)
    with _ENCODERS_LOCK:  # held during the load, so two threads asking at once load it once
        if key not in _ENCODERS:
            # Seconds, not a minute of the hub's retries, when the weights cannot be had.
            check_weights(model_name, pretrained)
            if in_child:
                from heimdex_clip_assets.adapters.encoder_process import EncoderProcess

                _ENCODERS[key] = EncoderProcess(*key)  # type: ignore[assignment]
            else:
                from runpod_worker.encoder import ClipEncoder

                _ENCODERS[key] = ClipEncoder.load(model_name, pretrained, precision=precision)
        return _ENCODERS[key]


def _settings_key(settings: Settings) -> tuple[str, str, str | None]:
    return settings.clip_model_name, settings.clip_pretrained, settings.clip_precision


def settings_encoder(settings: Settings, *, in_child: bool = False) -> ClipEncoder:
    return load_encoder(*_settings_key(settings), in_child=in_child)


def encoder_in_child(settings: Settings) -> bool:
    """Whether the settings' model loads (or runs) in a child process: loading it holds no GIL here."""
    from heimdex_clip_assets.adapters.encoder_process import EncoderProcess

    return isinstance(_ENCODERS.get(_settings_key(settings)), EncoderProcess)


# ---------------------------------------------------------------------------------------- backends
class ClipBackend(ABC):
    name: ClassVar[str]
    device: str = "none"  # where the model runs, for the metadata's device
    enabled: ClassVar[bool] = True

    def __init__(self, *, model_name: str, pretrained: str, model_version: str, dim: int) -> None:
        self.model_name = model_name
        self.pretrained = pretrained
        self.model_version = model_version
        self.dim = dim

    def limit_threads(self, threads: int | None) -> None:
        """Cores this process's forward passes may use (None: all); only the in-process backend has any."""
        return  # remote and disabled backends run no forward pass here

    @abstractmethod
    def embed(self, images: Sequence[SceneImage]) -> list[EmbeddingResult | ClipError]:
        """Embed ``images`` as one job: one result per image, in order. Raises for a job that failed as a
        whole, and for errors no other job can escape (bad credentials, wrong model); per-image failures
        come back in their slots. Safe to call from several threads at once."""

    def prepare(self, images: Sequence[SceneImage]) -> PreparedJob:
        """What a job needs before it is sent that need not hold one of the jobs in flight (the runpod
        backend signs its URLs here); :meth:`send` then sends it. Raises as :meth:`embed` does."""
        return PreparedJob(images)

    def send(self, job: PreparedJob) -> list[EmbeddingResult | ClipError]:
        """Embed a job :meth:`prepare` made; by default all the work happens here."""
        return self.embed(job.images)

    def _job_metadata(self, batch_size: int) -> dict[str, Any]:
        """The metadata all of one job's results share (made once per job, not per image)."""
        return {
            # The keys the seed system documents for visual_clip_metadata (its app reads them)...
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "normalized": True,
            "device": self.device,
            "created_at": utc_now(),
            "error": None,
            # ...the guide's backend, and ours.
            "backend": self.name,
            "model_version": self.model_version,
            "cache_hit": False,
            "batch_size": batch_size,
        }

    @staticmethod
    def _result(vector: np.ndarray, job: dict[str, Any], **timings: float) -> EmbeddingResult:
        # The vector store ranks by cosine on unit vectors; a remote worker is outside our control, so
        # the invariant is enforced here, where every backend's vectors pass.
        vector = _unit(vector)
        metadata = {
            **job,
            "embed_dim": int(vector.shape[0]),
            **{k: round(float(v), 2) for k, v in timings.items()},
        }
        return EmbeddingResult(vector, metadata)


class RunPodBackend(ClipBackend):
    """Thumbnails as short-lived signed URLs to the RunPod worker, one job per call.

    URLs are signed right before the job goes out (:meth:`prepare`: the engine signs a job while the
    jobs ahead of it are in flight, at most ``max_in_flight`` jobs ahead, and :meth:`send` signs again
    if the job then waited for a slot more than a tenth of the URLs' life), and again by the client
    before each retry, so a URL never waits in a queue while its expiry runs down.
    """

    name = "runpod"
    device = "runpod"  # the worker's own device is not in its answer
    needs_urls = True

    def __init__(
        self,
        client: RunPodClient,
        storage: Storage,
        *,
        pretrained: str,
        expires_in: int,
        request_mode: str = "auto",
        single_in_flight: int = 8,
    ) -> None:
        if client.model_name is None or client.model_version is None or client.dim is None:
            raise ConfigError(
                "RunPodBackend needs a client that knows the expected model name, version and dim"
            )
        super().__init__(
            model_name=client.model_name,
            pretrained=pretrained,
            model_version=client.model_version,
            dim=client.dim,
        )
        self.client = client
        self.storage = storage
        self.expires_in = expires_in
        # "auto" becomes "batch" or "single" on the first job (RUNPOD_REQUEST_MODE).
        self.request_mode = request_mode
        self.single_in_flight = single_in_flight

    def embed(self, images: Sequence[SceneImage]) -> list[EmbeddingResult | ClipError]:
        return self.send(self.prepare(images))

    def prepare(self, images: Sequence[SceneImage]) -> PreparedJob:
        """Sign the job's URLs (one storage call for all of them): the engine does this while the jobs
        before it are in flight, so a job holds its slot only while the endpoint has it."""
        started = time.perf_counter()
        paths = [str(img.storage_path) for img in images]
        urls = self.storage.create_signed_urls(paths, self.expires_in, missing_ok=True)
        # The job's input is signed here too (its HMAC over 256 URLs is ~4 ms of a slot otherwise).
        items = self._items(images, urls)
        signed = self.client.sign_batch(items) if items and self.request_mode != "single" else None
        return PreparedJob(images, urls, time.monotonic(), time.perf_counter() - started, signed)

    def send(self, job: PreparedJob) -> list[EmbeddingResult | ClipError]:
        if job.urls is None or time.monotonic() - job.prepared_at > self.expires_in * RESIGN_AFTER:
            # Never prepared here, or it waited for a slot so long that its URLs have aged: sign afresh.
            job = self.prepare(job.images)
        assert job.urls is not None
        started = time.perf_counter()
        images, urls = job.images, job.urls
        paths = {str(img.key): str(img.storage_path) for img in images}
        items = self._items(images, urls)
        if not items:
            return [self._not_in_storage(img) for img in images]

        def resign(items: Sequence[ImageItem]) -> list[ImageItem]:
            again = [paths[str(i.request_id)] for i in items]
            # A thumbnail deleted meanwhile keeps its old URL: it fails again alone, not the whole job.
            fresh = self.storage.create_signed_urls(again, self.expires_in, missing_ok=True)
            return [
                ImageItem(fresh.get(path, i.image_url), i.request_id)
                for path, i in zip(again, items, strict=True)
            ]

        remote = self._embed_items(items, resign, job.signed)
        # What the pipeline waited per image: the job's round trip shared by its images (signing, queue
        # and network included, unlike the worker's own timings; not the wait for a slot).
        total_ms = (job.prepare_s + time.perf_counter() - started) * 1000 / len(items)
        shared = self._job_metadata(len(items))
        sent = iter(remote)
        slots: list[EmbeddingResult | ClipError] = []
        for img in images:
            if img.storage_path not in urls:
                slots.append(self._not_in_storage(img))
            elif isinstance(item := next(sent), ClipError):
                slots.append(item)
            else:
                slots.append(
                    self._result(
                        item.vector,
                        shared,
                        inference_time_ms=item.inference_ms,
                        download_ms=item.download_ms,
                        total_ms=total_ms,
                        worker_total_ms=item.total_ms,
                    )
                )
        return slots

    @staticmethod
    def _not_in_storage(img: SceneImage) -> NotFoundError:
        return NotFoundError(
            f"Scene {img.key}: its thumbnail {img.storage_path} is not in storage; rerun scene_keyframes "
            "for its video"
        )

    @staticmethod
    def _items(images: Sequence[SceneImage], urls: dict[str, str]) -> list[ImageItem]:
        """The job's images whose thumbnails could be signed, as the worker's request lists them."""
        return [
            ImageItem(urls[str(img.storage_path)], str(img.key)) for img in images if img.storage_path in urls
        ]

    def _embed_items(
        self,
        items: Sequence[ImageItem],
        resign: Callable[[Sequence[ImageItem]], list[ImageItem]],
        signed: SignedBatch | None = None,
    ) -> Sequence[RemoteEmbedding | ClipError]:
        if self.request_mode == "single":
            return self._embed_singly(items)
        try:
            remote = self.client.embed_batch(items, resign=resign, signed=signed)
        except (*SYSTEMIC_ERRORS, RemoteError, InvalidRequestError) as err:
            if self.request_mode != "auto" or isinstance(err, ModelMismatchError):
                raise
            # The guide's worker knows only the single-image request: one probe says whether this is it.
            try:
                first = self.client.embed_one(resign(items[:1])[0].image_url, items[0].request_id)
            except ClipError:
                raise err from None
            log.warning("RunPod worker takes single images only (the guide's worker): one job per image")
            self.request_mode = "single"
            return [first, *self._embed_singly(resign(items[1:]))]
        self.request_mode = "batch"
        return remote

    def _embed_singly(self, items: Sequence[ImageItem]) -> list[RemoteEmbedding | ClipError]:
        """The guide's request, one job per image, ``single_in_flight`` at once."""

        def one(item: ImageItem) -> RemoteEmbedding | ClipError:
            try:
                return self.client.embed_one(item.image_url, item.request_id)
            except SYSTEMIC_ERRORS:
                raise
            except ClipError as err:
                return err

        with ThreadPoolExecutor(self.single_in_flight, thread_name_prefix="runpod-single") as pool:
            return list(pool.map(one, items))


class LocalBackend(ClipBackend):
    """The worker's encoder in this process (CPU, or a local GPU), one forward pass per call."""

    name = "local"

    def __init__(
        self, encoder: ClipEncoder, storage: Storage | None, *, model_version: str | None = None
    ) -> None:
        super().__init__(
            model_name=encoder.model_name,
            pretrained=encoder.pretrained,
            model_version=model_version or encoder.model_version,
            dim=encoder.dim,
        )
        self.encoder = encoder
        self.device = str(encoder.device)
        self.storage = storage
        self._downloads = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="clip-download")

    def limit_threads(self, threads: int | None) -> None:
        self.encoder.limit_threads(threads)

    def embed(self, images: Sequence[SceneImage]) -> list[EmbeddingResult | ClipError]:
        started = time.perf_counter()
        fetched = list(self._downloads.map(self._read, images))
        blobs = [data for data, _ in fetched if isinstance(data, bytes)]
        if not blobs:
            return [data for data, _ in fetched if isinstance(data, ClipError)]
        t0 = time.perf_counter()
        encoded = iter(self.encoder.encode_bytes(blobs))
        # One forward pass serves the whole batch; each image is charged an equal share of it.
        inference_ms = (time.perf_counter() - t0) * 1000 / len(blobs)
        total_ms = (time.perf_counter() - started) * 1000 / len(blobs)
        shared = self._job_metadata(len(blobs))
        out: list[EmbeddingResult | ClipError] = []
        for data, download_ms in fetched:
            vector = data if isinstance(data, ClipError) else next(encoded)
            out.append(
                vector
                if isinstance(vector, ClipError)
                else self._result(
                    vector,
                    shared,
                    inference_time_ms=inference_ms,
                    download_ms=download_ms,
                    total_ms=total_ms,
                )
            )
        return out

    def _read(self, image: SceneImage) -> tuple[bytes | ClipError, float]:
        """The image's bytes (or why not) and how long fetching them took, in ms."""
        if image.data is not None:
            return image.data, 0.0
        if image.storage_path is None or self.storage is None:
            return InvalidRequestError(f"Scene {image.key}: no image bytes and no storage path to read"), 0.0
        started = time.perf_counter()
        try:
            data: bytes | ClipError = self.storage.download(image.storage_path)
        except ClipError as err:
            data = err
        return data, (time.perf_counter() - started) * 1000


class OffBackend(ClipBackend):
    """CLIP disabled (``CLIP_INFERENCE_BACKEND=off`` or ``CLIP_ENABLED=false``): callers check ``enabled``
    and skip; calling it anyway is a configuration mistake worth a clear error, not empty results."""

    name = "off"
    enabled = False

    def embed(self, images: Sequence[SceneImage]) -> list[EmbeddingResult | ClipError]:
        raise self._disabled()

    @staticmethod
    def _disabled() -> ConfigError:
        return ConfigError(
            "CLIP is off (CLIP_INFERENCE_BACKEND=off or CLIP_ENABLED=false); set "
            "CLIP_INFERENCE_BACKEND=local or runpod to embed images or search"
        )


def make_backend(settings: Settings, storage: Storage | None) -> ClipBackend:
    """The backend ``settings`` ask for; the local one loads (or reuses) the process's encoder now."""
    if settings.clip_backend == "off":
        return OffBackend(
            model_name=settings.clip_model_name,
            pretrained=settings.clip_pretrained,
            model_version=settings.clip_model_version,
            dim=settings.clip_dim,
        )
    if settings.clip_backend == "runpod":
        if storage is None:
            raise ConfigError("the runpod backend needs storage to sign thumbnail URLs")
        return RunPodBackend(
            RunPodClient.from_settings(settings),
            storage,
            pretrained=settings.clip_pretrained,
            expires_in=settings.signed_url_expires_s,
            request_mode=settings.runpod_request_mode,
            single_in_flight=settings.clip_batch_size,
        )
    return LocalBackend(settings_encoder(settings), storage, model_version=settings.clip_model_version)


# -------------------------------------------------------------------------------------- log lines
_LABELS = {"runpod": "RunPod", "local": "Local", "off": "Off"}


def log_result(key: int | str, backend: str, result: EmbeddingResult | ClipError) -> str:
    """The seed's log line(s) for one scene's outcome, e.g.
    ``Scene 5: RunPod CLIP embedding generated (dim=512, inference=45.2ms, total=234.5ms)``, or for a
    failure two lines: ``Scene 5: RunPod timeout: Request timeout after 60.0s`` then
    ``Scene 5: CLIP embedding failed: Timeout``."""
    label = _LABELS.get(backend, backend)
    if isinstance(result, EmbeddingResult):
        meta = result.metadata
        return (
            f"Scene {key}: {label} CLIP embedding generated (dim={meta['embed_dim']}, "
            f"inference={meta['inference_time_ms']:.1f}ms, total={meta['total_ms']:.1f}ms)"
        )
    return (
        f"Scene {key}: {describe_error(backend, result)}\nScene {key}: CLIP embedding failed: {_kind(result)}"
    )


def describe_error(backend: str, err: ClipError) -> str:
    """``RunPod timeout: ...``, ``RunPod authentication error: ...``, ``RunPod error: ...`` as in the seed;
    messages that already say what they are (connection, dimension) stand alone."""
    label = _LABELS.get(backend, backend)
    if isinstance(err, RequestTimeoutError):
        return f"{label} timeout: {err.message}"
    if isinstance(err, AuthError):
        return f"{label} authentication error: {err.message}"
    if err.code in ("network_error", "model_mismatch"):
        return err.message
    return f"{label} error: {err.message}"


def _kind(err: ClipError) -> str:
    # RequestTimeoutError -> "Timeout" (the seed's wording), ImageDownloadError -> "ImageDownload", ...
    return type(err).__name__.removeprefix("Request").removesuffix("Error") or err.code


def utc_now() -> str:
    """The metadata's ``created_at``: ISO 8601 in UTC, as the seed system writes it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = math.sqrt(float(vector @ vector))  # np.linalg.norm's own overhead is most of a 512-d norm
    return vector / norm if norm > 0 else vector
