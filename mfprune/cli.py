"""The `mfprune` command line: each command parses its options, calls one library function
and prints the result. Domain errors become one `error: ... (hint: ...)` line and exit 2."""

import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from mfprune.console import OutputFormat, Sink, library_output, plural
from mfprune.entry import INTERRUPT_HINT, Interrupted, received, stop_interrupts
from mfprune.errors import MfpruneError
from mfprune.memory import human_bytes as _human_bytes

app = typer.Typer(
    name="mfprune",
    help="Shrink Mixture-of-Experts LLMs to the task they are used for.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from mfprune import __version__

        sys.stdout.write(f"mfprune {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="print the version and exit", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    """Shrink Mixture-of-Experts LLMs to the task they are used for."""


F = TypeVar("F", bound=Callable[..., Any])

FormatOpt = Annotated[
    OutputFormat, typer.Option("--format", help="human (rich), json (machine-readable) or quiet")
]


def _model_location(text: str) -> Path:
    """MODEL as typed: ``default`` is the embedded default model (mfprune.checkpoint)."""
    from mfprune.checkpoint import model_location

    return model_location(text)


_DEFAULT_HELP = "; `default`: the embedded demo model"


def model_argument(help: str) -> Any:
    return typer.Argument(help=help + _DEFAULT_HELP, parser=_model_location)


VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="show what lm-eval, datasets and transformers print (progress, logs) on stderr",
    ),
]

ArchOpt = Annotated[
    Path | None,
    typer.Option("--arch", help="your own adapter TOML for a family mfprune does not know"),
]


ModelCodeOpt = Annotated[
    str | None,
    typer.Option(
        "--model-code",
        help="module:Class — the model's own PreTrainedModel class, for a family transformers "
        "does not ship (docs/custom-models.md)",
    ),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="run the checkpoint's own auto_map Python code (off by default: it executes code "
        "from the model folder)",
    ),
]


@contextlib.contextmanager
def _model_code(class_path: str | None, trust_remote_code: bool) -> Iterator[None]:
    """The model code a command runs with (mfprune.modelcode); remote code is said loudly,
    whatever the output format."""
    from mfprune.modelcode import REMOTE_CODE_WARNING, use_model_code

    if trust_remote_code:
        sys.stderr.write(f"WARNING: {REMOTE_CODE_WARNING}\n")
    with use_model_code(class_path=class_path, trust_remote_code=trust_remote_code):
        yield


def command(fn: F | None = None, *, interrupted: str = INTERRUPT_HINT) -> Any:
    """Run a command body; turn MfpruneError / Ctrl-C into one line and a non-zero exit.
    ``interrupted``: the hint printed after Ctrl-C (what is true of this command's outputs)."""
    if fn is None:
        return functools.partial(command, interrupted=interrupted)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sink = Sink(kwargs.get("fmt", OutputFormat.human))
        try:
            try:
                return fn(*args, sink=sink, **kwargs)
            except BaseException as exc:
                code = _interrupt_code(exc)
                if code is None:
                    raise
                stop_interrupts()
                sink.error("interrupted", interrupted)
                raise typer.Exit(code) from None
        except typer.Exit:
            raise
        except MfpruneError as exc:
            sink.error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
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
        finally:
            from mfprune.io.outputs import release_all

            release_all()  # output locks a failed command still held

    # typer reads the signature: hide the injected ``sink`` parameter
    import inspect

    sig = inspect.signature(fn)
    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for p in sig.parameters.values() if p.name != "sink"]
    )
    return wrapper


def _interrupt_code(exc: BaseException) -> int | None:
    """The exit code when ``exc`` is an interrupt, or follows one (a library caught the
    interrupt and then failed because of it); None otherwise."""
    if isinstance(exc, Interrupted):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):  # in-process use: Python's own SIGINT handler
        return 130
    signum = received()
    if signum is None or isinstance(exc, typer.Exit | SystemExit):
        return None
    return 128 + signum


def run(argv: list[str]) -> int:
    """Parse ``argv`` and run the command; every usage error is one ``error:`` line, exit 2.
    Called by ``mfprune.entry.main`` (which handles Ctrl-C outside a command body)."""
    cli = typer.main.get_command(app)
    try:
        code = cli.main(args=argv, prog_name="mfprune", standalone_mode=False)
    except typer.TyperException as exc:  # typer's usage errors: missing option, bad value, ...
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            sys.stderr.write(ctx.get_help() + "\n")
            return 2
        where = ctx.command_path if ctx is not None else "mfprune"
        sys.stderr.write(f"error: {_sentence(exc.format_message())} (hint: see `{where} --help`)\n")
        return 2 if getattr(exc, "exit_code", 1) in (1, 2) else int(exc.exit_code)
    except MfpruneError as exc:  # raised while parsing an argument (e.g. MODEL)
        Sink().error(exc.message, exc.hint)
        return exc.exit_code
    return code if isinstance(code, int) else 0


def _sentence(message: str) -> str:
    """typer's 'Missing option '--out'.' -> 'missing option '--out'' (one line, our style)."""
    text = " ".join(message.split()).rstrip(".")
    return text[:1].lower() + text[1:]


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


@app.command()
@command
def inspect(
    model: Annotated[Path, model_argument("model folder (config.json + *.safetensors)")],
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
    if report.description:
        table.add_row("about", report.description)
    mtp = f", MTP: {_layers(report.mtp_layers)}" if report.mtp_layers else ""
    table.add_row("layers", f"{report.num_layers}, MoE: {_layers(e.layers)}{mtp}")
    groups = f", {e.n_group} groups (top-{e.topk_group} groups)" if e.n_group > 1 else ""
    table.add_row("experts", f"{e.experts_per_layer} per layer, top-{e.top_k}{groups}")
    table.add_row("routing", e.routing)
    if report.attention_experts:
        a = report.attention_experts
        table.add_row("attention experts", f"{a.experts_per_layer} per layer, top-{a.top_k}")
        table.add_row("attention routing", a.routing)
    if report.heads:
        where = (
            f" in layers {_layers(report.head_layers)}"
            if report.head_layers and len(report.head_layers) < report.num_layers
            else ""
        )
        table.add_row(
            "heads",
            f"{report.heads} query, {report.kv_heads} KV, head_dim {report.head_dim}{where}; "
            f"pruning: {report.head_pruning}",
        )
    total = sum(report.params.values())
    for role, n in report.params.items():
        if n:
            table.add_row(f"params: {role}", f"{n:,} ({100 * n / max(total, 1):.1f}%)")
    table.add_row("params: total", f"{total:,}")
    table.add_row("dtypes", ", ".join(f"{k} {v:,}" for k, v in report.dtypes.items()))
    table.add_row("weights", report.weight_format.description)
    table.add_row("per expert", ", ".join(report.expert_tensors))
    if report.uncovered_expert_tensors:
        names = report.uncovered_expert_tensors
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        table.add_row(
            "uncovered", ", ".join(names[:3]) + more + " (a prune of their layers refuses)"
        )
    table.add_row("on disk", f"{_human_bytes(report.bytes_on_disk)} in {report.shards} shard(s)")
    sink.result(report.to_dict(), table)


def _layers(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]} ({len(layers)})"
    return ", ".join(map(str, layers))


@app.command()
@command
def prune(
    model: Annotated[Path, model_argument("source model folder (never modified)")],
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="output folder for the pruned model")
    ] = None,
    plan: Annotated[
        Path | None, typer.Option("--plan", help="plan JSON (docs/plan-format.md)")
    ] = None,
    profile: Annotated[
        Path | None, typer.Option("--profile", help="stats from `mfprune profile`: rank and plan")
    ] = None,
    criterion: Annotated[
        str | None,
        typer.Option("--criterion", help="frequency, soft, ean, reap (default) or random"),
    ] = None,
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
    keep_params: Annotated[
        float | None,
        typer.Option(
            "--keep-params",
            help="CartesianMoE: share of each layer's sub-expert parameters kept (a sub-expert "
            "is freed when no kept expert uses it; counts may differ between layers)",
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
        bool,
        typer.Option("--plan-only", help="write only the plan, to --plan-out (no checkpoint)"),
    ] = False,
    plan_out: Annotated[
        Path | None,
        typer.Option("--plan-out", help="with --plan-only: the plan file to write (plan.json)"),
    ] = None,
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
    drop_mtp: Annotated[
        bool,
        typer.Option(
            "--drop-mtp",
            help="remove the multi-token-prediction layers (config count set to 0) instead of "
            "pruning them like the last decoder layer",
        ),
    ] = False,
    repair: Annotated[
        str,
        typer.Option(
            "--repair",
            help="none (exact rewrite) or refit (kept experts refit on --data so each pruned "
            "block reproduces the original's output)",
        ),
    ] = "none",
    repair_data: Annotated[
        Path | None,
        typer.Option("--data", help="the task's data for --repair (as `mfprune profile` reads)"),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="calibrate --repair on at most N tokens")
    ] = None,
    refit_steps: Annotated[
        int | None,
        typer.Option(
            "--refit-steps",
            help="--repair refit: gradient steps per layer refining the kept experts' gate, up "
            "and down projections after the closed-form refit [default: 300; 0: closed form "
            "only]",
        ),
    ] = None,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential",
            help="--repair refit with one decoder layer in memory at a time (models bigger "
            "than memory)",
        ),
    ] = False,
    model_code: ModelCodeOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    fmt: FormatOpt = OutputFormat.human,
    *,
    sink: Sink,
) -> None:
    """Rewrite MODEL into a smaller checkpoint: keep what --plan says, or rank a --profile
    with --criterion under a budget (--keep / --keep-ratio / --coverage / --global-budget)."""
    import contextlib

    from mfprune.arch import load_spec_file
    from mfprune.console import Ticker
    from mfprune.prune import Budget, prune_model

    bar = sink.progress(unit="tokens") if repair != "none" else contextlib.nullcontext(Ticker())
    with _model_code(model_code, trust_remote_code), bar as ticker:  # ticker: repair's passes
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
                keep_params=keep_params,
                min_keep=min_keep,
                attention_keep_ratio=attention_keep_ratio,
                heads_keep_ratio=heads_keep_ratio,
            ),
            spec=load_spec_file(arch) if arch else None,
            plan_only=plan_only,
            plan_out=plan_out,
            allow_uneven=allow_uneven,
            overwrite=overwrite,
            max_shard_bytes=parse_size(max_shard_size) if max_shard_size else None,
            verify=verify,
            drop_mtp=drop_mtp,
            repair=repair,
            data=repair_data,
            max_tokens=max_tokens,
            refit_steps=refit_steps,
            sequential=sequential,
            on_repair_start=ticker.set_total,
            on_repair_batch=ticker.advance,
        )
    where = "out" if outcome.rewrite is not None else "plan_out"
    data: dict[str, Any] = {where: str(outcome.out), "plan": outcome.plan.to_dict()}
    if outcome.layers:
        data["layers"] = [layer.__dict__ for layer in outcome.layers]
        table = Table(title=f"plan ({criterion or 'reap'})", title_justify="left")
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
    dead = outcome.plan.meta.get("dead_sub_experts")
    if dead:  # CartesianMoE: the sub-experts no kept expert uses, freed by the rewrite
        sink.show(_sub_expert_table(dead))
    result = outcome.rewrite
    if result is not None and result.replaced:
        sink.warn(f"--overwrite: replaced {result.replaced}")
    if result is None:
        sink.result(
            data,
            f"wrote {outcome.out} (--plan-only: no checkpoint; next: mfprune prune MODEL "
            f"--plan {outcome.out} --out DIR)",
        )
        return
    if result.skipped_files:
        sink.warn(
            f"not carried over: {', '.join(result.skipped_files)} (a pruned model gets its "
            "weights, config, tokenizer, generation config, model code and license files; "
            "README.md is its own model card)"
        )
    data["rewrite"] = result.to_dict()
    verdict = ""
    if outcome.verify is not None:
        check = outcome.verify
        data["verify"] = {**check.__dict__, "exact": check.exact}
        verdict = (
            f"\nverified on {check.tokens} tokens: max |pruned - masked original| = "
            f"{check.max_abs_diff:.2g} (pruning moves logits by up to {check.masking_effect:.2g})"
        )
    if outcome.repair is not None:
        data["repair"] = outcome.repair.to_dict()
        sink.show(_repair_table(outcome.repair))
    ratio = result.out_bytes / max(result.source_bytes, 1)
    from mfprune.rewrite.config_patch import change_text

    changes = ", ".join(change_text(k, a, b) for k, (a, b) in result.config_changes.items())
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


def _sub_expert_table(dead: dict[str, list[list[int]]]) -> Table:
    """Per MoE layer and set, the sub-experts a CartesianMoE prune frees."""
    sets = max(len(v) for v in dead.values())
    table = Table(title="sub-experts freed (no kept expert uses them)", title_justify="left")
    for column in ("layer", *(f"set {s}" for s in range(sets))):
        table.add_column(column)
    for layer, per_set in dead.items():
        table.add_row(layer, *(_ids(ids) if ids else "-" for ids in per_set))
    return table


def _repair_table(repair: Any) -> Table:
    """Per layer: the pruned block's error vs the original block on the calibration tokens."""
    table = Table(
        title=f"repair: {repair.method} on {repair.tokens:,} tokens ({repair.seconds:.1f}s); "
        "error = Σ‖pruned block − original block‖² / Σ‖original block‖²",
        title_justify="left",
    )
    refined = any(fit.refined is not None for fit in repair.layers)
    columns = ["layer", "tokens", "error dropped", "error refit"]
    for column in columns + (["refined (held-out tokens)"] if refined else []):
        table.add_column(column)
    for fit in repair.layers:
        after = "—" if fit.error_refit is None else f"{fit.error_refit / fit.target:.4f}"
        row = [str(fit.layer), f"{fit.tokens:,}", f"{fit.error_dropped / fit.target:.4f}", after]
        if refined:
            r = fit.refined
            if r is None:
                row.append("—")
            elif r.best_step == 0:  # no step did better on the held-out tokens
                row.append(f"{r.error_before:.4f}, closed form kept")
            else:
                row.append(f"{r.error_before:.4f} → {r.error_after:.4f} (step {r.best_step})")
        table.add_row(*row)
    return table


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
    model: Annotated[Path, model_argument("model folder with its tokenizer")],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="task data: a JSONL file (text / messages / prompt+completion), a text file, "
            "or a folder of those",
        ),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="stats file to write (.safetensors)")],
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="stop after this many tokens (default: all)")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="sequences per forward")] = 8,
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            help="cut longer documents into chunks of this many tokens (default: 2048, or the "
            "model's max_position_embeddings if smaller)",
        ),
    ] = None,
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
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential",
            help="load and run one decoder layer at a time (models bigger than memory)",
        ),
    ] = False,
    arch: ArchOpt = None,
    model_code: ModelCodeOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    verbose: VerboseOpt = False,
    fmt: FormatOpt = OutputFormat.human,
    *,
    sink: Sink,
) -> None:
    """Record how task DATA uses every expert, attention expert and head of MODEL.
    Under torchrun the ranks split DATA and rank 0 writes the stats of all of it."""
    import time

    from mfprune.arch import load_spec_file
    from mfprune.io.outputs import Input
    from mfprune.profiling import Shard, profile_model
    from mfprune.profiling.distributed import detect_world
    from mfprune.profiling.stats import check_stats_out

    world = detect_world()
    if world is not None and not world.is_main:
        sink = Sink(OutputFormat.quiet)  # rank 0 reports and writes; errors still print
    inputs = [Input(model, "the model folder"), Input(data, "the data")]
    inputs += Input.of(arch, "the adapter file")
    main_rank = world is None or world.is_main  # only rank 0 claims and writes the file
    target = check_stats_out(out, inputs=inputs) if main_rank else None
    start = time.perf_counter()
    forward_start = [start]

    def on_start(tokens: Any) -> None:
        ticker.set_total(tokens.tokens)
        forward_start[0] = time.perf_counter()

    with (
        _model_code(model_code, trust_remote_code),
        sink.progress(unit="tokens") as ticker,
        library_output(verbose=verbose),
    ):
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
            sequential=sequential,
            spec=load_spec_file(arch) if arch else None,
            on_start=on_start,
            on_batch=ticker.advance,
        )
    end = time.perf_counter()
    if world is not None and not world.is_main:
        return
    written = stats.save(target)
    summary = {"out": str(written), **stats.summary(), "seconds": round(end - start, 3)}
    # throughput from the first forward on (loading the model is not profiling); with
    # --sequential each layer is read from disk between the forwards, and that time is in it
    rate = stats.meta.tokens / max(end - forward_start[0], 1e-9)
    summary["tokens_per_second"] = round(rate, 1)
    if sequential:
        summary["tokens_per_second_includes"] = "reading each layer from disk"
    sink.result(summary, _stats_line(f"wrote {written}", summary))


@app.command("merge-stats")
@command
def merge_stats_command(
    stats: Annotated[
        list[Path],
        typer.Argument(help="stats files of one model, on disjoint data", metavar="STATS"),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="merged stats file to write")],
    fmt: FormatOpt = OutputFormat.human,
    *,
    sink: Sink,
) -> None:
    """Add up stats files of one model made on disjoint data (--shard 0/2 + 1/2, say)."""
    from mfprune.io.outputs import Input
    from mfprune.profiling.stats import ProfileStats, check_stats_out, merge_stats

    target = check_stats_out(out, inputs=[Input(p, "an input stats file") for p in stats])
    merged = merge_stats(*(ProfileStats.load(p) for p in stats))
    written = merged.save(target)
    summary = {"out": str(written), **merged.summary()}
    sink.result(summary, _stats_line(f"merged {len(stats)} files into {written}", summary))


@app.command()
@command
def show(
    stats: Annotated[Path, typer.Argument(help="stats file from `mfprune profile`")],
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            help="a second profile of the same model (e.g. general text): which experts are "
            "specific to STATS",
        ),
    ] = None,
    top: Annotated[int, typer.Option("--top", help="experts / heads listed per layer")] = 4,
    plan: Annotated[
        Path | None,
        typer.Option(
            "--plan",
            help="a plan of this model (plan.json, OUT/mfprune_plan.json): mark what it drops",
        ),
    ] = None,
    html: Annotated[
        str | None, typer.Option("--html", help="write a layers x experts heatmap page")
    ] = None,
    svg: Annotated[str | None, typer.Option("--svg", help="write the heatmap as SVG")] = None,
    fmt: FormatOpt = OutputFormat.human,
    *,
    sink: Sink,
) -> None:
    """Each layer's most and least used experts and heads (share of routed tokens); with
    --against, the experts specific to the task; --html / --svg write a heatmap; --plan
    marks what a plan drops."""
    from mfprune.io.outputs import Input, claim_file, write_file
    from mfprune.plan import PrunePlan
    from mfprune.profiling.stats import ProfileStats
    from mfprune.profiling.view import build_view, heatmap_html, heatmap_svg

    inputs = [*Input.of(stats, "the stats file"), *Input.of(against, "the --against stats")]
    inputs += Input.of(plan, "the plan")
    targets = {}
    for kind, path in (("html", html), ("svg", svg)):
        if path is not None:
            targets[kind] = claim_file(
                path, inputs=inputs, flag=f"--{kind}", example=f"heatmap.{kind}"
            )
            inputs.append(Input(targets[kind].path, f"the --{kind} output"))
    view = build_view(
        ProfileStats.load(stats),
        name=stats.name,
        against=ProfileStats.load(against) if against else None,
        other_name=against.name if against else None,
        top=top,
        plan=PrunePlan.load(plan) if plan else None,
    )
    for panel in view.panels:
        sink.show(_view_table(view, panel))
    written = []
    for kind, target in targets.items():
        write_file(target, heatmap_html(view) if kind == "html" else heatmap_svg(view))
        written.append(str(target.path))
    data = view.to_dict()
    data["written"] = written
    meta = view.stats.meta
    line = (
        f"{stats.name}: {meta.family}, {plural(meta.tokens, 'token')} from "
        f"{plural(meta.documents, 'document')}"
    )
    if against:
        line += f"; compared with {against.name}"
    sink.result(data, line + "".join(f"\nwrote {w}" for w in written))


def _view_table(view: Any, panel: Any) -> Table:
    table = Table(title=f"{panel.title} — share per layer", title_justify="left")
    columns = ["layer", f"most used {panel.column}s", f"least used {panel.column}s"]
    if panel.count is not None:
        columns.append("never routed")
    if panel.other is not None:
        columns += [f"specific to {view.name}", f"more used in {view.other_name}"]
    if panel.kept is not None:
        columns.append("dropped by the plan")
    for column in columns:
        table.add_column(column)
    for row in view.rows(panel):
        cells = [
            str(row["layer"]),
            "  ".join(f"{e} {s:.1%}" for e, s in row["most"]),
            "  ".join(f"{e} {s:.1%}" for e, s in row["least"]),
        ]
        if panel.count is not None:
            cells.append(_ids(tuple(row["never_routed"])) or "-")
        if panel.other is not None:
            for key in ("task_specific", "other_specific"):
                items = row[key]
                cells.append(
                    "  ".join(f"{i[panel.column]} {i['ratio']:.1f}x" for i in items) or "-"
                )
        if panel.kept is not None:
            cells.append(_ids(tuple(row["dropped"])) or "-")
        table.add_row(*cells)
    return table


def _stats_line(head: str, summary: dict[str, Any]) -> str:
    e = summary["experts"]
    never = sum(len(ids) for ids in e["never_routed"].values())
    parts = [
        f"{head} — {plural(summary['tokens'], 'token')} from "
        f"{plural(summary['documents'], 'document')}",
        f"{plural(len(e['layers']), 'MoE layer')} x {plural(e['experts'], 'expert')} "
        f"(top-{e['top_k']}), {never} never routed",
    ]
    if "attention_experts" in summary:
        a = summary["attention_experts"]
        parts.append(
            f"{plural(len(a['layers']), 'layer')} x {plural(a['experts'], 'attention expert')}"
        )
    if "heads" in summary:
        h = summary["heads"]
        parts.append(f"{plural(h['layers'], 'layer')} x {plural(h['heads'], 'head')}")
    if "tokens_per_second" in summary:
        rate = f"{summary['tokens_per_second']:,.0f} tokens/s"
        if "tokens_per_second_includes" in summary:
            rate += f" (including {summary['tokens_per_second_includes']})"
        parts.append(rate)
    return "; ".join(parts)


class KernelChoice(StrEnum):
    eager = "eager"
    grouped_mm = "grouped_mm"
    batched_mm = "batched_mm"
    mfprune_triton = "mfprune_triton"


def _split(values: list[str] | None) -> tuple[str, ...]:
    """Repeated and/or comma-separated option values -> a tuple."""
    return tuple(v.strip() for value in values or () for v in value.split(",") if v.strip())


def _write_json(target: Any, data: dict[str, Any]) -> None:
    """Write ``data`` to a claimed output (mfprune.io.outputs) atomically."""
    import json

    from mfprune.io.outputs import write_file

    write_file(target, json.dumps(data, indent=2, default=str) + "\n")


MaxDropOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--max-drop",
        help="gate: fail (exit 4) when a quality metric drops more than X below the baseline: "
        "0.02 (absolute) or 2% (of the baseline); METRIC=X for one metric (repeatable; "
        "perplexity rising is a drop)",
    ),
]


@app.command()
@command
def bench(
    model: Annotated[Path, model_argument("model folder (config.json, safetensors, tokenizer)")],
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            help="the original model, benched side by side" + _DEFAULT_HELP,
            parser=_model_location,
        ),
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option("--tasks", help="lm-eval task names (comma-separated or repeated)"),
    ] = None,
    include_path: Annotated[
        list[Path] | None,
        typer.Option("--include-path", help="a folder of your own lm-eval task YAMLs (repeatable)"),
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            help='held-out JSONL turned into a task data_<name>: {"text"} records -> perplexity; '
            '{"question", "choices", "answer"} records -> multiple choice (repeatable)',
        ),
    ] = None,
    limit: Annotated[
        float | None,
        typer.Option("--limit", help="documents per task (a share when below 1); for quick runs"),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="lm-eval batch size")] = 8,
    num_fewshot: Annotated[
        int | None, typer.Option("--num-fewshot", help="few-shot examples (default: the task's)")
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto (cuda if available), cpu, cuda, cuda:N")
    ] = "auto",
    dtype: Annotated[
        DtypeChoice, typer.Option("--dtype", help="dtype to run in (auto: the checkpoint's)")
    ] = DtypeChoice.auto,
    kernel: Annotated[
        KernelChoice | None,
        typer.Option("--kernel", help="experts implementation (default: transformers')"),
    ] = None,
    prompt_len: Annotated[
        int, typer.Option("--prompt-len", help="speed: prompt tokens per sequence")
    ] = 256,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="speed: decode steps")] = 64,
    speed_batch: Annotated[int, typer.Option("--speed-batch", help="speed: sequences")] = 1,
    repeats: Annotated[
        int,
        typer.Option("--repeats", help="speed: timed rounds after a warm-up (median and spread)"),
    ] = 5,
    no_speed: Annotated[bool, typer.Option("--no-speed", help="skip the speed runs")] = False,
    max_drop: MaxDropOpt = None,
    json_out: Annotated[
        str | None, typer.Option("--json-out", help="also write the report as JSON (bench.json)")
    ] = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="print a markdown table (for a pull request)")
    ] = False,
    arch: ArchOpt = None,
    model_code: ModelCodeOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    verbose: VerboseOpt = False,
    fmt: FormatOpt = OutputFormat.human,
    *,
    sink: Sink,
) -> None:
    """Quality (lm-eval), speed and memory of MODEL, side by side with --baseline; with
    --max-drop, a gate that exits 4 when quality falls too far."""
    from mfprune.arch import load_spec_file
    from mfprune.bench import QualitySpec, SpeedSpec, parse_gate, run_bench
    from mfprune.bench.quality import as_limit

    if markdown and fmt is OutputFormat.json:
        raise MfpruneError(
            "--markdown and --format json both print on stdout", hint="use --json-out FILE"
        )
    gate = parse_gate(max_drop or ())  # not split on commas: lm-eval filters have them
    json_target = None
    if json_out is not None:  # claimed now: an unusable path fails before any model runs
        from mfprune.io.outputs import Input, claim_file

        inputs = [Input(model, "the model"), *Input.of(baseline, "the baseline model")]
        inputs += [Input(p, "a --data file") for p in data or ()]
        inputs += [Input(p, "an --include-path folder") for p in include_path or ()]
        json_target = claim_file(json_out, inputs=inputs, flag="--json-out", example="bench.json")
    with _model_code(model_code, trust_remote_code), library_output(verbose=verbose):
        report = run_bench(
            model,
            baseline=baseline,
            quality=QualitySpec(
                tasks=_split(tasks),
                include_paths=tuple(include_path or ()),
                data=tuple(data or ()),
                limit=as_limit(limit),
                batch_size=batch_size,
                num_fewshot=num_fewshot,
            ),
            speed=None
            if no_speed
            else SpeedSpec(
                prompt_len=prompt_len,
                new_tokens=new_tokens,
                batch_size=speed_batch,
                repeats=repeats,
            ),
            device=device,
            dtype=dtype.value,
            kernel=kernel.value if kernel else None,
            gate=gate,
            on_stage=sink.info,
            spec=load_spec_file(arch) if arch else None,
        )
    data_out = report.to_dict()
    if json_target is not None:
        _write_json(json_target, data_out)
    if markdown:
        sys.stdout.write(report.markdown())
    else:
        sink.result(data_out, report.table())
    _raise_on_gate(report.gate)


def _raise_on_gate(gate: Any) -> None:
    """A gate that matched no metric is bad input (exit 2); a failed one exits 4."""
    from mfprune.errors import GateFailed

    if gate is None:
        return
    if gate.unmatched or not gate.checks:
        raise MfpruneError(gate.summary(), hint="metric names are task/metric as in the table")
    if not gate.passed:
        raise GateFailed(gate.summary())


@app.command()
@command(
    interrupted="nothing was written to the output folder; a profile that finished is in the "
    "stats cache, so running the command again skips it"
)
def shrink(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="shrink.toml: profile, prune, bench, gate")
    ],
    model: Annotated[
        Path | None,
        typer.Option("--model", help="overrides `model`" + _DEFAULT_HELP, parser=_model_location),
    ] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="overrides `out`")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="overrides `profile.data`")] = None,
    criterion: Annotated[
        str | None, typer.Option("--criterion", help="overrides `prune.criterion`")
    ] = None,
    keep: Annotated[
        int | None, typer.Option("--keep", help="overrides the file's budget with prune.keep")
    ] = None,
    keep_ratio: Annotated[
        float | None,
        typer.Option("--keep-ratio", help="overrides the file's budget with prune.keep_ratio"),
    ] = None,
    max_drop: Annotated[
        str | None, typer.Option("--max-drop", help="overrides `gate.max_drop` (0.02 or 2%)")
    ] = None,
    repair: Annotated[
        str | None, typer.Option("--repair", help="overrides `prune.repair` (none or refit)")
    ] = None,
    limit: Annotated[float | None, typer.Option("--limit", help="overrides `bench.limit`")] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="overrides profile.device and bench.device")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="overrides `profile.cache_dir`")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace a non-empty output folder (atomically)")
    ] = False,
    verbose: VerboseOpt = False,
    fmt: FormatOpt = OutputFormat.human,
    *,
    sink: Sink,
) -> None:
    """The CI step: profile → prune → bench → gate, driven by one TOML file; every artifact in
    one folder. Exit 0 done (gate passed), 4 gate failed, 2 bad input (docs/ci.md)."""
    from mfprune.shrink import load_config, run_shrink

    def absolute(p: Path | str | None) -> str | None:  # flags: relative to the current folder
        return None if p is None else str(Path(p).expanduser().resolve())

    if out is not None:
        from mfprune.io.outputs import not_empty

        not_empty(out)

    overrides: dict[str, Any] = {
        "model": absolute(model),
        "out": absolute(out),
        "profile.data": absolute(data),
        "profile.cache_dir": absolute(cache_dir),
        "profile.device": device,
        "bench.device": device,
        "prune.criterion": criterion,
        "prune.keep": keep,
        "prune.keep_ratio": keep_ratio,
        "prune.repair": repair,
        "gate.max_drop": max_drop,
        "bench.limit": limit,
        "overwrite": overwrite or None,
    }
    with library_output(verbose=verbose):
        outcome = run_shrink(load_config(config, overrides), config_path=config, on_stage=sink.info)
    if outcome.replaced:
        sink.warn(f"overwrite: replaced {outcome.replaced}")
    sink.show(outcome.bench.table())
    result = outcome.to_dict()
    rw = outcome.rewrite
    cached = " (profile skipped: cached stats)" if outcome.stats_cached else ""
    sink.result(
        result,
        f"wrote {outcome.out}: model/ {_human_bytes(rw.out_bytes)} "
        f"({rw.out_bytes / max(rw.source_bytes, 1):.1%} of {_human_bytes(rw.source_bytes)}), "
        f"stats, plan.json, bench.json, report.md{cached}",
    )
    _raise_on_gate(outcome.bench.gate)


def main() -> None:  # pragma: no cover - the console entry point is mfprune.entry:main
    from mfprune.entry import main as entry

    entry()
