"""The embedding engine: the one way scenes become CLIP vectors, for every path that embeds.

The asset (a run of one or many video partitions), ``heimdex-clip backfill``, the schedule's runs and
``process-video`` all hand the engine a stream of scenes; it

* answers what it can from the embedding cache (the same thumbnail content, embedded before by the same
  model version, is never sent again);
* packs the rest, across videos, into jobs of ``batch_size`` images;
* keeps ``max_in_flight`` jobs running at once (the reader waits for a free slot);
* has each job's URLs signed by the backend right before it is sent: while the jobs ahead of it are in
  flight, at most ``max_in_flight`` jobs ahead, so a job holds its slot only while the endpoint has it
  (the backend signs again if a job waited for its slot long enough for its URLs to age, and the
  RunPod client re-signs before each of its retries: the engine itself never retries);
* writes each job's vectors as it comes back, in one transaction for the whole job, on writer threads of
  their own, so a slow write never holds a slot the endpoint could use; the queue between the two is
  bounded, so memory holds a few jobs whatever the library's size.

No Dagster, no printing: callers turn the :class:`EngineReport` into logs, metadata or a table.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from heimdex_clip_assets.adapters.clip_backends import (
    SYSTEMIC_ERRORS,
    ClipBackend,
    EmbeddingResult,
    PreparedJob,
    SceneImage,
    log_result,
)
from heimdex_clip_assets.adapters.db import SceneEmbedding, SceneToEmbed, VectorStore
from heimdex_clip_assets.config import Settings
from heimdex_clip_contract.errors import ClipError, ConfigError

log = logging.getLogger(__name__)
_WAIT_S = 0.5  # the main thread waits at most this long at a time, so it sees signals (see run)

MAX_FAILURES_KEPT = 50  # examples in the report; counts are always complete
# Connections writing vectors at once: with an HNSW index every insert walks the graph (~2-3 ms of the
# database's CPU per vector), so writes, not the endpoint, can be the limit; several use several cores.
WRITE_THREADS = 4


@dataclass
class EngineReport:
    backend: str
    model_version: str
    batch_size: int
    max_in_flight: int
    scenes: int = 0
    embedded: int = 0
    cache_hits: int = 0
    failed: int = 0
    jobs: int = 0
    peak_in_flight: int = 0
    job_seconds: list[float] = field(default_factory=list)
    failures: list[tuple[str, int, ClipError]] = field(default_factory=list)  # (video, scene index, why)
    failed_by_video: Counter[str] = field(default_factory=Counter)
    videos: set[str] = field(default_factory=set)
    wall_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return (self.embedded - self.cache_hits) / self.wall_s if self.wall_s else 0.0

    def failure_summary(self, limit: int = 5) -> str:
        shown = "; ".join(
            f"video {video} scene {index}: {err.code}: {err.message}"
            for video, index, err in self.failures[:limit]
        )
        more = self.failed - min(self.failed, limit)
        return shown + (f"; and {more} more" if more > 0 else "")


class EmbeddingEngine:
    """Embeds streams of scenes through one backend; one engine per run or command."""

    def __init__(
        self,
        store: VectorStore,
        backend: ClipBackend,
        *,
        batch_size: int,
        max_in_flight: int,
        write_threads: int = WRITE_THREADS,
        use_cache: bool = True,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        if batch_size < 1 or max_in_flight < 1:
            raise ConfigError("CLIP_BATCH_SIZE and RUNPOD_MAX_IN_FLIGHT must be at least 1")
        self.store = store
        self.backend = backend
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.use_cache = use_cache
        self.log = logger or log
        self.on_progress = on_progress
        self.write_threads = write_threads
        self._lock = threading.Lock()
        self._in_flight = 0
        self._peak = 0

    def run(self, pages: Iterable[Sequence[SceneToEmbed]]) -> EngineReport:
        """Embed every scene of ``pages`` (pages of a keyset scan, any videos mixed)."""
        report = EngineReport(
            backend=self.backend.name,
            model_version=self.backend.model_version,
            batch_size=self.batch_size,
            max_in_flight=self.max_in_flight,
        )
        started = time.perf_counter()
        slots = threading.Semaphore(self.max_in_flight)
        # Finished jobs wait here for a writer; bounded, so slow writes slow the sending down instead of
        # holding vectors without limit.
        written: queue.Queue[_Finished | None] = queue.Queue(maxsize=self.max_in_flight * 2)
        self._error: BaseException | None = None
        writers = [
            threading.Thread(target=self._writer, args=(written, report), name=f"clip-write-{i}", daemon=True)
            for i in range(self.write_threads)
        ]
        for thread in writers:
            thread.start()
        pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="clip-job")
        # Jobs are prepared (their URLs signed) while the jobs ahead of them are in flight, at most
        # max_in_flight jobs ahead: a slot is held only while the endpoint has the job.
        preparing = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="clip-prepare")
        ahead: deque[Future[_Prepared]] = deque()
        # Every wait here is timed: a signal the kernel hands to another thread only runs its handler
        # (Ctrl-C, SIGTERM) once the main thread returns to Python, which an untimed wait never does.
        pending: set[Future[None]] = set()

        def dispatch(*, block: bool) -> bool:
            """Send the oldest prepared job once it is ready and a slot is free (the reader waits for
            both: memory holds a few jobs at most); without ``block``, only if both are so now."""
            prepared = ahead[0]
            if not block and not prepared.done():
                return False
            while not prepared.done():
                wait([prepared], timeout=_WAIT_S)
            job = prepared.result()  # a systemic error raises here and stops the run
            if block:
                while not slots.acquire(timeout=_WAIT_S):
                    pass
            elif not slots.acquire(blocking=False):
                return False
            ahead.popleft()
            if self._error is not None:
                slots.release()
                return False
            pending.add(pool.submit(self._guarded_job, job, written, slots))
            return True

        jobs = _ReadAhead(self._jobs(pages, report), self.store)
        try:
            for job in jobs:
                # At most max_in_flight jobs signed ahead: the reader waits to send the oldest first.
                while len(ahead) >= self.max_in_flight and self._error is None:
                    dispatch(block=True)
                if self._error is not None:
                    break
                ahead.append(preparing.submit(self._prepare, job))
                while ahead and dispatch(block=False):  # whatever is ready goes out now
                    pass
            while ahead and self._error is None:
                dispatch(block=True)
            while pending:
                pending = wait(pending, timeout=_WAIT_S).not_done
            pool.shutdown()
        except BaseException:
            # Ctrl-C or SIGTERM (or a failed read): stop now instead of waiting out the jobs in flight,
            # which may sit in RUNPOD_TIMEOUT_S; what they still write is complete rows only.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            jobs.close()
            preparing.shutdown(wait=False, cancel_futures=True)
            for _ in writers:
                written.put(None)
            for thread in writers:
                thread.join()
        if self._error is not None:
            raise self._error
        report.wall_s = time.perf_counter() - started
        return report

    def _guarded_job(
        self, job: _Prepared, written: queue.Queue[_Finished | None], slots: threading.Semaphore
    ) -> None:
        try:
            written.put(self._send(job))
        except BaseException as exc:  # systemic errors stop the run; the first one is raised
            self._error = self._error or exc
        finally:
            slots.release()

    def _writer(self, written: queue.Queue[_Finished | None], report: EngineReport) -> None:
        with self.store.holding_connection():  # one connection for all of this writer's jobs
            while (finished := written.get()) is not None:
                if self._error is not None:
                    continue  # drain, so no job thread waits on a full queue
                try:
                    self._write(finished, report)
                except BaseException as exc:  # a database error stops the run
                    self._error = self._error or exc

    # ---------------------------------------------------------------------------------- packing
    def _jobs(
        self, pages: Iterable[Sequence[SceneToEmbed]], report: EngineReport
    ) -> Iterator[list[SceneToEmbed]]:
        """Jobs of ``batch_size`` cache misses, scenes of any videos together; cache hits are written
        page by page on the way."""
        pending: list[SceneToEmbed] = []
        for page in pages:
            report.scenes += len(page)
            report.videos.update(s.video_id for s in page)
            todo = self._answer_from_cache(page, report) if self.use_cache else list(page)
            pending.extend(todo)
            while len(pending) >= self.batch_size:
                yield pending[: self.batch_size]
                pending = pending[self.batch_size :]
        if pending:
            yield pending

    def _answer_from_cache(self, page: Sequence[SceneToEmbed], report: EngineReport) -> list[SceneToEmbed]:
        cached = self.store.cached_embeddings(
            [s.thumbnail_sha256 for s in page if s.thumbnail_sha256], self.backend.model_version
        )
        rows, todo = [], []
        now = time.time()
        for scene in page:
            hit = cached.get(scene.thumbnail_sha256) if scene.thumbnail_sha256 else None
            if hit is None:
                todo.append(scene)
                continue
            vector, meta = hit
            rows.append(SceneEmbedding(scene.id, vector, {**meta, "cache_hit": True, "embedded_at": now}))
        if rows:
            self.store.write_scene_embeddings(rows)
            with self._lock:
                report.embedded += len(rows)
                report.cache_hits += len(rows)
            if self.on_progress:
                self.on_progress(len(rows))
        return todo

    # ------------------------------------------------------------------------------------ one job
    def _prepare(self, job: list[SceneToEmbed]) -> _Prepared:
        """The backend's work before the job needs a slot (signing its URLs); a job that cannot be
        prepared fails its scenes, unless the error is systemic."""
        images = [SceneImage(key=s.id, storage_path=s.thumbnail_path) for s in job]
        try:
            return _Prepared(job, self.backend.prepare(images))
        except SYSTEMIC_ERRORS:
            raise
        except ClipError as err:
            return _Prepared(job, None, err)

    def _send(self, prepared: _Prepared) -> _Finished:
        job = prepared.job
        with self._lock:
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
        started = time.perf_counter()
        try:
            if prepared.backend_job is None:
                assert prepared.error is not None
                raise prepared.error
            results = self.backend.send(prepared.backend_job)
        except SYSTEMIC_ERRORS:
            raise
        except ClipError as err:  # the whole job failed for good: each scene records why
            results = [err] * len(job)
        finally:
            with self._lock:
                self._in_flight -= 1
        return _Finished(job, results, time.perf_counter() - started)

    def _write(self, finished: _Finished, report: EngineReport) -> None:
        """One job's vectors in one transaction, as soon as a writer is free."""
        job, results = finished.job, finished.results
        now = time.time()
        rows = [
            stored_embedding(scene.id, result, now)
            for scene, result in zip(job, results, strict=True)
            if isinstance(result, EmbeddingResult)
        ]
        self.store.write_scene_embeddings(rows)
        failed = [(s, r) for s, r in zip(job, results, strict=True) if isinstance(r, ClipError)]
        for scene, err in failed:
            self.log.warning(f"Video {scene.video_id}: {log_result(scene.index, self.backend.name, err)}")
        videos = len({s.video_id for s in job})
        self.log.info(
            f"{self.backend.name} job: {len(rows)}/{len(job)} scenes of {videos} video(s) embedded in "
            f"{finished.seconds * 1000:.0f} ms"
        )
        with self._lock:
            report.jobs += 1
            report.embedded += len(rows)
            report.failed += len(failed)
            report.peak_in_flight = self._peak
            report.job_seconds.append(finished.seconds)
            for scene, err in failed:
                report.failed_by_video[scene.video_id] += 1
                if len(report.failures) < MAX_FAILURES_KEPT:
                    report.failures.append((scene.video_id, scene.index, err))
        if self.on_progress:
            self.on_progress(len(job))


def stored_embedding(scene_id: str, result: EmbeddingResult, now: float) -> SceneEmbedding:
    """A vector as it is written: its metadata stamped with ``embedded_at`` (what backfill resumes by)."""
    return SceneEmbedding(scene_id, result.vector, {**result.metadata, "embedded_at": now})


class _ReadAhead:
    """Jobs made on a thread of their own, one ahead of the engine's reader: reading the next page of
    scenes (and answering from the cache) never keeps a prepared job from its free slot."""

    _END = object()

    def __init__(self, jobs: Iterator[list[SceneToEmbed]], store: VectorStore) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(jobs, store), name="clip-read", daemon=True)
        self._thread.start()

    def _read(self, jobs: Iterator[list[SceneToEmbed]], store: VectorStore) -> None:
        try:
            with store.holding_connection():  # every page (and cache answer) on one connection
                for job in jobs:
                    if not self._put(job):
                        return
            self._put((self._END, None))
        except BaseException as exc:  # a failed read: raised by the engine's reader
            self._put((self._END, exc))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_WAIT_S)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> Iterator[list[SceneToEmbed]]:
        while True:
            try:
                item = self._queue.get(timeout=_WAIT_S)  # timed, so a signal still reaches this thread
            except queue.Empty:
                continue
            if isinstance(item, tuple) and item[0] is self._END:
                if item[1] is not None:
                    raise item[1]
                return
            yield item

    def close(self) -> None:
        """Stop reading (the run ended or failed); the thread ends at its next page or job."""
        self._stop.set()


@dataclass(frozen=True)
class _Prepared:
    """A job ready to go out as soon as a slot is free (or already failed as a whole)."""

    job: list[SceneToEmbed]
    backend_job: PreparedJob | None  # None: preparing it failed with ``error``
    error: ClipError | None = None


@dataclass(frozen=True)
class _Finished:
    """A job back from the backend, waiting for a writer."""

    job: list[SceneToEmbed]
    results: list[EmbeddingResult | ClipError]
    seconds: float


def engine_for(
    settings: Settings,
    store: VectorStore,
    backend: ClipBackend,
    *,
    use_cache: bool = True,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> EmbeddingEngine:
    """The engine as the settings size it: ``CLIP_BATCH_SIZE`` images per job, ``max_in_flight`` jobs."""
    return EmbeddingEngine(
        store,
        backend,
        batch_size=settings.clip_batch_size,
        max_in_flight=settings.max_in_flight,
        use_cache=use_cache,
        logger=logger,
        on_progress=on_progress,
    )


def embed_videos(
    video_ids: Sequence[str],
    *,
    settings: Settings,
    store: VectorStore,
    backend: ClipBackend,
    force: bool = False,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> EngineReport:
    """Embed exactly the scenes of these videos that lack a current embedding (all with ``force``),
    scenes of different videos sharing jobs; then each video's status says what its scenes hold."""
    engine = engine_for(settings, store, backend, logger=logger)
    report = engine.run(store.iter_scenes_to_embed(backend.model_version, video_ids=video_ids, force=force))
    store.refresh_embedding_status(video_ids, backend.model_version)
    return report


class KeyframeEmbedder:
    """Embeds a video's keyframes while its scenes are still being detected (the in-process backend).

    Detection hands over each thumbnail as its scene ends (:meth:`submit`); a thread of its own embeds
    them in batches of ``min_batch`` to ``batch_size`` (whatever is waiting when the model is free) from
    their bytes, so the model's load and its forward passes overlap with decoding instead of following
    it. Vectors are kept by scene index until the scenes have rows (:meth:`results`); the caller writes
    them. It never fails the detection: a scene it could not embed is simply not in the results, and
    the embedding step (the engine) does it, with its own retries and error reports. Bytes are what
    the thumbnail in storage holds, so the vectors are those the engine would make from it.
    """

    def __init__(
        self,
        backend: Callable[[], ClipBackend],
        *,
        batch_size: int,
        min_batch: int = 8,
        wait_for_model: bool = True,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> None:
        self._backend = backend
        self.wait_for_model = wait_for_model
        self.batch_size = max(1, batch_size)
        self.min_batch = max(1, min(min_batch, self.batch_size))
        self.log = logger or log
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue()
        self._results: dict[int, EmbeddingResult] = {}
        self._cancelled = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clip-keyframes", daemon=True)
        self._thread.start()

    def wait_ready(self) -> None:
        """Wait until the model is loaded (or could not be).

        Loading it is mostly importing torch and open_clip: Python code that holds the GIL. Beside it,
        the decoder waits for the GIL after every frame (up to the 5 ms switch interval each time) and
        detection slows several-fold; so detection starts once the load is over, and only the forward
        passes, which release the GIL, overlap with it. Unless the model loads in another process
        (``wait_for_model=False``): then it holds no GIL here, and detection starts at once.
        """
        # Timed, so a signal still reaches the main thread.
        while self.wait_for_model and not self._ready.wait(_WAIT_S):
            pass

    def submit(self, index: int, jpeg: bytes) -> None:
        self._queue.put((index, jpeg))

    def results(self) -> dict[int, EmbeddingResult]:
        """Wait for every submitted keyframe; its vector by scene index (those it could embed)."""
        self._queue.put(None)
        while self._thread.is_alive():
            self._thread.join(_WAIT_S)  # timed, so a signal still reaches the main thread
        return self._results

    def cancel(self) -> None:
        """Stop without waiting for what is queued (the detection failed or was interrupted)."""
        self._cancelled.set()
        self._queue.put(None)

    def _run(self) -> None:
        pending: list[tuple[int, bytes]] = []
        closed = False
        backend: ClipBackend | None = None
        try:
            try:
                backend = self._backend()  # waits for the model when it is still loading
            finally:
                self._ready.set()
            while not (closed and not pending) and not self._cancelled.is_set():
                # Block for the next keyframe unless a batch is ready or the stream has ended.
                while not closed and len(pending) < self.min_batch:
                    item = self._queue.get()
                    if item is None:
                        closed = True
                    else:
                        pending.append(item)
                while not closed and len(pending) < self.batch_size:  # and take what else is waiting
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        closed = True
                    else:
                        pending.append(item)
                batch, pending = pending[: self.batch_size], pending[self.batch_size :]
                if batch and not self._cancelled.is_set():
                    # One core while the video is still decoding (which keeps both busy): two compute
                    # threads beside the decoder's spin at every barrier and burn the CPU both need.
                    backend.limit_threads(None if closed else 1)
                    self._embed(backend, batch)
        except ClipError as exc:  # the model could not load, or a systemic error: the engine will say
            self.log.warning(f"Embedding while detecting stopped ({exc.message}); the embedding step goes on")
        finally:
            if backend is not None:
                backend.limit_threads(None)

    def _embed(self, backend: ClipBackend, batch: list[tuple[int, bytes]]) -> None:
        try:
            results = backend.embed([SceneImage(key=index, data=jpeg) for index, jpeg in batch])
        except SYSTEMIC_ERRORS:
            raise
        except ClipError:
            return  # the whole batch failed: the embedding step does these scenes
        for (index, _), result in zip(batch, results, strict=True):
            if isinstance(result, EmbeddingResult):
                self._results[index] = result
