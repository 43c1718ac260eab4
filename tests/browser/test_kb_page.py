"""The knowledge-base page (/kb) in headless Chromium against the real app (uvicorn, tiny CLIP,
embedded Qdrant, local blobs): upload several files, browse, search, delete, limits and auth."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support.media import noise_png, pdf_bytes, png_bytes

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

NOTES = "# Bike care\n\nOil the chain every month.\n\n# Warranty\n\nThe frame is covered for two years.\n"


def wait_uploads(page: Any, count: int) -> dict[str, tuple[str, str]]:
    """Wait until ``count`` upload rows have a result; {file name: (outcome, result text)}."""
    page.wait_for_function(f"document.querySelectorAll('.upload-row[data-outcome]').length >= {count}")
    rows = page.locator(".upload-row")
    return {
        rows.nth(i).get_attribute("data-filename"): (
            rows.nth(i).get_attribute("data-outcome"), rows.nth(i).locator(".upload-result").inner_text())
        for i in range(rows.count())
    }


def card_sources(page: Any) -> list[str]:
    return page.locator(".snippet-card").evaluate_all("cards => cards.map(c => c.dataset.source)")


def test_upload_several_files_then_browse_search_and_delete(
    start_server: Any, open_page: Any, sample_images: list[Image.Image]
) -> None:
    server = start_server()
    page = open_page()
    page.goto(server.url + "/kb")
    page.get_by_text("The knowledge base is empty").wait_for()

    photo = png_bytes(sample_images[0])
    page.set_input_files("#upload-input", files=[
        {"name": "photo.png", "mimeType": "image/png", "buffer": photo},
        {"name": "notes.md", "mimeType": "text/markdown", "buffer": NOTES.encode()},
        {"name": "manual.pdf", "mimeType": "application/pdf", "buffer": pdf_bytes(sample_images[1:3])},
        {"name": "tool.exe", "mimeType": "application/octet-stream", "buffer": b"MZ\x90\x00"},
    ])
    results = wait_uploads(page, 4)
    assert results["photo.png"] == ("ingested", "ingested")
    assert results["notes.md"] == ("ingested", "ingested 2 snippets")
    assert results["manual.pdf"] == ("ingested", "ingested 2 snippets")
    outcome, text = results["tool.exe"]
    assert outcome == "skipped" and "unsupported file type '.exe'" in text
    assert page.locator(".upload-row[data-filename='photo.png'] progress").evaluate("p => p.value") == 1

    # The list reloads after the uploads: five snippets, PDF pages numbered.
    page.wait_for_function("document.querySelectorAll('.snippet-card').length === 5")
    assert sorted(card_sources(page)) == ["manual.pdf", "manual.pdf", "notes.md", "notes.md", "photo.png"]
    assert page.locator(".snippet-card", has_text="manual.pdf · page 2").count() == 1
    assert page.locator(".snippet-card", has_text="Oil the chain every month.").count() == 1
    thumb = page.locator(".snippet-card[data-source='photo.png'] button.thumb img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())

    # Search by the same image: that snippet comes first, with its scores.
    page.set_input_files("#search-image", files=[{"name": "q.png", "mimeType": "image/png", "buffer": photo}])
    with page.expect_response("**/v1/search") as info:
        page.click("#search-form button[type=submit]")
    assert info.value.status == 200
    page.get_by_text("results for your search").wait_for()
    assert card_sources(page)[0] == "photo.png"
    assert "CLIP 1.000" in page.locator(".snippet-card").first.inner_text()
    # …and by text.
    page.set_input_files("#search-image", files=[])
    page.fill("#search-text", "Oil the chain every month.")
    page.press("#search-text", "Enter")
    page.wait_for_function("document.querySelector('#list-status').textContent.startsWith('5 results')")
    assert "notes.md" in card_sources(page)

    # The same photo again is recognised.
    page.set_input_files("#upload-input", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": photo}])
    page.wait_for_function("document.querySelectorAll('.upload-row[data-outcome]').length === 5")
    assert page.locator(".upload-row").first.locator(".upload-result").inner_text() == "already present"

    # Delete the photo (after confirming): gone from the page and from the API.
    page.click("#browse-all")
    card = page.locator(".snippet-card[data-source='photo.png']")
    card.wait_for()
    snippet_id = card.get_attribute("data-id")
    messages: list[str] = []
    page.once("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
    card.get_by_role("button", name="Delete snippet photo.png").click()
    card.wait_for(state="detached")
    assert "photo.png" in messages[0]
    assert httpx.get(f"{server.url}/v1/snippets/{snippet_id}").status_code == 404
    assert page.locator("#list-status").inner_text() == "Deleted the snippet from photo.png."


def test_dismissing_the_confirmation_keeps_the_snippet(start_server: Any, open_page: Any) -> None:
    server = start_server()
    created = httpx.post(f"{server.url}/v1/snippets", data={"text": "keep me", "source": "keep.txt"}).json()
    page = open_page()
    page.goto(server.url + "/kb")
    card = page.locator(".snippet-card[data-source='keep.txt']")
    page.once("dialog", lambda dialog: dialog.dismiss())
    card.get_by_role("button", name="Delete snippet keep.txt").click()
    assert card.count() == 1
    assert httpx.get(f"{server.url}/v1/snippets/{created['id']}").status_code == 200


def test_oversized_upload_shows_413_message(start_server: Any, open_page: Any) -> None:
    server = start_server(limit_image_bytes=20_000)
    big = noise_png(120)
    page = open_page()
    page.goto(server.url + "/kb")
    with page.expect_response("**/v1/snippets") as info:
        page.set_input_files("#upload-input", files=[{"name": "big.png", "mimeType": "image/png", "buffer": big}])
    assert info.value.status == 413
    outcome, text = wait_uploads(page, 1)["big.png"]
    assert outcome == "skipped"
    assert text.startswith("skipped: Too large: ")
    assert "20000" in text.replace(",", "") or "limit" in text


def post_patiently(http: httpx.Client, path: str, **kwargs: Any) -> httpx.Response:
    """POST, waiting out the server's rate limit (429 + Retry-After) like a polite client."""
    for _ in range(20):
        response = http.post(path, **kwargs)
        if response.status_code != 429:
            response.raise_for_status()
            return response
        time.sleep(float(response.headers.get("Retry-After", "1")))
    raise AssertionError("still rate limited")


def test_pages_of_snippets_thumbnails_and_source_filter(start_server: Any, open_page: Any) -> None:
    server = start_server()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(30):
            image = Image.new("RGB", (16, 16), (i * 8, 255 - i * 8, (i * 37) % 256))
            post_patiently(http, "/v1/snippets", data={"text": f"swatch {i}", "source": f"swatch-{i}.png"},
                           files={"image": (f"swatch-{i}.png", png_bytes(image), "image/png")})
    time.sleep(server.settings.rate_limit_burst / server.settings.rate_limit_rps)  # a full bucket again
    page = open_page()
    page.goto(server.url + "/kb")
    page.wait_for_function("document.querySelectorAll('.snippet-card').length === 24")
    # 24 thumbnails + the list exceed the rate limit's burst of 20: the page retries the refused ones.
    page.wait_for_function(
        "[...document.querySelectorAll('.snippet-card img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=20_000,
    )
    first_page = set(card_sources(page))
    assert page.locator("#page-label").inner_text() == "Page 1"
    assert page.is_disabled("#prev-page")
    page.click("#next-page")
    page.wait_for_function("document.querySelectorAll('.snippet-card').length === 6")
    assert page.locator("#page-label").inner_text() == "Page 2"
    assert page.is_disabled("#next-page")
    assert first_page.isdisjoint(card_sources(page))
    assert len(first_page | set(card_sources(page))) == 30
    page.click("#prev-page")
    page.wait_for_function("document.querySelectorAll('.snippet-card').length === 24")

    page.fill("#filter-source", "swatch-7.png")
    page.press("#filter-source", "Enter")
    page.wait_for_function("document.querySelectorAll('.snippet-card').length === 1")
    assert card_sources(page) == ["swatch-7.png"]


def test_admin_key_is_needed_to_upload(start_server: Any, open_page: Any, sample_images: list[Image.Image]) -> None:
    admin, chat = "admin-key-for-browser-tests-0123", "chat-key-for-browser-tests-01234"
    server = start_server(auth_disabled=False, api_keys=f"admin:{admin},chat:{chat}")
    upload = [{"name": "photo.png", "mimeType": "image/png", "buffer": png_bytes(sample_images[3])}]
    page = open_page()
    page.goto(server.url + "/kb")
    page.get_by_role("alert").get_by_text("An API key is needed").wait_for()

    page.fill("#api-key", chat)
    page.click("#api-key-form button[type=submit]")
    page.get_by_text("The knowledge base is empty").wait_for()  # a chat key may browse…
    page.set_input_files("#upload-input", files=upload)
    outcome, text = wait_uploads(page, 1)["photo.png"]
    assert outcome == "skipped" and "not allowed" in text  # …but not upload

    page.fill("#api-key", admin)
    page.click("#api-key-form button[type=submit]")
    page.wait_for_function("document.querySelector('#api-key-note').textContent.includes('Key saved')")
    page.set_input_files("#upload-input", files=upload)
    page.wait_for_function("document.querySelectorAll('.upload-row[data-outcome]').length === 2")
    assert page.locator(".upload-row").first.get_attribute("data-outcome") == "ingested"
    # With auth on, thumbnails are fetched with the key (a plain <img src> would get a 401).
    thumb = page.locator(".snippet-card button.thumb img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())


def test_answers_rated_down_are_listed_with_their_sources(start_server: Any, open_page: Any) -> None:
    server = start_server()
    evil = '<img src=x onerror="window.__pwned = 1">'
    with httpx.Client(base_url=server.url, timeout=120) as http:
        r = http.post("/v1/snippets", data={"text": "The frame is covered for two years.", "source": "warranty.txt"})
        assert r.status_code == 201, r.text
        answers = []
        for question in ("How long is the frame covered?", f"Is the chain oiled? {evil}", "Any thumbs up?"):
            r = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": question}], "max_tokens": 8, "retrieval": {"k": 1}})
            assert r.status_code == 200, r.text
            answers.append(r.json())
        for answer, rating, comment in zip(answers, ("down", "down", "up"), ("It missed the frame.", evil, None)):
            body = {"completion_id": answer["id"], "rating": rating, **({"comment": comment} if comment else {})}
            assert http.post("/v1/feedback", json=body).status_code == 201

    page = open_page()
    page.goto(server.url + "/kb")
    page.wait_for_function("document.querySelectorAll('#down-list .down-rated-item').length === 2")
    items = page.locator("#down-list .down-rated-item")
    assert items.evaluate_all("els => els.map(e => e.dataset.completionId)") == [answers[1]["id"], answers[0]["id"]]
    newest, oldest = items.nth(0), items.nth(1)
    assert newest.locator(".down-rated-question").inner_text() == f"Is the chain oiled? {evil}"
    assert newest.locator(".down-rated-comment").inner_text() == evil  # shown as text, never as markup
    assert newest.locator("img").count() == 0 and page.evaluate("window.__pwned") is None
    assert oldest.locator(".down-rated-comment").inner_text() == "It missed the frame."
    kept = oldest.locator(".down-rated-sources li")
    assert kept.count() == 1 and "warranty.txt" in kept.inner_text() and "relevancy" in kept.inner_text()
    assert "knowledge base default" in oldest.locator(".down-rated-meta").inner_text()
    assert page.locator("#down-status").inner_text().startswith("2 answers rated down")
    assert page.locator("#down-more").is_hidden()


def test_kb_picker_switches_what_the_page_shows_and_where_uploads_go(start_server: Any, open_page: Any) -> None:
    server = start_server()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/v1/knowledge-bases", json={"name": "valves"}).status_code == 201
        post_patiently(http, "/v1/snippets", data={"text": "default note", "source": "default.txt"})
    page = open_page()
    page.goto(server.url + "/kb")
    page.wait_for_function("document.querySelectorAll('.snippet-card').length === 1")
    assert card_sources(page) == ["default.txt"]
    page.select_option("#kb-select", "vlmrag/valves")
    page.wait_for_function("document.querySelectorAll('.snippet-card').length === 0")
    page.set_input_files("#upload-input", files=[{"name": "valve.md", "mimeType": "text/markdown",
                                                  "buffer": b"# Valve\n\nThe ball valve V-20."}])
    page.wait_for_function("document.querySelector('.upload-row[data-outcome]') !== null")
    page.wait_for_function("document.querySelectorAll('.snippet-card').length >= 1", timeout=20_000)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/v1/stats", params={"kb": "valves"}).json()["count"] == 1
        assert http.get("/v1/stats").json()["count"] == 1  # the default KB got nothing
