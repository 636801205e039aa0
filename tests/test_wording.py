"""Messages a user reads, each checked: plurals, config changes, encodings, JSON errors, hub ids,
percent drops, task names, piped tables, progress in logs, and stats bytes that do not depend
on the process that wrote them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mfprune.bench.quality import data_task_name, read_data_records
from mfprune.bench.report import DropLimit
from mfprune.cli import _stats_line, app
from mfprune.console import LogTicker
from mfprune.errors import DataError, ModelError
from mfprune.rewrite.config_patch import change_text

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "mfprune" / "default_model" / "data" / "code.profile.jsonl"


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def summary(tokens: int, documents: int, layers: int, **extra: object) -> dict:
    experts = {"layers": list(range(layers)), "experts": 1, "top_k": 1, "never_routed": {}}
    return {"tokens": tokens, "documents": documents, "experts": experts, **extra}


def test_counts_of_one_are_singular():
    line = _stats_line("wrote s", summary(1, 1, 1))
    assert "1 token from 1 document" in line and "1 MoE layer x 1 expert (top-1)" in line
    line = _stats_line("wrote s", summary(2048, 3, 4))
    assert "2,048 tokens from 3 documents" in line and "4 MoE layers x 1 expert" in line


def test_sequential_throughput_says_it_includes_disk_time():
    extra = {"tokens_per_second": 19.0, "tokens_per_second_includes": "reading each layer"}
    assert "19 tokens/s (including reading each layer)" in _stats_line(
        "w", summary(9, 1, 1, **extra)
    )


def test_config_changes_read_as_words():
    assert change_text("head_dim", None, 16) == "head_dim set to 16"
    assert change_text("num_experts", 16, 8) == "num_experts 16→8"
    assert change_text("x", 1, None) == "x removed"


@pytest.mark.parametrize("reader", ["profile", "bench"])
def test_encoding_hints_fit_the_bytes(reader, tmp_path):
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes('{"text": "hello"}\n'.encode("utf-16"))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    for path, hint in ((utf16, "the file is UTF-16: convert it, e.g. `iconv -f utf-16"),
                       (latin, "`file -i IN` tells its encoding")):  # fmt: skip
        if reader == "bench":
            with pytest.raises(DataError) as err:
                read_data_records(path)
            message, got = err.value.message, err.value.hint
        else:
            result = run("profile", "default", "--data", path, "--out", tmp_path / "s")
            message, got = result.stderr, result.stderr
        assert f"{path}:1: not UTF-8 text" in message and hint in got
        assert "latin1" not in got or path == latin


def test_a_bad_jsonl_line_names_its_line_and_column(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(DataError) as err:
        read_data_records(bad)
    assert err.value.message == f"{bad}:2: not valid JSON (Expecting value at column 10)"
    result = run("profile", "default", "--data", bad, "--out", tmp_path / "s")
    assert f"error: {bad}:2: not valid JSON (Expecting value at column 10)" in result.stderr
    assert "at at" not in result.stderr


def test_a_hub_id_is_told_that_only_local_folders_work(tmp_path, monkeypatch):
    from mfprune.checkpoint import open_checkpoint

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as err:
        open_checkpoint("Qwen/Qwen3-30B-A3B")
    assert "mfprune never downloads" in err.value.hint
    assert "huggingface-cli download Qwen/Qwen3-30B-A3B --local-dir DIR" in err.value.hint
    with pytest.raises(ModelError) as err:
        open_checkpoint(tmp_path / "missing")
    assert err.value.hint.startswith("check the path: MODEL is a local folder")


def test_a_drop_of_more_than_the_baseline_reads():
    assert DropLimit.parse("200%") == DropLimit(2.0, relative=True)
    assert DropLimit.parse("200%").allowed(10.0) == pytest.approx(20.0)


def test_task_names_from_non_ascii_file_names():
    assert data_task_name(Path("données.jsonl")) == "data_donnees"
    assert data_task_name(Path("held-out v2.jsonl")) == "data_held_out_v2"
    cjk, other = data_task_name(Path("代码.jsonl")), data_task_name(Path("数据.jsonl"))
    assert cjk.isascii() and cjk.startswith("data_") and cjk != other
    mixed = data_task_name(Path("code_代码.jsonl"))
    assert mixed.startswith("data_code_") and mixed != "data_code"


def test_piped_show_tables_never_wrap_an_entry(tmp_path):
    stats = tmp_path / "s.safetensors"
    assert (
        run("profile", "default", "--data", DATA, "--out", stats, "--max-tokens", 400).exit_code
        == 0
    )
    result = run("show", stats, "--top", 8)
    rows = [line for line in result.stdout.splitlines() if line.startswith("│ 0 ")]
    assert len(rows) == 2  # experts and heads panels: layer 0 on one line each
    assert rows[0].count("%") == 16  # 8 most + 8 least used, none pushed to a second line


def test_log_progress_is_a_plain_line_every_few_seconds():
    now = [0.0]
    stream = io.StringIO()
    ticker = LogTicker(stream, unit="tokens", interval=5.0, clock=lambda: now[0])
    ticker.set_total(1000)
    for _ in range(10):
        now[0] += 1.0
        ticker.advance(100)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "progress: 500 / 1,000 tokens (50%), 100 tokens/s, 5 s",
        "progress: 1,000 / 1,000 tokens (100%), 100 tokens/s, 10 s",
    ]
    assert "\r" not in stream.getvalue()


def test_profile_in_a_log_prints_progress_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(LogTicker, "INTERVAL", 0.0)
    result = run("profile", "default", "--data", DATA, "--out", tmp_path / "s", "--max-tokens", 400)
    assert result.exit_code == 0, result.stderr
    assert "progress: " in result.stderr and " tokens (" in result.stderr


def test_stats_bytes_do_not_depend_on_the_process(tmp_path):
    """safetensors writes metadata in hash order, which changes from process to process."""
    outs = []
    for i in range(2):
        out = tmp_path / f"s{i}.safetensors"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONHASHSEED": str(i)}
        cmd = [sys.executable, "-m", "mfprune", "profile", "default", "--data", str(DATA)]
        cmd += ["--out", str(out), "--max-tokens", "300", "--format", "quiet"]
        subprocess.run(cmd, check=True, env=env, timeout=300)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    n = int.from_bytes(outs[0][:8], "little")
    meta = json.loads(outs[0][8 : 8 + n])["__metadata__"]
    assert list(meta) == sorted(meta)
