"""Evaluation outputs: results.json, results.md (markdown table) and pr_curve.png (matplotlib, Agg)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retriever.eval.metrics import FAMILY_CLIP_THRESHOLD, FAMILY_RERANK, FAMILY_TOPK, MethodResult

DEFINITIONS = (
    "Micro-averaged over queries: precision = Σ relevant kept / Σ kept (— when nothing is kept), "
    "recall = Σ relevant kept / Σ relevant (relevant images outside the CLIP pool count as missed), "
    "F1 = 2PR/(P+R). One relevant image per caption, so recall = hit rate. Latency per query: CLIP "
    "methods = retrieval; re-rank methods = retrieval + relevancy scoring."
)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(results: Sequence[MethodResult]) -> str:
    """One row per method."""
    lines = [
        "| method | precision | recall | F1 | hit rate | mean kept | empty | p50 ms | p95 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {_fmt(r.precision)} | {_fmt(r.recall)} | {_fmt(r.f1)} | {_fmt(r.hit_rate)} | "
            f"{r.mean_kept:.2f} | {_fmt(r.empty_rate)} | {_fmt(r.latency_p50_ms, 1)} | {_fmt(r.latency_p95_ms, 1)} |"
        )
    return "\n".join(lines)


def render_markdown(summary: dict[str, Any], results: Sequence[MethodResult]) -> str:
    """The results.md document: dataset, CLIP recall@n, score paths, the table, definitions."""
    ds = summary.get("dataset", {})
    lines = [
        "# vlmrag evaluation: COCO captions, text → image", "",
        f"- images ingested: {ds.get('images')}, queries evaluated: {ds.get('queries')}",
        (f"- pool N = {summary.get('pool')}, adaptive k = {summary.get('k')}, scorer = {summary.get('scorer')}"
         f" (model: {summary.get('rerank_model') or '—'})"),
        f"- CLIP embedder: {summary.get('embedder')}",
    ]
    recall = summary.get("clip_recall_at", {})
    if recall:
        lines.append("- CLIP recall@n: " + ", ".join(f"R@{n} {v:.3f}" for n, v in recall.items()))
    lines.append(f"- pool recall (ceiling for every method): {summary.get('pool_recall', 0.0):.3f}")
    if summary.get("score_paths"):
        lines.append("- scoring paths (candidates): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(summary["score_paths"].items())))
    if summary.get("degraded_queries"):
        lines.append(f"- queries whose re-rank degraded to clip: {summary['degraded_queries']}")
    lines += ["", markdown_table(results), "", DEFINITIONS, ""]
    return "\n".join(lines)


def plot_curves(results: Sequence[MethodResult], path: Path, title: str = "") -> None:
    """Precision and recall against the threshold (re-rank and CLIP map), fixed-k points marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_pr) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {FAMILY_RERANK: ("re-rank", "-", "tab:red"), FAMILY_CLIP_THRESHOLD: ("CLIP map", "--", "tab:purple")}
    for family, (label, style, colour) in styles.items():
        rows = sorted((r for r in results if r.family == family), key=lambda r: r.threshold or 0.0)
        if not rows:
            continue
        xs = [r.threshold for r in rows]
        ax_t.plot(xs, [r.precision if r.precision is not None else float("nan") for r in rows], style,
                  marker="o", color="tab:blue", label=f"{label} precision")
        ax_t.plot(xs, [r.recall for r in rows], style, marker="o", color="tab:orange", label=f"{label} recall")
        ax_pr.plot([r.recall for r in rows], [r.precision if r.precision is not None else float("nan")
                                               for r in rows], style, marker="o", color=colour, label=label)
    for r in (r for r in results if r.family == FAMILY_TOPK):
        ax_t.axhline(r.precision or 0.0, color="tab:gray", linestyle=":", linewidth=1)
        ax_t.annotate(f"{r.name} P", (1.0, r.precision or 0.0), xycoords=("axes fraction", "data"),
                      ha="right", va="bottom", fontsize=8, color="tab:gray")
        ax_pr.scatter([r.recall], [r.precision or 0.0], marker="s", s=50, zorder=3)
        ax_pr.annotate(r.name, (r.recall, r.precision or 0.0), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax_t.set(xlabel="threshold", ylabel="score", title="precision / recall vs threshold (dotted: CLIP top-k precision)",
             ylim=(0, 1.05))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision vs recall (squares: CLIP top-k)",
              xlim=(0, 1.05), ylim=(0, 1.05))
    for ax in (ax_t, ax_pr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(out_dir: Path, summary: dict[str, Any], results: Sequence[MethodResult]) -> dict[str, Path]:
    """Write results.json, results.md and pr_curve.png into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plot": out_dir / "pr_curve.png"}
    document = {**summary, "definitions": DEFINITIONS, "methods": [r.to_dict() for r in results]}
    paths["json"].write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(summary, results), encoding="utf-8")
    plot_curves(results, paths["plot"], title=f"COCO captions, {summary.get('dataset', {}).get('queries')} queries")
    return paths
