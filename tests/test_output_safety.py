"""No command may destroy a user's files, and a config that lies is caught before work starts.

Each case runs the real CLI and checks the one-line error AND that nothing on disk changed:
the working folder, the model, the data, the config file and the device files are compared
byte for byte before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_bad_input import (
    MIXTRAL_HALF,
    assert_clean_error,
    copy_model,
    leftovers,
    run,
    snapshot,
    write_plan,
)

from mfprune.errors import OutputError
from mfprune.io.outputs import Input, claim_file, claim_folder, staged_folder, write_file

DOC = "def add(a, b):\n    return a + b\nThe quick brown fox jumps over the lazy dog.\n"


@pytest.fixture
def work(tmp_path, monkeypatch, model_dir):
    """A working folder holding a model, task data and a shrink config: what a CI job has."""
    root = tmp_path / "job"
    root.mkdir()
    model = root / "model"
    shutil.copytree(model_dir("mixtral"), model)
    (root / "task.jsonl").write_text(
        "".join(json.dumps({"text": f"{DOC} {i}"}) + "\n" for i in range(6))
    )
    (root / "notes.txt").write_text("the team's notes")
    monkeypatch.chdir(root)
    return root


def _profile(model: Path, data: Path, out: Path) -> Path:
    result = run("profile", model, "--data", data, "--out", out, "--format", "quiet")
    assert result.exit_code == 0, result.stderr
    return out


# ------------------------------------------------------------------ empty paths


def test_prune_out_empty_with_overwrite_keeps_the_working_folder(work, tmp_path):
    stats = _profile(work / "model", work / "task.jsonl", tmp_path / "stats.safetensors")
    before = snapshot(work)
    result = run("prune", "model", "--profile", stats, "--keep", 4, "--out", "", "--overwrite")
    assert_clean_error(result, "--out is empty", "unset variable")
    assert snapshot(work) == before


@pytest.mark.parametrize("blank", ["", "  "])
def test_shrink_out_empty_keeps_config_and_data(work, blank):
    config = work / "shrink.toml"
    config.write_text(
        f'model = "model"\nout = "{blank}"\noverwrite = true\n'
        '[profile]\ndata = "task.jsonl"\n[prune]\nkeep = 4\n'
    )
    before = snapshot(work)
    assert_clean_error(run("shrink", "--config", config), "'out' is an empty path")
    assert snapshot(work) == before
    config.write_text(config.read_text().replace(f'out = "{blank}"', 'out = "o"'))
    before = snapshot(work)
    assert_clean_error(run("shrink", "--config", config, "--out", "", "--overwrite"), "is empty")
    assert snapshot(work) == before


@pytest.mark.parametrize("command", ["profile", "merge-stats", "show-html", "bench-json"])
def test_every_file_output_refuses_an_empty_path(work, tmp_path, command):
    stats = _profile(work / "model", work / "task.jsonl", tmp_path / "s.safetensors")
    args = {
        "profile": ["profile", "model", "--data", "task.jsonl", "--out", ""],
        "merge-stats": ["merge-stats", stats, "--out", ""],
        "show-html": ["show", stats, "--html", ""],
        "bench-json": ["bench", "model", "--json-out", "", "--no-speed"],
    }[command]
    before = snapshot(work)
    assert_clean_error(run(*args), "is empty")
    assert snapshot(work) == before


# ------------------------------------------------------------------ outputs onto inputs


def test_profile_out_into_the_model_or_onto_the_data_is_refused(work):
    before = snapshot(work)
    cases = [
        (work / "model" / "model.safetensors", "lies inside the model folder"),
        (work / "model" / "stats.safetensors", "lies inside the model folder"),
        (work / "task.jsonl", "is the data"),
        (".", "contains the model folder"),
    ]
    for out, fragment in cases:
        result = run("profile", "model", "--data", "task.jsonl", "--out", out)
        assert_clean_error(result, fragment)
    assert snapshot(work) == before


def test_folder_outputs_refuse_the_working_folder_and_its_parents(work, tmp_path):
    plan = write_plan(tmp_path / "plan.json", MIXTRAL_HALF)
    before = snapshot(work)
    for out in (".", ".."):
        result = run("prune", "model", "--plan", plan, "--out", out, "--overwrite")
        assert_clean_error(result, "contains the source model")
    # a model elsewhere: the working folder itself is still protected
    other = copy_model(lambda _f: work / "model", "mixtral", tmp_path)
    result = run("prune", other, "--plan", plan, "--out", ".", "--overwrite")
    assert_clean_error(result, "is the working folder")
    assert snapshot(work) == before


def test_prune_out_onto_its_plan_or_stats_is_refused(work, tmp_path):
    stats = _profile(work / "model", work / "task.jsonl", tmp_path / "in" / "stats.safetensors")
    plan = write_plan(tmp_path / "in" / "plan.json", MIXTRAL_HALF)
    before = snapshot(tmp_path / "in")
    assert_clean_error(
        run("prune", "model", "--plan", plan, "--out", tmp_path / "in", "--overwrite"),
        "contains the plan file",
    )
    assert_clean_error(
        run("prune", "model", "--profile", stats, "--keep", 4, "--out", stats), "is the stats file"
    )
    assert snapshot(tmp_path / "in") == before


def test_show_and_merge_refuse_to_overwrite_their_inputs(work, tmp_path):
    stats = _profile(work / "model", work / "task.jsonl", tmp_path / "s.safetensors")
    digest = snapshot(tmp_path)
    assert_clean_error(run("show", stats, "--html", stats), "is the stats file")
    assert_clean_error(run("merge-stats", stats, "--out", stats), "is an input stats file")
    assert snapshot(tmp_path) == digest


def test_a_stats_output_never_replaces_a_file_that_is_not_stats(work, tmp_path):
    other = tmp_path / "weights.safetensors"
    shutil.copyfile(work / "model" / "model.safetensors", other)
    before = other.read_bytes()
    result = run("profile", "model", "--data", "task.jsonl", "--out", other)
    assert_clean_error(result, "is not an mfprune stats file")
    assert other.read_bytes() == before
    stats = _profile(work / "model", work / "task.jsonl", tmp_path / "s.safetensors")
    _profile(work / "model", work / "task.jsonl", stats)  # a stats file is replaced


# ------------------------------------------------------------------ links and special files


def test_device_files_fifos_sockets_and_links_are_never_replaced(work, tmp_path):
    stats = _profile(work / "model", work / "task.jsonl", tmp_path / "s.safetensors")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    link = tmp_path / "link.html"
    target = tmp_path / "real.html"
    target.write_text("the user's page")
    link.symlink_to(target)
    devnull = os.stat("/dev/null")
    cases = [
        (["profile", "model", "--data", "task.jsonl", "--out", "/dev/null"], "is a device"),
        (["merge-stats", stats, "--out", "/dev/null"], "is a device"),
        (["show", stats, "--svg", fifo], "is a FIFO"),
        (["show", stats, "--html", sock_path], "is a socket"),
        (["show", stats, "--html", link], "is a symlink"),
        (["bench", "model", "--json-out", "/dev/null", "--no-speed"], "is a device"),
        (["bench", "model", "--json-out", link, "--no-speed"], "is a symlink"),
    ]
    try:
        for args, fragment in cases:
            assert_clean_error(run(*args), fragment)
    finally:
        sock.close()
    after = os.stat("/dev/null")
    assert (after.st_mode, after.st_rdev) == (devnull.st_mode, devnull.st_rdev)
    assert link.is_symlink() and target.read_text() == "the user's page"
    assert fifo.exists() and not fifo.is_file()


def test_a_symlinked_output_folder_is_refused(work, tmp_path):
    plan = write_plan(tmp_path / "plan.json", MIXTRAL_HALF)
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("x")
    (tmp_path / "out").symlink_to(real)
    result = run("prune", "model", "--plan", plan, "--out", tmp_path / "out", "--overwrite")
    assert_clean_error(result, "is a symlink")
    assert [p.name for p in real.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------ --overwrite


def test_overwrite_only_replaces_mfprune_outputs_and_says_what(work, tmp_path):
    plan = write_plan(tmp_path / "plan.json", MIXTRAL_HALF)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "plan.json").write_text('{"format": "mfprune.plan/1"}')  # not alone: not a marker
    result = run("prune", "model", "--plan", plan, "--out", out, "--overwrite")
    assert_clean_error(result, "was not written by mfprune")
    assert (out / "thesis.tex").read_text() == "years of work"
    (out / "thesis.tex").unlink()
    (out / "plan.json").unlink()
    assert run("prune", "model", "--plan", plan, "--out", out).exit_code == 0
    result = run("prune", "model", "--plan", plan, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert f"replaced {out} (an mfprune output with mfprune_provenance.json" in result.stderr
    assert leftovers(out) == []


def test_plan_only_writes_only_the_plan_file_and_the_prune_continues_from_it(work, tmp_path):
    """--plan-only writes --plan-out alone: --out is refused with it (so it never creates,
    replaces or deletes a folder), and `prune --plan PLAN --out OUT` then runs as usual."""
    source = write_plan(tmp_path / "source-plan.json", MIXTRAL_HALF)
    plan, out = tmp_path / "plans" / "half.json", tmp_path / "out"
    result = run("prune", "model", "--plan", source, "--plan-only", "--plan-out", plan)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in plan.parent.iterdir()) == ["half.json"]
    assert json.loads(plan.read_text())["experts"] == json.loads(source.read_text())["experts"]
    assert not out.exists()
    result = run("prune", "model", "--plan", plan, "--out", out)
    assert result.exit_code == 0, result.stderr
    assert (out / "model.safetensors").is_file()
    digest_before = sorted((p.name, p.stat().st_size) for p in out.iterdir())
    for args, message in (
        (["--out", out], "--plan-only writes no model: --out is not used with it"),
        (["--overwrite"], "--plan-only writes no model: --overwrite is not used with it"),
        ([], "--plan-only needs --plan-out PLAN.json"),
    ):
        result = run("prune", "model", "--plan", plan, "--plan-only", *args)
        assert_clean_error(result, message)
    assert sorted((p.name, p.stat().st_size) for p in out.iterdir()) == digest_before
    assert_clean_error(
        run("prune", "model", "--plan", plan, "--plan-out", plan), "--plan-out goes with"
    )
    assert_clean_error(run("prune", "model", "--plan", plan), "missing option '--out'")


def test_plan_only_replaces_a_plan_but_no_other_file(work, tmp_path):
    source = write_plan(tmp_path / "source-plan.json", MIXTRAL_HALF)
    plan = write_plan(tmp_path / "old-plan.json", MIXTRAL_HALF)
    assert run("prune", "model", "--plan", source, "--plan-only", "--plan-out", plan).exit_code == 0
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    result = run("prune", "model", "--plan", source, "--plan-only", "--plan-out", notes)
    assert_clean_error(result, "is not an mfprune plan")
    assert notes.read_text() == '{"mine": true}'


# ------------------------------------------------------------------ exclusive outputs


def test_a_second_run_on_a_locked_output_fails_at_once(work, tmp_path):
    plan = write_plan(tmp_path / "plan.json", MIXTRAL_HALF)
    out = tmp_path / "out"
    held = claim_folder(out, inputs=[Input(work / "model", "the source model")])
    try:
        result = run("prune", "model", "--plan", plan, "--out", out)
        assert_clean_error(result, "another mfprune run is writing")
        assert not out.exists()
    finally:
        held.release()
    assert run("prune", "model", "--plan", plan, "--out", out).exit_code == 0
    assert leftovers(out) == []


def test_two_concurrent_prunes_cannot_both_succeed(work, tmp_path):
    """Two real processes race for one --out: exactly one writes it, the other fails cleanly."""
    plan = write_plan(tmp_path / "plan.json", MIXTRAL_HALF)
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from mfprune.cli import app; app()"]
    cmd += ["prune", "model", "--plan", str(plan)]
    cmd += ["--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    results: list[subprocess.CompletedProcess] = []

    def go() -> None:
        results.append(subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [r.stderr for r in results]
    loser = next(r for r in results if r.returncode)
    assert "another mfprune run is writing" in loser.stderr or "not empty" in loser.stderr
    assert "Traceback" not in loser.stderr
    assert (out / "model.safetensors").is_file() and leftovers(out) == []


def test_the_final_rename_never_replaces_what_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    target = claim_folder(out)
    with pytest.raises(OutputError, match="appeared while mfprune was writing"):  # noqa: SIM117
        with staged_folder(target) as tmp:
            (tmp / "a").write_text("ours")
            out.mkdir()
            (out / "theirs").write_text("another program's")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert leftovers(out) == []
    single = tmp_path / "one.json"
    target = claim_file(single)
    single.write_text("another program's")
    with pytest.raises(OutputError, match="appeared while mfprune was writing"):
        write_file(target, "ours")
    assert single.read_text() == "another program's"
    assert leftovers(single) == []


# ------------------------------------------------------------------ what a model folder holds


def test_stray_safetensors_in_a_model_folder_are_not_weights(work, tmp_path):
    """A stats file copied into the model folder is not a shard: inspect does not count it,
    the fingerprint ignores it, prune neither reads nor carries it."""
    stats = _profile(work / "model", work / "task.jsonl", tmp_path / "s.safetensors")
    inspected = json.loads(run("inspect", "model", "--format", "json").stdout)
    shutil.copyfile(stats, work / "model" / "stats.safetensors")
    again = json.loads(run("inspect", "model", "--format", "json").stdout)
    assert again == inspected
    out = tmp_path / "pruned"
    result = run("prune", "model", "--profile", stats, "--keep", 4, "--out", out)
    assert result.exit_code == 0, result.stderr  # same fingerprint: not "another model's"
    assert not (out / "stats.safetensors").exists()
    assert "not carried over: stats.safetensors" in result.stderr


def test_stats_as_model_and_model_as_stats_say_what_they_are(work, tmp_path):
    stats = _profile(work / "model", work / "task.jsonl", tmp_path / "s.safetensors")
    assert_clean_error(run("inspect", stats), "is a file (it is an mfprune stats file)")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(work / "model" / "config.json", lone / "config.json")
    shutil.copyfile(stats, lone / "stats.safetensors")
    assert_clean_error(run("inspect", lone), "not weights transformers loads")
    result = run("prune", "model", "--profile", "model", "--keep", 4, "--out", tmp_path / "o")
    assert_clean_error(result, "is a model folder, not a stats file")
    result = run(
        "prune", "model", "--profile", "model/model.safetensors", "--keep", 4, "--out", "o"
    )
    assert_clean_error(result, "it holds model weights")


# ------------------------------------------------------------------ configs that lie


def _lying_copy(tmp_path: Path, source: Path, **changes: object) -> Path:
    model = tmp_path / "lying"
    shutil.copytree(source, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"num_hidden_layers": 1}, ("num_hidden_layers = 1", "weights hold 2 layers")),
        ({"hidden_size": 48}, ("hidden_size = 48", "embed_tokens.weight is 64 wide")),
        ({"vocab_size": 999}, ("vocab_size = 999", "rows")),
        ({"num_attention_heads": 8}, ("head_dim 8 = hidden_size / num_attention_heads",)),
        ({"num_key_value_heads": 1}, ("num_key_value_heads = 1", "k_proj.weight")),
    ],
    ids=["layers", "hidden", "vocab", "heads", "kv-heads"],
)
def test_a_config_that_disagrees_with_the_weights_is_refused(
    changes, fragments, tiny_checkpoint, tmp_path
):
    model = _lying_copy(tmp_path, tiny_checkpoint("mixtral"), **changes)
    plan = write_plan(tmp_path / "plan.json", MIXTRAL_HALF)
    before = snapshot(tmp_path)
    assert_clean_error(run("inspect", model), *fragments, "fix config.json")
    assert_clean_error(run("prune", model, "--plan", plan, "--out", tmp_path / "o"), *fragments)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ up-front checks


def test_options_the_mode_ignores_are_refused(work, tmp_path):
    plan = write_plan(tmp_path / "plan.json", MIXTRAL_HALF)
    stats = _profile(work / "model", work / "task.jsonl", tmp_path / "s.safetensors")
    out = tmp_path / "o"
    cases = [
        (["--plan", plan, "--keep", 4], "--keep is ignored with --plan"),
        (["--plan", plan, "--criterion", "soft"], "--criterion is ignored with --plan"),
        (["--profile", stats, "--keep", 4, "--attention-keep-ratio", 0.5], "no attention experts"),
        (["--profile", stats, "--keep", 4, "--heads-keep-ratio", 0], "must be in (0, 1]"),
        (["--profile", stats, "--keep-ratio", 1.5], "--keep-ratio must be in (0, 1]"),
    ]
    for args, fragment in cases:
        assert_clean_error(run("prune", "model", *args, "--out", out), fragment)
        assert not out.exists()


def test_empty_and_blank_data_are_refused_with_the_minimum(work, tmp_path):
    for name, content in [("blank.jsonl", '{"text": "   "}\n{"text": "\\n"}\n'), ("ws.txt", " \n")]:
        (tmp_path / name).write_text(content)
        result = run("profile", "model", "--data", tmp_path / name, "--out", tmp_path / "s.st")
        assert_clean_error(result, "hold no tokens")
    (tmp_path / "short.jsonl").write_text('{"text": "hi"}\n')
    result = run("profile", "model", "--data", tmp_path / "short.jsonl", "--out", "s.st")
    assert_clean_error(result, "a profile needs at least 16")
    result = run("profile", "model", "--data", "task.jsonl", "--out", "s.st", "--max-tokens", 3)
    assert_clean_error(result, "below the 16 tokens")
    assert not (tmp_path / "s.st").exists() and not (work / "s.st").exists()


def test_seq_len_past_the_model_positions_is_refused_and_the_default_capped(work, tmp_path):
    positions = json.loads((work / "model" / "config.json").read_text())["max_position_embeddings"]
    result = run(
        "profile", "model", "--data", "task.jsonl", "--out", "s.st", "--seq-len", positions + 1
    )
    assert_clean_error(result, f"longer than the model's max_position_embeddings = {positions}")
    from mfprune.profiling.run import resolve_seq_len

    assert resolve_seq_len({"max_position_embeddings": 512}, None) == 512
    assert resolve_seq_len({"text_config": {"max_position_embeddings": 4096}}, None) == 2048
    assert resolve_seq_len({}, 100) == 100


def test_bench_json_out_is_checked_before_any_model_runs(work, tmp_path, monkeypatch):
    import mfprune.bench as bench

    def never(*_a, **_k):
        raise AssertionError("the bench ran before the output was checked")

    monkeypatch.setattr(bench, "run_bench", never)
    result = run("bench", "model", "--json-out", "/proc/nope/bench.json", "--no-speed")
    assert_clean_error(result, "cannot")
    result = run("bench", "model", "--json-out", work / "model" / "bench.json", "--no-speed")
    assert_clean_error(result, "lies inside the model")


def _gated_config(work: Path, bench: str, metric: str) -> Path:
    """A shrink.toml whose [bench] section is ``bench`` and whose gate names ``metric``."""
    config = work / "shrink.toml"
    config.write_text(
        'model = "model"\nout = "o"\n[profile]\ndata = "task.jsonl"\n[prune]\nkeep = 4\n'
        f'[bench]\n{bench}\nspeed = false\n[gate]\nmetrics = {{ "{metric}" = 0.01 }}\n'
    )
    return config


def test_gate_names_are_checked_before_anything_runs(work, tmp_path, monkeypatch):
    import mfprune.profiling as profiling

    def never(*_a, **_k):
        raise AssertionError("profiling started before the gate was checked")

    monkeypatch.setattr(profiling, "profile_model", never)
    result = run("shrink", "--config", _gated_config(work, 'data = ["task.jsonl"]', "acc"))
    assert_clean_error(result, "gate metric 'acc' matches none", "data_task/bits_per_byte")
    assert not (work / "o").exists()
    result = run(
        "bench", "model", "--baseline", "model", "--data", "task.jsonl", "--max-drop", "acc=0.01"
    )
    assert_clean_error(result, "--max-drop metric 'acc' matches none")


def test_gate_names_of_lm_eval_tasks_are_checked_before_any_model_loads(work, monkeypatch):
    """Named lm-eval tasks: the metrics come from the configs lm-eval indexes (no download),
    so a gate on a metric hellaswag does not report fails before the model loads."""
    import mfprune.bench.run as bench_run
    import mfprune.profiling as profiling

    def never(*_a, **_k):
        raise AssertionError("work started before the gate was checked")

    monkeypatch.setattr(bench_run, "load_model", never)
    monkeypatch.setattr(profiling, "profile_model", never)
    result = run(
        "bench", "model", "--baseline", "model", "--tasks", "hellaswag", "--no-speed",
        "--max-drop", "hellaswag/exact_match=0.01",
    )  # fmt: skip
    assert_clean_error(result, "metric 'hellaswag/exact_match' matches none", "hellaswag/acc_norm")
    result = run("shrink", "--config", _gated_config(work, 'tasks = ["mmlu"]', "acc_norm"))
    assert_clean_error(result, "gate metric 'acc_norm' matches none", "mmlu_anatomy/acc")
    assert not (work / "o").exists()


def test_expected_metrics_of_lm_eval_tasks_follow_groups_tags_and_filters(tmp_path):
    from mfprune.bench.quality import QualitySpec, expected_metric_keys, prepare_tasks

    def keys(*names):
        return expected_metric_keys(prepare_tasks(QualitySpec(tasks=names), tmp_path))

    assert keys("hellaswag") == ["hellaswag/acc", "hellaswag/acc_norm"]
    mmlu = keys("mmlu")  # the group's aggregate, its sub-groups' and every subject's
    assert {"mmlu/acc", "mmlu_stem/acc", "mmlu_anatomy/acc"} <= set(mmlu)
    assert all(k.endswith("/acc") for k in mmlu) and len(mmlu) > 50
    gsm8k = keys("gsm8k")  # one key per filter
    assert "gsm8k/exact_match,strict-match" in gsm8k and "gsm8k/exact_match" not in gsm8k
    assert set(keys("arc_e*")) >= {"arc_easy/acc", "arc_easy/acc_norm"}


def test_the_documented_shrink_config_gates_on_metrics_its_data_gives(tmp_path):
    """docs/ci.md's shrink.toml: it loads, and every gate rule names a metric of its data."""
    import re

    from mfprune.bench import parse_gate
    from mfprune.bench.quality import QualitySpec, expected_metric_keys, prepare_tasks
    from mfprune.bench.report import check_gate_names
    from mfprune.shrink import load_config

    docs = (Path(__file__).parents[1] / "docs" / "ci.md").read_text()
    toml = re.search(r"```toml\n(.*?)```", docs, re.S).group(1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "calibration.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "data" / "heldout.jsonl").write_text('{"text": "y"}\n')
    toml = toml.replace('"checkpoints/final"', '"default"')
    (tmp_path / "shrink.toml").write_text(toml)
    config = load_config(tmp_path / "shrink.toml")
    keys = expected_metric_keys(prepare_tasks(QualitySpec(data=tuple(config.bench.data)), tmp_path))
    check_gate_names(parse_gate(config.gate_rules()), keys, where="gate")


def test_a_plan_made_for_another_model_is_refused(work, tmp_path):
    stats = _profile(work / "model", work / "task.jsonl", tmp_path / "s.safetensors")
    planned = tmp_path / "planned.json"
    args = ["--keep", 4, "--plan-only", "--plan-out", planned]
    result = run("prune", "model", "--profile", stats, *args)
    assert result.exit_code == 0, result.stderr
    plan = json.loads(planned.read_text())
    assert plan["meta"]["stats"]["model_fingerprint"]
    plan["meta"]["stats"]["model_fingerprint"] = "0" * 64
    (tmp_path / "foreign.json").write_text(json.dumps(plan))
    result = run("prune", "model", "--plan", tmp_path / "foreign.json", "--out", tmp_path / "o")
    assert_clean_error(result, "profile of another model", "delete meta.stats")
    assert run("prune", "model", "--plan", planned, "--out", "o2").exit_code == 0


def test_the_shrink_stats_cache_may_not_lie_in_an_input(work):
    config = work / "shrink.toml"
    config.write_text(
        'model = "model"\nout = "o"\n[profile]\ndata = "task.jsonl"\ncache_dir = "model/cache"\n'
        "[prune]\nkeep = 4\n[bench]\nspeed = false\n"
    )
    before = snapshot(work)
    assert_clean_error(run("shrink", "--config", config), "profile.cache_dir", "the source model")
    assert snapshot(work) == before
