"""Byte-range slicing equals torch indexing, on random shapes, axes, kept sets and dtypes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mfprune.io.reader import read_header
from mfprune.io.writer import write_shard
from mfprune.rewrite import slicing

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]


@st.composite
def cases(draw):
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(0, ndim - 1))
    width = draw(st.sampled_from([w for w in (1, 2, 3) if shape[axis] % w == 0]))
    n = shape[axis] // width
    kept = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
    dtype = draw(st.sampled_from(DTYPES))
    max_ranges = draw(st.sampled_from([1, 256]))  # force the in-memory gather path too
    return shape, axis, width, kept, dtype, max_ranges


@settings(max_examples=60, deadline=None)
@given(cases())
def test_slice_tensor_matches_torch(tmp_path_factory, case):
    shape, axis, width, kept, dtype, max_ranges = case
    tmp = tmp_path_factory.mktemp("slice")
    t = (torch.arange(int(torch.tensor(shape).prod())) % 251).reshape(shape).to(dtype)
    save_file({"x": t, "pad": torch.ones(3)}, tmp / "a.safetensors")
    info = read_header(tmp / "a.safetensors").tensors["x"]
    old = slicing.MAX_RANGES
    slicing.MAX_RANGES = max_ranges
    try:
        out = slicing.slice_tensor(info, axis=axis, blocks=slicing.blocks_for(kept, width))
    finally:
        slicing.MAX_RANGES = old
    write_shard(tmp / "b.safetensors", [out], metadata={"format": "pt"})
    got = load_file(tmp / "b.safetensors")["x"]
    index = torch.tensor([i * width + j for i in kept for j in range(width)])
    expected = t.index_select(axis, index)
    assert got.dtype == dtype and got.shape == expected.shape
    assert torch.equal(got.view(torch.uint8), expected.contiguous().view(torch.uint8))


def test_blocks_merge_adjacent_ids():
    assert slicing.blocks_for([0, 1, 2, 5, 7, 8], 2) == [(0, 6), (10, 12), (14, 18)]
