"""The wire contract: golden signing vectors and every way authentication can fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from heimdex_clip_contract import codec, errors, schema, signing
from heimdex_clip_contract.errors import AuthError
from heimdex_clip_contract.schema import ImageItem
from heimdex_clip_contract.signing import Verifier

VECTORS = json.loads((Path(__file__).parents[1] / "data" / "hmac_vectors.json").read_text())["vectors"]
NOW = 1_764_115_200


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['kind']}-{v['sig'][:8]}")
def test_golden_vectors(vector: dict[str, Any]) -> None:
    secret = vector["secret"]
    if vector["kind"] == "request-v2":
        body = vector["input"]
        unsigned = {k: v for k, v in body.items() if k != "auth"}
        auth = body["auth"]
        assert signing.sign_request(unsigned, secret, ts=auth["ts"], nonce=auth["nonce"]) == body
        assert signing.request_message(body) == vector["message"]
        ts = auth["ts"]
    elif vector["kind"] == "single":
        urls, ts = vector["image_urls"], vector["ts"]
        assert signing.single_message(urls[0], ts) == vector["message"]
        assert signing.sign_single(urls[0], ts, secret) == vector["sig"]
        body = schema.build_single_request(urls[0], secret, ts=ts, version=1)
    else:
        urls, ts = vector["image_urls"], vector["ts"]
        assert signing.batch_message(urls, ts) == vector["message"]
        assert signing.sign_batch(urls, ts, secret) == vector["sig"]
        body = schema.build_batch_request([ImageItem(u) for u in urls], secret, ts=ts, version=1)
    request = schema.parse_request(body)
    assert request.message == vector["message"]
    assert request.version == (2 if vector["kind"] == "request-v2" else 1)
    Verifier([secret]).verify(
        request.message, ts, vector["sig"], version=request.version, nonce=request.nonce, now=ts
    )


def test_batch_signature_is_not_a_single_signature() -> None:
    sig = signing.sign_batch(["https://h/a.jpg"], NOW, "k")
    with pytest.raises(AuthError, match="bad signature"):
        Verifier(["k"]).verify(signing.single_message("https://h/a.jpg", NOW), NOW, sig, now=NOW)


def _single(secret: str = "k", ts: int = NOW) -> tuple[str, int, str]:
    url = "https://h/a.jpg"
    return signing.single_message(url, ts), ts, signing.sign_single(url, ts, secret)


@pytest.mark.parametrize(
    ("ts", "sig", "match"),
    [
        (NOW, None, "missing signature"),
        (NOW, "", "missing signature"),
        (str(NOW), "ab", "integer"),
        (True, "ab", "integer"),
        (NOW, "0" * 64, "bad signature"),
    ],
)
def test_malformed_auth(ts: Any, sig: Any, match: str) -> None:
    with pytest.raises(AuthError, match=match):
        Verifier(["k"]).verify("m", ts, sig, now=NOW)


def test_missing_auth_block() -> None:
    with pytest.raises(AuthError, match="missing auth"):
        schema.parse_request({"image_url": "https://h/a.jpg"})


@pytest.mark.parametrize("skew", [-121, 121])
def test_stale_and_future_timestamps(skew: int) -> None:
    message, ts, sig = _single(ts=NOW + skew)
    with pytest.raises(AuthError, match="window"):
        Verifier(["k"], window_s=120).verify(message, ts, sig, now=NOW)


def test_replay_refused() -> None:
    verifier = Verifier(["k"])
    message, ts, sig = _single()
    verifier.verify(message, ts, sig, now=NOW)
    with pytest.raises(AuthError, match="replay"):
        verifier.verify(message, ts, sig.upper(), now=NOW + 1)


def test_rotation_accepts_current_and_previous() -> None:
    verifier = Verifier(["new", "old"])
    for secret in ("new", "old"):
        message, ts, sig = _single(secret)
        verifier.verify(message, ts, sig, now=NOW)
    message, ts, sig = _single("other")
    with pytest.raises(AuthError):
        verifier.verify(message, ts, sig, now=NOW)


def test_encode_embedding_ndarray_matches_sequence() -> None:
    # The handler passes numpy rows (converted in C); plain sequences keep the stdlib path. Same wire.
    np = pytest.importorskip("numpy")
    row = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    for encoding in ("json", "base64"):
        fast = codec.encode_embedding(row, encoding)
        slow = codec.encode_embedding([float(v) for v in row], encoding)
        assert fast == slow
        assert codec.decode_embedding(fast, 512) == row.tolist()
    assert (
        codec.decode_embedding(codec.encode_embedding(row.astype(np.float64), "base64"), 512) == row.tolist()
    )


def test_config_error_is_one_class_with_a_wire_code() -> None:
    from runpod_worker import config

    # One class for "config_error": the pipeline's except clauses also catch the worker's errors.
    assert errors.ConfigError is config.ConfigError is errors.ConfigError
    rebuilt = errors.error_from_dict(errors.ConfigError("CLIP_PRECISION bad").to_dict())
    assert type(rebuilt) is errors.ConfigError and not rebuilt.retryable
