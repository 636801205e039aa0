"""run_bench: quality, speed and memory of a model, and of its baseline on the same settings.

Order of work, cheapest first, so bad input fails before a model is loaded: the model folders,
the options and the gate, the kernel, the tokenizer, the tasks (data read, task YAML generated,
every task name resolved); then each model in turn (baseline first), loaded with
``mfprune.load_pretrained`` (per-layer expert counts included), evaluated, timed and freed, so
only one model is in memory at a time - except for speed: the models stay loaded for the
interleaved timing rounds (speed.py) when they fit in memory together, and are timed one after
the other (and say so) when they do not.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mfprune.arch import ArchSpec, spec_for_config
from mfprune.arch.layout import resolve_layout
from mfprune.bench.quality import (
    QualitySpec,
    evaluate,
    expected_metric_keys,
    prepare_tasks,
    set_offline,
)
from mfprune.bench.report import BenchReport, GateRule, ModelBench, check_gate, check_gate_names
from mfprune.bench.speed import SpeedSpec, measure_speed
from mfprune.checkpoint import Checkpoint, open_checkpoint
from mfprune.errors import MfpruneError, ModelError, did_you_mean
from mfprune.memory import check_fits, loaded_bytes

#: transformers' own experts implementations that run on any device.
BUILTIN_KERNELS = ("eager", "grouped_mm", "batched_mm")
TRITON_KERNEL = "mfprune_triton"
KERNELS = (*BUILTIN_KERNELS, TRITON_KERNEL)


def run_bench(
    model: str | Path,
    *,
    baseline: str | Path | None = None,
    quality: QualitySpec | None = None,
    speed: SpeedSpec | None = None,
    device: str = "auto",
    dtype: str = "auto",
    kernel: str | None = None,
    gate: Sequence[GateRule] = (),
    on_stage: Callable[[str], None] | None = None,
    spec: ArchSpec | None = None,
) -> BenchReport:
    """Bench ``model`` (and ``baseline``, if given); apply ``gate`` when given.

    Args:
        quality: lm-eval tasks / task folders / a JSONL data file; None: no quality numbers.
        speed: prefill / decode timing and memory (``SpeedSpec()`` for the defaults); None: skip.
        device: "auto" (cuda if available), "cpu", "cuda", "cuda:N".
        dtype: "auto" (the checkpoint's), "float32", "bfloat16", "float16".
        kernel: the experts implementation (``KERNELS``); None: transformers' default.
        gate: ``--max-drop`` rules; needs a baseline and quality metrics.
        on_stage: called with a short line as each stage starts (progress for a person).
        spec: the adapter (``--arch``) for a family without a built-in one.

    The returned report's ``gate`` says whether the gate passed; raising is the caller's call.
    """
    set_offline()
    from mfprune.modules import refuse_block_diffusion
    from mfprune.profiling.run import resolve_device, resolve_dtype

    say = on_stage or (lambda _line: None)
    quality = quality or QualitySpec()
    ckpt = open_checkpoint(model)
    base = open_checkpoint(baseline) if baseline is not None else None
    for target in filter(None, (ckpt, base)):  # an MoE model mfprune knows, before any work
        layout = resolve_layout(target, spec or spec_for_config(target.config))
        layout.require_one_stack("benching")  # its quality and speed runs feed a causal LM
        refuse_block_diffusion(target.config, "benching")
    _check_options(quality, speed, gate, has_baseline=base is not None)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    for target in filter(None, (base, ckpt)):  # one at a time at least, before any work
        check_fits(
            loaded_bytes(target, torch_dtype), device=torch_device,
            what=f"benching {target.root} (the whole model is loaded)",
            hint="bench on a machine with more memory, or in a smaller --dtype "
            "(bfloat16 halves float32 weights)",
        )  # fmt: skip
    implementation = resolve_kernel(kernel, torch_device)
    tokenizer = _tokenizer(ckpt, base)
    report_models: dict[str, ModelBench] = {}
    timed: dict[str, Any] = {}  # role -> loaded model, kept for the interleaved speed rounds
    with tempfile.TemporaryDirectory(prefix="mfprune-bench-") as work:
        tasks = None
        if not quality.empty:
            tasks = prepare_tasks(quality, Path(work))  # bad data / task names fail here, quietly
            keys = expected_metric_keys(tasks) if gate else None
            if keys is not None:  # the metrics are known up front: check the names now
                check_gate_names(gate, keys, where="--max-drop")
            say(f"lm-eval tasks: {', '.join(tasks.names)}")
        targets = [(role, t) for role, t in (("baseline", base), ("model", ckpt)) if t]
        together = speed is not None and _fit_together(
            [t for _, t in targets], torch_device, torch_dtype
        )
        for role, target in targets:
            seconds: dict[str, float] = {}
            start = time.perf_counter()
            say(f"{role}: loading {target.root}")
            loaded = load_model(
                target.root, dtype=torch_dtype, device=torch_device, kernel=implementation
            )
            seconds["load"] = time.perf_counter() - start
            bench = _describe(target, loaded)
            with _kernel_errors(implementation):
                if tasks is not None:
                    say(f"{role}: lm-eval on {', '.join(tasks.names)}")
                    start = time.perf_counter()
                    bench.quality = evaluate(loaded, tokenizer, tasks, quality)
                    seconds["quality"] = time.perf_counter() - start
                if speed is not None and not together:
                    say(f"{role}: timing prefill and decode ({speed.repeats} runs)")
                    start = time.perf_counter()
                    bench.speed = measure_speed({role: loaded}, speed)[role]
                    seconds["speed"] = time.perf_counter() - start
            bench.seconds = {k: round(v, 3) for k, v in seconds.items()}
            report_models[role] = bench
            if together:
                timed[role] = loaded
            del loaded
            _free(torch_device)
        if timed and speed is not None:
            say(f"timing prefill and decode: {speed.repeats} rounds of {' and '.join(timed)}")
            start = time.perf_counter()
            with _kernel_errors(implementation):
                for role, result in measure_speed(timed, speed).items():
                    report_models[role].speed = result
                    report_models[role].seconds["speed"] = round(time.perf_counter() - start, 3)
            timed.clear()
            _free(torch_device)
    result = BenchReport(
        model=report_models["model"],
        baseline=report_models.get("baseline"),
        settings=_settings(quality, speed, device, dtype, implementation, gate),
        versions=_versions(),
    )
    if gate and result.baseline is not None:
        result.gate = check_gate(gate, result.model.quality, result.baseline.quality)
    return result


def _fit_together(targets: Sequence[Checkpoint], device: Any, dtype: Any) -> bool:
    """Whether all models fit in memory at once, for interleaved timing (else one at a time)."""
    from mfprune.memory import USABLE_SHARE, available_bytes

    if len(targets) < 2:
        return True
    free = available_bytes(device)
    need = sum(loaded_bytes(t, dtype) for t in targets)  # weights; activations are small
    return free is None or need <= USABLE_SHARE * free


def _check_options(
    quality: QualitySpec, speed: SpeedSpec | None, gate: Sequence[GateRule], *, has_baseline: bool
) -> None:
    if gate and not has_baseline:
        raise MfpruneError(
            "--max-drop compares with a baseline: none was given",
            hint="pass --baseline ORIGINAL_MODEL",
        )
    if gate and quality.empty:
        raise MfpruneError(
            "--max-drop gates on quality, but no quality task was given",
            hint="pass --tasks NAME, --data FILE.jsonl, or both",
        )
    if quality.limit is not None and not quality.limit > 0:
        raise MfpruneError(f"--limit must be positive, got {quality.limit}", hint="fix --limit")
    counts = {"--batch-size": quality.batch_size}
    if speed is not None:
        counts |= {
            "--prompt-len": speed.prompt_len,
            "--new-tokens": speed.new_tokens,
            "--speed-batch": speed.batch_size,
            "--repeats": speed.repeats,
        }
    for flag, value in counts.items():
        if value < 1:
            raise MfpruneError(f"{flag} must be at least 1, got {value}", hint=f"fix {flag}")


def resolve_kernel(kernel: str | None, device: Any) -> str | None:
    """Check an experts-implementation name; register mfprune's Triton kernel when asked."""
    if kernel is None or kernel in BUILTIN_KERNELS:
        return kernel
    if kernel != TRITON_KERNEL:
        raise MfpruneError(
            f"unknown kernel '{kernel}'{did_you_mean(kernel, KERNELS)}",
            hint=f"use one of {', '.join(KERNELS)}",
        )
    # before triton is imported: it reads TRITON_INTERPRET once, when it is first imported
    if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
        raise MfpruneError(
            f"--kernel {TRITON_KERNEL} runs on CUDA devices only",
            hint="pass --device cuda, or set TRITON_INTERPRET=1 to run it (very slowly) on CPU",
        )
    try:
        import mfprune_kernels

        register = mfprune_kernels.register
    except (ImportError, AttributeError) as exc:
        raise MfpruneError(
            f"--kernel {TRITON_KERNEL}: mfprune's Triton kernels cannot be imported ({exc})",
            hint="install mfprune with its kernels (`pip install -e .` in the repository, which "
            "needs triton), or use --kernel grouped_mm",
        ) from None
    return register()


@contextlib.contextmanager
def _kernel_errors(kernel: str | None) -> Iterator[None]:
    """mfprune's Triton kernel refuses experts it cannot run (biases, another activation, ...)
    with KernelInputError at the first forward: that is the user's choice of kernel, not a bug."""
    if kernel != TRITON_KERNEL:
        yield
        return
    from mfprune_kernels import KernelInputError

    try:
        yield
    except KernelInputError as exc:
        raise ModelError(
            f"--kernel {TRITON_KERNEL}: {exc}", hint="use --kernel grouped_mm, or leave it out"
        ) from None


def load_model(root: Path, *, dtype: Any, device: Any, kernel: str | None) -> Any:
    """``mfprune.load_pretrained`` (uneven expert counts too), quietly, on ``device``."""
    from transformers.utils import logging as hf_logging

    from mfprune.loading import load_pretrained

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if kernel is not None:
        kwargs["experts_implementation"] = kernel
    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        model = load_pretrained(root, **kwargs)
    except ValueError as exc:
        if kernel is not None and "experts_implementation" in str(exc):
            raise ModelError(
                f"{root} cannot run with --kernel {kernel}: {str(exc).splitlines()[0]}",
                hint="leave --kernel out to use transformers' default",
            ) from None
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def _tokenizer(ckpt: Checkpoint, base: Checkpoint | None) -> Any:
    """MODEL's tokenizer, or the baseline's when MODEL has none (pruning never changes it)."""
    from mfprune.profiling.run import load_tokenizer

    try:
        return load_tokenizer(ckpt.root)
    except ModelError:
        if base is None:
            raise
        return load_tokenizer(base.root)


def _describe(ckpt: Checkpoint, model: Any) -> ModelBench:
    params = list(model.parameters())
    buffers = list(model.buffers())
    return ModelBench(
        path=str(ckpt.root),
        params=sum(p.numel() for p in params),
        weights_bytes=sum(t.numel() * t.element_size() for t in (*params, *buffers)),
        disk_bytes=sum(s.file_size for s in ckpt.shards),
        dtype=str(params[0].dtype).removeprefix("torch."),
        device=str(params[0].device),
        experts_implementation=getattr(model.config, "_experts_implementation", None),
    )


def _free(device: Any) -> None:
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def _settings(
    quality: QualitySpec,
    speed: SpeedSpec | None,
    device: str,
    dtype: str,
    kernel: str | None,
    gate: Sequence[GateRule],
) -> dict[str, Any]:
    return {
        "tasks": list(quality.tasks),
        "include_paths": [str(p) for p in quality.include_paths],
        "data": [str(p) for p in quality.data],
        "limit": quality.limit,
        "batch_size": quality.batch_size,
        "num_fewshot": quality.num_fewshot,
        "speed": None if speed is None else speed.__dict__,
        "device": device,
        "dtype": dtype,
        "kernel": kernel,
        "max_drop": [str(r) for r in gate],
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("lm_eval", "torch", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out
