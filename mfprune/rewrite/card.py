"""The pruned model's own model card (README.md) and its provenance chain.

The source's card describes the source (its expert count, its parameter count, its scores) and
is never copied. The card written instead says what the model was pruned from — every step when
a pruned model is pruned again — what each layer keeps, the criterion, budget and data
fingerprint of the plan, and the measured quality once a bench has run (``add_quality``, which
`mfprune shrink` calls).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mfprune.arch.layout import ModelLayout
from mfprune.errors import ModelError
from mfprune.plan import Kept, PrunePlan
from mfprune.rewrite.config_patch import change_text

CARD_FILE = "README.md"
QUALITY_HEADING = "## Measured quality"


def source_history(root: Path, provenance_file: str) -> list[dict[str, Any]]:
    """The provenance of every earlier prune of the model at ``root``, oldest first: the
    source's own history plus the source's provenance (empty for a model mfprune did not write)."""
    path = root / provenance_file
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(
            f"{path} is not readable JSON ({exc})",
            hint="this model was pruned by mfprune but its provenance is damaged: restore it "
            "or delete the file to start a new chain",
        ) from None
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("mfprune."):
        raise ModelError(
            f"{path} is not an mfprune provenance file",
            hint="restore it or delete the file to start a new chain",
        )
    history = data.get("history", [])
    if not isinstance(history, list):
        history = []
    step = {k: v for k, v in data.items() if k != "history"}
    return [*history, step]


def model_card(*, provenance: dict[str, Any], plan: PrunePlan, layout: ModelLayout) -> str:
    """Markdown of the card (front matter for hubs that read it, then the sections); the same
    inputs give the same bytes, wherever the model is written."""
    source = provenance["source"]
    history = provenance.get("history", [])
    meta = plan.meta
    lines = [
        "---",
        "tags: [mfprune, pruned, mixture-of-experts]",
        f"pruned_from: {json.dumps(history[0]['source']['path'] if history else source['path'])}",
        "---",
        "",
        f"# {layout.family}, pruned",
        "",
        f"A {layout.family} Mixture-of-Experts model pruned by mfprune "
        f"{provenance['mfprune_version']} from `{source['path']}` (fingerprint "
        f"`{source['fingerprint'][:16]}…`). Its own files: `mfprune_plan.json` (what each layer "
        "keeps) and `mfprune_provenance.json` (where it came from).",
        "",
        "## What was kept",
        "",
        *_kept_table(plan, layout),
        "",
    ]
    changes = provenance.get("config_changes", {})
    if changes:
        items = ", ".join(f"`{change_text(k, a, b)}`" for k, (a, b) in changes.items())
        lines += [f"Config changes: {items}.", ""]
    lines += ["## How it was chosen", "", *_how(meta), ""]
    if provenance.get("repair"):
        lines += [
            "The kept experts were then repaired on the task's data (`mfprune prune --repair`): "
            "their weights differ from the source's (details in `mfprune_provenance.json`).",
            "",
        ]
    lines += ["## Pruned from", "", *_chain(history, source), ""]
    lines += [QUALITY_HEADING, "", "Not measured yet: run `mfprune bench THIS --baseline "
              "SOURCE` (or `mfprune shrink`, which records it here).", ""]  # fmt: skip
    return "\n".join(lines)


def _kept_table(plan: PrunePlan, layout: ModelLayout) -> list[str]:
    parts: list[tuple[str, Kept, int, tuple[int, ...]]] = [
        ("experts", plan.experts, layout.experts.num_experts, layout.experts.layers)
    ]
    if layout.attention_experts is not None:
        a = layout.attention_experts
        parts.append(("attention experts", plan.attention_experts, a.num_experts, a.layers))
    if layout.heads is not None and plan.heads:
        parts.append(
            ("query heads", plan.heads, layout.heads.num_heads, tuple(range(layout.num_layers)))
        )
    head = "| layer | " + " | ".join(f"{name} kept" for name, *_ in parts) + " |"
    rows = [head, "|---:|" + "---|" * len(parts)]
    layers = sorted({layer for *_, ls in parts for layer in ls})
    for layer in layers:
        cells = []
        for _name, kept, total, part_layers in parts:
            if layer not in part_layers:
                cells.append("—")
            elif layer in kept:
                ids = kept[layer]
                cells.append(f"{len(ids)} of {total}: {' '.join(map(str, ids))}")
            else:
                cells.append(f"all {total}")
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    return rows


def _how(meta: dict[str, Any]) -> list[str]:
    if not meta:
        return ["A plan given by hand (`mfprune prune --plan`): no criterion or data recorded."]
    out = []
    if "criterion" in meta:
        options = meta.get("criterion_options") or {}
        extra = f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""
        out.append(f"- criterion: `{meta['criterion']}`{extra}")
    if meta.get("budget"):
        out.append(
            "- budget: " + ", ".join(f"`{k}` = {v}" for k, v in sorted(meta["budget"].items()))
        )
    stats = meta.get("stats") or {}
    if stats.get("data_fingerprint"):
        tokens = f" ({stats['tokens']:,} tokens)" if isinstance(stats.get("tokens"), int) else ""
        out.append(f"- task data fingerprint: `{stats['data_fingerprint'][:16]}…`{tokens}")
    return out or ["A plan with free-form metadata: see `mfprune_plan.json`."]


def _chain(history: list[dict[str, Any]], source: dict[str, Any]) -> list[str]:
    """Original first, then each pruned model in turn, this one's source last."""
    sources = [step["source"] for step in history] + [source]
    lines = []
    for i, s in enumerate(sources, 1):
        what = "the original" if i == 1 else f"pruned step {i - 1}"
        lines.append(f"{i}. `{s['path']}` ({what}, fingerprint `{s['fingerprint'][:16]}…`)")
    lines.append(f"{len(sources) + 1}. this model")
    return lines


def add_quality(card: Path, rows: list[tuple[str, str, str, str]], caption: str) -> None:
    """Replace the card's quality section with ``rows`` (metric, model, baseline, ratio)."""
    text = card.read_text(encoding="utf-8")
    head, _, _ = text.partition(QUALITY_HEADING)
    table = [
        "| metric | this model | source | ratio |",
        "|---|---:|---:|---:|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
    ]
    card.write_text(
        head + "\n".join([QUALITY_HEADING, "", *table, "", caption, ""]), encoding="utf-8"
    )
