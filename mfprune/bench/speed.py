"""Speed and memory of loaded models on fixed prompts, interleaved, with their noise.

Prefill: one forward pass over ``batch × prompt_len`` prompt tokens (with the KV cache on).
Decode: ``new_tokens`` greedy steps of one token per sequence, reusing that cache. The prompts
are token ids drawn from a fixed seed, so every model with the same vocabulary gets the same
prompts.

Timing: every model runs once untimed (warm-up: first-call allocations, kernel selection), then
``repeats`` timed rounds; in each round every model runs once, in alternating order, so drift of
the machine (another process, clock scaling) falls on all models alike. Each model's result keeps
every sample; the report gives the median and the spread (min..max), and ``compare`` calls a
difference "within noise" when the two spreads overlap or the medians differ by less than
``NOISE_FLOOR``.

Memory, labelled by how it was measured:

- on CUDA, ``torch.cuda.max_memory_allocated`` during the model's own runs, minus what was
  allocated before them, plus the model's weights: the peak of tensors this model needs
  (weights, activations, KV cache), the allocator's cached-but-free blocks excluded;
- on CPU, torch keeps no allocator statistics and the process's RSS mixes every model loaded and
  every earlier run, so the bytes of the weights and of the KV cache after the decode are counted
  tensor by tensor (activations, short-lived, are not included).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

CUDA_METHOD = "cuda_max_memory_allocated"
CPU_METHOD = "cpu_weights_plus_kv_cache"
MEMORY_LABELS = {
    CUDA_METHOD: "peak memory (CUDA allocated)",
    CPU_METHOD: "memory: weights + KV cache (counted)",
}
#: timing differences smaller than this share of the baseline are never called a difference
NOISE_FLOOR = 0.05


@dataclass(frozen=True)
class SpeedSpec:
    prompt_len: int = 256
    new_tokens: int = 64
    batch_size: int = 1
    repeats: int = 5
    seed: int = 0


@dataclass(frozen=True)
class Timing:
    """Throughput samples of one stage (tokens/s, one per timed round)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: the run-to-run noise, as a share."""
        return (self.high - self.low) / max(self.median, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "spread": self.spread,
            "samples": list(self.samples),
        }


@dataclass(frozen=True)
class Comparison:
    """A model's throughput against the baseline's: the ratio of the medians and the verdict."""

    ratio: float
    within_noise: bool

    @property
    def verdict(self) -> str:
        if self.within_noise:
            return "within noise"
        return "faster" if self.ratio > 1 else "slower"

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "within_noise": self.within_noise, "verdict": self.verdict}


def compare(model: Timing, baseline: Timing) -> Comparison:
    """Within noise when the spreads overlap or the medians differ by under ``NOISE_FLOOR``."""
    ratio = model.median / max(baseline.median, 1e-12)
    overlap = model.low <= baseline.high and baseline.low <= model.high
    return Comparison(ratio=ratio, within_noise=overlap or abs(ratio - 1) < NOISE_FLOOR)


@dataclass(frozen=True)
class SpeedResult:
    prompt_len: int  # tokens per prompt actually used (capped by the model's positions)
    new_tokens: int
    batch_size: int
    repeats: int
    prefill: Timing  # tokens/s
    decode: Timing
    interleaved: bool  # timed in rounds with the other models (module docstring)
    memory_method: str  # CUDA_METHOD or CPU_METHOD
    peak_memory_bytes: int | None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill.median

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode.median

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
            "batch_size": self.batch_size,
            "repeats": self.repeats,
            "interleaved": self.interleaved,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prefill": self.prefill.to_dict(),
            "decode": self.decode.to_dict(),
            "memory_method": self.memory_method,
            "memory_label": MEMORY_LABELS[self.memory_method],
            "peak_memory_bytes": self.peak_memory_bytes,
        }


def measure_speed(models: Mapping[str, Any], spec: SpeedSpec) -> dict[str, SpeedResult]:
    """Time prefill and decode of every model (loaded, in eval mode, on its device), interleaved:
    a warm-up run each, then ``spec.repeats`` rounds in alternating order."""
    runners = {name: _Runner(model, spec) for name, model in models.items()}
    order = list(runners)
    with torch.inference_mode():
        for runner in runners.values():
            runner.run(timed=False)
        for round_ in range(spec.repeats):
            for name in order if round_ % 2 == 0 else order[::-1]:
                runners[name].run(timed=True)
    return {name: runner.result(interleaved=len(runners) > 1) for name, runner in runners.items()}


class _Runner:
    """One model's prompts, timed runs and memory."""

    def __init__(self, model: Any, spec: SpeedSpec) -> None:
        self.model, self.spec = model, spec
        self.device = next(model.parameters()).device
        self.prompt_len, self.new_tokens = _fit(model.config, spec.prompt_len, spec.new_tokens)
        generator = torch.Generator().manual_seed(spec.seed)
        vocab = int(model.config.get_text_config().vocab_size)
        ids = torch.randint(0, vocab, (spec.batch_size, self.prompt_len), generator=generator)
        self.ids = ids.to(self.device)  # [B, S]
        self.sync: Callable[[], None] = (
            torch.cuda.synchronize if self.device.type == "cuda" else _no_sync
        )
        # transformers >= 5.2x names the KV cache `cache`; earlier 5.x `past_key_values`
        params = inspect.signature(model.forward).parameters
        self.cache = "cache" if "cache" in params else "past_key_values"
        self.weights = sum(
            t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
        )
        self.prefill: list[float] = []  # seconds
        self.decode: list[float] = []
        self.peak = 0

    def run(self, *, timed: bool) -> None:
        model, cuda = self.model, self.device.type == "cuda"
        if cuda:
            self.sync()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        start = time.perf_counter()
        out = model(input_ids=self.ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)  # [B, 1]
        self.sync()
        mid = time.perf_counter()
        for _ in range(self.new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{self.cache: out[self.cache]})
            nxt = out.logits[:, -1:].argmax(-1)
        self.sync()
        end = time.perf_counter()
        if cuda:
            run = torch.cuda.max_memory_allocated(self.device) - before
            self.peak = max(self.peak, self.weights + run)
        else:
            self.peak = max(self.peak, self.weights + _tensor_bytes(out[self.cache]))
        if timed:
            self.prefill.append(mid - start)
            self.decode.append(end - mid)

    def result(self, *, interleaved: bool) -> SpeedResult:
        b = self.spec.batch_size
        return SpeedResult(
            prompt_len=self.prompt_len,
            new_tokens=self.new_tokens,
            batch_size=b,
            repeats=len(self.prefill),
            prefill=Timing(tuple(b * self.prompt_len / max(s, 1e-12) for s in self.prefill)),
            decode=Timing(tuple(b * self.new_tokens / max(s, 1e-12) for s in self.decode)),
            interleaved=interleaved,
            memory_method=CUDA_METHOD if self.device.type == "cuda" else CPU_METHOD,
            peak_memory_bytes=self.peak,
        )


def _tensor_bytes(obj: Any, depth: int = 0, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensors reachable from ``obj`` (a KV cache object and its layers)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if depth > 4:
        return 0
    if isinstance(obj, dict):
        items: Any = obj.values()
    elif isinstance(obj, list | tuple):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return 0
    return sum(_tensor_bytes(item, depth + 1, seen) for item in items)


def _no_sync() -> None:
    pass


def _fit(config: Any, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """Cap prompt + new tokens at the model's positions (new tokens first keep their count)."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_len + new_tokens > limit:
        new_tokens = min(new_tokens, limit // 2)
        prompt_len = max(1, min(prompt_len, limit - new_tokens))
    return prompt_len, new_tokens
