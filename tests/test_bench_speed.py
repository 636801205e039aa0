"""bench's speed numbers: warm-up, interleaved rounds, median and spread, the noise verdict, and
memory that is counted (not an RSS difference that earlier runs make meaningless)."""

from __future__ import annotations

import functools

import pytest

from mfprune.bench.report import BenchReport, ModelBench
from mfprune.bench.speed import (
    CPU_METHOD,
    NOISE_FLOOR,
    SpeedResult,
    SpeedSpec,
    Timing,
    compare,
    measure_speed,
)


def test_overlapping_spreads_are_within_noise():
    # medians 105 vs 120 (x1.14), but the runs overlap: 110 > 108
    c = compare(Timing((100.0, 105.0, 110.0)), Timing((108.0, 120.0, 125.0)))
    assert c.within_noise and c.verdict == "within noise"
    assert c.ratio == pytest.approx(105 / 120)


def test_separate_spreads_are_a_difference():
    assert compare(Timing((200.0, 205.0, 210.0)), Timing((100.0, 102.0, 105.0))).verdict == "faster"
    assert compare(Timing((50.0, 51.0, 52.0)), Timing((100.0, 102.0, 105.0))).verdict == "slower"


def test_a_difference_under_the_floor_is_noise_even_with_tight_runs():
    small = 1 + NOISE_FLOOR / 2
    c = compare(Timing((100.0 * small,) * 3), Timing((100.0,) * 3))
    assert c.within_noise
    big = 1 + NOISE_FLOOR * 2
    assert not compare(Timing((100.0 * big,) * 3), Timing((100.0,) * 3)).within_noise


def test_spread_is_range_over_median():
    t = Timing((90.0, 100.0, 120.0))
    assert t.median == 100 and t.spread == pytest.approx(0.3)
    assert t.to_dict()["samples"] == [90.0, 100.0, 120.0]


@pytest.fixture(scope="module")
def two_models(model_dir):
    from transformers import AutoModelForCausalLM

    path = model_dir("qwen3_moe")
    return {
        name: AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
        for name in ("baseline", "model")
    }


def test_rounds_are_interleaved_after_a_warm_up(two_models):
    calls: list[str] = []
    for name, model in two_models.items():
        original = model.forward

        @functools.wraps(original)
        def forward(*args, _name=name, _original=original, **kwargs):
            if kwargs["input_ids"].shape[1] > 1:  # a prefill: one per run
                calls.append(_name)
            return _original(*args, **kwargs)

        model.forward = forward
    try:
        results = measure_speed(two_models, SpeedSpec(prompt_len=6, new_tokens=2, repeats=3))
    finally:
        for model in two_models.values():
            del model.forward
    # warm-up of each, then rounds in alternating order
    warm_up, rounds = ["baseline", "model"], ["baseline", "model", "model", "baseline"] * 2
    assert calls == warm_up + rounds[:6]
    for result in results.values():
        assert result.interleaved and result.repeats == 3
        assert len(result.prefill.samples) == 3 and len(result.decode.samples) == 3
        assert all(s > 0 for s in result.prefill.samples + result.decode.samples)


def test_cpu_memory_is_weights_plus_kv_cache(two_models):
    model = two_models["model"]
    spec = SpeedSpec(prompt_len=6, new_tokens=2, repeats=1)
    result = measure_speed({"m": model}, spec)["m"]
    assert result.memory_method == CPU_METHOD and not result.interleaved
    weights = sum(p.numel() * p.element_size() for p in (*model.parameters(), *model.buffers()))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # keys and values of every layer for the prompt and the decoded tokens (fp32); the last
    # decoded token's own cache entry is written by the step that produced it
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4 * (6 + 2)
    assert result.peak_memory_bytes == weights + kv


def test_report_rows_carry_the_verdict():
    def bench(prefill: tuple[float, ...], decode: tuple[float, ...]) -> ModelBench:
        speed = SpeedResult(
            prompt_len=8, new_tokens=2, batch_size=1, repeats=3, prefill=Timing(prefill),
            decode=Timing(decode), interleaved=True, memory_method=CPU_METHOD,
            peak_memory_bytes=1000,
        )  # fmt: skip
        return ModelBench("m", 10, 40, 40, "float32", "cpu", None, speed=speed)

    report = BenchReport(
        model=bench((100, 104, 108), (10, 11, 12)), baseline=bench((100, 102, 106), (20, 21, 22))
    )
    rows = {r["name"]: r for r in report.to_dict()["comparison"]}
    assert rows["prefill tokens/s"]["verdict"] == "within noise"
    assert rows["decode tokens/s"]["verdict"] == "slower"
    assert "memory: weights + KV cache (counted)" in rows
    text = report.markdown()
    assert "1.020× within noise" in text and "0.524× slower" in text
    assert "interleaved" in text and "never gated" in text
