"""``vlmrag ingest PATH... [--tag T]... [--server URL] [--batch-size N] [--coco-images DIR] [--json]``.

PATHs: folders (images + sidecar captions, text/Markdown, PDFs, JSONL), ``.jsonl`` manifests, COCO
captions ``.json`` files, PDFs, single images or text files (see ``retriever/ingest/readers.py``).

A progress bar (rate, ETA) is drawn on a terminal, a plain summary otherwise; failures are printed
as ``<file>: <reason>`` on stderr. Exit status: 0 unless nothing could be ingested *and* some items
were bad (then 1); an empty input is 0 with a warning.

The embedded store belongs to one process. When ``vlmrag serve`` holds it, this command ingests
through the running service's ``POST /v1/snippets`` instead (found from ``DATA_DIR/server.json``,
or given with ``--server URL``), sending ``Authorization: Bearer $VLMRAG_API_KEY`` when that is set,
and each item's ``extra`` metadata (COCO captions, sidecar keys) as the JSON form field ``extra``.

``--json`` prints one object: ``{"seen", "ingested", "skipped_existing", "failed", "failures":
[{"source", "key", "reason", "status"}], "timings": {stage: seconds}, "first_batch_s", "total",
"via": "local" | "<server URL>"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from retriever.errors import StoreUnavailable, Unauthorized, UpstreamUnavailable, VlmragError
from retriever.ingest.pipeline import IngestReport
from retriever.ingest.readers import IngestItem, read_paths
from retriever.ingest.rules import IngestRules, snippet_tags
from retriever.progress import ProgressBar
from server.knowledge_bases import DEFAULT_KB, kb_of
from server.settings import Settings
from server.wiring import build_knowledge_base

API_KEY_ENV = "VLMRAG_API_KEY"
REMOTE_CONCURRENCY = 4


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "ingest", help="Add images, text, JSONL, COCO captions or PDFs to the knowledge base.",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--tag", action="append", default=[], help="Tag every snippet (repeatable).")
    parser.add_argument("--server", metavar="URL", help="Ingest through a running vlmrag service.")
    parser.add_argument("--batch-size", type=int, default=None, help="Embedding/upsert batch size.")
    parser.add_argument("--coco-images", type=Path, default=None, metavar="DIR",
                        help="Image folder for a COCO captions JSON (default: guessed next to it).")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON (stable keys).")
    parser.add_argument("--no-ocr", action="store_true",
                        help="Do not read the text in images and scanned pages (VLMRAG_OCR_ENABLED=false).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.no_ocr:
        settings = settings.model_copy(update={"ocr_enabled": False})
    items = list(read_paths(args.paths, coco_images_dir=args.coco_images))  # cheap: no image is read
    show_bar = sys.stderr.isatty() and not args.json
    if args.server:
        return _finish(await _remote(args.server, items, args, settings, show_bar), args, args.server)
    try:
        kb = await build_knowledge_base(settings, batch_size=args.batch_size)
    except StoreUnavailable as exc:
        url = None if settings.qdrant_url else find_running_server(settings.data_dir)
        if url is None:
            raise StoreUnavailable(
                f"{exc.message}. If `vlmrag serve` holds this data dir, ingest through it: "
                f"`vlmrag ingest --server http://HOST:PORT {' '.join(args.paths)}`"
            ) from exc
        print(f"the embedded store is held by the running vlmrag service at {url}; "
              "ingesting through its API", file=sys.stderr)
        return _finish(await _remote(url, items, args, settings, show_bar), args, url)
    try:
        with ProgressBar("ingesting", len(items), enabled=show_bar) as bar:
            report = await kb.ingest(items, tags=args.tag, progress=lambda r: _show(bar, r), total=len(items))
    finally:
        await kb.close()
    return _finish(report, args, "local")


def find_running_server(data_dir: Path) -> str | None:
    """The URL in ``DATA_DIR/server.json`` if its pid is alive, else None."""
    from server.commands.serve import read_run_file  # uvicorn: only when needed

    info = read_run_file(data_dir)
    return None if info is None else str(info["url"]).rstrip("/")


def _show(bar: ProgressBar, report: IngestReport) -> None:
    bar.update(report.done, throughput=report.ingested)  # the rate counts snippets stored


def _finish(report: IngestReport, args: argparse.Namespace, via: str) -> int:
    if args.json:
        print(json.dumps({**report.to_dict(), "via": via}, indent=2))
    else:
        rate = report.ingested / report.timings["total"] if report.timings.get("total") else 0.0
        print(f"ingested {report.ingested}, already present {report.skipped_existing}, failed {report.failed} "
              f"(of {report.seen} items) in {report.timings.get('total', 0):.1f} s ({rate:.1f} snippets/s)"
              + ("" if via == "local" else f" via {via}"))
    for failure in report.failures:
        print(f"{failure.key}: {failure.reason}", file=sys.stderr)
    if report.seen == 0:
        print("warning: nothing to ingest in the given paths", file=sys.stderr)
    nothing_landed = report.ingested == 0 and report.skipped_existing == 0
    return 1 if nothing_landed and report.failed > 0 else 0


# --- through a running service ---------------------------------------------------------------------


async def _remote(
    url: str, items: list[IngestItem], args: argparse.Namespace, settings: Settings, show_bar: bool
) -> IngestReport:
    """POST every item to ``{url}/v1/snippets``; item errors are reported, auth/connection errors raise."""
    report = IngestReport(total=len(items))
    started = time.perf_counter()
    headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get(API_KEY_ENV)) else {}
    limit = asyncio.Semaphore(REMOTE_CONCURRENCY)
    # `vlmrag --kb NAME`: the service is asked for that KB (its blob namespace is "kbs/NAME/")
    kb = None if (name := kb_of(settings)) == DEFAULT_KB else name
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, params={"kb": kb} if kb else None,
                                 timeout=httpx.Timeout(120.0, connect=5.0)) as client:
        with ProgressBar("ingesting", len(items), enabled=show_bar) as bar:

            async def one(item: IngestItem) -> None:
                async with limit:
                    await _post_item(client, item, args.tag, settings, report)
                    _show(bar, report)

            report.seen = len(items)
            await asyncio.gather(*(one(item) for item in items))
    report.timings["total"] = time.perf_counter() - started
    return report


async def _post_item(
    client: httpx.AsyncClient, item: IngestItem, tags: list[str], settings: Settings, report: IngestReport
) -> None:
    """Check and read one item under the ingestion rules, POST it; its input errors go to ``report``."""
    rules = IngestRules(max_image_bytes=settings.limit_image_bytes)
    try:  # the checks of a local run, so a bad item is reported the same way (and never sent)
        text, image = await asyncio.to_thread(rules.read, item)
    except VlmragError as exc:
        report.fail(item, exc.message, exc.status_code)
        return
    # tags as repeated form fields (FastAPI's list[str] Form); each value is one tag.
    data: dict[str, Any] = {"text": text, "source": item.source, "tags": snippet_tags(item.tags, tags)}
    if item.page is not None:
        data["page"] = str(item.page)
    if item.extra:
        # COCO captions, sidecar/JSONL metadata: one JSON object form field (a server that does not
        # know the field ignores it, as FastAPI does with undeclared form fields).
        data["extra"] = json.dumps(item.extra, ensure_ascii=False, default=str)
    files = None
    if image is not None:
        files = {"image": (item.image_name or "image", image, "application/octet-stream")}
    for attempt in range(5):
        try:
            response = await client.post("/v1/snippets", data=data, files=files)
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"cannot reach the vlmrag service at {client.base_url}: {exc}") from exc
        if response.status_code == 429 and attempt < 4:
            await asyncio.sleep(float(response.headers.get("retry-after", "1") or 1))
            continue
        break
    if response.status_code in (401, 403):
        raise Unauthorized(
            f"the vlmrag service at {client.base_url} refused the request ({response.status_code}): "
            f"set {API_KEY_ENV} to a key with the admin scope (`vlmrag keygen --scope admin`)"
        )
    if response.status_code == 404:
        raise UpstreamUnavailable(f"the service at {client.base_url} has no POST /v1/snippets endpoint")
    if response.status_code >= 500:
        raise UpstreamUnavailable(f"the vlmrag service at {client.base_url} failed: "
                                  f"{response.status_code} {_error_message(response)}")
    if response.status_code >= 400:
        report.fail(item, _error_message(response), response.status_code)
        return
    body = response.json()
    if body.get("created", True):
        report.ingested += 1
        report.ids.append(str(body.get("id")))
    else:
        report.skipped_existing += 1


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("error", {}).get("message") or body)
    except ValueError:
        return response.text[:200] or response.reason_phrase
