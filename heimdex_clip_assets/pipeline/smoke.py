"""``heimdex-clip smoke``: the seed's smoke test, against whatever backend is configured.

Expected output on RunPod (the seed's Step 5)::

    ✓ RunPod CLIP endpoint reachable
    ✓ Signed URL generation working
    ✓ HMAC authentication working
    ✓ Embedding generated: 512 dimensions
    ✓ Latency: 234ms (download: 50ms, inference: 45ms)
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import httpx

from heimdex_clip_assets import services
from heimdex_clip_assets.adapters.runpod_client import RunPodClient
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices import synthetic
from heimdex_clip_contract.errors import AuthError, ClipError

SMOKE_PATH = "smoke/smoke-test.jpg"


@dataclass(frozen=True)
class Check:
    ok: bool
    message: str


def run_smoke(settings: Settings) -> list[Check]:
    checks: list[Check] = []
    if settings.clip_backend == "off":
        return [Check(False, "CLIP is off (CLIP_INFERENCE_BACKEND=off); set runpod or local to test it")]

    # Signed URL: upload a thumbnail-like JPEG, sign it, fetch it back anonymously.
    storage = services.storage(settings)
    jpeg = synthetic.jpeg(480, 270, quality=85)  # a realistic thumbnail, made here: no fixture file
    try:
        storage.upload(SMOKE_PATH, jpeg, content_type="image/jpeg")
        url = storage.create_signed_url(SMOKE_PATH, expires_in=settings.signed_url_expires_s)
        fetched = httpx.get(url, timeout=30)
        signed_ok = fetched.status_code == 200 and fetched.content == jpeg
        signed_msg = (
            "Signed URL generation working"
            if signed_ok
            else (f"Signed URL generation failed: HTTP {fetched.status_code} fetching the signed URL")
        )
    except ClipError as exc:
        return [Check(False, f"Signed URL generation failed: {exc.message}")]
    except httpx.HTTPError as exc:
        return [Check(False, f"Signed URL generation failed: cannot fetch it ({type(exc).__name__})")]

    if settings.clip_backend == "local":
        started = time.perf_counter()
        encoder = services.text_image_encoder(settings)
        load_ms = (time.perf_counter() - started) * 1000
        checks.append(
            Check(
                True,
                f"Local CLIP encoder loaded ({encoder.model_name}, {encoder.pretrained}, {load_ms:.0f}ms)",
            )
        )
        checks.append(Check(signed_ok, signed_msg))
        started = time.perf_counter()
        result = encoder.encode_bytes([jpeg])[0]
        total_ms = (time.perf_counter() - started) * 1000
        if isinstance(result, ClipError):
            checks.append(Check(False, f"Embedding failed: {result.message}"))
            return checks
        checks.append(_dim_check(len(result), settings.clip_dim))
        checks.append(Check(True, f"Latency: {total_ms:.0f}ms (download: 0ms, inference: {total_ms:.0f}ms)"))
        return checks

    # RunPod: a real job proves reachability, auth and the model; a wrongly signed one must be refused.
    with RunPodClient.from_settings(settings) as client:
        started = time.perf_counter()
        try:
            emb = client.embed_one(url, request_id="smoke-test")
        except AuthError as exc:
            return [
                Check(True, "RunPod CLIP endpoint reachable"),
                Check(signed_ok, signed_msg),
                Check(False, f"HMAC authentication failed: {exc.message}"),
            ]
        except ClipError as exc:
            return [
                Check(False, f"RunPod CLIP endpoint not usable: {exc.message}"),
                Check(signed_ok, signed_msg),
            ]
        total_ms = (time.perf_counter() - started) * 1000
    checks.append(Check(True, "RunPod CLIP endpoint reachable"))
    checks.append(Check(signed_ok, signed_msg))
    wrong = settings.replace(hmac_secret=secrets.token_hex(32), runpod_max_retries=0)
    with RunPodClient.from_settings(wrong) as bad_client:
        try:
            bad_client.embed_one(url, request_id="smoke-test-bad-signature")
            refused = False
        except AuthError:
            refused = True
        except ClipError:
            refused = False
    checks.append(
        Check(
            refused,
            "HMAC authentication working"
            if refused
            else "HMAC authentication NOT enforced: a request with a wrong signature was accepted; "
            "set EMBEDDING_HMAC_SECRET on the worker",
        )
    )
    checks.append(_dim_check(emb.dim, settings.clip_dim))
    checks.append(
        Check(
            True,
            f"Latency: {total_ms:.0f}ms (download: {emb.download_ms:.0f}ms, "
            f"inference: {emb.inference_ms:.0f}ms)",
        )
    )
    return checks


def _dim_check(dim: int, expected: int) -> Check:
    if dim == expected:
        return Check(True, f"Embedding generated: {dim} dimensions")
    return Check(False, f"Unexpected embedding dimension: {dim} (expected {expected})")
