"""Speed and memory of one loaded model on fixed prompts.

Prefill: one forward pass over ``batch × prompt_len`` prompt tokens (with the KV cache on).
Decode: ``new_tokens`` greedy steps of one token per sequence, reusing that cache. Each is timed
``repeats`` times after one warm-up run and the median is reported. The prompts are token ids
drawn from a fixed seed, so every model with the same vocabulary gets the same prompts.

Memory, honestly labelled by how it was measured:

- on CUDA, ``torch.cuda.max_memory_allocated`` over the runs: the peak of tensors allocated
  (weights, activations, KV cache), the allocator's cached-but-free blocks excluded;
- on CPU, torch has no allocator statistics, so the process's resident set size is sampled
  every millisecond during the runs, and the peak *rise* over the RSS before them is reported:
  the working memory of the runs on top of the loaded model (approximate: allocator reuse and
  the sampling interval both hide some of it).
"""

from __future__ import annotations

import inspect
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

CUDA_METHOD = "cuda_max_memory_allocated"
RSS_METHOD = "cpu_rss_rise_sampled"


@dataclass(frozen=True)
class SpeedSpec:
    prompt_len: int = 256
    new_tokens: int = 64
    batch_size: int = 1
    repeats: int = 3
    seed: int = 0


@dataclass(frozen=True)
class SpeedResult:
    prompt_len: int  # tokens per prompt actually used (capped by the model's positions)
    new_tokens: int
    batch_size: int
    repeats: int
    prefill_seconds: float  # median of the repeats
    decode_seconds: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    memory_method: str  # CUDA_METHOD or RSS_METHOD
    peak_memory_bytes: int | None  # see the module docstring; None where it cannot be measured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_speed(model: Any, spec: SpeedSpec) -> SpeedResult:
    """Time prefill and decode of ``model`` (loaded, in eval mode, on its device)."""
    device = next(model.parameters()).device
    prompt_len, new_tokens = _fit(model.config, spec.prompt_len, spec.new_tokens)
    generator = torch.Generator().manual_seed(spec.seed)
    vocab = int(model.config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (spec.batch_size, prompt_len), generator=generator)  # [B, S]
    ids = ids.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else _no_sync
    # transformers >= 5.2x names the KV cache `cache`; earlier 5.x `past_key_values`
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run() -> tuple[float, float]:
        sync()
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)  # [B, 1]
        sync()
        mid = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{cache: out[cache]})
            nxt = out.logits[:, -1:].argmax(-1)
        sync()
        return mid - start, time.perf_counter() - mid

    with torch.inference_mode(), _PeakMemory(device) as memory:
        run()  # warm-up: first-call allocations, kernel selection
        times = [run() for _ in range(spec.repeats)]
    prefill = statistics.median(t[0] for t in times)
    decode = statistics.median(t[1] for t in times)
    return SpeedResult(
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        batch_size=spec.batch_size,
        repeats=spec.repeats,
        prefill_seconds=prefill,
        decode_seconds=decode,
        prefill_tokens_per_s=spec.batch_size * prompt_len / max(prefill, 1e-12),
        decode_tokens_per_s=spec.batch_size * new_tokens / max(decode, 1e-12),
        memory_method=memory.method,
        peak_memory_bytes=memory.peak,
    )


def _no_sync() -> None:
    pass


def _fit(config: Any, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """Cap prompt + new tokens at the model's positions (new tokens first keep their count)."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_len + new_tokens > limit:
        new_tokens = min(new_tokens, limit // 2)
        prompt_len = max(1, min(prompt_len, limit - new_tokens))
    return prompt_len, new_tokens


class _PeakMemory:
    """Context manager: ``peak`` (bytes) and ``method`` after it exits (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = CUDA_METHOD if device.type == "cuda" else RSS_METHOD
        self.peak: int | None = None
        self._rss: Callable[[], int] | None = _rss_reader()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = self._max = 0

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._rss is not None:
            self._base = self._max = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        assert self._rss is not None
        while not self._stop.wait(0.001):
            self._max = max(self._max, self._rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self._thread is not None and self._rss is not None:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._rss())
            self.peak = self._max - self._base


def _rss_reader() -> Callable[[], int] | None:
    """RSS in bytes from /proc (Linux); None elsewhere (memory is then not reported)."""
    path = "/proc/self/statm"
    if not os.path.exists(path):
        return None
    page = os.sysconf("SC_PAGE_SIZE")

    def read() -> int:
        with open(path, "rb") as f:
            return int(f.read().split()[1]) * page

    return read
