"""The search page in a real browser: Debian's chromium driven by playwright through executable_path
(``playwright install`` cannot download here), against the app served by uvicorn on loopback."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdex_clip_assets.devservices.net import serve_in_thread
from heimdex_clip_assets.devservices.synthetic import jpeg
from heimdex_clip_assets.pipeline.search import SearchService
from heimdex_clip_assets.serve.app import create_app
from heimdex_clip_assets.serve.auth import Authenticator
from tests.fixtures.browser import needs_chromium
from tests.serve.conftest import JWT_SECRET, Library, local_encoder, user_token

# Screenshots land here for people to look at (CI keeps them as artifacts when it wants).
SCREENSHOTS = (
    Path(os.environ.get("HEIMDEX_SCREENSHOTS", "")) if os.environ.get("HEIMDEX_SCREENSHOTS") else None
)

pytestmark = needs_chromium


@pytest.fixture
def server_url(library: Library, worker_encoder) -> Iterator[str]:
    service = SearchService(library.store, library.storage, local_encoder(worker_encoder))
    with serve_in_thread(create_app(service, Authenticator(jwt_secret=JWT_SECRET))) as url:
        yield f"{url}/"
    service.close()


def test_search_click_and_play(browser, server_url: str, library: Library, tmp_path: Path) -> None:
    shots = SCREENSHOTS or tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(server_url)
    # The server wants a token: the page asks for it, then keeps it in this browser.
    page.wait_for_selector("#auth:not([hidden])")
    page.fill("#token", user_token(library.alice.user_id))
    page.click("#auth-form button")

    page.fill("#q", "a dog on a beach")
    page.press("#q", "Enter")
    page.wait_for_selector(".card")
    # Every thumbnail loads (a decoded image, not a broken one), with file name, time range and score.
    page.wait_for_function(
        "[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    cards = page.locator(".card")
    assert cards.count() == 4
    first = cards.first
    assert first.locator(".name").inner_text() == "alpha.mp4"
    assert first.locator(".time").inner_text() == "0:01.5 \u2013 0:03.0"
    assert float(first.locator(".score").inner_text()) == pytest.approx(1.0, abs=1e-3)
    # Only Alice's video, in the results and in the filter; Bob's never appear.
    names = page.locator(".card .name").all_inner_texts()
    assert set(names) == {"alpha.mp4"}
    assert page.locator("#video option").all_inner_texts() == ["All videos", "alpha.mp4"]
    page.screenshot(path=str(shots / "search-1600.png"), full_page=True)

    first.locator("button").click()
    video = page.locator("#video-el")
    src = video.get_attribute("src") or ""
    assert "/object/sign/" in src and src.endswith("#t=1.500")
    # The browser starts the video at the scene (the media fragment): where playback began, or where it
    # stands if autoplay was refused.
    page.wait_for_function("document.getElementById('video-el').readyState >= 1")
    start = page.evaluate(
        "(v => v.played.length ? v.played.start(0) : v.currentTime)(document.getElementById('video-el'))"
    )
    assert start == pytest.approx(1.5, abs=0.05)
    page.screenshot(path=str(shots / "player-1600.png"))

    narrow = browser.new_page(viewport={"width": 400, "height": 900})
    narrow.goto(server_url + "?q=a+city+at+night")
    narrow.wait_for_selector("#auth:not([hidden])")  # a new browser context: sign in again
    narrow.fill("#token", user_token(library.alice.user_id))
    narrow.click("#auth-form button")
    narrow.wait_for_selector(".card")
    narrow.wait_for_function(
        "[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    # Nothing wider than the screen: no sideways scrolling at 400 px.
    assert narrow.evaluate("document.documentElement.scrollWidth") <= 400
    narrow.screenshot(path=str(shots / "search-400.png"), full_page=True)
    narrow.locator(".card button").first.click()
    narrow.wait_for_function("document.getElementById('video-el').readyState >= 1")
    assert narrow.evaluate("document.documentElement.scrollWidth") <= 400
    narrow.screenshot(path=str(shots / "player-400.png"))


def test_second_user_never_sees_the_first(browser, server_url: str, library: Library) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server_url)
    page.wait_for_selector("#auth:not([hidden])")
    page.fill("#token", user_token(library.bob.user_id))
    page.click("#auth-form button")
    for query in ["a red car", "a dog on a beach", "a city at night"]:
        page.fill("#q", query)
        page.press("#q", "Enter")
        page.wait_for_function("document.getElementById('status').textContent.includes('scenes in')")
        assert set(page.locator(".card .name").all_inner_texts()) == {"bravo.mp4"}
    # Image search by dropping a picture on the page: still only Bob's scenes.
    page.evaluate("document.getElementById('status').textContent = ''")
    page.evaluate(
        """b64 => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "query.jpg", {type: "image/jpeg"}));
            window.dispatchEvent(new DragEvent("drop", {dataTransfer: data, cancelable: true}));
        }""",
        base64.b64encode(jpeg(seed=5)).decode(),
    )
    page.wait_for_function("document.getElementById('status').textContent.includes('scenes in')")
    assert page.locator(".card").count() == 2
    assert set(page.locator(".card .name").all_inner_texts()) == {"bravo.mp4"}
