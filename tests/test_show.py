"""`mfprune show`: per-layer most/least used experts and heads, task-specific experts against a
second profile, and the SVG / HTML heatmaps; bad input is one line and writes nothing."""

from __future__ import annotations

import html.parser
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from test_profile import DOCS, assert_clean_error, profile, run, write_jsonl

from mfprune.errors import StatsError
from mfprune.profiling import ProfileStats
from mfprune.profiling.stats import ExpertStats, HeadStats, StatsMeta
from mfprune.profiling.view import build_view, heatmap_html, heatmap_svg

SVG = "{http://www.w3.org/2000/svg}"


def synthetic(
    counts: list[list[int]], *, model: str = "m" * 64, data: str = "d" * 64, heads: bool = True
) -> ProfileStats:
    """Stats with the given routed counts [L, E] (top-2: each row sums to 2 x tokens)."""
    count = torch.tensor(counts, dtype=torch.int64)
    tokens = int(count[0].sum()) // 2
    assert (count.sum(dim=1) == 2 * tokens).all()
    rows = count.shape[0]
    experts = ExpertStats(
        layers=tuple(range(1, rows + 1)),
        top_k=2,
        count=count,
        soft=count.double() * 0.5,
        ean=count.double() * 2.0,
        reap_num=count.double(),
        tokens=torch.full((rows,), tokens, dtype=torch.int64),
    )
    head_stats = HeadStats(
        layers=tuple(range(rows + 1)),
        usage=torch.arange(1.0, 4 * (rows + 1) + 1, dtype=torch.float64).reshape(rows + 1, 4),
        tokens=torch.full((rows + 1,), tokens, dtype=torch.int64),
    )
    meta = StatsMeta(
        family="mixtral",
        model_type="mixtral",
        model_fingerprint=model,
        data_fingerprint=data,
        data_parts=(data,),
        tokens=tokens,
        documents=3,
        dtype="float32",
        mfprune_version="0",
    )
    return ProfileStats(meta=meta, experts=experts, heads=head_stats if heads else None)


TASK = [[10, 0, 30, 40, 20, 50, 40, 10], [25, 25, 25, 25, 25, 25, 25, 25]]  # 100 tokens
GENERAL = [[100, 20, 60, 40, 80, 50, 30, 20], [80, 40, 40, 40, 40, 40, 60, 60]]  # 200 tokens


def test_most_and_least_used_per_layer():
    view = build_view(synthetic(TASK), name="task.st", top=2)
    experts, heads = view.panels
    assert (experts.kind, heads.kind) == ("experts", "heads")
    torch.testing.assert_close(experts.share.sum(dim=1), torch.ones(2, dtype=torch.float64))
    first, second = view.rows(experts)
    assert first["layer"] == 1
    assert first["most"] == [[5, 0.25], [3, 0.2]]  # 50 / 200, then the first of two 40s
    assert first["least"] == [[1, 0.0], [7, 0.05]]
    assert first["never_routed"] == [1]
    assert second["never_routed"] == [] and second["most"][0][1] == 0.125
    head_rows = view.rows(heads)
    assert len(head_rows) == 3 and [h for h, _ in head_rows[0]["most"]] == [3, 2]
    assert "never_routed" not in head_rows[0]
    wide = build_view(synthetic(TASK), name="task.st", top=10)
    assert len(wide.rows(experts)[0]["most"]) == 4  # most and least never overlap


def test_against_ranks_task_specific_experts():
    view = build_view(
        synthetic(TASK),
        name="code.st",
        against=synthetic(GENERAL, data="g" * 64),
        other_name="web.st",
    )
    first = view.rows(view.panels[0])[0]
    # shares, task vs general: 6: 20% vs 7.5%; 5: 25% vs 12.5%; 3: 20% vs 10%; 1: 0% vs 5%
    assert [item["expert"] for item in first["task_specific"]] == [6, 5, 3]
    assert first["task_specific"][0]["ratio"] == pytest.approx(0.20125 / 0.07625, rel=1e-3)
    assert first["other_specific"][0]["expert"] == 1  # never used by the task
    assert first["other_specific"][0]["ratio"] < 0.1
    assert all(item["ratio"] > 1 for item in first["task_specific"])
    data = view.to_dict()
    assert data["against"] == "web.st" and "other_share" in data["panels"][0]
    json.dumps(data)  # plain JSON


def test_svg_and_html_heatmaps_are_well_formed_with_tooltips():
    for against in (None, synthetic(GENERAL, data="g" * 64)):
        view = build_view(synthetic(TASK), name="t.st", against=against, other_name="g.st")
        root = ET.fromstring(heatmap_svg(view))
        cells = [r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
        assert len(cells) == 2 * 8 + 3 * 4  # experts 2 layers x 8, heads 3 layers x 4
        tips = [c.find(f"{SVG}title").text for c in cells]
        assert "layer 1, expert 5: 25.00% (50 routed)" in tips[5]
        if against is not None:
            assert "vs 12.50%; ratio 1.99x" in tips[5]  # (25% + ε) / (12.5% + ε)
        else:
            assert tips[1].startswith("layer 1, expert 1: 0.00% (0 routed)")
            assert cells[1].get("fill") == "#d9d9d9"  # never routed: grey
        texts = "".join(t.text or "" for t in root.iter(f"{SVG}text"))
        assert ("8x" in texts and "1/8x" in texts) if against is not None else "25.0%" in texts
        page = heatmap_html(view)
        _assert_balanced(page)
        assert (
            page.count("<svg") == 1
            and "<script" not in page
            and "http" not in page.replace("http://www.w3.org/2000/svg", "")
        )  # self-contained


def _assert_balanced(page: str) -> None:
    void = {"meta", "br", "img", "line", "rect", "input", "link"}

    class Checker(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag not in void:
                self.stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            if tag in void:
                return
            assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
            self.stack.pop()

    checker = Checker()
    checker.feed(page)
    assert checker.stack == []


def test_against_another_model_is_refused():
    with pytest.raises(StatsError, match="another model") as info:
        build_view(
            synthetic(TASK), name="a.st", against=synthetic(TASK, model="x" * 64), other_name="b.st"
        )
    assert "same checkpoint" in info.value.hint
    with pytest.raises(StatsError, match="disagree on the heads"):
        build_view(
            synthetic(TASK), name="a", against=synthetic(GENERAL, heads=False), other_name="b"
        )


# ----------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def stats_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("show")
    files = {
        "task": synthetic(TASK).save(root / "task.safetensors"),
        "general": synthetic(GENERAL, data="g" * 64).save(root / "general.safetensors"),
        "other": synthetic(TASK, model="x" * 64).save(root / "other.safetensors"),
    }
    corrupted = root / "corrupted.safetensors"
    corrupted.write_bytes(files["task"].read_bytes()[:-16])
    files["corrupted"] = corrupted
    return files


def test_cli_show_tables_json_and_files(stats_files, tmp_path):
    task, general = stats_files["task"], stats_files["general"]
    result = run("show", task)
    assert result.exit_code == 0, result.stderr
    assert "most used experts" in result.stdout and "5 25.0%" in result.stdout
    assert "heads" in result.stdout
    svg, page = tmp_path / "out" / "map.svg", tmp_path / "map.html"
    result = run(
        "show", task, "--against", general, "--svg", svg, "--html", page, "--format", "json"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["written"] == [str(page), str(svg)]
    assert data["panels"][0]["rows"][0]["task_specific"][0]["expert"] == 6
    ET.parse(svg)
    _assert_balanced(page.read_text())
    result = run("show", task, "--against", general, "--top", "1")
    assert "specific" in result.stdout and "6 2.6x" in result.stdout  # task-specific, --top 1


def test_cli_show_bad_input(stats_files, tmp_path, model_dir):
    task = stats_files["task"]
    out = tmp_path / "map.svg"
    assert_clean_error(run("show", stats_files["corrupted"], "--svg", out), "corrupted.safetensors")
    assert_clean_error(
        run("show", task, "--against", stats_files["other"], "--svg", out),
        "another model",
        "same checkpoint",
    )
    assert_clean_error(run("show", task, "--html", tmp_path), "is a folder")
    assert_clean_error(run("show", task, "--top", "0"), "--top must be at least 1")
    assert_clean_error(run("show", tmp_path / "nope.st"), "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_show_a_real_jetmoe_profile(model_dir, tmp_path):
    """Attention experts get their own panel; JetMoE has no per-head panel."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    stats = profile(model_dir("jetmoe"), data)
    view = build_view(stats, name="jet.st")
    assert [p.kind for p in view.panels] == ["experts", "attention_experts"]
    root = ET.fromstring(heatmap_svg(view))
    heading = [t.text for t in root.iter(f"{SVG}text") if t.get("font-weight") == "600"]
    assert heading == [
        "experts: share of each layer's routed tokens",
        "attention experts: share of each layer's routed tokens",
    ]


# ---------------------------------------------------------------------------- plan marks, scales


def test_heatmap_marks_what_a_plan_drops():
    from mfprune.plan import PrunePlan

    plan = PrunePlan(experts={1: (2, 3, 4, 5)}, heads={0: (0, 1)})  # layer 2 keeps every expert
    view = build_view(synthetic(TASK), name="t.st", plan=plan)
    root = ET.fromstring(heatmap_svg(view))
    crosses = list(root.iter(f"{SVG}path"))
    legend_marks = 2  # one "dropped" sample in each panel's legend
    assert len(crosses) == 4 + 2 + legend_marks  # 4 experts of layer 1, 2 heads of layer 0
    cells = [r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    tips = [c.find(f"{SVG}title").text for c in cells]
    assert tips[0].endswith("; dropped by the plan") and tips[2].endswith("; kept by the plan")
    assert tips[8].endswith("; kept by the plan")  # layer 2: absent from the plan, keeps all
    texts = "".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "× = dropped by the plan" in texts and "dropped" in texts
    rows = view.to_dict()
    experts = next(p for p in rows["panels"] if p["kind"] == "experts")
    assert [r["dropped"] for r in experts["rows"]] == [[0, 1, 6, 7], []]


def test_a_plan_of_another_model_is_refused():
    from mfprune.plan import PrunePlan

    with pytest.raises(StatsError, match=r"the plan does not fit t\.st: experts of layer 9"):
        build_view(synthetic(TASK), name="t.st", plan=PrunePlan(experts={9: (0, 1)}))
    with pytest.raises(StatsError, match="layer 1 keeps id 8"):
        build_view(synthetic(TASK), name="t.st", plan=PrunePlan(experts={1: (0, 8)}))


def test_every_colour_scale_starts_at_zero():
    from mfprune.profiling.view import _Scale

    view = build_view(synthetic(TASK), name="t.st")
    for panel in view.panels:
        scale = _Scale.of(panel)
        assert scale.low == 0.0 and scale.label(0.0) == "0.0%"
        assert scale.colour(0.0) == "#f7fbff"  # white: unused, in the heads panel too


def test_long_against_titles_fit_the_drawing():
    long = "general-text-profile-of-the-whole-web-crawl.stats.safetensors"
    view = build_view(
        synthetic(TASK), name="task.stats.safetensors", against=synthetic(GENERAL, data="g" * 64),
        other_name=long,
    )  # fmt: skip
    root = ET.fromstring(heatmap_svg(view))
    width = float(root.get("width"))
    headings = [t.text for t in root.iter(f"{SVG}text") if t.get("font-weight") == "600"]
    assert headings and all(long in h for h in headings)
    assert all(8 + 8.2 * len(h) <= width for h in headings)  # ~8.2 px a bold 13 px character


def test_cli_show_with_a_plan(stats_files, tmp_path):
    from mfprune.plan import PrunePlan

    stats = ProfileStats.load(stats_files["task"])
    layer = stats.experts.layers[0]
    plan = tmp_path / "plan.json"
    PrunePlan(experts={layer: (0, 1)}).save(plan)
    result = run("show", stats_files["task"], "--plan", plan, "--svg", tmp_path / "h.svg")
    assert result.exit_code == 0, result.stderr
    assert "dropped by the plan" in result.stdout
    assert "× = dropped by the plan" in (tmp_path / "h.svg").read_text()
