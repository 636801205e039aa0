"""`--format quiet` prints nothing but errors, `--format json` nothing but the JSON on stdout,
and third-party output (lm-eval's per-request progress, datasets' "Generating split",
transformers' load reports) shows only with `--verbose` — checked on real processes, whose
stderr is the real one (in-process runners would hide what a library writes to fd 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_cli_behaviour import DATA, child_env

EVAL = DATA.with_name("code.eval.jsonl")


def mfprune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**child_env(), "HF_HOME": str(cwd / "hf_home")}
    return subprocess.run(
        [sys.executable, "-m", "mfprune", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=600,
    )  # fmt: skip


def test_quiet_bench_and_profile_print_nothing(tmp_path):
    bench = ["bench", "default", "--baseline", "default", "--data", str(EVAL), "--limit", "2"]
    bench += ["--prompt-len", "8", "--new-tokens", "2", "--repeats", "1", "--format", "quiet"]
    profile = ["profile", "default", "--data", str(DATA), "--out", "s.safetensors"]
    profile += ["--max-tokens", "500", "--format", "quiet"]
    for args in (bench, profile):
        result = mfprune(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (result.stdout, result.stderr) == ("", ""), args[0]
    assert (tmp_path / "s.safetensors").is_file()


def test_json_alone_on_stdout_and_library_output_only_with_verbose(tmp_path):
    args = ["bench", "default", "--data", str(EVAL), "--limit", "2", "--no-speed"]
    plain = mfprune(*args, "--format", "json", cwd=tmp_path)
    verbose = mfprune(*args, "--format", "json", "--verbose", cwd=tmp_path)
    for result in (plain, verbose):
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["format"] == "mfprune.bench/1"
    assert "Running loglikelihood requests" in verbose.stderr
    assert plain.stderr == ""
