"""The search service on the real test services: two tenants' videos with embedded scenes.

Scene vectors are the random-init model's own text vectors of known phrases, so a search for a phrase
finds its scene first with a score of ~1, whatever the weights. Both tenants own a "a red car" scene.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jwt
import pytest
from fastapi.testclient import TestClient

from heimdex_clip_assets.adapters.db import EmbeddingRow, SceneRecord, VectorStore, VideoRecord
from heimdex_clip_assets.adapters.storage import SupabaseStorage
from heimdex_clip_assets.devservices.synthetic import jpeg
from heimdex_clip_assets.pipeline.search import LocalQueryEncoder, QueryEncoder, SearchService
from heimdex_clip_assets.serve.app import create_app
from heimdex_clip_assets.serve.auth import Authenticator
from runpod_worker.fetch import FetchPolicy
from tests.fixtures.rows import clip_metadata

if TYPE_CHECKING:
    from runpod_worker.encoder import ClipEncoder

API_KEY = "test-api-key-0123456789"
JWT_SECRET = "test-jwt-secret-0123456789abcdef0123"
PHRASES = ["a red car", "a dog on a beach", "a city at night", "snow on mountains"]


@dataclass
class Tenant:
    user_id: str
    video_id: str
    filename: str
    scene_ids: list[str]


@dataclass
class Library:
    store: VectorStore
    storage: SupabaseStorage
    alice: Tenant
    bob: Tenant


def add_video(
    store: VectorStore,
    storage: SupabaseStorage,
    encoder: ClipEncoder,
    *,
    filename: str,
    video: bytes,
    phrases: list[str],
    owner: str,
) -> Tenant:
    video_id = str(uuid.uuid4())
    folder = f"{owner}/{video_id}"
    storage.upload(f"{folder}/{filename}", video, content_type="video/mp4")
    store.ensure_owner(owner)
    store.add_video(
        VideoRecord(id=video_id, owner_id=owner, storage_path=f"{folder}/{filename}", filename=filename)
    )
    scenes = []
    for i in range(len(phrases)):
        path = f"{folder}/thumbnails/scene_{i}.jpg"
        storage.upload(path, jpeg(seed=i))
        scenes.append(
            SceneRecord(
                i, i * 1.5, (i + 1) * 1.5, storage.public_url(path), i * 1.5 + 0.5, f"{uuid.uuid4().hex:0>64}"
            )
        )
    store.insert_scenes(video_id, scenes)
    meta = {**clip_metadata(encoder.model_version, "local", 1.0), "pretrained": "random"}
    vectors = encoder.encode_text(phrases)
    store.write_embeddings(video_id, [EmbeddingRow(i, v, meta) for i, v in enumerate(vectors)])
    return Tenant(owner, video_id, filename, [s.id for s in store.scenes(video_id)])  # type: ignore[misc]


@pytest.fixture
def library(
    store: VectorStore, storage: SupabaseStorage, worker_encoder: ClipEncoder, sample_video: Path
) -> Library:
    video = sample_video.read_bytes()
    alice = add_video(
        store,
        storage,
        worker_encoder,
        filename="alpha.mp4",
        video=video,
        phrases=PHRASES,
        owner=str(uuid.uuid4()),
    )
    bob = add_video(
        store,
        storage,
        worker_encoder,
        filename="bravo.mp4",
        video=video,
        phrases=["a red car", "a bowl of soup"],
        owner=str(uuid.uuid4()),
    )
    return Library(store, storage, alice, bob)


def local_encoder(encoder: ClipEncoder) -> LocalQueryEncoder:
    return LocalQueryEncoder(encoder, encoder.model_version, FetchPolicy(allow_private=True))


MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_client(library: Library, worker_encoder: ClipEncoder) -> Iterator[MakeClient]:
    """``make_client(api_keys=(), jwt_secret=None, encoder=None)``: a TestClient on a fresh app."""
    services: list[SearchService] = []

    def make(
        api_keys: tuple[str, ...] = (), jwt_secret: str | None = None, encoder: QueryEncoder | None = None
    ) -> TestClient:
        service = SearchService(library.store, library.storage, encoder or local_encoder(worker_encoder))
        services.append(service)
        return TestClient(create_app(service, Authenticator(api_keys, jwt_secret), max_image_bytes=200_000))

    yield make
    for service in services:
        service.close()


def user_token(user_id: str, *, secret: str = JWT_SECRET, expires_in: int = 600, **claims: object) -> str:
    """A Supabase-style access token for ``user_id``."""
    now = int(time.time())
    payload = {
        "sub": user_id,
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now,
        "exp": now + expires_in,
    }
    return jwt.encode({**payload, **claims}, secret, algorithm="HS256")
