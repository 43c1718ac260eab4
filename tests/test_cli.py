"""``vlmrag ingest / search / stats / delete`` through ``server.cli.main`` (in-process, real stores)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from server.cli import main
from tests.support.bad_images import OK, write_bad_images
from tests.test_ingest import save_images


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


def test_ingest_search_stats_delete(cli_env: Path, sample_images, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "kb"
    paths = save_images(folder, sample_images[:4])
    paths[0].with_suffix(".txt").write_text("a wiring diagram of the pump")
    (folder / "notes.md").write_text("# Safety\nWear gloves.\n")

    code = main(["ingest", str(folder), "--tag", "demo"])
    out = capsys.readouterr().out
    assert code == 0 and "ingested 5, already present 0, failed 0" in out

    code, report = run_json(capsys, "ingest", str(folder), "--json")
    assert code == 0
    assert {"seen", "ingested", "skipped_existing", "failed", "failures", "timings", "via"} <= report.keys()
    assert (report["ingested"], report["skipped_existing"], report["via"]) == (0, 5, "local")

    code, stats = run_json(capsys, "stats", "--json")
    assert code == 0
    assert set(stats) == {"count", "by_kind", "by_source", "embedder", "store", "collection", "blobs", "lexical",
                          "passage", "text_embedder"}
    assert stats["count"] == 5 and stats["by_kind"] == {"image": 3, "image_text": 1, "text": 1}
    assert stats["by_source"]["kb/notes.md"] == 1 and stats["embedder"].startswith("open_clip:")

    code, found = run_json(capsys, "search", "a wiring diagram of the pump", "--json", "--limit", "3")
    assert code == 0 and set(found) == {"query", "results", "timings_ms"}
    assert len(found["results"]) == 3
    hit = next(r for r in found["results"] if r["source"] == "kb/img0.png")
    assert set(hit) == {"rank", "id", "score", "kind", "source", "text", "tags", "image_ref", "thumb_ref",
                        "page", "vector_scores"}
    assert hit["tags"] == ["demo"] and hit["vector_scores"]["text->text"] == pytest.approx(1.0, abs=1e-3)

    code, found = run_json(capsys, "search", "--image", str(paths[2]), "--kind", "image", "--json")
    assert found["results"][0]["source"] == "kb/img2.png"
    assert found["query"]["filters"]["kind"] == ["image"]

    code, found = run_json(capsys, "search", "gloves", "--source", "kb/notes.md", "--json")
    assert [r["source"] for r in found["results"]] == ["kb/notes.md"]

    code, deleted = run_json(capsys, "delete", "--source", "kb/notes.md", "--json")
    assert (code, deleted) == (0, {"deleted": 1})
    code, deleted = run_json(capsys, "delete", "--id", hit["id"], "--json")
    assert (code, deleted) == (0, {"deleted": 1})
    assert main(["delete", "--id", hit["id"]]) == 1  # gone: NotFound
    code, stats = run_json(capsys, "stats", "--json")
    assert stats["count"] == 3


def test_plain_output(cli_env: Path, sample_images, tmp_path: Path, capsys) -> None:
    save_images(tmp_path / "p", sample_images[:2])
    assert main(["ingest", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert main(["search", "anything", "--limit", "1"]) == 0
    assert " 1. " in capsys.readouterr().out
    assert main(["stats"]) == 0
    assert "snippets:   2" in capsys.readouterr().out


def test_exit_codes(cli_env: Path, sample_images, tmp_path: Path, capsys) -> None:
    corpus = write_bad_images(tmp_path / "bad")
    only_bad = [str(path) for path, status in corpus.values() if status != OK]
    code = main(["ingest", *only_bad, str(tmp_path / "missing.png")])
    err = capsys.readouterr().err
    assert code == 1
    assert "bomb_20000x20000.png: image has too many pixels" in err
    assert "missing.png: no such file or directory" in err

    good = save_images(tmp_path / "good", sample_images[:1])
    assert main(["ingest", str(good[0]), *only_bad[:2]]) == 0  # something landed: success

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["ingest", str(empty)]) == 0
    assert "nothing to ingest" in capsys.readouterr().err

    assert main(["search"]) == 2  # no query: InvalidInput
    assert main(["search", "x", "--image", str(tmp_path / "bad" / "truncated.png")]) == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.subprocess
def test_ingest_goes_through_the_running_service(cli_env: Path, sample_images, tmp_path: Path, capsys) -> None:
    """`vlmrag serve` holds the embedded store: ingest finds it via server.json and uses its API."""
    import uvicorn

    from server.app import create_app
    from tests.support.settings import bare_settings

    folder = tmp_path / "via-api"
    paths = save_images(folder, sample_images[:3])
    paths[0].with_suffix(".txt").write_text("caption through the API")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")

    settings = bare_settings(auth_disabled=True, backup_dir=str(tmp_path / "server-backups"))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        # Without server.json the CLI explains what to do instead of dying on the lock.
        assert main(["ingest", str(folder)]) == 1
        assert "--server http://HOST:PORT" in capsys.readouterr().err

        cli_env.joinpath("server.json").write_text(json.dumps({"url": f"http://127.0.0.1:{port}",
                                                               "pid": os.getpid()}))
        code, report = run_json(capsys, "ingest", str(folder), "--tag", "api", "--json")
        assert code == 0
        assert (report["ingested"], report["failed"], report["via"]) == (3, 1, f"http://127.0.0.1:{port}")
        assert report["failures"][0]["status"] == 422
        code, report = run_json(capsys, "ingest", str(folder), "--json", "--server", f"http://127.0.0.1:{port}")
        assert (report["ingested"], report["skipped_existing"]) == (0, 3)
        # optimize too: the server builds HNSW on a copy in a child process and swaps it in
        code, built = run_json(capsys, "optimize", "--force", "--json")
        assert code == 0 and built["via"] == f"http://127.0.0.1:{port}", built
        assert built["built"] and built["points"] == 3 and built["indexed_vectors"] > 0  # 0 before
        # and backup: the server writes it into its backup folder, the CLI moves it to OUT
        code, archive = run_json(capsys, "backup", str(tmp_path / "out" / "kb.vlmrag.tar"), "--json")
        assert code == 0 and archive["via"] == f"http://127.0.0.1:{port}", archive
        assert archive["path"] == str(tmp_path / "out" / "kb.vlmrag.tar") and Path(archive["path"]).is_file()
        assert archive["kbs"]["default"]["points"] == 3 and not list((tmp_path / "server-backups").iterdir())
    finally:
        server.should_exit = True
        thread.join(30)
    code, stats = run_json(capsys, "stats", "--json")  # the lock is free again
    assert stats["count"] == 3 and stats["by_kind"] == {"image": 2, "image_text": 1}
    code, found = run_json(capsys, "search", "caption through the API", "--tag", "api", "--json")
    assert len(found["results"]) == 3 and all(r["tags"] == ["api"] for r in found["results"])


def test_stale_server_file_is_ignored(cli_env: Path, tmp_path: Path) -> None:
    from server.commands.ingest import find_running_server

    cli_env.mkdir(parents=True, exist_ok=True)
    (cli_env / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:1/", "pid": 2**22 + 12345}))
    assert find_running_server(cli_env) is None
    (cli_env / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:1/", "pid": os.getpid()}))
    assert find_running_server(cli_env) == "http://127.0.0.1:1"
    (cli_env / "server.json").write_text("{not json")
    assert find_running_server(cli_env) is None


async def test_remote_ingest_sends_extra_metadata_as_a_json_form_field(
    cli_env: Path, sample_images, tmp_path: Path
) -> None:
    """Sidecar metadata survives the trip through ``POST /v1/snippets`` (parsed by a real multipart parser)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from retriever.ingest.pipeline import IngestReport
    from retriever.ingest.readers import IngestItem, read_paths
    from server.commands.ingest import _post_item
    from tests.support.settings import bare_settings

    folder = tmp_path / "meta"
    paths = save_images(folder, sample_images[:1])
    paths[0].with_suffix(".json").write_text(json.dumps({"caption": "a pump", "captions": ["a pump", "éclair"],
                                                         "coco_image_id": 7}))
    (folder / "plain.txt").write_text("no metadata here")
    received: list[dict[str, object]] = []

    async def snippets(request: Request) -> JSONResponse:
        form = await request.form()
        received.append({key: form.getlist(key) for key in form})
        return JSONResponse({"id": f"id-{len(received)}", "created": True}, status_code=201)

    app = Starlette(routes=[Route("/v1/snippets", snippets, methods=["POST"])])
    report = IngestReport(total=3)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kb") as client:
        for item in [*read_paths([str(folder)]), IngestItem(source="api", key="bare", text="bare")]:
            await _post_item(client, item, ["run"], bare_settings(auth_disabled=True), report)
    assert report.ingested == 3 and report.failed == 0
    by_text = {str(form["text"][0]): form for form in received}
    with_meta = by_text["a pump"]
    assert json.loads(str(with_meta["extra"][0])) == {"captions": ["a pump", "éclair"], "coco_image_id": 7}
    assert with_meta["tags"] == ["run"] and "image" in with_meta
    assert json.loads(str(by_text["no metadata here"]["extra"][0])) == {"passage": 0}  # the text reader's
    assert "extra" not in by_text["bare"]  # no empty field for an item without metadata


def test_every_command_registers_and_help_lists_them() -> None:
    from server.cli import COMMANDS, build_parser

    parser = build_parser()  # imports every command module for real
    for name in COMMANDS:
        assert parser.parse_args([name, *_minimal_args(name)]).command == name


def _minimal_args(name: str) -> list[str]:
    return {"ingest": ["x"], "delete": ["--source", "s"], "eval": ["--coco", "a.json", "--out", "o"],
            "reindex": ["--drop-old"], "kb": ["list"], "feedback": ["export"], "backup": ["out.tar"],
            "restore": ["in.tar"]}.get(name, [])


@pytest.mark.subprocess
def test_light_commands_do_not_import_torch() -> None:
    """`vlmrag --help` and `vlmrag keygen` import only their own module, not torch/qdrant-client."""
    import subprocess
    import sys

    code = ("import sys; from server.cli import main; rc = main(['keygen', '--quiet']); "
            "heavy = sorted(m for m in ('torch', 'open_clip', 'qdrant_client') if m in sys.modules); "
            "print(rc, heavy)")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []"


def test_global_options_work_after_the_command(cli_env: Path, tmp_path: Path, capsys) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "seal.md").write_text("# Seal\n\nThe P-100 impeller seal.\n")
    assert main(["kb", "create", "pumps"]) == 0
    assert main(["ingest", "--kb", "pumps", str(notes)]) == 0  # as people type it
    assert run_json(capsys, "stats", "--json", "--kb", "pumps")[1]["count"] == 1
    assert run_json(capsys, "--kb", "pumps", "stats", "--json")[1]["count"] == 1  # before the command, as ever
    assert run_json(capsys, "stats", "--json")[1]["count"] == 0  # the default KB is another one
    assert main(["stats", "--kb", "nope"]) == 1  # honoured there: no such KB

    other = tmp_path / "other-data"
    assert main(["ingest", str(notes), "--data-dir", str(other)]) == 0
    assert run_json(capsys, "--data-dir", str(other), "stats", "--json")[1]["count"] == 1
    assert run_json(capsys, "stats", "--json")[1]["count"] == 0  # VLMRAG_DATA_DIR's store got nothing


def test_global_options_after_the_command_parse_as_before_it() -> None:
    from server.cli import build_parser

    parse = build_parser().parse_args
    assert (parse(["--kb", "a", "ingest", "x"]).kb, parse(["ingest", "x", "--kb", "a"]).kb) == ("a", "a")
    assert parse(["--kb", "a", "ingest", "x", "--kb", "b"]).kb == "b"  # the later one wins
    assert parse(["--kb", "a", "-v", "stats"]).kb == "a"  # not given after: the one before stays
    assert (parse(["stats"]).verbose, parse(["stats", "-v"]).verbose, parse(["kb", "list", "-v"]).verbose) \
        == (False, True, True)
    assert parse(["kb", "create", "p", "--data-dir", "d"]).data_dir == "d"  # an action's parser too
    export = parse(["feedback", "export", "--kb", "pumps"])  # the command's own --kb stays its own
    assert (export.feedback_kb, export.kb) == ("pumps", None)


def test_other_libraries_logs_are_quiet_unless_verbose(cli_env: Path, capsys) -> None:
    import logging

    from server.cli import cli_logging

    before = logging.getLogger().level
    with cli_logging(verbose=False):
        logging.getLogger("server.some").info("ours at info")
        logging.getLogger("retriever.some").debug("ours at debug")
        logging.getLogger().info("theirs at info")  # open_clip logs like this, on the root logger
        logging.getLogger("httpx").info("theirs too")
        logging.getLogger("urllib3").warning("theirs, a warning")
    err = capsys.readouterr().err
    assert "ours at info" in err and "theirs, a warning" in err
    assert "ours at debug" not in err and "theirs at info" not in err and "theirs too" not in err
    with cli_logging(verbose=True):
        logging.getLogger().info("theirs at info")
        logging.getLogger("retriever.some").debug("ours at debug")
    err = capsys.readouterr().err
    assert "theirs at info" in err and "ours at debug" in err
    assert logging.getLogger().level == before  # left as found (main runs in-process in tests)

    assert main(["search", "a pump", "--json"]) == 0  # loads the (tiny) CLIP model through open_clip
    assert "Parsing model identifier" not in capsys.readouterr().err
    assert main(["search", "a pump", "--json", "-v"]) == 0
    assert "Parsing model identifier" in capsys.readouterr().err


def test_search_resolves_its_plan_like_the_api(cli_env: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """`vlmrag search` takes VLMRAG_RETRIEVAL_MODE (the settings' default), and --mode over it."""
    folder = tmp_path / "kb"
    folder.mkdir()
    (folder / "codes.md").write_text("# Faults\nError E-417 means the pump overheated.\n\n# Filter\nClean it monthly.\n")
    (folder / "other.md").write_text("# Cable\nUse the grey power cable.\n")
    assert main(["ingest", str(folder)]) == 0

    def lists(found: dict) -> set[str]:
        return {name for r in found["results"] for name in r["vector_scores"]}

    monkeypatch.setenv("VLMRAG_RETRIEVAL_MODE", "lexical")
    code, found = run_json(capsys, "search", "E-417 overheated", "--json")
    assert code == 0 and found["query"]["mode"] == "lexical"
    assert found["results"] and lists(found) == {"text->lexical"}
    assert "E-417" in found["results"][0]["text"]

    code, found = run_json(capsys, "search", "E-417 overheated", "--json", "--mode", "dense")
    assert code == 0 and found["query"]["mode"] == "dense"
    assert found["results"] and not any(name.endswith("->lexical") for name in lists(found))

    monkeypatch.setenv("VLMRAG_RETRIEVAL_MODE", "hybrid")
    code, found = run_json(capsys, "search", "E-417 overheated", "--json")
    assert {"text->lexical", "text->text"} <= lists(found)
