"""Plans, stats and safetensors headers are parsed, never evaluated: whatever the bytes, the
result is a value or one MfpruneError — never another exception."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mfprune.errors import MfpruneError
from mfprune.io.reader import read_header
from mfprune.plan import PLAN_FORMAT, PrunePlan

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 300)
    | st.floats(allow_nan=True)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)
sections = st.dictionaries(
    st.one_of(st.integers(0, 40).map(str), st.text(max_size=3)),
    st.one_of(st.lists(st.integers(-2, 70), max_size=10), json_values),
    max_size=5,
)
plans = st.fixed_dictionaries(
    {"format": st.sampled_from([PLAN_FORMAT, "mfprune.plan/2", 1])},
    optional={
        "experts": sections,
        "attention_experts": sections,
        "heads": sections,
        "meta": json_values,
        "extra": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(plans, json_values))
def test_plan_parsing_returns_a_plan_or_one_error(data):
    try:
        plan = PrunePlan.from_dict(data)
    except MfpruneError:
        return
    text = plan.to_json()  # compared as text: a NaN in meta is never == itself
    assert PrunePlan.from_dict(json.loads(text)).to_json() == text  # round trip


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(header=st.one_of(json_values, st.binary(max_size=64)), data=st.binary(max_size=64))
def test_safetensors_header_parsing_never_crashes(header, data, tmp_path):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    with contextlib.suppress(MfpruneError):  # anything else escaping fails the test
        read_header(path)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(0, 4000), flip=st.integers(0, 4000), value=st.integers(0, 255))
def test_corrupted_stats_files_give_one_error(cut, flip, value, stats_file, tmp_path):
    from mfprune.profiling import ProfileStats

    raw = bytearray(stats_file.read_bytes())
    if flip < len(raw):
        raw[flip] = value
    path = tmp_path / "s.safetensors"
    path.write_bytes(bytes(raw[: max(cut, 1)] if cut < len(raw) else raw))
    with contextlib.suppress(MfpruneError):
        ProfileStats.load(path)


@pytest.fixture(scope="module")
def stats_file(model_dir, tmp_path_factory):
    from mfprune import profile_model

    d = tmp_path_factory.mktemp("fuzz")
    (d / "t.jsonl").write_text(json.dumps({"text": "def f(x): return x * 2\n" * 3}) + "\n")
    return profile_model(model_dir("mixtral"), d / "t.jsonl", device="cpu").save(d / "s.st")
