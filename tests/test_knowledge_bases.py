"""Knowledge bases per team or customer: CRUD, keys bound to KBs, and isolation on every route.

The heart is the matrix: every route × {own KB, other KB, no KB} × {chat key, admin key, key bound elsewhere},
checking the status and that no body ever carries another KB's snippet id, text, image or count.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from server.app import create_app
from server.auth import hash_key
from server.settings import Settings
from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_server import running_client
from tests.support.media import png_bytes

ADMIN = "admin-key-unbound-0123456789"
PUMPS_CHAT = "chat-key-pumps-0123456789ab"
PUMPS_ADMIN = "admin-key-pumps-0123456789a"
VALVES_CHAT = "chat-key-valves-0123456789a"
KEYS = ",".join([
    f"admin:sha256:{hash_key(ADMIN)}",
    f"chat@pumps:sha256:{hash_key(PUMPS_CHAT)}",
    f"admin@pumps,default:sha256:{hash_key(PUMPS_ADMIN)}",  # a comma-listed binding inside the comma list
    f"chat@valves:sha256:{hash_key(VALVES_CHAT)}",
])
MARK = {"pumps": "PUMPSECRET impeller seal", "valves": "VALVESECRET ball valve", "default": "DEFAULTSECRET"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def png(color: tuple[int, int, int]) -> bytes:
    return png_bytes(Image.new("RGB", (48, 40), color))


@pytest.fixture
async def tenants(settings: Settings, knowledge_base, fake_vllm: FakeVLLM) -> AsyncIterator[dict[str, Any]]:
    changed = settings.model_copy(update={"auth_disabled": False, "api_keys": KEYS,
                                          "rate_limit_auth_failures_burst": 1000})
    app = create_app(changed, knowledge_base=knowledge_base, vllm_transport=httpx.MockTransport(fake_vllm))
    async with running_client(app) as client:
        for name in ("pumps", "valves"):
            r = await client.post("/v1/knowledge-bases", headers=auth(ADMIN),
                                  json={"name": name, "display_name": name.title(), "system_prompt": f"Only {name}."})
            assert r.status_code == 201, r.text
        ids: dict[str, str] = {}
        for i, name in enumerate(("pumps", "valves", "default")):
            r = await client.post("/v1/snippets", params={"kb": name}, headers=auth(ADMIN),
                                  data={"text": MARK[name], "source": f"{name}.txt"},
                                  files={"image": ("p.png", png((40 * i, 90, 200)), "image/png")})
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
        yield {"client": client, "ids": ids, "app": app}


def leaks(body: str, own: str) -> list[str]:
    """The other KBs' marks or ids found in a response body."""
    return [m for name, m in MARK.items() if name != own and m in body]


def routes(kb: str | None, target: str) -> list[tuple[str, str, dict[str, Any], str]]:
    """(method, path, request kwargs, scope) of every KB route, asking for ``kb`` (None: not named)."""
    params = {"kb": kb} if kb else {}
    chat_body: dict[str, Any] = {"messages": [{"role": "user", "content": "seal"}], "retrieval": {"scorer": "clip"}}
    if kb:
        chat_body["retrieval"]["kb"] = kb
    listed = [
        ("GET", "/v1/snippets", {"params": params}, "chat"),
        ("GET", f"/v1/snippets/{target}", {"params": params}, "chat"),
        ("GET", f"/v1/snippets/{target}/image", {"params": params}, "chat"),
        ("GET", f"/v1/snippets/{target}/thumbnail", {"params": params}, "chat"),
        ("POST", "/v1/search", {"params": params, "json": {"text": "seal", "scorer": "clip"}}, "chat"),
        ("POST", "/v1/chat/completions", {"json": chat_body}, "chat"),
        ("POST", "/v1/ask", {"data": {"question": "seal", "scorer": "clip", **params}}, "chat"),
        ("GET", "/v1/stats", {"params": params}, "admin"),
        ("POST", "/v1/snippets", {"params": params, "data": {"text": "new note", "source": "n.txt"}}, "admin"),
        ("POST", "/v1/ingest/files", {"params": params,
                                      "files": [("files", ("a.md", b"# A note\n\nabout seals", "text/markdown"))]},
         "admin"),
        ("DELETE", f"/v1/snippets/{target}", {"params": params}, "admin"),  # last: it removes the target
    ]
    if kb:
        listed.insert(-1, ("GET", f"/v1/knowledge-bases/{kb}", {}, "admin"))
        listed.insert(-1, ("GET", f"/v1/knowledge-bases/{kb}/optimize", {}, "admin"))
        listed.insert(-1, ("POST", f"/v1/knowledge-bases/{kb}/optimize", {"json": {}}, "admin"))  # not_needed: 200
    return listed


# caller → (key, the KBs it is bound to in order, scopes)
CALLERS = {"chat key": (PUMPS_CHAT, ("pumps",), {"chat"}),
           "admin key": (PUMPS_ADMIN, ("pumps", "default"), {"chat", "admin"}),
           "key bound elsewhere": (VALVES_CHAT, ("valves",), {"chat"})}


@pytest.mark.parametrize("which", ["own", "other", "none"])
@pytest.mark.parametrize("caller", sorted(CALLERS))
async def test_isolation_matrix(tenants: dict[str, Any], caller: str, which: str) -> None:
    """Seen from the pumps tenant: "own" asks for pumps, "other" for valves, "none" names no KB."""
    client, ids = tenants["client"], tenants["ids"]
    key, bound, scopes = CALLERS[caller]
    kb = {"own": "pumps", "other": "valves", "none": None}[which]
    effective = kb or ("default" if "default" in bound else bound[0])  # server/knowledge_bases.py::choose_kb
    may = effective in bound
    for method, path, kwargs, scope in routes(kb, ids[effective]):
        r = await client.request(method, path, headers=auth(key), **kwargs)
        expected = {403} if scope not in scopes else ({200, 201} if may else {404})
        assert r.status_code in expected, (caller, which, method, path, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        text = r.text if not r.headers.get("content-type", "").startswith("image/") else ""
        own = effective if may else "-"  # a refusal carries no KB's content at all
        assert not leaks(text, own), (caller, which, path, text[:300])
        assert not [i for name, i in ids.items() if name != own and i in text], (caller, which, path)


async def test_every_body_carries_only_its_own_kb(tenants: dict[str, Any]) -> None:
    client, ids = tenants["client"], tenants["ids"]
    r = await client.post("/v1/search", params={"kb": "pumps"}, headers=auth(PUMPS_CHAT),
                          json={"text": "anything", "scorer": "clip", "pool": 20, "k": 20})
    candidates = r.json()["candidates"]
    assert [c["id"] for c in candidates] == [ids["pumps"]]
    assert candidates[0]["thumbnail_url"].endswith("?kb=pumps")
    r = await client.get("/v1/stats", params={"kb": "pumps"}, headers=auth(ADMIN))
    assert r.json()["count"] == 1 and r.json()["by_source"] == {"pumps.txt": 1}
    r = await client.post("/v1/chat/completions", headers=auth(PUMPS_CHAT),
                          json={"model": "vlmrag/pumps", "messages": [{"role": "user", "content": "seal"}],
                                "retrieval": {"scorer": "clip"}})
    assert r.status_code == 200 and {s["id"] for s in r.json()["sources"]} == {ids["pumps"]}


async def test_a_thumbnail_url_of_one_kb_does_not_open_with_another_kbs_key(tenants: dict[str, Any]) -> None:
    client, ids = tenants["client"], tenants["ids"]
    r = await client.get(f"/v1/snippets/{ids['pumps']}", params={"kb": "pumps"}, headers=auth(PUMPS_CHAT))
    url = r.json()["thumbnail_url"]
    assert (await client.get(url, headers=auth(PUMPS_CHAT))).status_code == 200
    for key in (VALVES_CHAT,):
        denied = await client.get(url, headers=auth(key))
        assert denied.status_code == 404 and "PUMP" not in denied.text
        # nor by dropping the kb parameter: the snippet is not in the key's own KB
        assert (await client.get(url.split("?")[0], headers=auth(key))).status_code == 404


async def test_model_id_picks_the_kb_and_models_lists_the_bound_ones(tenants: dict[str, Any]) -> None:
    client = tenants["client"]
    models = (await client.get("/v1/models", headers=auth(PUMPS_CHAT))).json()["data"]
    assert [m["id"] for m in models] == ["vlmrag", "vlmrag/pumps"]
    models = (await client.get("/v1/models", headers=auth(ADMIN))).json()["data"]
    assert [m["id"] for m in models] == ["vlmrag", "vlmrag/pumps", "vlmrag/valves"]
    r = await client.post("/v1/chat/completions", headers=auth(PUMPS_CHAT),
                          json={"model": "vlmrag/valves", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    r = await client.post("/v1/chat/completions", headers=auth(ADMIN),
                          json={"model": "vlmrag/valves", "messages": [{"role": "user", "content": "x"}],
                                "retrieval": {"kb": "pumps"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kb"


async def test_kb_system_prompt_and_defaults_apply(tenants: dict[str, Any], fake_vllm: FakeVLLM) -> None:
    client = tenants["client"]
    r = await client.patch("/v1/knowledge-bases/pumps", headers=auth(ADMIN),
                           json={"retrieval": {"k": 1, "scorer": "none"}})
    assert r.status_code == 200 and r.json()["retrieval"] == {"k": 1, "scorer": "none"}
    r = await client.post("/v1/search", params={"kb": "pumps"}, headers=auth(PUMPS_CHAT), json={"text": "seal"})
    assert r.json()["scorer"] == "none"
    await client.post("/v1/chat/completions", headers=auth(PUMPS_CHAT),
                      json={"messages": [{"role": "user", "content": "seal"}]})
    assert "Only pumps." in fake_vllm.answer_bodies[-1]["messages"][0]["content"]


async def test_a_search_reads_the_kbs_defaults_of_now_though_its_encode_starts_before(tenants: dict[str, Any]) -> None:
    """/v1/search starts the text's encode before it reads the KB's defaults, guessing from the last ones
    it read: a change of mode (here by this replica; by another one the same) counts at the next search."""
    client = tenants["client"]

    async def search() -> dict[str, Any]:
        r = await client.post("/v1/search", params={"kb": "pumps"}, headers=auth(PUMPS_CHAT),
                              json={"text": "pump seal", "scorer": "clip"})
        assert r.status_code == 200, r.text
        return r.json()

    def lists(body: dict[str, Any]) -> set[str]:
        return {name for c in body["candidates"] for name in c["vector_scores"]}

    first = await search()  # no defaults yet: hybrid, the encode started early
    assert first["timings"]["embed"] > 0 and "text->image" in lists(first)
    for mode, embeds in (("lexical", False), ("dense", True), ("lexical", False)):
        r = await client.patch("/v1/knowledge-bases/pumps", headers=auth(ADMIN), json={"retrieval": {"mode": mode}})
        assert r.status_code == 200, r.text
        body = await search()
        assert (body["timings"]["embed"] > 0) is embeds, (mode, body["timings"])
        assert all(name.endswith("->lexical") for name in lists(body)) is not embeds, (mode, lists(body))
        again = await search()  # now the guess is right: the same answer
        assert [(c["id"], c["clip_score"], c["vector_scores"]) for c in again["candidates"]] == \
            [(c["id"], c["clip_score"], c["vector_scores"]) for c in body["candidates"]]


async def test_crud_and_delete_removes_points_and_blobs(tenants: dict[str, Any], settings: Settings) -> None:
    client, ids = tenants["client"], tenants["ids"]
    listed = (await client.get("/v1/knowledge-bases", headers=auth(ADMIN))).json()["items"]
    assert [k["name"] for k in listed] == ["default", "pumps", "valves"]
    assert [k["name"] for k in (await client.get("/v1/knowledge-bases", headers=auth(PUMPS_ADMIN))).json()["items"]] \
        == ["default", "pumps"]
    assert (await client.post("/v1/knowledge-bases", headers=auth(PUMPS_ADMIN), json={"name": "x"})).status_code == 403
    assert (await client.post("/v1/knowledge-bases", headers=auth(ADMIN), json={"name": "pumps"})).status_code == 409
    assert (await client.post("/v1/knowledge-bases", headers=auth(ADMIN), json={"name": "Bad Name"})).status_code == 400
    blob_dir = Path(settings.blob_dir) / "kbs" / "valves"
    assert any(p.is_file() for p in blob_dir.rglob("*"))
    r = await client.delete("/v1/knowledge-bases/valves", headers=auth(ADMIN))
    assert r.status_code == 200 and r.json() == {"name": "valves", "deleted": True, "snippets": 1}
    assert not blob_dir.exists()
    assert (await client.get(f"/v1/snippets/{ids['valves']}", params={"kb": "valves"},
                             headers=auth(ADMIN))).status_code == 404
    assert (await client.delete("/v1/knowledge-bases/default", headers=auth(ADMIN))).status_code == 409
    # the default KB and the others are untouched
    assert (await client.get(f"/v1/snippets/{ids['pumps']}/image", params={"kb": "pumps"},
                             headers=auth(ADMIN))).status_code == 200
    assert (await client.get(f"/v1/snippets/{ids['default']}/image", headers=auth(ADMIN))).status_code == 200


async def test_same_content_in_two_kbs_gets_different_ids(tenants: dict[str, Any]) -> None:
    client = tenants["client"]
    made = []
    for kb in ("pumps", "valves"):
        r = await client.post("/v1/snippets", params={"kb": kb}, headers=auth(ADMIN),
                              data={"text": "the very same note", "source": "same.txt"})
        made.append(r.json()["id"])
    assert made[0] != made[1]


async def test_two_kbs_ingest_at_once(tenants: dict[str, Any]) -> None:
    client = tenants["client"]

    async def ingest(kb: str) -> list[int]:
        codes = []
        for i in range(6):
            r = await client.post("/v1/snippets", params={"kb": kb}, headers=auth(ADMIN),
                                  data={"text": f"{kb} note {i}", "source": f"{kb}-{i}.txt"})
            codes.append(r.status_code)
        return codes

    results = await asyncio.gather(ingest("pumps"), ingest("valves"))
    assert all(code == 201 for codes in results for code in codes)
    for kb in ("pumps", "valves"):
        stats = (await client.get("/v1/stats", params={"kb": kb}, headers=auth(ADMIN))).json()
        assert stats["count"] == 7 and all(src.startswith(kb) for src in stats["by_source"])


async def test_an_existing_collection_is_the_default_kb(settings: Settings, knowledge_base, fake_vllm: FakeVLLM) -> None:
    """No migration: today's collection answers as `default` with no catalog row."""
    await knowledge_base.add_snippet(None, "old data", "old.txt")
    app = create_app(settings, knowledge_base=knowledge_base, vllm_transport=httpx.MockTransport(fake_vllm))
    async with running_client(app) as client:
        r = await client.get("/v1/snippets", params={"kb": "default"})
        assert [s["text"] for s in r.json()["items"]] == ["old data"]
        assert json.loads((await client.get("/v1/knowledge-bases/default")).text)["count"] == 1


def test_cli_kb_lifecycle_and_global_kb_option(cli_env: Path, tmp_path: Path, capsys) -> None:
    from server.cli import main

    assert main(["kb", "create", "pumps", "--display-name", "Pumps", "--retrieval", '{"k": 2}']) == 0
    assert main(["kb", "create", "pumps"]) == 1  # exists: Conflict, one line
    assert "exists" in capsys.readouterr().err
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "seal.md").write_text("# Seal\n\nThe P-100 impeller seal.\n")
    assert main(["--kb", "pumps", "ingest", str(notes)]) == 0
    capsys.readouterr()
    assert main(["--kb", "pumps", "stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 1
    assert main(["stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 0  # the default KB is separate
    assert main(["kb", "list", "--json"]) == 0
    assert [k["name"] for k in json.loads(capsys.readouterr().out)] == ["default", "pumps"]
    assert main(["kb", "show", "pumps"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["count"] == 1 and shown["retrieval"] == {"k": 2} and shown["display_name"] == "Pumps"
    assert main(["--kb", "nope", "stats"]) == 1
    assert main(["kb", "delete", "pumps", "--yes"]) == 0
    assert main(["--kb", "pumps", "stats"]) == 1  # gone


async def test_kb_metrics_and_rate_limit(settings: Settings, knowledge_base, fake_vllm: FakeVLLM) -> None:
    changed = settings.model_copy(update={"rate_limit_kb_rps": 0.001, "rate_limit_kb_burst": 3})
    app = create_app(changed, knowledge_base=knowledge_base, vllm_transport=httpx.MockTransport(fake_vllm))
    async with running_client(app) as client:
        assert (await client.post("/v1/knowledge-bases", json={"name": "pumps"})).status_code == 201
        r = await client.post("/v1/snippets", params={"kb": "pumps"}, data={"text": "a seal", "source": "s.txt"})
        assert r.status_code == 201
        statuses = [(await client.post("/v1/chat/completions", json={
            "model": "vlmrag/pumps", "messages": [{"role": "user", "content": "seal"}]})).status_code
            for _ in range(3)]
        assert statuses == [200, 200, 429]  # the snippet add was the burst's first token
        assert (await client.post("/v1/search", json={"text": "seal"})).status_code == 200  # default KB: own budget
        metrics = (await client.get("/metrics")).text
        assert 'vlmrag_kb_requests_total{kb="pumps",kind="answer"} 2.0' in metrics
        assert 'vlmrag_kb_ingested_snippets_total{kb="pumps"} 1.0' in metrics
        assert 'vlmrag_kb_tokens_total{kb="pumps",kind="completion"}' in metrics
        assert 'vlmrag_kb_requests_total{kb="default",kind="search"} 1.0' in metrics


async def test_two_kbs_ingest_at_once_on_the_qdrant_client_adapter(settings: Settings, fake_vllm: FakeVLLM,
                                                                   tmp_path: Path) -> None:
    """The same concurrency on qdrant-client (local mode stands in for a server: one client per KB)."""
    changed = settings.model_copy(update={"qdrant_url": ":memory:"})
    app = create_app(changed, vllm_transport=httpx.MockTransport(fake_vllm))
    async with running_client(app) as client:
        for name in ("pumps", "valves"):
            assert (await client.post("/v1/knowledge-bases", json={"name": name})).status_code == 201

        async def ingest(kb: str) -> list[int]:
            return [(await client.post("/v1/snippets", params={"kb": kb},
                                       data={"text": f"{kb} note {i}", "source": f"{kb}-{i}.txt"})).status_code
                    for i in range(5)]

        results = await asyncio.gather(ingest("pumps"), ingest("valves"))
        assert all(code == 201 for codes in results for code in codes)
        for kb in ("pumps", "valves"):
            stats = (await client.get("/v1/stats", params={"kb": kb})).json()
            assert stats["count"] == 5 and stats["store"].startswith("qdrant")
            assert all(src.startswith(kb) for src in stats["by_source"])
        r = await client.delete("/v1/knowledge-bases/valves")
        assert r.status_code == 200 and r.json()["snippets"] == 5
