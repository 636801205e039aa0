"""The bench report: both models side by side with ratios, the quality gate, and the three ways
out (a rich table, ``bench.json``, a markdown table for a pull request).

The gate (``--max-drop``): each rule is ``X`` (every metric) or ``PATTERN=X`` (metrics whose
``task/metric`` key or bare metric name matches the glob PATTERN); for each metric the last
matching rule applies. ``X`` is absolute (``0.02``) or relative to the baseline (``2%``). The
drop is direction-aware: baseline − model for a metric where higher is better (accuracy), model
− baseline where lower is better (perplexity, bits per byte).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mfprune.bench.quality import Metric
from mfprune.bench.speed import MEMORY_LABELS, NOISE_FLOOR, Comparison, SpeedResult, Timing, compare
from mfprune.errors import MfpruneError, did_you_mean
from mfprune.memory import human_bytes as _human_bytes

BENCH_FORMAT = "mfprune.bench/1"
_TOLERANCE = 1e-9  # float noise: a drop this small (relative to the baseline) is no drop


# ---------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class DropLimit:
    """``0.02`` (absolute) or ``2%`` (``relative``: a share of the baseline's value)."""

    value: float
    relative: bool = False

    @classmethod
    def parse(cls, text: str) -> DropLimit:
        raw = text.strip()
        relative = raw.endswith("%")
        try:
            value = float(raw.removesuffix("%").strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:  # 200%: perplexity may triple
            raise MfpruneError(
                f"cannot read --max-drop '{text}'",
                hint="write an absolute drop such as 0.02, or a share of the baseline such as 2%",
            )
        return cls(value / 100 if relative else value, relative)

    def allowed(self, baseline: float) -> float:
        """The largest drop allowed from ``baseline``, in the metric's units."""
        return self.value * abs(baseline) if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


@dataclass(frozen=True)
class GateRule:
    pattern: str | None  # None: every metric
    limit: DropLimit

    @classmethod
    def parse(cls, text: str) -> GateRule:
        pattern, sep, value = text.rpartition("=")
        if sep and not pattern.strip():
            raise MfpruneError(
                f"cannot read --max-drop '{text}': no metric before '='",
                hint="write METRIC=X, e.g. acc=0.02 or data_heldout/word_perplexity=5%",
            )
        return cls(pattern.strip() or None, DropLimit.parse(value))

    def matches(self, metric: Metric) -> bool:
        if self.pattern is None:
            return True
        return fnmatch.fnmatchcase(metric.key, self.pattern) or fnmatch.fnmatchcase(
            metric.name, self.pattern
        )

    def __str__(self) -> str:
        return str(self.limit) if self.pattern is None else f"{self.pattern}={self.limit}"


def parse_gate(texts: Iterable[str | float]) -> tuple[GateRule, ...]:
    return tuple(GateRule.parse(str(t)) for t in texts)


def check_gate_names(rules: Sequence[GateRule], keys: Sequence[str], *, where: str) -> None:
    """Before anything runs: every rule's pattern must match one of ``keys`` (``task/metric``,
    the metrics the tasks will report), or the gate could only fail after the whole run."""
    names = {k.split("/", 1)[-1] for k in keys}
    for rule in rules:
        if rule.pattern is None:
            continue
        if not any(fnmatch.fnmatchcase(k, rule.pattern) for k in (*keys, *names)):
            raise MfpruneError(
                f"{where} metric '{rule.pattern}' matches none of the metrics the tasks give: "
                f"{', '.join(keys)}",
                hint="name one of those (globs work, e.g. '*/bits_per_byte'), or add a task "
                "that reports it",
            )


@dataclass(frozen=True)
class GateCheck:
    metric: str
    baseline: float
    value: float
    higher_is_better: bool
    drop: float  # > 0: worse than the baseline, in the metric's units
    allowed: float
    rule: str

    @property
    def passed(self) -> bool:
        return self.drop <= self.allowed + _TOLERANCE * max(1.0, abs(self.baseline))

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "baseline": self.baseline,
            "value": self.value,
            "higher_is_better": self.higher_is_better,
            "drop": self.drop,
            "allowed": self.allowed,
            "rule": self.rule,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class GateResult:
    rules: tuple[GateRule, ...]
    checks: tuple[GateCheck, ...]
    unmatched: tuple[str, ...] = ()  # rule patterns that matched no metric

    @property
    def failed(self) -> tuple[GateCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def passed(self) -> bool:
        return not self.failed and not self.unmatched and bool(self.checks)

    def summary(self) -> str:
        if self.unmatched:
            return f"no metric matches --max-drop {', '.join(self.unmatched)}"
        if not self.checks:
            return "no quality metric to gate on"
        if not self.failed:
            return f"quality gate passed: {len(self.checks)} metric(s) within --max-drop"
        parts = [
            f"{c.metric} dropped {_num(c.drop)} > {_num(c.allowed)} allowed ({c.rule})"
            for c in self.failed
        ]
        return "quality gate failed: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": [str(r) for r in self.rules],
            "passed": self.passed,
            "failed": [c.metric for c in self.failed],
            "unmatched": list(self.unmatched),
            "checks": [c.to_dict() for c in self.checks],
        }


def check_gate(
    rules: Sequence[GateRule], model: Sequence[Metric], baseline: Sequence[Metric]
) -> GateResult:
    """Apply ``rules`` to every metric both models have (module docstring)."""
    base = {m.key: m for m in baseline}
    used: set[int] = set()
    checks = []
    for metric in model:
        ref = base.get(metric.key)
        matching = [i for i, r in enumerate(rules) if r.matches(metric)]
        if ref is None or not matching:
            continue
        used.update(matching)
        rule = rules[matching[-1]]
        higher = metric.higher_is_better is not False
        drop = ref.value - metric.value if higher else metric.value - ref.value
        checks.append(
            GateCheck(
                metric=metric.key,
                baseline=ref.value,
                value=metric.value,
                higher_is_better=higher,
                drop=drop,
                allowed=rule.limit.allowed(ref.value),
                rule=str(rule),
            )
        )
    keys = [m.key for m in model]
    unmatched = tuple(
        f"'{r.pattern}'{did_you_mean(r.pattern, keys + [m.name for m in model])}"
        for i, r in enumerate(rules)
        if i not in used and r.pattern is not None
    )
    return GateResult(rules=tuple(rules), checks=tuple(checks), unmatched=unmatched)


# ---------------------------------------------------------------------------- the report


@dataclass
class ModelBench:
    """One model's numbers."""

    path: str
    params: int
    weights_bytes: int  # parameters and buffers in memory, in the dtype it ran in
    disk_bytes: int  # safetensors files
    dtype: str
    device: str
    experts_implementation: str | None
    quality: list[Metric] = field(default_factory=list)
    speed: SpeedResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "params": self.params,
            "weights_bytes": self.weights_bytes,
            "disk_bytes": self.disk_bytes,
            "dtype": self.dtype,
            "device": self.device,
            "experts_implementation": self.experts_implementation,
            "quality": {m.key: m.to_dict() for m in self.quality},
            "speed": self.speed.to_dict() if self.speed else None,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class Row:
    """One line of the side-by-side table."""

    kind: str  # quality / speed / size
    name: str
    model: float | None
    baseline: float | None
    higher_is_better: bool | None
    unit: str = ""  # "bytes", "tok/s", ""
    timing: tuple[Timing, Timing | None] | None = None  # speed rows: (model, baseline) samples

    @property
    def ratio(self) -> float | None:
        if self.model is None or self.baseline in (None, 0):
            return None
        return self.model / self.baseline  # type: ignore[operator]

    @property
    def comparison(self) -> Comparison | None:
        """Speed rows with a baseline: the ratio of the medians and the noise verdict."""
        if self.timing is None or self.timing[1] is None:
            return None
        return compare(self.timing[0], self.timing[1])

    def to_dict(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "name": self.name,
            "model": self.model,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "higher_is_better": self.higher_is_better,
            "unit": self.unit,
        }
        if self.timing is not None:
            model, base = self.timing
            out["model_spread"] = model.spread
            out["baseline_spread"] = base.spread if base else None
            comparison = self.comparison
            out["verdict"] = comparison.verdict if comparison else None
        return out


@dataclass
class BenchReport:
    model: ModelBench
    baseline: ModelBench | None = None
    gate: GateResult | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[Row]:
        base = {m.key: m for m in self.baseline.quality} if self.baseline else {}
        rows = [
            Row(
                "quality",
                m.key,
                m.value,
                base[m.key].value if m.key in base else None,
                m.higher_is_better,
            )
            for m in self.model.quality
        ]
        b, m = self.baseline, self.model
        if m.speed is not None:
            bs = b.speed if b else None
            for stage in ("prefill", "decode"):
                mine, theirs = getattr(m.speed, stage), getattr(bs, stage) if bs else None
                rows.append(
                    Row(
                        "speed",
                        f"{stage} tokens/s",
                        mine.median,
                        theirs.median if theirs else None,
                        True,
                        "tok/s",
                        timing=(mine, theirs),
                    )
                )
            if m.speed.peak_memory_bytes is not None:
                rows.append(
                    Row(
                        "speed",
                        MEMORY_LABELS[m.speed.memory_method],
                        m.speed.peak_memory_bytes,
                        bs.peak_memory_bytes if bs else None,
                        False,
                        "bytes",
                    )
                )
        rows.append(Row("size", "parameters", m.params, b.params if b else None, False))
        rows.append(
            Row(
                "size",
                "weights in memory",
                m.weights_bytes,
                b.weights_bytes if b else None,
                False,
                "bytes",
            )
        )
        rows.append(
            Row("size", "on disk", m.disk_bytes, b.disk_bytes if b else None, False, "bytes")
        )
        return rows

    def to_dict(self) -> dict[str, Any]:
        from mfprune import __version__

        return {
            "format": BENCH_FORMAT,
            "mfprune_version": __version__,
            "versions": self.versions,
            "settings": self.settings,
            "model": self.model.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "comparison": [r.to_dict() for r in self.rows()],
            "gate": self.gate.to_dict() if self.gate else None,
        }

    # -------------------------------------------------------------------- rendering

    def _gate_cells(self) -> dict[str, tuple[bool, str]]:
        if self.gate is None:
            return {}
        return {
            c.metric: (c.passed, "ok" if c.passed else f"FAIL {_num(c.drop)} > {_num(c.allowed)}")
            for c in self.gate.checks
        }

    def _header(self) -> list[str]:
        head = ["", "model"]
        if self.baseline:
            head += ["baseline", "ratio"]
        if self.gate:
            head.append("gate")
        return head

    def _cells(self, row: Row, gate: dict[str, tuple[bool, str]]) -> list[str]:
        model, base = row.timing if row.timing else (None, None)
        cells = [row.name, _fmt(row.model, row.unit) + _spread(model)]
        if self.baseline:
            cells += [_fmt(row.baseline, row.unit) + _spread(base), _ratio(row)]
        if self.gate:
            cells.append(gate.get(row.name, (True, ""))[1] if row.kind == "quality" else "")
        return cells

    def table(self) -> Any:
        """A rich Table; failed gate rows in red."""
        from rich.table import Table

        title = f"{self.model.path}" + (f"  vs  {self.baseline.path}" if self.baseline else "")
        table = Table(title=title, title_justify="left")
        for i, col in enumerate(self._header()):  # metric names never wrap: the gate cell may
            table.add_column(col, justify="left" if i in (0, 4) else "right", no_wrap=i == 0)
        gate = self._gate_cells()
        last_kind = None
        for row in self.rows():
            if last_kind is not None and row.kind != last_kind:
                table.add_section()
            last_kind = row.kind
            failed = row.kind == "quality" and not gate.get(row.name, (True, ""))[0]
            table.add_row(*self._cells(row, gate), style="bold red" if failed else None)
        table.caption = self._caption()
        return table

    def markdown(self) -> str:
        """A GitHub-flavoured markdown table (and the gate verdict) for a pull request."""
        gate = self._gate_cells()
        head = self._header()
        lines = [
            "| " + " | ".join(h or "metric" for h in head) + " |",
            "|" + "|".join(["---", *["---:"] * (len(head) - 1)]) + "|",
        ]
        for row in self.rows():
            cells = self._cells(row, gate)
            if row.kind == "quality" and not gate.get(row.name, (True, ""))[0]:
                cells = [f"**{c}**" if c else c for c in cells]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        caption = self._caption()
        return "\n".join(lines) + (f"\n\n{caption}\n" if caption else "\n")

    def _caption(self) -> str:
        parts = []
        m = self.model
        if m.speed is not None:
            s = m.speed
            parts.append(
                f"speed: {s.batch_size} × {s.prompt_len} prompt tokens, {s.new_tokens} decode "
                f"steps, median of {s.repeats} runs ±half their spread"
                f"{_order(s, self.baseline is not None)} on {m.device} "
                f"({m.dtype}, experts {m.experts_implementation or 'default'}); a speed ratio "
                f"is 'within noise' when the runs' spreads overlap or it is within "
                f"{NOISE_FLOOR:.0%} of 1; speed is never gated"
            )
        if self.gate is not None:
            parts.append(self.gate.summary())
        return "; ".join(parts)


def _num(x: float) -> str:
    return f"{x:.4g}"


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "bytes":
        return _human_bytes(value)
    if unit == "tok/s":
        return f"{value:,.0f}"
    if float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _ratio(row: Row) -> str:
    r = row.ratio
    if r is None:
        return "—"
    comparison = row.comparison
    return f"{r:.3f}×" + (f" {comparison.verdict}" if comparison else "")


def _order(speed: SpeedResult, with_baseline: bool) -> str:
    if speed.interleaved:
        return ", interleaved with the baseline's"
    return (
        ", one model after the other (they did not fit in memory together)" if with_baseline else ""
    )


def _spread(timing: Timing | None) -> str:
    """' ±2.1%': half the min..max spread of the timed runs."""
    return "" if timing is None else f" ±{timing.spread / 2:.1%}"
