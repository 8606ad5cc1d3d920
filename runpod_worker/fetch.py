"""SSRF-safe image download for job-supplied URLs (modelled on runpod-python's ``rp_ssrf.py``).

A job names any URL it likes and the worker fetches it from inside RunPod's network, so without
checks a signed-but-malicious (or leaked-secret) job could read cloud metadata (169.254.169.254) or
services on private addresses (CWE-918). Every hop is therefore checked: scheme, host allowlist,
every resolved address, then the connection is pinned to a checked address so a DNS answer that
changes between check and connect (rebinding) cannot slip through. Size and time are capped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self
from urllib.parse import urljoin, urlsplit

import aiohttp
import certifi
from yarl import URL

from heimdex_clip_contract.errors import (
    ClipError,
    ImageDownloadError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidRequestError,
)
from runpod_worker.config import WorkerConfig

_ALLOWED_SCHEMES = ("http", "https")
_REDIRECT_STATUS = frozenset((301, 302, 303, 307, 308))
# CGNAT (RFC 6598) is not ``is_private`` before CPython 3.12.4, so it is listed explicitly, as is the
# local-use NAT64 prefix (RFC 8215), which translates to whatever IPv4 network the operator chose.
_EXTRA_BLOCKED = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("64:ff9b:1::/48"))
# The well-known NAT64 prefix (RFC 6052): the last 32 bits are the IPv4 host a translator reaches.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_CHUNK = 64 * 1024
# One TLS context for every job: a new one parses the CA bundle synchronously on the event loop (~20 ms
# a job). Same trust store (certifi), and ``create_default_context`` keeps CERT_REQUIRED +
# check_hostname, so a connection pinned to an IP is still verified against the name sent as SNI
# (``_get_once``'s ``server_hostname``), not the IP. Sharing is safe: a context is only read per handshake.
_TLS_CONTEXT = ssl.create_default_context(cafile=certifi.where())


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int = 10 * 1024 * 1024
    timeout_s: float = 30.0
    # Empty: any public host. Entries match the host exactly; ".example.com" also matches subdomains.
    host_allowlist: tuple[str, ...] = ()
    # Tests and same-VPC setups only: skips the address checks, never the scheme/allowlist/size ones.
    allow_private: bool = False
    max_redirects: int = 5

    @classmethod
    def from_config(cls, config: WorkerConfig) -> FetchPolicy:
        return cls(
            max_bytes=config.max_image_bytes,
            timeout_s=config.download_timeout_s,
            host_allowlist=config.host_allowlist,
            allow_private=config.allow_private_hosts,
        )


def _reached(ip: str) -> list[IPAddress] | None:
    """Every address a connection to ``ip`` ends up at, or None when ``ip`` does not parse.

    An IPv6 address can carry an IPv4 one that relays and translators deliver to: IPv4-mapped
    (``::ffff:10.0.0.1``), 6to4 (``2002:7f00:1::1`` is 127.0.0.1), Teredo (server and client) and NAT64
    (``64:ff9b::a9fe:a9fe`` is 169.254.169.254). Each carried address is judged too; for NAT64 only the
    carried one, since the prefix itself is public routing for whatever IPv4 host it names.
    """
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id ("fe80::1%eth0")
    except ValueError:
        return None
    if not isinstance(address, ipaddress.IPv6Address):
        return [address]
    if address in _NAT64:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    carried = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    return [address, *(a for a in carried if a is not None)]


def _public(address: IPAddress) -> bool:
    if any(address.version == net.version and address in net for net in _EXTRA_BLOCKED):
        return False
    # link-local covers 169.254.169.254 (cloud metadata); each flag is a class no image host lives in.
    if (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    ):
        return False
    return address.is_global


def is_public_address(ip: str) -> bool:
    """True only for a globally routable unicast address, whatever address it carries; unparseable
    input is not public."""
    reached = _reached(ip)
    return reached is not None and all(_public(a) for a in reached)


def _never_allowed(ip: str) -> bool:
    """Addresses refused even with ``allow_private``: link-local holds cloud metadata (169.254.169.254)
    and no image host; multicast and unspecified addresses are never a server."""
    reached = _reached(ip)
    return reached is None or any(a.is_link_local or a.is_multicast or a.is_unspecified for a in reached)


def host_allowed(host: str, allowlist: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    if not allowlist:
        return True
    return any(host == entry or (entry.startswith(".") and host.endswith(entry)) for entry in allowlist)


async def _resolve(host: str, port: int, policy: FetchPolicy) -> str:
    """Resolve ``host`` and return the address to connect to; refuse if ANY address is not public.

    A host answering with one public and one private address is treated as hostile: which one a
    client would pick is not ours to predict.
    """
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        # DNS hiccups are usually transient, so this one may be retried.
        raise ImageDownloadError(f"Image download failed: could not resolve host {host!r}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise ImageDownloadError(f"Image download failed: host {host!r} has no address")
    for ip in addresses:
        if _never_allowed(ip) or not (policy.allow_private or is_public_address(ip)):
            raise InvalidRequestError(
                f"image_url host {host!r} resolves to a non-public address; refused "
                "(IMAGE_ALLOW_PRIVATE_HOSTS=true allows private and loopback hosts, for local testing)"
            )
    return addresses[0]


class ImageClient:
    """One job's downloads: an aiohttp session (no proxies from the environment, no automatic redirects
    or decompression) whose connections are kept alive from image to image, and each host's checked
    address, resolved once for the job (its URLs share a host or two; a resolution per image was a
    thread hop each). Use it as an async context manager, on the loop that runs the job."""

    def __init__(self, policy: FetchPolicy, *, max_connections: int = 16) -> None:
        self.policy = policy
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._addresses: dict[tuple[str, int], asyncio.Task[str]] = {}

    async def __aenter__(self) -> Self:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=self._max_connections, ssl=_TLS_CONTEXT
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # the cap counts the bytes that arrive, and images come as they are
            trust_env=False,  # a proxy would make the pinned address meaningless
            timeout=aiohttp.ClientTimeout(total=self.policy.timeout_s),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
        for task in self._addresses.values():
            task.cancel()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use ImageClient as an async context manager")
        return self._session

    async def address(self, host: str, port: int) -> str:
        """``host``'s checked address: resolved once per job, however many of its images ask at once
        (a refusal is the same for all of them)."""
        task = self._addresses.get((host, port))
        if task is None:
            task = self._addresses[(host, port)] = asyncio.create_task(_resolve(host, port, self.policy))
        return await asyncio.shield(task)  # one image's timeout must not cancel the others' answer


async def _check_url(client: ImageClient, url: str) -> tuple[URL, str, str | None]:
    """Validate one hop; return the pinned URL (host replaced by a checked IP), the Host header, and
    the name TLS must verify (None for http)."""
    parts = urlsplit(url)
    # file://, ftp://, gopher:// and friends reach local files or other protocols: only web fetches.
    scheme = parts.scheme.lower()
    if scheme not in _ALLOWED_SCHEMES:
        raise InvalidRequestError(f"image_url scheme {parts.scheme!r} is not allowed (http or https only)")
    host = parts.hostname
    if not host:
        raise InvalidRequestError("image_url has no host")
    # userinfo would be sent as Basic auth to whoever the URL names; a signed URL never needs it.
    if parts.username or parts.password:
        raise InvalidRequestError("image_url must not carry credentials")
    if not host_allowed(host, client.policy.host_allowlist):
        raise InvalidRequestError(f"image_url host {host!r} is not in IMAGE_HOST_ALLOWLIST")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
        # encoded=True: the signed URL's query (its token) goes out byte for byte as it was signed.
        pinned = URL(url, encoded=True).with_host(await client.address(host, port))
    except ValueError as exc:
        raise InvalidRequestError("image_url has an invalid port or host") from exc
    return pinned, parts.netloc.rsplit("@", 1)[-1], host if scheme == "https" else None


async def _get_once(client: ImageClient, url: str) -> tuple[bytes, None] | tuple[None, str]:
    """One hop: (body, None), or (None, next URL) for a redirect."""
    policy = client.policy
    pinned, host_header, tls_name = await _check_url(client, url)
    async with client.session.get(
        pinned,
        headers={"Host": host_header, "Accept": "image/*", "Accept-Encoding": "identity"},
        allow_redirects=False,
        # TLS must still present and verify the real name, not the pinned IP.
        server_hostname=tls_name,
    ) as response:
        if response.status in _REDIRECT_STATUS:
            location = response.headers.get("location")
            if not location:
                raise ImageDownloadError("Image download failed: redirect without Location", retryable=False)
            return None, urljoin(url, location)
        if 400 <= response.status < 500:
            # An expired or bad signed URL (Supabase answers 400 InvalidJWT) will not heal by retrying
            # the same URL: the caller must sign a new one.
            raise ImageDownloadError(
                f"Image download failed: HTTP {response.status} from the image host (expired or "
                "invalid signed URL?)",
                retryable=False,
            )
        if response.status >= 300:
            raise ImageDownloadError(f"Image download failed: HTTP {response.status} from the image host")
        content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if not content_type.startswith("image/"):
            raise InvalidImageError(f"Image host sent content type {content_type or 'none'!r}, not image/*")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
            raise ImageTooLargeError(
                f"Image is {int(declared)} bytes, over MAX_IMAGE_SIZE_BYTES={policy.max_bytes}"
            )
        # Content-Length may be absent or lie: count what actually arrives and stop at the cap.
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > policy.max_bytes:
                raise ImageTooLargeError(f"Image is over MAX_IMAGE_SIZE_BYTES={policy.max_bytes}")
        return bytes(body), None


async def fetch_image(client: ImageClient, url: str) -> bytes:
    """Download one image under the client's policy; raises a :class:`ClipError` subclass on any
    refusal. Every redirect hop is checked as the first URL was."""
    timeout_s = client.policy.timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            for _ in range(client.policy.max_redirects + 1):
                body, redirect = await _get_once(client, url)
                if redirect is None:
                    return body
                url = redirect
    except TimeoutError as exc:
        raise ImageDownloadError(
            f"Image download failed: Timeout after {timeout_s:g}s (IMAGE_DOWNLOAD_TIMEOUT)"
        ) from exc
    except aiohttp.ClientError as exc:
        # Connection resets, protocol errors: the network's fault, worth a retry.
        raise ImageDownloadError(f"Image download failed: {type(exc).__name__}") from exc
    raise ImageDownloadError(
        f"Image download failed: more than {client.policy.max_redirects} redirects", retryable=False
    )


async def fetch_all(
    urls: Sequence[str], policy: FetchPolicy, concurrency: int
) -> list[tuple[bytes | ClipError, float]]:
    """Each URL's bytes (or why not) and how long it took in ms, in order: ``concurrency`` lanes, each
    taking the next URL when it is free, over as many kept-alive connections of one :class:`ImageClient`.

    aiohttp, not httpx: httpx validated the signed URL's long query character by character and httpcore
    rebuilt its socket's attributes on every request, ~1 ms of CPU per image between them; at a GPU's
    pace the downloads, not the model, set a worker's speed (``bench/fetch.py``). A client per call: the
    bench and the local API's tests run each job under a fresh ``asyncio.run``, and a connection
    belongs to the loop that opened it.
    """
    results: dict[int, tuple[bytes | ClipError, float]] = {}
    todo = iter(enumerate(urls))  # shared: no await between taking a URL and owning it
    lanes = min(concurrency, len(urls))

    async def lane(client: ImageClient) -> None:
        for i, url in todo:
            started = time.perf_counter()
            try:
                data: bytes | ClipError = await fetch_image(client, url)
            except ClipError as exc:
                data = exc
            results[i] = data, round((time.perf_counter() - started) * 1000, 2)

    async with ImageClient(policy, max_connections=max(lanes, 1)) as client:
        await asyncio.gather(*(lane(client) for _ in range(lanes)))
    return [results[i] for i in range(len(urls))]
