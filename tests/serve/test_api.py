"""The search API on real Postgres + pgvector and the real storage server, in-process (TestClient)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest

from heimdex_clip_assets.devservices.synthetic import jpeg
from heimdex_clip_assets.pipeline.search import LocalQueryEncoder
from runpod_worker.fetch import FetchPolicy
from tests.serve.conftest import API_KEY, JWT_SECRET, PHRASES, Library, MakeClient, user_token

if TYPE_CHECKING:
    from runpod_worker.encoder import ClipEncoder


def error(reply: httpx.Response, status: int, code: str) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()["error"]
    assert body["code"] == code and isinstance(body["retryable"], bool)
    assert "Traceback" not in body["message"]
    return str(body["message"])


def test_text_search_finds_the_scene_with_signed_urls(make_client: MakeClient, library: Library) -> None:
    client = make_client()
    reply = client.get(
        "/v1/search", params={"q": "a dog on a beach", "limit": 3, "user_id": library.alice.user_id}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    top = body["hits"][0]
    assert (top["video_id"], top["index"], top["filename"]) == (library.alice.video_id, 1, "alpha.mp4")
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
    assert (top["start_s"], top["end_s"]) == (1.5, 3.0)
    assert len(body["hits"]) == 3 and not body["cached"]
    # Signed URLs that work without credentials; the video's starts playing at the scene.
    assert httpx.get(top["thumbnail_url"]).content[:3] == b"\xff\xd8\xff"
    url, fragment = top["video_url"].split("#")
    assert fragment == "t=1.500"
    assert httpx.get(url, headers={"Range": "bytes=0-99"}).status_code == 206
    # The same query again comes from the cache.
    again = client.get("/v1/search", params={"q": "  a dog  on a beach ", "user_id": library.alice.user_id})
    assert again.json()["cached"] and again.json()["hits"][0] == top


def test_video_filter_and_min_score(make_client: MakeClient, library: Library) -> None:
    client = make_client()
    hits = client.get("/v1/search", params={"q": "a red car", "video_id": library.bob.video_id}).json()[
        "hits"
    ]
    assert {h["video_id"] for h in hits} == {library.bob.video_id}
    hits = client.get("/v1/search", params={"q": "a red car", "min_score": 0.999}).json()["hits"]
    assert sorted(h["filename"] for h in hits) == ["alpha.mp4", "bravo.mp4"]


def test_embed_text(make_client: MakeClient) -> None:
    body = make_client().post("/v1/embed/text", json={"text": "a red car"}).json()
    assert body["dim"] == 512 and len(body["embedding"]) == 512
    assert sum(v * v for v in body["embedding"]) == pytest.approx(1.0, abs=1e-4)


def test_image_search_by_upload(make_client: MakeClient, library: Library) -> None:
    client = make_client()
    reply = client.post(
        "/v1/search/image", files={"file": ("q.jpg", jpeg(seed=3), "image/jpeg")}, params={"limit": 2}
    )
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["hits"]) == 2


def test_image_search_by_url(make_client: MakeClient, library: Library) -> None:
    url = library.storage.create_signed_url(
        f"{library.alice.user_id}/{library.alice.video_id}/thumbnails/scene_0.jpg"
    )
    reply = make_client().post("/v1/search/image", json={"url": url})
    assert reply.status_code == 200, reply.text
    assert reply.json()["hits"][0]["video_id"] == library.alice.video_id


@pytest.mark.parametrize(
    ("params", "status", "code", "words"),
    [
        ({"q": "   "}, 400, "invalid_request", "empty"),
        ({"q": "x" * 10_000}, 400, "invalid_request", "10,000 characters"),
        ({"q": "car", "limit": 100_000}, 400, "invalid_request", "between 1 and 100"),
        ({"q": "car", "limit": "ten"}, 400, "invalid_request", "limit"),
        ({"q": "car", "video_id": "nope"}, 400, "invalid_request", "UUID"),
        ({"q": "car", "video_id": "6f1c0b8e-0000-4000-8000-000000000000"}, 404, "not_found", "No video"),
        ({"q": "car", "min_score": 3}, 400, "invalid_request", "min_score"),
        ({}, 400, "invalid_request", "q"),
    ],
)
def test_bad_input_is_a_clear_4xx(
    make_client: MakeClient, params: dict, status: int, code: str, words: str
) -> None:
    assert words in error(make_client().get("/v1/search", params=params), status, code)


def test_bad_images_are_refused(make_client: MakeClient) -> None:
    client = make_client()
    not_image = client.post(
        "/v1/search/image", files={"file": ("a.txt", b"hello, not a picture", "text/plain")}
    )
    assert "not an image" in error(not_image, 400, "invalid_image")
    too_big = client.post("/v1/search/image", files={"file": ("big.jpg", b"\xff" * 300_000, "image/jpeg")})
    error(too_big, 413, "image_too_large")
    error(
        client.post("/v1/search/image", content=b"raw", headers={"content-type": "image/jpeg"}),
        400,
        "invalid_request",
    )
    private = client.post("/v1/search/image", json={"url": "ftp://example.com/a.jpg"})
    error(private, 400, "invalid_request")
    error(client.get("/v1/nothing"), 404, "not_found")


def test_api_keys(make_client: MakeClient, library: Library) -> None:
    client = make_client(api_keys=("old-key", API_KEY))
    assert "Authorization" in error(client.get("/v1/search", params={"q": "car"}), 401, "auth_failed")
    bad = client.get("/v1/search", params={"q": "car"}, headers={"Authorization": "Bearer wrong"})
    error(bad, 401, "auth_failed")
    ok = client.get("/v1/search", params={"q": "a red car"}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert {h["filename"] for h in ok.json()["hits"][:2]} == {"alpha.mp4", "bravo.mp4"}  # every tenant
    assert client.get("/healthz").status_code == 200  # no credentials needed
    assert client.get("/").status_code == 200


def test_a_user_token_sees_only_its_own_scenes(make_client: MakeClient, library: Library) -> None:
    client = make_client(api_keys=(API_KEY,), jwt_secret=JWT_SECRET)
    alice = {"Authorization": f"Bearer {user_token(library.alice.user_id)}"}
    for q in ["a red car", "a bowl of soup", *PHRASES]:
        hits = client.get("/v1/search", params={"q": q, "limit": 100}, headers=alice).json()["hits"]
        assert hits and {h["video_id"] for h in hits} == {library.alice.video_id}
    image = client.post(
        "/v1/search/image", files={"file": ("q.jpg", jpeg(seed=1), "image/jpeg")}, headers=alice
    )
    assert {h["video_id"] for h in image.json()["hits"]} == {library.alice.video_id}
    # Bob's video does not exist for Alice, and she cannot ask for Bob's scenes.
    other = client.get("/v1/search", params={"q": "car", "video_id": library.bob.video_id}, headers=alice)
    error(other, 404, "not_found")
    as_bob = client.get("/v1/search", params={"q": "car", "user_id": library.bob.user_id}, headers=alice)
    error(as_bob, 403, "forbidden")
    videos = client.get("/v1/videos", headers=alice).json()["videos"]
    assert videos == [{"id": library.alice.video_id, "filename": "alpha.mp4", "scenes": 4}]


@pytest.mark.parametrize(
    ("token", "words"),
    [
        (lambda uid: user_token(uid, expires_in=-60), "expired"),
        (lambda uid: user_token(uid, secret="another-secret-0123456789abcdef01"), "refused"),
        (lambda uid: user_token(uid, aud="anon"), "refused"),
        (lambda uid: user_token("not-a-uuid"), "user id"),
    ],
)
def test_bad_user_tokens_are_refused(make_client: MakeClient, library: Library, token, words: str) -> None:
    client = make_client(jwt_secret=JWT_SECRET)
    reply = client.get(
        "/v1/search", params={"q": "car"}, headers={"Authorization": f"Bearer {token(library.alice.user_id)}"}
    )
    assert words in error(reply, 401, "auth_failed")


def test_metrics_and_docs(make_client: MakeClient) -> None:
    client = make_client()
    for _ in range(2):
        client.get("/v1/search", params={"q": "a city at night"})
    client.get("/v1/search", params={"q": ""})
    text = client.get("/metrics").text
    assert 'heimdex_search_requests_total{method="GET",route="/v1/search",status="200"} 2.0' in text
    assert 'heimdex_search_request_seconds_bucket{le="0.05",route="/v1/search"}' in text
    assert 'heimdex_search_encoder_calls_total{backend="local",kind="text"} 1.0' in text
    assert 'heimdex_search_query_cache_total{result="hit"} 1.0' in text
    assert 'heimdex_search_errors_total{code="invalid_request"} 1.0' in text
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/search", "/v1/search/image", "/v1/embed/text", "/healthz", "/metrics"} <= set(paths)


def test_image_urls_cannot_reach_private_addresses(
    make_client: MakeClient, library: Library, worker_encoder: ClipEncoder
) -> None:
    """The search host fetches a user's URL with the worker's SSRF rules: loopback is refused."""
    encoder = LocalQueryEncoder(worker_encoder, worker_encoder.model_version, FetchPolicy())
    url = library.storage.create_signed_url(
        f"{library.alice.user_id}/{library.alice.video_id}/thumbnails/scene_0.jpg"
    )
    reply = make_client(encoder=encoder).post("/v1/search/image", json={"url": url})
    assert "non-public address" in error(reply, 400, "invalid_request")
