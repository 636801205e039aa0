"""The `mfprune` command line: each command parses its options, calls one library function
and prints the result. Domain errors become one `error: ... (hint: ...)` line and exit 2."""

import functools
import os
import re
import signal
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from mfprune.console import OutputFormat, Sink
from mfprune.errors import MfpruneError

app = typer.Typer(
    name="mfprune",
    help="Shrink Mixture-of-Experts LLMs to the task they are used for.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])

FormatOpt = Annotated[
    OutputFormat, typer.Option("--format", help="human (rich), json (machine-readable) or quiet")
]
ArchOpt = Annotated[
    Path | None,
    typer.Option("--arch", help="your own adapter TOML for a family mfprune does not know"),
]


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def command(fn: F) -> F:
    """Run a command body; turn MfpruneError / Ctrl-C into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sink = Sink(kwargs.get("fmt", OutputFormat.human))
        signal.signal(signal.SIGTERM, _sigterm)
        try:
            return fn(*args, sink=sink, **kwargs)
        except MfpruneError as exc:
            sink.error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            sink.error("interrupted; no output was left behind", "re-run the command to resume")
            raise typer.Exit(130) from None
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            sink.error(f"{exc.strerror or exc}{where}", "check disk space and permissions")
            raise typer.Exit(1) from None
        except Exception as exc:
            if os.environ.get("MFPRUNE_DEBUG"):
                raise
            sink.error(
                f"internal error: {type(exc).__name__}: {exc}",
                "re-run with MFPRUNE_DEBUG=1 for the traceback and report it",
            )
            raise typer.Exit(3) from None

    # typer reads the signature: hide the injected ``sink`` parameter
    import inspect

    sig = inspect.signature(fn)
    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for p in sig.parameters.values() if p.name != "sink"]
    )
    return wrapper  # type: ignore[return-value]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' / '500MiB' / '123' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise MfpruneError(f"cannot read size '{text}'", hint="write e.g. 5GB, 500MB or 2GiB")
    number, unit = float(m.group(1)), m.group(2).upper()
    power = " KMGT".index(unit[0]) if unit and unit[0] in "KMGT" else 0
    base = 1024 if "I" in unit else 1000
    return int(number * base**power)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


@app.command()
@command
def inspect(
    model: Annotated[Path, typer.Argument(help="model folder (config.json + *.safetensors)")],
    arch: ArchOpt = None,
    fmt: FormatOpt = OutputFormat.human,
    *,
    sink: Sink,
) -> None:
    """Family, MoE layers, experts, top-k, groups, heads and the parameter split."""
    from mfprune.arch import load_spec_file
    from mfprune.inspect import inspect_model

    report = inspect_model(model, spec=load_spec_file(arch) if arch else None)
    table = Table(title=f"{report.path}", show_header=False, title_justify="left")
    e = report.experts
    table.add_row("family", f"{report.family} (model_type {report.model_type})")
    table.add_row("layers", f"{report.num_layers}, MoE: {_layers(e.layers)}")
    groups = f", {e.n_group} groups (top-{e.topk_group} groups)" if e.n_group > 1 else ""
    table.add_row("experts", f"{e.experts_per_layer} per layer, top-{e.top_k}{groups}")
    if report.attention_experts:
        a = report.attention_experts
        table.add_row("attention experts", f"{a.experts_per_layer} per layer, top-{a.top_k}")
    if report.heads:
        table.add_row(
            "heads",
            f"{report.heads} query, {report.kv_heads} KV, head_dim {report.head_dim}; "
            f"pruning: {report.head_pruning}",
        )
    total = sum(report.params.values())
    for role, n in report.params.items():
        if n:
            table.add_row(f"params: {role}", f"{n:,} ({100 * n / max(total, 1):.1f}%)")
    table.add_row("params: total", f"{total:,}")
    table.add_row("dtypes", ", ".join(f"{k} {v:,}" for k, v in report.dtypes.items()))
    table.add_row("on disk", f"{_human_bytes(report.bytes_on_disk)} in {report.shards} shard(s)")
    sink.result(report.to_dict(), table)


def _layers(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]} ({len(layers)})"
    return ", ".join(map(str, layers))


@app.command()
@command
def prune(
    model: Annotated[Path, typer.Argument(help="source model folder (never modified)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder for the pruned model")],
    plan: Annotated[
        Path | None, typer.Option("--plan", help="plan JSON (docs/plan-format.md)")
    ] = None,
    profile: Annotated[
        Path | None, typer.Option("--profile", help="stats from `mfprune profile`: rank and plan")
    ] = None,
    criterion: Annotated[
        str, typer.Option("--criterion", help="frequency, soft, ean, reap or random")
    ] = "reap",
    seed: Annotated[int, typer.Option("--seed", help="seed of the random criterion")] = 0,
    keep: Annotated[int | None, typer.Option("--keep", help="experts kept per MoE layer")] = None,
    keep_ratio: Annotated[
        float | None, typer.Option("--keep-ratio", help="share of experts kept in every layer")
    ] = None,
    coverage: Annotated[
        float | None,
        typer.Option(
            "--coverage", help="smallest uniform count keeping this share of every layer's mass"
        ),
    ] = None,
    global_budget: Annotated[
        float | None,
        typer.Option(
            "--global-budget",
            help="share of all experts, spent per layer where the scores say (uneven counts: "
            "load with mfprune.load_pretrained)",
        ),
    ] = None,
    min_keep: Annotated[int, typer.Option("--min-keep", help="never keep fewer per layer")] = 0,
    heads_keep_ratio: Annotated[
        float | None, typer.Option("--heads-keep-ratio", help="share of query heads kept")
    ] = None,
    attention_keep_ratio: Annotated[
        float | None,
        typer.Option("--attention-keep-ratio", help="share of attention experts kept (JetMoE)"),
    ] = None,
    plan_only: Annotated[
        bool, typer.Option("--plan-only", help="write OUT/plan.json and stop (no checkpoint)")
    ] = False,
    allow_uneven: Annotated[
        bool,
        typer.Option("--allow-uneven", help="accept a plan whose layers keep different counts"),
    ] = False,
    arch: ArchOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace a non-empty output folder atomically")
    ] = False,
    max_shard_size: Annotated[
        str | None,
        typer.Option("--max-shard-size", help="largest output shard, e.g. 5GB (default: source's)"),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="load both models and check the pruned logits equal the masked original's "
            "(small models only)",
        ),
    ] = False,
    fmt: FormatOpt = OutputFormat.human,
    *,
    sink: Sink,
) -> None:
    """Rewrite MODEL into a smaller checkpoint: keep what --plan says, or rank a --profile
    with --criterion under a budget (--keep / --keep-ratio / --coverage / --global-budget)."""
    from mfprune.arch import load_spec_file
    from mfprune.prune import Budget, prune_model

    outcome = prune_model(
        model,
        out,
        plan=plan,
        profile=profile,
        criterion=criterion,
        criterion_options={"seed": seed} if criterion == "random" else {},
        budget=Budget(
            keep=keep,
            keep_ratio=keep_ratio,
            coverage=coverage,
            global_budget=global_budget,
            min_keep=min_keep,
            attention_keep_ratio=attention_keep_ratio,
            heads_keep_ratio=heads_keep_ratio,
        ),
        spec=load_spec_file(arch) if arch else None,
        plan_only=plan_only,
        allow_uneven=allow_uneven,
        overwrite=overwrite,
        max_shard_bytes=parse_size(max_shard_size) if max_shard_size else None,
        verify=verify,
    )
    data: dict[str, Any] = {"out": str(outcome.out), "plan": outcome.plan.to_dict()}
    if outcome.layers:
        data["layers"] = [layer.__dict__ for layer in outcome.layers]
        table = Table(title=f"plan ({criterion})", title_justify="left")
        for column in ("layer", "kept", "dropped", "routed mass kept"):
            table.add_column(column)
        for layer in outcome.layers:
            table.add_row(
                str(layer.layer),
                _ids(layer.kept),
                _ids(layer.dropped),
                f"{layer.mass_kept:.1%}",
            )
        sink.show(table)
    result = outcome.rewrite
    if result is None:
        sink.result(data, f"wrote {outcome.out / 'plan.json'} (--plan-only: no checkpoint)")
        return
    for name in result.skipped_files:
        sink.warn(f"not carried over: {name} (weights outside the safetensors index, or a folder)")
    data["rewrite"] = result.to_dict()
    verdict = ""
    if outcome.verify is not None:
        check = outcome.verify
        data["verify"] = {**check.__dict__, "exact": check.exact}
        verdict = (
            f"\nverified on {check.tokens} tokens: max |pruned - masked original| = "
            f"{check.max_abs_diff:.2g} (pruning moves logits by up to {check.masking_effect:.2g})"
        )
    ratio = result.out_bytes / max(result.source_bytes, 1)
    changes = ", ".join(f"{k} {a}→{b}" for k, (a, b) in result.config_changes.items())
    uneven = (
        "\nlayers keep different expert counts: load with mfprune.load_pretrained(DIR)"
        if "mfprune_expert_counts" in result.config_changes
        else ""
    )
    sink.result(
        data,
        f"wrote {result.out} — {_human_bytes(result.out_bytes)} "
        f"({ratio:.1%} of {_human_bytes(result.source_bytes)}), {result.shards} shard(s); "
        f"{result.tensors_sliced} tensors sliced, {result.tensors_dropped} dropped; "
        f"config: {changes or 'unchanged'}{verdict}{uneven}",
    )


def _ids(ids: tuple[int, ...]) -> str:
    return " ".join(map(str, ids)) if len(ids) <= 24 else f"{len(ids)} ids"


class DtypeChoice(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@app.command()
@command
def profile(
    model: Annotated[Path, typer.Argument(help="model folder with its tokenizer")],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="task data: a JSONL file (text / messages / prompt+completion), a text file, "
            "or a folder of those",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="stats file to write (.safetensors)")],
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="stop after this many tokens (default: all)")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="sequences per forward")] = 8,
    seq_len: Annotated[
        int, typer.Option("--seq-len", help="cut longer documents into chunks of this many tokens")
    ] = 2048,
    dtype: Annotated[
        DtypeChoice, typer.Option("--dtype", help="dtype to run in (auto: the checkpoint's)")
    ] = DtypeChoice.auto,
    device: Annotated[
        str, typer.Option("--device", help="auto (cuda if available), cpu, cuda, cuda:N")
    ] = "auto",
    text_field: Annotated[
        str | None, typer.Option("--text-field", help="the JSONL field that holds the text")
    ] = None,
    shard: Annotated[
        str,
        typer.Option("--shard", help="I/N: profile documents I, I+N, I+2N, ... (merge-stats adds)"),
    ] = "0/1",
    arch: ArchOpt = None,
    fmt: FormatOpt = OutputFormat.human,
    *,
    sink: Sink,
) -> None:
    """Record how task DATA uses every expert, attention expert and head of MODEL."""
    import time

    from mfprune.arch import load_spec_file
    from mfprune.profiling import Shard, profile_model
    from mfprune.profiling.stats import check_stats_out

    target = check_stats_out(out)
    start = time.perf_counter()
    forward_start = [start]

    def on_start(tokens: Any) -> None:
        ticker.set_total(tokens.tokens)
        forward_start[0] = time.perf_counter()

    with sink.progress(unit="tokens") as ticker:
        stats = profile_model(
            model,
            data,
            max_tokens=max_tokens,
            batch_size=batch_size,
            seq_len=seq_len,
            dtype=dtype.value,
            device=device,
            text_field=text_field,
            shard=Shard.parse(shard),
            spec=load_spec_file(arch) if arch else None,
            on_start=on_start,
            on_batch=ticker.advance,
        )
    end = time.perf_counter()
    stats.save(target)
    summary = {"out": str(target), **stats.summary(), "seconds": round(end - start, 3)}
    # throughput of the forward passes alone (loading the model is not profiling)
    rate = stats.meta.tokens / max(end - forward_start[0], 1e-9)
    summary["tokens_per_second"] = round(rate, 1)
    sink.result(summary, _stats_line(f"wrote {target}", summary))


@app.command("merge-stats")
@command
def merge_stats_command(
    stats: Annotated[
        list[Path],
        typer.Argument(help="stats files of one model, on disjoint data", metavar="STATS"),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="merged stats file to write")],
    fmt: FormatOpt = OutputFormat.human,
    *,
    sink: Sink,
) -> None:
    """Add up stats files of one model made on disjoint data (--shard 0/2 + 1/2, say)."""
    from mfprune.profiling.stats import ProfileStats, check_stats_out, merge_stats

    target = check_stats_out(out)
    merged = merge_stats(*(ProfileStats.load(p) for p in stats))
    merged.save(target)
    summary = {"out": str(target), **merged.summary()}
    sink.result(summary, _stats_line(f"merged {len(stats)} files into {target}", summary))


def _stats_line(head: str, summary: dict[str, Any]) -> str:
    e = summary["experts"]
    never = sum(len(ids) for ids in e["never_routed"].values())
    parts = [
        f"{head} — {summary['tokens']:,} tokens from {summary['documents']:,} documents",
        f"{len(e['layers'])} MoE layers x {e['experts']} experts (top-{e['top_k']}), "
        f"{never} never routed",
    ]
    if "attention_experts" in summary:
        a = summary["attention_experts"]
        parts.append(f"{len(a['layers'])} layers x {a['experts']} attention experts")
    if "heads" in summary:
        parts.append(f"{summary['heads']['layers']} layers x {summary['heads']['heads']} heads")
    if "tokens_per_second" in summary:
        parts.append(f"{summary['tokens_per_second']:,.0f} tokens/s")
    return "; ".join(parts)


def main() -> None:  # pragma: no cover - console entry point
    app()
