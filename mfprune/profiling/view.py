"""What ``mfprune show`` shows: per layer, the most and least used experts and heads, and —
against a second profile (general text, say) — the experts specific to the task; as tables,
JSON, and a self-contained SVG / HTML heatmap (layers x experts).

Numbers, per layer (row) and expert or head (column):

* share: the expert's share of the layer's routed tokens, ``count / (tokens * K)`` (a row sums
  to 1; uniform routing gives 1/E). For heads: the head's share of the layer's head usage
  (Σ‖what the head writes‖).
* against OTHER: ``ratio = (share + ε) / (share_other + ε)`` with ε = 1% of the uniform share,
  so an expert OTHER never used still gets a finite ratio. Experts with the largest ratios
  are the task's own; ratios below 1 mark experts the task uses less than OTHER does.

The heatmap is written by this module (no plotting dependency): one SVG, each cell with a
tooltip (``<title>``) holding its numbers, a colour-scale legend; the HTML file wraps the same
SVG with a heading and the tables.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

import torch

from mfprune.errors import MfpruneError, StatsError
from mfprune.plan import PrunePlan
from mfprune.profiling.stats import ExpertStats, HeadStats, ProfileStats

_EPS_OF_UNIFORM = 0.01  # ε of the ratio, as a share of the uniform share 1/E
_RATIO_SPAN = 3.0  # the diverging colour scale spans log2 ratios -3 .. +3 (1/8x .. 8x)


@dataclass(frozen=True)
class Panel:
    """One heatmap: rows are layers, columns experts (or heads)."""

    kind: str  # "experts", "attention_experts" or "heads"
    column: str  # "expert" or "head"
    layers: tuple[int, ...]  # [L]
    share: torch.Tensor  # [L, N] float64, rows sum to 1 (0 for a layer that saw nothing)
    count: torch.Tensor | None  # [L, N] routed tokens (None for heads)
    other: torch.Tensor | None = None  # [L, N] OTHER's share (with --against)
    kept: dict[int, tuple[int, ...]] | None = None  # with --plan: layer -> kept ids

    def dropped(self, r: int, c: int) -> bool:
        """Whether the plan drops column ``c`` of row ``r`` (a layer it omits keeps all)."""
        if self.kept is None:
            return False
        ids = self.kept.get(self.layers[r])
        return ids is not None and c not in ids

    @property
    def title(self) -> str:
        return self.kind.replace("_", " ")

    def log2_ratio(self) -> torch.Tensor:
        """[L, N] log2 of (share + ε) / (other + ε); only with ``other``."""
        assert self.other is not None
        eps = _EPS_OF_UNIFORM / self.share.shape[1]
        return torch.log2((self.share + eps) / (self.other + eps))


@dataclass(frozen=True)
class View:
    """Everything ``mfprune show`` prints or draws."""

    name: str  # the stats file's name
    other_name: str | None
    stats: ProfileStats
    panels: tuple[Panel, ...]
    top: int

    def rows(self, panel: Panel) -> list[dict[str, Any]]:
        """Per layer: the ``top`` most and least used columns, the never-routed ones, and
        (against OTHER) the ``top`` most task-specific and most OTHER-specific."""
        out = []
        n = min(self.top, max(1, panel.share.shape[1] // 2))  # most and least never overlap
        ratio = panel.log2_ratio() if panel.other is not None else None
        for i, layer in enumerate(panel.layers):
            share = panel.share[i]
            order = torch.argsort(share, descending=True, stable=True).tolist()
            row: dict[str, Any] = {
                "layer": layer,
                "most": [[e, round(float(share[e]), 6)] for e in order[:n]],
                "least": [[e, round(float(share[e]), 6)] for e in order[::-1][:n]],
            }
            if panel.count is not None:
                row["never_routed"] = (panel.count[i] == 0).nonzero().flatten().tolist()
            if panel.kept is not None:
                row["dropped"] = [c for c in range(share.shape[0]) if panel.dropped(i, c)]
            if ratio is not None and panel.other is not None:
                by_ratio = torch.argsort(ratio[i], descending=True, stable=True).tolist()
                row["task_specific"] = [
                    self._compare(panel, i, e, ratio) for e in by_ratio[:n] if ratio[i, e] > 0
                ]
                row["other_specific"] = [
                    self._compare(panel, i, e, ratio) for e in by_ratio[::-1][:n] if ratio[i, e] < 0
                ]
            out.append(row)
        return out

    @staticmethod
    def _compare(panel: Panel, i: int, e: int, ratio: torch.Tensor) -> dict[str, Any]:
        assert panel.other is not None
        return {
            panel.column: e,
            "ratio": round(2 ** float(ratio[i, e]), 4),
            "share": round(float(panel.share[i, e]), 6),
            "other_share": round(float(panel.other[i, e]), 6),
        }

    def to_dict(self) -> dict[str, Any]:
        meta = self.stats.meta
        return {
            "stats": self.name,
            "against": self.other_name,
            "family": meta.family,
            "tokens": meta.tokens,
            "documents": meta.documents,
            "panels": [
                {
                    "kind": p.kind,
                    "layers": list(p.layers),
                    "share": _rounded(p.share),
                    **({"other_share": _rounded(p.other)} if p.other is not None else {}),
                    "rows": self.rows(p),
                }
                for p in self.panels
            ],
        }


def build_view(
    stats: ProfileStats,
    *,
    name: str,
    against: ProfileStats | None = None,
    other_name: str | None = None,
    top: int = 4,
    plan: PrunePlan | None = None,
) -> View:
    """Shares of every panel, compared with ``against`` when given; with ``plan``, each panel
    knows what the plan keeps (the heatmap marks what it drops).

    Raises:
        StatsError: ``against`` comes from another model, or covers other layers.
        MfpruneError: ``top`` < 1.
    """
    if top < 1:
        raise MfpruneError(f"--top must be at least 1, got {top}", hint="e.g. --top 4")
    if against is not None and against.meta.model_fingerprint != stats.meta.model_fingerprint:
        raise StatsError(
            f"{other_name} comes from another model than {name} (model fingerprint "
            f"{against.meta.model_fingerprint[:12]}… vs {stats.meta.model_fingerprint[:12]}…)",
            hint="compare two profiles of the same checkpoint, e.g. task data vs general text",
        )
    panels = []
    for kind in ("experts", "attention_experts", "heads"):
        mine = getattr(stats, kind)
        if mine is None:
            continue
        theirs = getattr(against, kind) if against is not None else None
        if against is not None and (theirs is None or _shape(theirs) != _shape(mine)):
            raise StatsError(
                f"{other_name} and {name} disagree on the {kind.replace('_', ' ')} (layers or "
                "counts) although they name the same model",
                hint="one of the files was edited; re-create it with `mfprune profile`",
            )
        share = _share(mine)
        panels.append(
            Panel(
                kind=kind,
                column="head" if kind == "heads" else "expert",
                layers=mine.layers,
                share=share,
                count=None if isinstance(mine, HeadStats) else mine.count,
                other=_share(theirs) if theirs is not None else None,
                kept=_plan_part(plan, kind, mine.layers, share.shape[1], name),
            )
        )
    return View(name=name, other_name=other_name, stats=stats, panels=tuple(panels), top=top)


def _plan_part(
    plan: PrunePlan | None, kind: str, layers: tuple[int, ...], n: int, name: str
) -> dict[int, tuple[int, ...]] | None:
    """The plan's kept ids for one panel, checked against the stats (fail closed)."""
    if plan is None:
        return None
    kept: dict[int, tuple[int, ...]] = getattr(plan, kind)
    problems = [f"layer {layer}" for layer in kept if layer not in layers]
    problems += [
        f"layer {layer} keeps id {i}" for layer, ids in kept.items() for i in ids if not 0 <= i < n
    ]
    if problems:
        raise StatsError(
            f"the plan does not fit {name}: {kind.replace('_', ' ')} of {', '.join(problems)} "
            f"(the stats have layers {', '.join(map(str, layers))} of {n} each)",
            hint="pass the plan made from this model (e.g. OUT/mfprune_plan.json of its prune)",
        )
    return kept


def _share(s: ExpertStats | HeadStats) -> torch.Tensor:
    total = s.usage if isinstance(s, HeadStats) else s.count.double()
    return total / total.sum(dim=1, keepdim=True).clamp_min(1e-300)


def _shape(s: ExpertStats | HeadStats) -> tuple[Any, ...]:
    t = s.usage if isinstance(s, HeadStats) else s.count
    return (s.layers, tuple(t.shape))


def _rounded(t: torch.Tensor) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in t]


# ------------------------------------------------------------------------------------ heatmap

_CELL_MAX, _CELL_MIN = 26.0, 5.0
_FONT = "font-family='ui-sans-serif,system-ui,sans-serif' font-size='11'"
_SEQUENTIAL = ((247, 251, 255), (107, 174, 214), (8, 48, 107))  # white -> blue (share)
_DIVERGING = ((33, 102, 172), (247, 247, 247), (178, 24, 43))  # blue <- white -> red (ratio)
_NEVER = "#d9d9d9"


def heatmap_svg(view: View) -> str:
    """Every panel stacked, each with its colour legend; cells carry tooltips."""
    parts, y, width = [], 8.0, 0.0
    for panel in view.panels:
        svg, w, h = _panel_svg(view, panel, y)
        parts.append(svg)
        y += h + 24
        width = max(width, w)
    title = html.escape(_title(view))
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{y:.0f}' "
        f"viewBox='0 0 {width:.0f} {y:.0f}' {_FONT}>\n<title>{title}</title>\n"
        f"<rect width='100%' height='100%' fill='white'/>\n" + "\n".join(parts) + "\n</svg>\n"
    )


def _title(view: View) -> str:
    meta = view.stats.meta
    head = f"{view.name}: {meta.family}, {meta.tokens:,} tokens"
    return f"{head} — against {view.other_name}" if view.other_name else head


def _panel_svg(view: View, panel: Panel, top_y: float) -> tuple[str, float, float]:
    rows, cols = panel.share.shape
    cell_w = max(_CELL_MIN, min(_CELL_MAX, 900.0 / cols))
    cell_h = max(_CELL_MIN + 3, min(_CELL_MAX, 640.0 / rows))
    left, top = 64.0, top_y + 64.0
    compare = panel.other is not None
    values = panel.log2_ratio() if compare else panel.share
    scale = _Scale.of(panel)
    heading, note = _panel_heading(view, panel)
    out = [
        f"<text x='8' y='{top_y + 14:.1f}' font-size='13' font-weight='600'>"
        f"{html.escape(heading)}</text>"
    ]
    if note:
        out.append(f"<text x='8' y='{top_y + 29:.1f}' fill='#555'>{html.escape(note)}</text>")
    label_every_col = max(1, math.ceil(12.0 / cell_w))
    label_every_row = max(1, math.ceil(12.0 / cell_h))
    for c in range(0, cols, label_every_col):
        x = left + (c + 0.5) * cell_w
        out.append(f"<text x='{x:.1f}' y='{top - 4:.1f}' text-anchor='middle'>{c}</text>")
    for r, layer in enumerate(panel.layers):
        y = top + r * cell_h
        if r % label_every_row == 0:
            out.append(
                f"<text x='{left - 6:.1f}' y='{y + cell_h / 2 + 4:.1f}' text-anchor='end'>"
                f"L{layer}</text>"
            )
        for c in range(cols):
            never = panel.count is not None and int(panel.count[r, c]) == 0 and not compare
            fill = _NEVER if never else scale.colour(float(values[r, c]))
            tip = html.escape(_tooltip(panel, r, c, values))
            out.append(
                f"<rect x='{left + c * cell_w:.1f}' y='{y:.1f}' width='{cell_w:.1f}' "
                f"height='{cell_h:.1f}' fill='{fill}' stroke='white' stroke-width='0.5'>"
                f"<title>{tip}</title></rect>"
            )
            if panel.dropped(r, c):
                out.append(_cross(left + c * cell_w, y, cell_w, cell_h))
    grid_w, grid_h = cols * cell_w, rows * cell_h
    never = panel.count is not None and not compare
    legend, legend_w = _legend(
        left + grid_w + 24, top, grid_h, scale, never, plan=panel.kept is not None
    )
    out.append(legend)
    axis = "expert" if panel.column == "expert" else "head"
    out.append(
        f"<text x='{left + grid_w / 2:.1f}' y='{top - 20:.1f}' text-anchor='middle' "
        f"fill='#555'>{axis}</text>"
    )
    heading, note = _panel_heading(view, panel)
    # ~8.2 px a character of the 13 px bold heading, ~6.6 of the 11 px note: the width fits both
    heading_w = 16 + max(8.2 * len(heading), 6.6 * len(note))
    width = max(left + grid_w + 24 + legend_w, heading_w)
    return "\n".join(out), width, top - top_y + max(grid_h, _legend_height(grid_h) + 40)


def _panel_heading(view: View, panel: Panel) -> tuple[str, str]:
    """(heading, note under it)."""
    what = "head usage" if panel.kind == "heads" else "routed tokens"
    notes = []
    if panel.other is None:
        heading = f"{panel.title}: share of each layer's {what}"
    else:
        heading = f"{panel.title}: share of {what} in {view.name} / in {view.other_name}"
        notes.append("red: the task's own, blue: used less by the task")
    if panel.kept is not None:
        notes.append("× = dropped by the plan")
    return heading, "; ".join(notes)


def _cross(x: float, y: float, w: float, h: float) -> str:
    """An × over a cell the plan drops."""
    m = min(w, h) * 0.22
    return (
        f"<path d='M{x + m:.1f},{y + m:.1f}L{x + w - m:.1f},{y + h - m:.1f}"
        f"M{x + w - m:.1f},{y + m:.1f}L{x + m:.1f},{y + h - m:.1f}' stroke='#333' "
        "stroke-width='1.2' pointer-events='none'/>"
    )


def _tooltip(panel: Panel, r: int, c: int, values: torch.Tensor) -> str:
    head = f"layer {panel.layers[r]}, {panel.column} {c}: {float(panel.share[r, c]):.2%}"
    if panel.count is not None:
        head += f" ({int(panel.count[r, c]):,} routed)"
    if panel.other is not None:
        head += f" vs {float(panel.other[r, c]):.2%}; ratio {2 ** float(values[r, c]):.2f}x"
    else:
        head += f"; {float(panel.share[r, c]) * panel.share.shape[1]:.2f}x uniform"
    if panel.kept is not None:
        head += "; dropped by the plan" if panel.dropped(r, c) else "; kept by the plan"
    return head


@dataclass(frozen=True)
class _Scale:
    """Value -> colour: share from ``low`` (white) to ``high`` (dark blue), or with
    ``compare`` a log2 ratio from -span (blue) through 0 (white) to +span (red)."""

    low: float
    high: float
    compare: bool

    @classmethod
    def of(cls, panel: Panel) -> _Scale:
        if panel.other is not None:
            return cls(-_RATIO_SPAN, _RATIO_SPAN, compare=True)
        # every share scale starts at 0: white means unused, in every panel
        return cls(0.0, max(float(panel.share.max()), 1e-12), compare=False)

    def colour(self, value: float) -> str:
        t = max(0.0, min(1.0, (value - self.low) / (self.high - self.low)))
        stops = _DIVERGING if self.compare else _SEQUENTIAL
        a, b = (stops[0], stops[1]) if t < 0.5 else (stops[1], stops[2])
        u = t * 2 if t < 0.5 else t * 2 - 1
        return "#" + "".join(f"{round(x + (y - x) * u):02x}" for x, y in zip(a, b, strict=True))

    def label(self, frac: float) -> str:
        value = self.low + (self.high - self.low) * frac
        if not self.compare:
            return f"{value:.1%}"
        return f"{2**value:.0f}x" if value >= 0 else f"1/{2**-value:.0f}x"


def _legend_height(grid_h: float) -> float:
    return max(grid_h, 80.0)


def _legend(
    x: float, y: float, height: float, scale: _Scale, never: bool, *, plan: bool = False
) -> tuple[str, float]:
    height = _legend_height(height)
    steps = 24
    out = []
    for i in range(steps):
        value = scale.low + (scale.high - scale.low) * (1 - (i + 0.5) / steps)  # top is high
        out.append(
            f"<rect x='{x:.1f}' y='{y + i * height / steps:.1f}' width='14' "
            f"height='{height / steps + 0.5:.1f}' fill='{scale.colour(value)}'/>"
        )
    out.append(
        f"<rect x='{x:.1f}' y='{y:.1f}' width='14' height='{height:.1f}' fill='none' "
        "stroke='#999'/>"
    )
    for frac in (1.0, 0.5, 0.0):
        ty = y + (1 - frac) * height
        out.append(
            f"<line x1='{x + 14:.1f}' x2='{x + 18:.1f}' y1='{ty:.1f}' y2='{ty:.1f}' stroke='#999'/>"
        )
        out.append(f"<text x='{x + 21:.1f}' y='{ty + 4:.1f}'>{scale.label(frac)}</text>")
    below = y + height + 8
    if never:
        out.append(
            f"<rect x='{x:.1f}' y='{below:.1f}' width='14' height='10' fill='{_NEVER}'/>"
            f"<text x='{x + 21:.1f}' y='{below + 9:.1f}'>never</text>"
        )
        below += 16
    if plan:
        out.append(_cross(x, below, 14, 10))
        out.append(f"<text x='{x + 21:.1f}' y='{below + 9:.1f}'>dropped</text>")
    return "\n".join(out), 80.0


def heatmap_html(view: View) -> str:
    """A self-contained page: heading, the SVG heatmap, and the per-layer tables."""
    meta = view.stats.meta
    sections = []
    for panel in view.panels:
        head = ["layer", f"most used {panel.column}s", f"least used {panel.column}s"]
        if panel.count is not None:
            head.append("never routed")
        if panel.other is not None:
            head += [f"specific to {view.name}", f"more used in {view.other_name}"]
        body = []
        for row in view.rows(panel):
            cells = [f"L{row['layer']}", _pairs(row["most"]), _pairs(row["least"])]
            if panel.count is not None:
                cells.append(" ".join(map(str, row["never_routed"])) or "—")
            if panel.other is not None:
                cells += [_ratios(row["task_specific"], panel.column)]
                cells += [_ratios(row["other_specific"], panel.column)]
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        sections.append(
            f"<h2>{html.escape(panel.title)}</h2>\n<table><thead><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + "</tr></thead><tbody>\n"
            + "\n".join(body)
            + "\n</tbody></table>"
        )
    facts = (
        f"{meta.family} ({meta.model_type}), {meta.tokens:,} tokens from {meta.documents:,} "
        f"documents, dtype {meta.dtype}, model {meta.model_fingerprint[:12]}…, "
        f"data {meta.data_fingerprint[:12]}…"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(_title(view))}</title>
<style>
body {{ font-family: ui-sans-serif, system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 18px; }} h2 {{ font-size: 15px; margin-top: 28px; }}
p.facts {{ color: #555; }}
table {{ border-collapse: collapse; font-size: 12px; }}
th, td {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; }}
th {{ background: #f4f4f4; }}
svg rect:hover {{ stroke: #000; stroke-width: 1.5; }}
</style>
</head>
<body>
<h1>{html.escape(_title(view))}</h1>
<p class="facts">{html.escape(facts)}. Hover a cell for its numbers.</p>
{heatmap_svg(view)}
{chr(10).join(sections)}
</body>
</html>
"""


def _pairs(pairs: list[list[Any]]) -> str:
    return "  ".join(f"{e} ({s:.1%})" for e, s in pairs)


def _ratios(items: list[dict[str, Any]], column: str) -> str:
    return "  ".join(f"{i[column]} ({i['ratio']:.1f}x)" for i in items) or "—"
