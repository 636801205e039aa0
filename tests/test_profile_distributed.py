"""`mfprune profile` under torchrun: two gloo ranks split the data, all-reduce the sums, and rank 0
writes the same stats one process makes — for the whole data (tokens, documents, fingerprint)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from test_profile import DOCS, SEQ_LEN, assert_same_stats, profile, write_jsonl

from mfprune.errors import MfpruneError
from mfprune.profiling import ProfileStats, Shard
from mfprune.profiling.data import TokenData
from mfprune.profiling.distributed import World, detect_world, rank_share


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(model_dir, tmp_path):
    model = model_dir("qwen2_moe")  # shared expert, heads
    data = write_jsonl(tmp_path / "task.jsonl", [{"text": d} for d in DOCS])
    out = tmp_path / "dist.safetensors"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MFPRUNE_DIST_TIMEOUT": "60",  # a lost rank fails the test instead of hanging it
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "mfprune",
        "profile",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--seq-len",
        str(SEQ_LEN),
        "--batch-size",
        "3",
        "--device",
        "cpu",
        "--format",
        "json",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"out"') == 1  # only rank 0 reports
    distributed = ProfileStats.load(out)
    single = profile(model, data, batch_size=3)
    assert_same_stats(single, distributed, rtol=1e-6)
    meta = distributed.meta
    assert (meta.tokens, meta.documents) == (single.meta.tokens, single.meta.documents)
    assert meta.data_fingerprint == single.meta.data_fingerprint
    assert meta.data_parts == single.meta.data_parts  # one part: the whole data, once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.safetensors", "task.jsonl"]


def test_ranks_share_the_chunks_evenly():
    chunks = [torch.arange(n, dtype=torch.int32) for n in (5, 1, 9, 3, 7, 2, 8)]
    tokens = TokenData(chunks=chunks, documents=7, fingerprint="f")
    shares = [rank_share(tokens, World(rank=r, size=3, local_rank=r)) for r in range(3)]
    got = sorted(tuple(c.tolist()) for s in shares for c in s.chunks)
    assert got == sorted(tuple(c.tolist()) for c in chunks)  # each chunk exactly once
    sizes = [s.tokens for s in shares]
    assert max(sizes) - min(sizes) <= 9  # dealt longest first
    assert all(s.fingerprint == "f" and s.documents == 7 for s in shares)


def test_world_from_the_environment(monkeypatch, model_dir, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert detect_world() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert detect_world() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert detect_world() == World(rank=2, size=4, local_rank=0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(MfpruneError, match="RANK"):
        detect_world()
    monkeypatch.setenv("RANK", "1")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "router"}])
    with pytest.raises(MfpruneError, match="ranks already split the data"):
        profile(model_dir("mixtral"), data, shard=Shard(0, 2))
    monkeypatch.setenv("MFPRUNE_DIST_TIMEOUT", "soon")
    from mfprune.profiling.distributed import timeout

    with pytest.raises(MfpruneError, match="MFPRUNE_DIST_TIMEOUT"):
        timeout()


@pytest.fixture(autouse=True)
def _no_stray_process_group():
    yield
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


def test_data_mismatch_between_ranks_is_caught(monkeypatch):
    """Each rank compares what it read with rank 0 before loading the model (one-rank gloo
    group in this process; a different data fingerprint is faked on 'rank 1')."""
    import torch.distributed as dist

    from mfprune.errors import DataError
    from mfprune.profiling.distributed import check_same_data

    calls = []

    def fake_all_gather_object(out: list, obj: object) -> None:
        calls.append(obj)
        out[:] = [obj, ("other", obj[1])]

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", fake_all_gather_object)
    tokens = TokenData(chunks=[torch.ones(3, dtype=torch.int32)], documents=1, fingerprint="f")
    with pytest.raises(DataError, match=r"ranks \[1\] read other data"):
        check_same_data(tokens, "model")
    assert calls == [("f", "model")]
