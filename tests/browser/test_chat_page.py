"""The chat page (/) in headless Chromium against the real app: uvicorn, tiny CLIP, real tiny vLLM.

The tiny model's words are gibberish, so the tests check plumbing: what the page sends, that the
streamed text is exactly what the server streamed, that source cards match the final chunk. Where
the random model cannot produce a case (a citation [n], a 429, a mid-stream error), the response is
replaced at the network layer (``page.route``), exactly where the server's answer plugs in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support.fixtures_browser import PHONE
from tests.support.fixtures_server import LiveServer
from tests.support.media import noise_png, png_bytes, sse_body, sse_payloads

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

ANSWER_DONE = ".message.assistant .answer[aria-busy='false']"
# The tiny model's context is 1024 tokens: one retrieved snippet plus the question's image fit.
TINY_K = "1"


def streamed_text(payloads: list[dict[str, Any]]) -> str:
    return "".join(
        (choice.get("delta") or {}).get("content") or "" for p in payloads for choice in p.get("choices", [])
    )


def final_sources(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    finals = [p for p in payloads if p.get("sources") is not None]
    assert finals, "the stream carried no final chunk with sources"
    return finals[-1]["sources"]


def image_file(image: Image.Image, name: str) -> dict[str, Any]:
    return {"name": name, "mimeType": "image/png", "buffer": png_bytes(image)}


def chunk(content: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [{"index": 0, "delta": {"content": content}, "finish_reason": None}] if content is not None else []
    return {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "vlmrag",
            "choices": choices, **extra}


def wait_answered(page: Any, count: int = 1) -> None:
    """Wait until ``count`` answers finished streaming (or failed)."""
    page.wait_for_function(f"document.querySelectorAll(\"{ANSWER_DONE}\").length >= {count}")


def set_k(page: Any, k: str) -> None:
    page.click("#settings summary")
    page.fill("#opt-k", k)


def install_stream_pacer(page: Any, piece: int = 200, delay_ms: int = 15) -> None:
    """Re-deliver the chat stream's bytes in small pieces over time.

    On a loaded machine the tiny model's whole answer can reach the browser in one read, which
    says nothing about incremental rendering; pacing the real bytes makes "text appears while it
    streams" observable every time, and cutting at arbitrary byte offsets also splits SSE events
    (and UTF-8 characters) across reads, which the page's parser must handle.
    """
    page.add_init_script("""
      const realFetch = window.fetch;
      window.fetch = async (input, init) => {
        const resp = await realFetch(input, init);
        if (!String(input).includes('/v1/chat/completions') || !resp.ok || !resp.body) return resp;
        const reader = resp.body.getReader();
        const paced = new ReadableStream({
          async pull(controller) {
            const {value, done} = await reader.read();
            if (done) { controller.close(); return; }
            for (let i = 0; i < value.length; i += PIECE) {
              controller.enqueue(value.slice(i, i + PIECE));
              await new Promise((r) => setTimeout(r, DELAY_MS));
            }
          },
        });
        return new Response(paced, {status: resp.status, headers: resp.headers});
      };
    """.replace("PIECE", str(piece)).replace("DELAY_MS", str(delay_ms)))


def install_answer_recorder(page: Any) -> None:
    """Record every distinct answer text the page shows, to see that it grows while streaming."""
    page.add_init_script("""
      window.__answerStates = [];
      new MutationObserver(() => {
        const answers = document.querySelectorAll('.message.assistant .answer');
        const last = answers[answers.length - 1];
        if (!last) return;
        const text = last.textContent;
        const states = window.__answerStates;
        if (text && states[states.length - 1] !== text) states.push(text);
      }).observe(document, {subtree: true, childList: true, characterData: true});
    """)


def test_question_with_image_streams_answer_and_source_cards(
    live_server: LiveServer, open_page: Any, sample_images: list[Image.Image], screenshot_dir: Path
) -> None:
    page = open_page()
    install_stream_pacer(page)
    install_answer_recorder(page)
    page.goto(live_server.url + "/")
    assert page.title().startswith("vlmrag")
    assert page.locator("#api-key-form").is_hidden(), "auth is off: no key field"
    set_k(page, TINY_K)
    page.wait_for_selector("#opt-scorer[data-source='server']", state="attached")  # options from /v1/scorers

    # Two images attached, previews shown, one removed again before sending.
    page.set_input_files("#image-input", files=[image_file(sample_images[0], "gradient.png"),
                                                image_file(sample_images[2], "checker.png")])
    previews = page.locator("#attachments .attachment img")
    previews.nth(1).wait_for()
    assert previews.count() == 2
    page.get_by_role("button", name="Remove checker.png").click()
    assert previews.count() == 1
    assert page.locator("#attachments").inner_text().startswith("gradient.png")

    page.fill("#question", "What does this gradient show?")
    with page.expect_response("**/v1/chat/completions") as response_info:
        page.press("#question", "Enter")
    wait_answered(page)
    # The previews are gone and the question box is ready for the next turn.
    assert page.locator("#attachments .attachment").count() == 0
    assert page.evaluate("document.activeElement.id") == "question"
    response = response_info.value
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")

    sent = response.request.post_data_json
    assert sent["stream"] is True
    last = sent["messages"][-1]
    assert last["role"] == "user"
    assert last["content"][0] == {"type": "text", "text": "What does this gradient show?"}
    images = [part for part in last["content"] if part["type"] == "image_url"]
    assert len(images) == 1 and images[0]["image_url"]["url"].startswith("data:image/png;base64,")
    # The scorer select was built from GET /v1/scorers, the server's default selected.
    assert sent["retrieval"] == {"enabled": True, "scorer": live_server.settings.rerank_scorer, "k": 1}

    payloads = sse_payloads(response.text())
    text = streamed_text(payloads)
    assert text, "the tiny model streamed no text"
    answer = page.locator(".message.assistant .answer").last
    assert answer.text_content() == text, "the page shows exactly the streamed text"
    deltas = sum(1 for p in payloads for c in p.get("choices", []) if (c.get("delta") or {}).get("content"))
    states = page.evaluate("window.__answerStates")
    assert deltas >= 2, "the tiny model streamed a single token: nothing to check"
    assert len(states) >= 2, f"the answer appeared at once, not while streaming: {states!r}"
    assert all(text.startswith(state) for state in states), "the text only ever grew"
    assert states[-1] == text

    sources = final_sources(payloads)
    kept = [s for s in sources if s["kept"]]
    dropped = [s for s in sources if not s["kept"]]
    assert kept, "the knowledge base has samples and threshold 0: something is kept"
    cards = page.locator(".message.assistant .sources .source-card.is-kept")
    assert cards.count() == len(kept)
    first = kept[0]
    first_card = page.locator(f"#t1-src-{first['index']}")
    assert f"CLIP {first['clip_score']:.3f}" in first_card.inner_text()
    assert first["source"] in first_card.inner_text()
    if dropped:
        toggle = page.get_by_label(f"Show dropped candidates ({len(dropped)})")
        assert page.locator(".dropped-list").is_hidden()
        toggle.check()
        assert page.locator(".dropped-list .source-card").count() == len(dropped)
        toggle.uncheck()
    timings = page.locator(".message.assistant .timings").inner_text()
    assert "ms" in timings or " s" in timings

    # An image source: its thumbnail loads, and a click enlarges it in a dialog.
    image_card = page.locator(".source-card.is-kept:has(button.thumb)").first
    thumb_img = image_card.locator("button.thumb img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb_img.element_handle())
    image_card.locator("button.thumb").click()
    dialog = page.locator("#image-dialog")
    assert dialog.is_visible()
    page.wait_for_function("() => document.querySelector('#image-dialog-img').naturalWidth > 0")
    page.keyboard.press("Escape")
    assert dialog.is_hidden()

    page.click("#settings summary")  # fold the settings away for the screenshot
    page.focus("#question")

    page.screenshot(path=str(screenshot_dir / "chat-desktop.png"))


def test_second_turn_sends_history_and_retrieval_options(live_server: LiveServer, open_page: Any) -> None:
    page = open_page()
    page.goto(live_server.url + "/")
    page.click("#settings summary")
    page.fill("#opt-k", TINY_K)
    page.fill("#opt-threshold", "0")
    page.wait_for_selector("#opt-scorer[data-source='server']", state="attached")
    assert page.locator("#opt-scorer option").evaluate_all("os => os.map(o => o.value)") == ["vlm", "rerank", "evidence", "clip", "none"]
    # no VLMRAG_RANKER_URL in the test settings: rerank is listed, marked, and cannot be picked
    rerank = page.locator("#opt-scorer option[value='rerank']")
    assert rerank.evaluate("o => o.disabled") is True and rerank.inner_text() == "rerank (not configured)"
    page.select_option("#opt-scorer", "none")

    page.fill("#question", "How long is the warranty?")
    with page.expect_response("**/v1/chat/completions") as first_info:
        page.click("#send")
    wait_answered(page)
    first_answer = page.locator(".message.assistant .answer").last.text_content()
    first_kept = [s for s in final_sources(sse_payloads(first_info.value.text())) if s["kept"]]
    assert len(first_kept) == 1, "k=1 was applied by the server (its default is 3)"
    assert first_info.value.request.post_data_json["retrieval"] == {
        "enabled": True, "scorer": "none", "k": 1, "threshold": 0,
    }

    page.fill("#question", "And for the frame?")
    with page.expect_response("**/v1/chat/completions") as second_info:
        page.click("#send")
    wait_answered(page, 2)
    messages = second_info.value.request.post_data_json["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == [{"type": "text", "text": "How long is the warranty?"}]
    assert messages[1]["content"] == first_answer
    assert messages[2]["content"] == [{"type": "text", "text": "And for the frame?"}]

    # Settings survive a reload (kept in the browser), and "New conversation" forgets the history.
    page.reload()
    assert page.input_value("#opt-k") == TINY_K
    page.wait_for_selector("#opt-scorer[data-source='server']", state="attached")
    assert page.input_value("#opt-scorer") == "none"
    page.click("#new-chat")
    assert page.locator(".message").count() == 0


def test_citations_link_to_cards_and_untrusted_text_stays_text(live_server: LiveServer, open_page: Any) -> None:
    """A crafted answer citing [1] and [2] over real snippets; markup in it must not become HTML."""
    with httpx.Client(base_url=live_server.url) as http:
        snippets = {s["id"]: s for s in http.get("/v1/snippets", params={"limit": 50}).json()["items"]}
    image_snippet = snippets[live_server.snippet_ids[0]]
    text_snippet = snippets[live_server.snippet_ids[4]]

    def source(item: dict[str, Any], index: int | None, kept: bool, reason: str | None = None) -> dict[str, Any]:
        return {"id": item["id"], "index": index, "kind": item["kind"], "text": item["text"], "source": item["source"],
                "page": None, "image_url": item["image_url"], "thumbnail_url": item["thumbnail_url"],
                "clip_score": 0.31, "relevancy": 0.9 if kept else 0.1, "kept": kept, "reason": reason}

    hostile = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
    events = [chunk("The gradient is blue and red [1]. "), chunk("Warranty: two years [2]. "), chunk(hostile),
              chunk(sources=[source(image_snippet, 1, True), source(text_snippet, 2, True),
                             source(snippets[live_server.snippet_ids[5]], None, False, "relevancy 0.10 < 0.50")],
                    degraded=[], timings={"embed": 3.0, "generate": 40.0})]
    page = open_page()
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=sse_body(events)))
    page.goto(live_server.url + "/")
    page.fill("#question", "colours?")
    page.click("#send")
    wait_answered(page)

    answer = page.locator(".answer").last
    assert answer.text_content().endswith(hostile), "markup is shown as text"
    assert answer.locator("img, b").count() == 0
    assert page.evaluate("window.__pwned") is None
    cites = answer.locator("a.cite")
    assert cites.all_text_contents() == ["[1]", "[2]"], answer.inner_html()
    cites.nth(1).click()
    assert page.evaluate("document.activeElement.id") == "t1-src-2"
    assert "faq.txt" in page.locator("#t1-src-2").inner_text()
    assert "embed 3.0 ms · generate 40 ms" in page.locator(".timings").inner_text()
    page.get_by_label("Show dropped candidates (1)").check()
    assert "Why dropped: relevancy 0.10 < 0.50" in page.locator(".dropped-list").inner_text()


def test_error_bodies_become_clear_messages(live_server: LiveServer, open_page: Any) -> None:
    page = open_page()
    replies: list[dict[str, Any]] = [
        {"status": 429, "headers": {"Retry-After": "7"},
         "body": {"error": {"message": "rate limit exceeded", "type": "rate_limit_error", "param": None,
                            "code": "rate_limited"}}},
        {"status": 503, "headers": {"Retry-After": "3"},
         "body": {"error": {"message": "the model server is unavailable", "type": "server_error",
                            "param": None, "code": "model_unavailable"}}},
    ]

    def reply(route: Any) -> None:
        r = replies.pop(0)
        route.fulfill(status=r["status"], headers={"Content-Type": "application/json", **r["headers"]},
                      body=json.dumps(r["body"]))

    page.route("**/v1/chat/completions", reply)
    page.goto(live_server.url + "/")
    page.fill("#question", "anything")
    page.click("#send")
    error = page.locator(".turn-error").last
    error.wait_for()
    assert error.inner_text() == "Slow down: too many requests. Try again in 7 s. (rate limit exceeded)"
    assert page.input_value("#question") == "anything", "the question is given back for a retry"
    page.click("#send")
    page.locator(".turn-error").nth(1).wait_for()
    assert page.locator(".turn-error").nth(1).inner_text().startswith(
        "The service is busy or unavailable right now. Try again in 3 s.")

    # A failure in the middle of a stream keeps the partial answer and shows the error.
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"},
        body=sse_body([chunk("Partial answer"), {"error": {"message": "model stopped responding",
                                                           "type": "server_error", "code": "upstream"}}])))
    page.click("#send")
    page.locator(".turn-error").nth(2).wait_for()
    assert page.locator(".answer").last.text_content() == "Partial answer"
    assert "model stopped responding" in page.locator(".turn-error").nth(2).inner_text()


def test_oversized_image_shows_413_message(start_server: Any, open_page: Any) -> None:
    server = start_server(limit_image_bytes=20_000)
    big = noise_png(120)
    assert len(big) > 20_000
    page = open_page()
    page.goto(server.url + "/")
    page.set_input_files("#image-input", files=[{"name": "huge.png", "mimeType": "image/png", "buffer": big}])
    page.fill("#question", "what is this?")
    with page.expect_response("**/v1/chat/completions") as info:
        page.click("#send")
    assert info.value.status == 413
    error = page.locator(".turn-error").last
    error.wait_for()
    assert error.inner_text().startswith("Too large: ")
    assert page.locator("#attachments .attachment").count() == 1, "the image is given back"


def test_api_key_field_appears_when_auth_is_on(start_server: Any, open_page: Any) -> None:
    key = "chat-key-for-browser-tests-0123456789"
    server = start_server(auth_disabled=False, api_keys=f"chat:{key}")
    page = open_page()
    page.goto(server.url + "/")
    key_field = page.get_by_label("API key")
    key_field.wait_for()
    page.fill("#question", "hello?")
    page.click("#send")
    page.locator(".turn-error").wait_for()
    assert page.locator(".turn-error").inner_text().startswith("An API key is needed")

    key_field.fill(key)
    page.click("#api-key-form button[type=submit]")
    page.wait_for_function("document.querySelector('#api-key-note').textContent.includes('Key saved')")
    with page.expect_response("**/v1/chat/completions") as info:
        page.click("#send")
    assert info.value.status == 200
    assert info.value.request.headers["authorization"] == f"Bearer {key}"
    wait_answered(page, 2)
    assert page.locator(".turn-error:not([hidden])").count() == 1, "only the keyless attempt failed"
    # The key is remembered by this browser across reloads.
    page.reload()
    key_field.wait_for()
    assert page.input_value("#api-key") == key


def test_phone_width_layout(live_server: LiveServer, open_page: Any, screenshot_dir: Path,
                            sample_images: list[Image.Image]) -> None:
    page = open_page(*PHONE)
    page.goto(live_server.url + "/")
    set_k(page, TINY_K)
    page.click("#settings summary")  # fold the settings away again
    page.set_input_files("#image-input", files=[image_file(sample_images[1], "stripes.png")])
    page.fill("#question", "Which snippet has stripes?")
    page.click("#send")
    wait_answered(page)
    page.locator(".source-card").first.wait_for()
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px at phone width"
    for control in ("#question", "#send", "#attach"):
        box = page.locator(control).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE[0], f"{control} is off screen"
    page.screenshot(path=str(screenshot_dir / "chat-phone.png"))


def test_thumbs_record_a_rating_and_a_comment(live_server: LiveServer, open_page: Any) -> None:
    page = open_page()
    page.goto(live_server.url + "/")
    set_k(page, TINY_K)
    question = "Which thumb should I press? (feedback test)"
    page.fill("#question", question)
    with page.expect_response("**/v1/chat/completions") as response_info:
        page.press("#question", "Enter")
    wait_answered(page)
    payloads = sse_payloads(response_info.value.text())
    completion_id = payloads[0]["id"]

    bar = page.get_by_role("group", name="Rate this answer")
    down = bar.get_by_role("button", name="Bad answer")
    assert down.get_attribute("aria-pressed") == "false"
    for button in (down, bar.get_by_role("button", name="Good answer")):  # drawn icons, no emoji font needed
        icon = button.locator("svg.icon")
        assert icon.locator("path").count() == 2
        box = icon.bounding_box()
        assert box and box["width"] >= 16 and box["height"] >= 16
    with page.expect_response("**/v1/feedback") as rated:
        down.click()
    assert rated.value.status == 201
    assert rated.value.request.post_data_json == {"completion_id": completion_id, "rating": "down"}
    bar.get_by_text("Thanks, recorded.").wait_for()
    assert down.get_attribute("aria-pressed") == "true"
    assert bar.get_by_role("button", name="Good answer").get_attribute("aria-pressed") == "false"

    page.get_by_label("Comment on this answer").fill("It should cite the manual.")
    with page.expect_response("**/v1/feedback") as commented:
        page.get_by_role("button", name="Send comment").click()
    assert commented.value.status == 201
    bar.get_by_text("Comment recorded").wait_for()

    with httpx.Client(base_url=live_server.url, timeout=30) as http:  # auth is off: any caller is admin
        items = http.get("/v1/feedback", params={"rating": "down"}).json()["items"]
    mine = [i for i in items if i["completion_id"] == completion_id]
    assert len(mine) == 1, items
    assert mine[0]["comment"] == "It should cite the manual."
    assert mine[0]["answer"]["question"] == question
    assert mine[0]["answer"]["answer"] == streamed_text(payloads)
    assert [s["id"] for s in mine[0]["answer"]["sources"]] == [s["id"] for s in final_sources(payloads)]


def test_kb_picker_lists_the_keys_kbs_and_the_chat_uses_the_one_picked(start_server: Any, open_page: Any) -> None:
    server = start_server()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/v1/knowledge-bases", json={"name": "pumps", "display_name": "Pumps"}).status_code == 201
        r = http.post("/v1/snippets", params={"kb": "pumps"}, data={"text": "PUMPS ONLY seal kit", "source": "p.txt"})
        assert r.status_code == 201
        http.post("/v1/snippets", data={"text": "DEFAULT ONLY note", "source": "d.txt"})
    page = open_page()
    page.goto(server.url + "/")
    page.click("#settings summary")
    page.wait_for_function("document.querySelectorAll('#opt-kb option').length === 2")
    assert page.locator("#opt-kb option").all_inner_texts() == ["default", "pumps"]
    assert page.is_visible("#opt-kb")
    page.select_option("#opt-kb", "vlmrag/pumps")
    page.fill("#opt-k", TINY_K)
    page.fill("#question", "which seal?")
    with page.expect_response("**/v1/chat/completions") as info:
        page.click("#send")
    wait_answered(page)
    assert info.value.request.post_data_json["model"] == "vlmrag/pumps"
    sources = final_sources(sse_payloads(info.value.text()))
    assert [s["text"] for s in sources] == ["PUMPS ONLY seal kit"]
    page.reload()  # the pick is kept in the browser
    page.wait_for_function("document.querySelector('#opt-kb').value === 'vlmrag/pumps'")


def test_unsupported_sentences_are_marked_with_the_token_no_source_has(
    live_server: LiveServer, open_page: Any, screenshot_dir: Path,
) -> None:
    """A crafted answer whose second sentence names a part the cited manual does not list.

    The answer comes from the server's own check (``POST /v1/verify`` over real snippets), so the
    page is shown exactly what a stream's final chunk carries; a bold heading in mathematical letters
    (outside the BMP, drawn by DejaVu) makes the code-point offsets differ from JavaScript's UTF-16 ones.
    """
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        created = http.post("/v1/snippets", data={"text": "Error E-417: pump overheat. Switch off for 2 min, "
                                                          "then replace module QX-7731.", "source": "manual.md"})
        assert created.status_code in (200, 201), created.text
        manual = created.json()["snippet"]
        answer = ("\U0001D400\U0001D40D\U0001D412\U0001D416\U0001D404\U0001D411: E-417 means the pump overheated [1]. Replace module QX-7713 and wait 20 min [1]. "
                  "Call us if it persists.")
        try:
            checked = http.post("/v1/verify", json={"answer": answer, "snippet_ids": [manual["id"]]})
        finally:  # the live server is shared by the session: leave its collection as the other tests expect
            assert http.delete(f"/v1/snippets/{manual['id']}").status_code == 200
        assert checked.status_code == 200, checked.text
        verification = checked.json()
    assert [c["supported"] for c in verification["claims"]] == [True, False, None]
    source = {"id": manual["id"], "index": 1, "kind": manual["kind"], "text": manual["text"], "source": "manual.md",
              "page": None, "image_url": None, "thumbnail_url": None, "clip_score": 0.42, "relevancy": 0.91,
              "kept": True, "reason": None}
    final = {k: v for k, v in verification.items() if k not in ("degraded", "timings")}
    events = [chunk(answer[:30]), chunk(answer[30:]),
              chunk(sources=[source], degraded=[], timings={"verify": 0.4}, verification=final)]
    page = open_page()
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=sse_body(events)))
    page.goto(live_server.url + "/")
    page.fill("#question", "My pump shows E-417, what now?")
    page.click("#send")
    wait_answered(page)

    answer_box = page.locator(".answer").last
    assert answer_box.text_content() == answer, "marking changes no text"
    marked = answer_box.locator(".claim.unsupported")
    assert marked.count() == 1
    assert marked.text_content() == "Replace module QX-7713 and wait 20 min [1]."
    assert marked.get_attribute("title") == "Not found in the sources: QX-7713, 20 min"
    assert marked.locator("mark.missing-token").all_text_contents() == ["QX-7713", "20 min"]
    assert answer_box.locator("a.cite").all_text_contents() == ["[1]", "[1]"], "citations still link"
    note = page.locator(".verify-note")
    assert note.inner_text() == "1 sentence is not supported by its sources: no source contains QX-7713, 20 min."
    page.screenshot(path=str(screenshot_dir / "chat-verify.png"))
