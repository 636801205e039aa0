"""`mfprune profile` / `merge-stats`: what the stats hold, checked against a by-hand reference,
and every way the input can be bad.

The tiny checkpoints have no tokenizer: each test model is a copy of the session's tiny
checkpoint with a tiny BPE tokenizer (trained offline) saved into it.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer
from transformers.activations import ACT2FN
from typer.testing import CliRunner

from mfprune import tinymodels
from mfprune.arch import spec_for_config
from mfprune.arch.layout import resolve_layout
from mfprune.checkpoint import open_checkpoint
from mfprune.cli import app
from mfprune.errors import ArchError, DataError, ModelError, StatsError
from mfprune.loading import auto_model_class
from mfprune.modules import find_o_projs, find_routers, moe_block, parent_of, routing_modules
from mfprune.oracle import logits
from mfprune.profiling import ProfileStats, Shard, merge_stats, profile_model
from mfprune.profiling.data import Record, encode, load_token_data
from mfprune.profiling.hooks import Recorder

# these tiny models only show why they have no adapter (test_rewrite_exact.py); ERNIE 4.5 VL's
# refusal is tested below
NOT_PROFILED = {"nllb-moe", "ernie4_5_vl_moe"}
FAMILIES = sorted(set(tinymodels.FAMILIES) - NOT_PROFILED)
SEQ_LEN = 16  # short chunks: long documents are cut, and batches mix lengths (padding)
_ERROR_LINE = re.compile(r"^error: (?P<message>\S.*?) \(hint: (?P<hint>\S.*)\)$")

# ~150 tokens in 10 documents of 1..40 tokens
DOCS = [
    *tinymodels.TINY_CORPUS,
    " ".join(tinymodels.TINY_CORPUS[:3]),
    "router",
    "experts and heads",
    "",
]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "task.jsonl"
    write_jsonl(path, [{"text": d} for d in DOCS])
    return path


@pytest.fixture(scope="session")
def tokenizer(model_dir) -> Any:
    return AutoTokenizer.from_pretrained(model_dir("mixtral"))


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def profile(model: Path, data: Path, **kw: Any) -> ProfileStats:
    kw = {"device": "cpu", "seq_len": SEQ_LEN, "batch_size": 4, **kw}
    return profile_model(model, data, **kw)


def expert_kinds(stats: ProfileStats) -> list[str]:
    return [k for k in ("experts", "attention_experts") if getattr(stats, k) is not None]


def assert_same_stats(a: ProfileStats, b: ProfileStats, *, rtol: float = 1e-6) -> None:
    """Equal counts and token totals; float sums equal up to summation order."""
    assert expert_kinds(a) == expert_kinds(b)
    for kind in expert_kinds(a):
        x, y = getattr(a, kind), getattr(b, kind)
        assert x.layers == y.layers and x.top_k == y.top_k
        assert torch.equal(x.count, y.count), kind
        assert torch.equal(x.tokens, y.tokens), kind
        for name in ("soft", "ean", "reap_num"):
            torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=rtol, atol=1e-9)
    assert (a.heads is None) == (b.heads is None)
    if a.heads is not None and b.heads is not None:
        assert torch.equal(a.heads.tokens, b.heads.tokens)
        torch.testing.assert_close(a.heads.usage, b.heads.usage, rtol=rtol, atol=1e-9)


#: tiny models whose layers 1 and 2 run 3 times per token (the adapter's [loop])
LOOPED = {"inkling2_loop", "inkling2_loop_text"}


def passes_by_hand(path: Path) -> Callable[[int], int]:
    """How many times each decoder layer runs per token, read from config.json's loop keys
    (Inkling 2 Loop's; every layer once elsewhere)."""
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", config)
    if "loop_num_passes" not in text:
        return lambda _layer: 1
    loop = range(text["loop_layer_index_start"], text["loop_layer_index_end"])
    return lambda layer: text["loop_num_passes"] if layer in loop else 1


def load_model(path: Path) -> Any:
    model_type = open_checkpoint(path).config["model_type"]
    return auto_model_class(model_type).from_pretrained(path, dtype=torch.float32).eval()


# ------------------------------------------------------------------------- what stats promise


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_never_change_logits(family, model_dir, data, tokenizer):
    path = model_dir(family)
    ckpt = open_checkpoint(path)
    layout = resolve_layout(ckpt, spec_for_config(ckpt.config))
    model = load_model(path)
    tokens = load_token_data(data, tokenizer, seq_len=SEQ_LEN)
    ids, mask = next(tokens.batches(batch_size=len(tokens.chunks), pad_id=0))  # all at once
    assert (mask == 0).any(), "the batch should hold padding"
    plain = logits(model, ids, attention_mask=mask)  # (Llama 4: through its language_model)
    recorder = Recorder(model, layout)
    with recorder.attached():
        recorder.set_mask(mask)
        hooked = logits(model, ids, attention_mask=mask)
    again = logits(model, ids, attention_mask=mask)  # hooks are gone
    assert torch.equal(plain, hooked)
    assert torch.equal(plain, again)
    experts = recorder.expert_stats("experts")
    assert experts is not None and int(experts.tokens[0]) == int(mask.sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_sum_to_tokens_times_top_k(family, model_dir, data):
    tokenizer = AutoTokenizer.from_pretrained(model_dir(family))  # its own class (Qwen3.5's)
    stats = profile(model_dir(family), data)
    real = sum(len(tokenizer(d)["input_ids"]) for d in DOCS)
    assert stats.meta.tokens == real
    assert stats.meta.documents == len(DOCS)
    assert stats.meta.family == spec_for_config({"model_type": family}).family
    assert stats.meta.model_fingerprint == open_checkpoint(model_dir(family)).fingerprint()
    passes = passes_by_hand(model_dir(family))
    for kind in expert_kinds(stats):
        s = getattr(stats, kind)
        runs = torch.tensor([passes(L) for L in s.layers])  # [L] runs per token
        assert torch.equal(s.layer_passes(), runs) and (s.passes is not None) == (family in LOOPED)
        assert (s.tokens == real * runs).all()  # looped layers: every pass counts
        extra = s.extra_slots if s.extra_slots is not None else 0  # LongCat's zero experts
        assert (s.count.sum(dim=1) + extra == real * runs * s.top_k).all(), kind
        # slots to no expert: LongCat's zero experts; tokens Switch's expert capacity dropped
        assert (s.extra_slots is not None) == (family in ("longcat_flash", "switch_transformers"))
        routed = s.count > 0
        assert (s.soft[~routed] == 0).all() and (s.ean[~routed] == 0).all()
        assert (s.ean[routed] > 0).all() and (s.soft[routed] > 0).all()
        assert ((s.reap() > 0) == routed).all()
    assert (stats.attention_experts is not None) == (family == "jetmoe")
    if family == "jetmoe":
        assert stats.heads is None  # its heads are attention experts
    elif stats.heads is None:  # no self_attn.o_proj to read (LFM2's out_proj): no head rules
        assert not spec_for_config({"model_type": family}).heads.tensors
    else:
        assert stats.heads is not None
        ckpt = open_checkpoint(model_dir(family))
        layout = resolve_layout(ckpt, spec_for_config(ckpt.config))
        if layout.spec.heads.tensors:  # all layers, or a hybrid's attention layers
            assert stats.heads.layers == layout.heads.layers
        runs = torch.tensor([passes(L) for L in stats.heads.layers])
        assert torch.equal(stats.heads.layer_passes(), runs)
        assert (stats.heads.tokens == real * runs).all() and (stats.heads.usage > 0).all()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "jetmoe"])
def test_padding_is_never_counted(family, model_dir, data):
    alone = profile(model_dir(family), data, batch_size=1)  # no padding at all
    padded = profile(model_dir(family), data, batch_size=5)
    assert alone.meta.data_fingerprint == padded.meta.data_fingerprint
    assert_same_stats(alone, padded, rtol=1e-5)


def test_shards_merged_equal_the_whole(model_dir, data, tmp_path):
    path = model_dir("jetmoe")  # both expert kinds
    whole = profile(path, data)
    halves = [profile(path, data, shard=Shard(i, 2)) for i in range(2)]
    assert [h.meta.documents for h in halves] == [5, 5]
    merged = merge_stats(*halves)
    assert_same_stats(whole, merged, rtol=1e-5)
    assert merged.meta.tokens == whole.meta.tokens
    assert merged.meta.documents == whole.meta.documents
    assert merged.meta.data_parts == tuple(sorted(h.meta.data_fingerprint for h in halves))
    # merged stats save, load and merge like any other
    loaded = ProfileStats.load(merged.save(tmp_path / "merged.safetensors"))
    assert_same_stats(merged, loaded, rtol=0)
    assert loaded.meta == merged.meta


def test_merge_refuses_another_model_and_the_same_data_twice(model_dir, data):
    ours = profile(model_dir("mixtral"), data)
    theirs = profile(model_dir("mixtral", rope_theta=5000.0), data)
    with pytest.raises(StatsError, match="another model"):
        merge_stats(ours, theirs)
    with pytest.raises(StatsError, match="same data"):
        merge_stats(ours, ours)
    with pytest.raises(StatsError, match="at least two"):
        merge_stats(ours)


def test_bfloat16_profile(model_dir, data):
    stats = profile(model_dir("qwen3_moe"), data, dtype="bfloat16")
    assert stats.meta.dtype == "bfloat16"
    e = stats.experts
    assert (e.count.sum(dim=1) == stats.meta.tokens * e.top_k).all()
    assert e.soft.dtype == torch.float64 and torch.isfinite(e.ean).all()


# ---------------------------------------------------------------------- by-hand reference sums


def _route_by_hand(
    family: str, router: Any, x: torch.Tensor, config: Any, *, block: Any = None, ids: Any = None
) -> tuple[Any, Any]:
    """(top-k ids [T, K], routing weights [T, K]) computed from the router's weights (``ids``
    [T]: the tokens, for DeepSeek-V4's hash layers)."""
    x = x.float()
    if family == "deepseek_v4":  # sqrt-softplus scores; hash layers: experts from the table
        scores = F.softplus(F.linear(x, router.weight)).sqrt()  # [T, E]
        if hasattr(router, "tid2eid"):
            index = router.tid2eid[ids].long()
        else:
            choice = scores + router.e_score_correction_bias
            index = choice.topk(config.num_experts_per_tok, dim=-1).indices
        weight = scores.gather(1, index)
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return index, weight * config.routed_scaling_factor
    if family == "dbrx":  # softmax, top-k, weights divided by their p-norm (p = 1)
        ffn = config.ffn_config
        weight, index = F.linear(x, router.layer.weight).softmax(dim=-1).topk(ffn.moe_top_k)
        p = ffn.moe_normalize_expert_weights
        return index, weight / weight.norm(p=p, dim=-1, keepdim=True)
    if family == "switch_transformers":  # softmax, top-1; capacity per sequence (one chunk)
        probs = F.linear(x, router.classifier.weight).softmax(dim=-1)  # [T, E]
        weight, index = probs.max(dim=-1, keepdim=True)  # [T, 1]
        one_hot = F.one_hot(index[:, 0], probs.shape[-1])  # [T, E]
        kept = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1, keepdim=True) <= config.expert_capacity
        return index, weight * kept  # weight 0: dropped, counted for no expert
    # Gemma 4's key, Aria's
    k = getattr(config, "top_k_experts", None) or getattr(config, "moe_topk", None)
    k = k or config.num_experts_per_tok
    if family in ("mixtral", "qwen2_moe"):
        probs = F.linear(x, router.weight).softmax(dim=-1)
        weight, index = probs.topk(k, dim=-1)
        if family == "mixtral" or config.norm_topk_prob:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return index, weight
    if family == "gpt_oss":
        value, index = F.linear(x, router.weight, router.bias).topk(k, dim=-1)
        return index, value.softmax(dim=-1)
    if family == "jetmoe":
        value, index = F.linear(x, router.layer.weight).topk(k, dim=-1)
        return index, value.softmax(dim=-1)
    if family in ("llama4", "llama4_text"):  # top-k on the logits, a sigmoid of the chosen
        value, index = F.linear(x, router.weight).topk(k, dim=-1)
        return index, value.sigmoid()
    if family == "deepseek_v3":
        scores = F.linear(x, router.weight).sigmoid()  # [T, E]
        choice = scores + router.e_score_correction_bias
        groups = choice.view(x.shape[0], config.n_group, -1)  # [T, G, E/G]
        best = groups.topk(2, dim=-1).values.sum(dim=-1).topk(config.topk_group, dim=-1).indices
        allowed = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter(1, best, True)
        choice = choice.masked_fill(~allowed.repeat_interleave(groups.shape[-1], dim=1), -1e9)
        index = choice.topk(k, dim=-1).indices
        weight = scores.gather(1, index)
        if config.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return index, weight * config.routed_scaling_factor
    if family in ("inkling_mm_model", "inkling_text"):  # sigmoid + bias over the routed rows;
        logits_ = F.linear(x, router.weight.float())  # [T, E + S]: then a row per shared expert
        E = router.num_experts
        choice = logits_[:, :E].sigmoid() + router.e_score_correction_bias
        index = choice.topk(k, dim=-1).indices
        # the chosen experts' and the shared experts' sigmoids, normalised together
        chosen = torch.cat([logits_[:, :E].gather(1, index), logits_[:, E:]], dim=-1)
        weight = chosen.sigmoid() / chosen.sigmoid().sum(dim=-1, keepdim=True)
        return index, weight[:, :k] * router.route_scale * router.global_scale
    if family == "zaya":  # MLP router fed the previous layer's router states: its own output,
        return block.gate_output[2].reshape(-1, k), block.gate_output[1].reshape(-1, k)
    # other families: the router's own output; a router that takes the selection bias kept on
    # its MoE block (MiniMax-M2, LFM2-MoE, AFMoE) gets it as transformers passes it
    if len(inspect.signature(router.forward).parameters) > 1:
        bias = next(
            getattr(block, n)
            for n in ("expert_bias", "e_score_correction_bias")
            if hasattr(block, n)
        )
        _, weight, index = router(x[None] if family == "afmoe" else x, bias)  # AFMoE: [B, S, D]
    else:
        _, weight, index = router(x)
    return index, weight


def _expert_by_hand(family: str, block: Any, e: int, x: torch.Tensor, config: Any) -> Any:
    """E_e(x) [N, D] from the expert's weights."""
    if family == "jetmoe":
        gate, up = F.linear(x, block.input_linear.weight[e]).chunk(2, dim=-1)
        act = ACT2FN[config.activation_function]
        return F.linear(act(gate) * up, block.output_linear.weight[e])
    ex = block.experts
    if family == "longcat_flash" and e >= ex.num_routed_experts:
        return x  # a zero-compute (identity) expert
    if family == "dbrx":  # expert e: rows [e * I, (e + 1) * I) of w1 / v1 / w2 [E * I, D]
        w1, v1, w2 = (w.view(-1, ex.ffn_hidden_size, x.shape[-1])[e] for w in ex.mlp.parameters())
        return (F.silu(x @ w1.T) * (x @ v1.T)) @ w2
    if family == "gpt_oss":
        gate_up = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        gate = gate_up[..., ::2].clamp(max=ex.limit)
        up = gate_up[..., 1::2].clamp(min=-ex.limit, max=ex.limit)
        glu = gate * torch.sigmoid(gate * ex.alpha)
        return ((up + 1) * glu) @ ex.down_proj[e] + ex.down_proj_bias[e]
    if family == "openai_privacy_filter":  # GPT-OSS's, gate and up halves concatenated
        gate, up = (x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]).chunk(2, dim=-1)
        gate, up = gate.clamp(max=ex.limit), up.clamp(min=-ex.limit, max=ex.limit)
        glu = gate * torch.sigmoid(gate * ex.alpha)
        return ((up + 1) * glu) @ ex.down_proj[e] + ex.down_proj_bias[e]
    if family == "switch_transformers":  # per-expert modules: wo(relu(wi(x)))
        expert = ex[f"expert_{e}"]
        return F.linear(F.relu(F.linear(x, expert.wi.weight)), expert.wo.weight)
    if family in ("nemotron_h", "nemotron_h_omni", "nemo_speechlm"):  # non-gated: down(act(up(x)))
        return F.linear(ex.act_fn(F.linear(x, ex.up_proj[e])), ex.down_proj[e])
    if family.startswith("inkling2"):  # softcapped SwiGLU (gate, up); inkling2_loop(_text) too
        return F.linear(ex._apply_gate(F.linear(x, ex.gate_up_proj[e])), ex.down_proj[e])
    if family == "muse_spark":  # at moe_hidden_size, then one norm shared by every expert
        gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
        return ex.post_expert_norm(F.linear(ex.act_fn(gate) * up, ex.down_proj[e]))
    if family in ("llama4", "llama4_text", "aria", "aria_text"):  # [E, D, 2I], [E, I, D]
        gate, up = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
        return (ex.act_fn(gate) * up) @ ex.down_proj[e]
    if family in ("minimax_m3_vl", "minimax_m3_vl_text"):  # SwiGLU-OAI, halves not interleaved
        gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
        gate, up = gate.clamp(max=ex.swiglu_limit), up.clamp(-ex.swiglu_limit, ex.swiglu_limit)
        glu = gate * torch.sigmoid(gate * ex.swiglu_alpha)
        return F.linear((up + 1) * glu, ex.down_proj[e])
    gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
    act = ex.act_fn if hasattr(ex, "act_fn") else ACT2FN[config.hidden_act]  # LFM2: no key
    return F.linear(act(gate) * up, ex.down_proj[e])


class _Sums:
    def __init__(self, layers: int, experts: int) -> None:
        self.count = torch.zeros(layers, experts, dtype=torch.int64)
        self.soft, self.ean, self.reap_num = (
            torch.zeros(layers, experts, dtype=torch.float64) for _ in range(3)
        )
        self.tokens = torch.zeros(layers, dtype=torch.int64)  # token passes through each row

    def add(self, row: int, index: Any, weight: Any, outputs: Any) -> None:
        """index / weight [T, K]; outputs [T, K, D] unweighted expert outputs (one pass)."""
        self.tokens[row] += index.shape[0]
        for t in range(index.shape[0]):
            for k in range(index.shape[1]):
                e, g = int(index[t, k]), float(weight[t, k])
                if e >= self.count.shape[1] or g == 0:  # LongCat's zero-compute experts,
                    continue  # tokens Switch's capacity dropped: not counted
                norm = float(outputs[t, k].double().norm())
                self.count[row, e] += 1
                self.soft[row, e] += g
                self.ean[row, e] += norm
                self.reap_num[row, e] += g * norm


#: Gemma 4: router and experts sit on the decoder layer, each with its own normed input
ROUTER_ON_THE_LAYER = {"gemma4", "gemma4_text", "diffusion_gemma"}
#: Muse Spark too:'s experts read the MoE block's input pooled to moe_hidden_size
OWN_EXPERT_INPUT = ROUTER_ON_THE_LAYER | {"muse_spark"}


def reference_stats(family: str, path: Path, data: Path, tokenizer: Any) -> dict[str, Any]:
    """Run each chunk alone (no padding) and sum routing and expert norms by hand, over every
    call of each layer's modules: a looped layer (Inkling 2 Loop) runs once per pass, and each
    pass is routed and summed on its own inputs."""
    model = load_model(path)
    config = model.config.get_text_config()
    chunks = load_token_data(data, tokenizer, seq_len=SEQ_LEN).chunks
    # one forward before any hook: where grouped_mm refuses the shapes (Llama 4), the oracle
    # falls back to eager after a failed try that would leave a partial call's inputs behind
    logits(model, chunks[0].long()[None])
    ckpt = open_checkpoint(path)
    layout = resolve_layout(ckpt, spec_for_config(ckpt.config))
    E = layout.experts.num_experts
    routers = routing_modules(
        model, layout.experts.spec, layout.experts.layers, stacks=layout.experts.stacks
    )
    o_projs = find_o_projs(model)
    if layout.heads is not None and layout.spec.heads.tensors:  # Kimi Linear: MLA layers only
        o_projs = {L: m for L, m in o_projs.items() if L in layout.heads.layers}
    try:
        heads = config.num_attention_heads
    except RuntimeError:  # per-layer head counts (dots.note 3): the profiler keeps no head stats
        o_projs, heads = {}, 0
    mlp = _Sums(len(routers), E)
    moa = _Sums(len(routers), E)
    usage = torch.zeros(len(o_projs), heads, dtype=torch.float64)
    inputs: dict[tuple[str, int], list[Any]] = {}  # module -> its input at each call
    handles = []
    for row, layer in enumerate(sorted(routers)):
        name, router = routers[layer]
        block = moe_block(model, name)
        handles.append(
            block.register_forward_pre_hook(
                lambda _m, a, row=row: inputs.setdefault(("mlp", row), []).append(a[0])
            )
        )
        if family == "zaya":  # keep what its router returned (it reads the last layer's)
            handles.append(
                block.gate.register_forward_hook(
                    lambda m, _a, out, block=block: setattr(block, "gate_output", out)
                )
            )
        if family in OWN_EXPERT_INPUT:  # the router's and the experts' inputs differ
            for key, module in (("router", router), ("experts", block.experts)):
                handles.append(
                    module.register_forward_pre_hook(
                        lambda _m, a, key=key, row=row: inputs.setdefault((key, row), []).append(
                            a[0]
                        )
                    )
                )
    for layer, o_proj in o_projs.items():
        handles.append(
            o_proj.register_forward_pre_hook(
                lambda _m, a, layer=layer: inputs.setdefault(("o", layer), []).append(a[0])
            )
        )
    attention = find_routers(model, attention=True)
    for row, layer in enumerate(sorted(attention)):  # jetmoe: capture map's and reduce's input
        block = parent_of(model, attention[layer][0])

        def spy(fn: Any, key: tuple[str, int]) -> Any:
            def wrapped(x: Any, *rest: Any) -> Any:
                inputs.setdefault(key, []).append(x)
                return fn(x, *rest)

            return wrapped

        block.map = spy(block.map, ("map", row))
        block.reduce = spy(block.reduce, ("reduce", row))
    with torch.no_grad():
        for chunk in chunks:
            inputs.clear()
            logits(model, chunk.long()[None])  # (Llama 4: through its language_model)
            for row, layer in enumerate(sorted(routers)):
                name, router = routers[layer]
                block = moe_block(model, name)
                for call, x in enumerate(inputs["mlp", row]):  # every pass of a looped layer
                    x = x.reshape(-1, config.hidden_size)  # [T, D]
                    if family in OWN_EXPERT_INPUT:
                        x_router = inputs["router", row][call]
                        index, weight = _route_by_hand(family, router, x_router, config)
                        x = inputs["experts", row][call]  # [T, D]
                    else:
                        index, weight = _route_by_hand(
                            family, router, x, config, block=block, ids=chunk.long()
                        )
                    outs = torch.stack(
                        [
                            torch.stack(
                                [_expert_by_hand(family, block, int(e), x[t], config) for e in ids]
                            )
                            for t, ids in enumerate(index)
                        ]
                    )  # [T, K, D]
                    mlp.add(row, index, weight, outs)
            for row, layer in enumerate(sorted(attention)):
                name, router = attention[layer]
                block = parent_of(model, name)
                for call, x in enumerate(inputs["map", row]):
                    x = x.reshape(-1, config.hidden_size)
                    index, weight = _route_by_hand(family, router, x, config)
                    slots = inputs["reduce", row][call]
                    slots = slots.reshape(index.shape[0], index.shape[1], -1)
                    w_out = block.output_linear.weight  # [E, D, hd]
                    outs = torch.einsum("tkh,tkdh->tkd", slots, w_out[index])  # [T, K, D]
                    moa.add(row, index, weight, outs)
            for att_row, (layer, o_proj) in enumerate(sorted(o_projs.items())):
                for x in inputs["o", layer]:
                    x = x.reshape(-1, o_proj.in_features)
                    width = o_proj.in_features // heads
                    for h in range(heads):
                        cols = slice(h * width, (h + 1) * width)
                        part = F.linear(x[:, cols], o_proj.weight[:, cols])  # [T, D]
                        usage[att_row, h] += part.double().norm(dim=-1).sum()
    for handle in handles:
        handle.remove()
    return {"experts": mlp, "attention_experts": moa if attention else None, "heads": usage}


@pytest.mark.parametrize("family", FAMILIES)
def test_sums_match_a_by_hand_reference(family, model_dir, data):
    """Routing (the five families named in BRIEF §2 by hand: softmax+renorm, softmax, top-k then
    softmax with bias, sigmoid+bias+groups+scaling, JetMoE's two routers) and every expert's
    output computed from the weights; profiled in padded batches, referenced one chunk at a
    time."""
    path = model_dir(family)
    tokenizer = AutoTokenizer.from_pretrained(path)  # the class the profiler loads
    stats = profile(path, data, batch_size=3)
    ref = reference_stats(family, path, data, tokenizer)
    for kind in expert_kinds(stats):
        got, want = getattr(stats, kind), ref[kind]
        assert torch.equal(got.tokens, want.tokens), kind  # token passes, counted by hand
        assert torch.equal(got.count, want.count), kind
        for name in ("soft", "ean", "reap_num"):
            torch.testing.assert_close(
                getattr(got, name), getattr(want, name), rtol=2e-5, atol=1e-5, msg=kind + name
            )
    if stats.heads is not None:
        torch.testing.assert_close(stats.heads.usage, ref["heads"], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ data formats


def test_text_messages_and_prompt_completion(tmp_path, tokenizer):
    chat = [{"role": "user", "content": "add two numbers"}, {"role": "assistant", "content": "a"}]
    records = [
        {"text": "the router"},
        {"messages": chat},
        {"prompt": "def add(a, b):", "completion": " return a + b"},
        {"prompt": chat[:1], "completion": chat[1:]},
        {"body": "ignored field order", "text": "experts"},
    ]
    got = load_token_data(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, seq_len=1000)
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert rendered.count("</s>") == 2  # the template really ran
    want = [
        tokenizer("the router")["input_ids"],
        tokenizer(rendered, add_special_tokens=False)["input_ids"],
        tokenizer("def add(a, b): return a + b")["input_ids"],
        tokenizer(rendered, add_special_tokens=False)["input_ids"],
        tokenizer("experts")["input_ids"],
    ]
    assert [c.tolist() for c in got.chunks] == want
    field = load_token_data(
        write_jsonl(tmp_path / "f.jsonl", [{"body": "heads"}]),
        tokenizer,
        seq_len=1000,
        text_field="body",
    )
    assert [c.tolist() for c in field.chunks] == [tokenizer("heads")["input_ids"]]


def test_folder_of_text_files_one_document_each(tmp_path, tokenizer):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("experts\nand heads\n")
    (folder / "sub" / "c.md").write_text("router")
    write_jsonl(folder / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    (folder / ".hidden.txt").write_text("never read")
    (folder / "notes.csv").write_text("skipped")
    got = load_token_data(folder, tokenizer, seq_len=1000)
    assert got.documents == 4
    want = ["one", "two", "experts\nand heads\n", "router"]
    assert [c.tolist() for c in got.chunks] == [tokenizer(t)["input_ids"] for t in want]


def test_seq_len_max_tokens_shards_and_batches(data, tokenizer):
    full = load_token_data(data, tokenizer, seq_len=SEQ_LEN)
    lengths = [len(tokenizer(d)["input_ids"]) for d in DOCS]
    assert full.tokens == sum(lengths)
    assert max(c.numel() for c in full.chunks) == SEQ_LEN and max(lengths) > SEQ_LEN
    assert full.documents == len(DOCS)
    capped = load_token_data(data, tokenizer, seq_len=SEQ_LEN, max_tokens=50)
    assert capped.tokens == 50
    assert torch.equal(torch.cat(capped.chunks), torch.cat(full.chunks)[:50])
    halves = [load_token_data(data, tokenizer, seq_len=SEQ_LEN, shard=Shard(i, 2)) for i in (0, 1)]
    assert sum(h.tokens for h in halves) == full.tokens
    assert halves[0].chunks[0].tolist() == tokenizer(DOCS[0])["input_ids"][:SEQ_LEN]
    assert halves[1].chunks[0].tolist() == tokenizer(DOCS[1])["input_ids"][:SEQ_LEN]
    batches = list(full.batches(batch_size=3, pad_id=7))
    assert sum(int(m.sum()) for _, m in batches) == full.tokens
    for ids, mask in batches:
        assert ids.shape == mask.shape and ids.shape[0] <= 3
        assert (ids[mask == 0] == 7).all()
        assert (mask.cummin(dim=1).values == mask).all()  # padding only on the right
    again = load_token_data(data, tokenizer, seq_len=SEQ_LEN)
    assert again.fingerprint == full.fingerprint != capped.fingerprint


def test_long_text_is_tokenized_in_pieces(tmp_path, tokenizer, monkeypatch):
    """A text past PIECE_CHARS is tokenized piece by piece, cut at whitespace, to the same ids
    as the whole text; with --max-tokens the tokenizer never sees the rest of it."""
    import mfprune.profiling.data as data_mod

    words = [f"w{i % 97}x{i % 13}" for i in range(3000)]
    text = " ".join(words)
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": text}])
    whole = tokenizer(text)["input_ids"]
    monkeypatch.setattr(data_mod, "PIECE_CHARS", 500)
    seen: list[int] = []

    class Spy:
        def __call__(self, piece: str, **kw: Any) -> Any:
            seen.append(len(piece))
            return tokenizer(piece, **kw)

    got = load_token_data(path, Spy(), seq_len=100)
    assert len(seen) > 10 and max(seen) <= 500
    assert torch.cat(got.chunks).tolist() == whole
    assert [c.numel() for c in got.chunks[:-1]] == [100] * (len(got.chunks) - 1)
    seen.clear()
    capped = load_token_data(path, Spy(), seq_len=100, max_tokens=150)
    assert capped.tokens == 150 and torch.cat(capped.chunks).tolist() == whole[:150]
    assert sum(seen) < len(text) / 5  # stopped early: most of the text was never tokenized


def test_shard_parse():
    assert Shard.parse("1/4") == Shard(1, 4) and str(Shard(1, 4)) == "1/4"
    for bad in ("4/4", "1", "a/b", "-1/2", "1/0"):
        with pytest.raises(Exception, match="cannot read shard"):
            Shard.parse(bad)


# ------------------------------------------------------------------------------- bad input


def _bad_data(tmp_path: Path) -> dict[str, tuple[Path, dict[str, Any], list[str]]]:
    """name -> (data path, extra kwargs, fragments the error must hold)."""
    t = tmp_path
    (t / "empty.jsonl").write_text("")
    (t / "blank.jsonl").write_text("\n\n")
    write_jsonl(t / "nofield.jsonl", [{"text": "fine"}, {"content": "x", "id": 1}])
    write_jsonl(t / "typo.jsonl", [{"content": "x"}])
    (t / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (t / "latin.txt").write_bytes(b"line one\nline two\nna\xefve\n")
    (t / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    write_jsonl(t / "list.jsonl", [["a", "b"]])
    write_jsonl(t / "number.jsonl", [{"text": 3}])
    write_jsonl(t / "chat.jsonl", [{"messages": "hello"}])
    write_jsonl(t / "few.jsonl", [{"text": "a"}, {"text": "b"}])
    write_jsonl(t / "empties.jsonl", [{"text": ""}, {"text": ""}])
    (t / "csvs").mkdir()
    (t / "csvs" / "a.csv").write_text("x")
    (t / "hfds").mkdir()
    (t / "hfds" / "dataset_info.json").write_text("{}")
    return {
        "missing": (t / "nope.jsonl", {}, ["nope.jsonl", "does not exist"]),
        "empty": (t / "empty.jsonl", {}, ["no documents", "empty"]),
        "blank": (t / "blank.jsonl", {}, ["no documents"]),
        "no field": (
            t / "nofield.jsonl",
            {},
            ["nofield.jsonl:2", "no 'text' field", "'content', 'id'", "--text-field content"],
        ),
        "typo": (t / "typo.jsonl", {"text_field": "contnet"}, ["did you mean 'content'"]),
        "jsonl not utf-8": (t / "latin.jsonl", {}, ["latin.jsonl:2", "not UTF-8", "0xe9"]),
        "txt not utf-8": (t / "latin.txt", {}, ["latin.txt:3", "not UTF-8", "0xef"]),
        "bad json": (t / "broken.jsonl", {}, ["broken.jsonl:2", "not valid JSON"]),
        "not an object": (t / "list.jsonl", {}, ["list.jsonl:1", "JSON object, got an array"]),
        "not a string": (t / "number.jsonl", {}, ["'text' is a number, not a string"]),
        "bad chat": (t / "chat.jsonl", {}, ["chat.jsonl:1", "'messages'", "role"]),
        "shard too far": (t / "few.jsonl", {"shard": Shard(2, 3)}, ["shard 2/3", "only 2"]),
        "no tokens": (t / "empties.jsonl", {}, ["hold no tokens"]),
        "no data files": (t / "csvs", {}, ["no data files", ".csv"]),
        "datasets folder": (t / "hfds", {}, ["save_to_disk", "to_json"]),
    }


def test_bad_data_is_one_clear_error(tmp_path, tokenizer):
    for name, (path, kw, fragments) in _bad_data(tmp_path).items():
        with pytest.raises(DataError) as info:
            load_token_data(path, tokenizer, seq_len=SEQ_LEN, **kw)
        for fragment in fragments:
            assert fragment in str(info.value), (name, str(info.value))
        assert info.value.hint, name


def test_chat_without_template(tokenizer):
    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(DataError, match="needs a chat template"):
        encode(Record(where="x.jsonl:1", messages=[{"role": "user", "content": "a"}]), bare)


def _tamper(src: Path, dst: Path, edit: Callable[[dict, dict], None]) -> Path:
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    edit(tensors, meta)
    save_file(tensors, dst, metadata=meta)
    return dst


def test_stats_round_trip_and_bad_stats_files(model_dir, data, tmp_path):
    stats = profile(model_dir("jetmoe"), data)
    good = stats.save(tmp_path / "good.safetensors")
    loaded = ProfileStats.load(good)
    assert loaded.meta == stats.meta
    assert_same_stats(stats, loaded, rtol=0)
    assert loaded.attention_experts is not None and loaded.heads is None

    def nan(t: dict, _m: dict) -> None:
        t["experts.soft"][0, 0] = float("nan")

    def narrow(t: dict, _m: dict) -> None:
        t["experts.ean"] = t["experts.ean"][:, :-1].contiguous()

    def recount(t: dict, _m: dict) -> None:
        t["attention_experts.count"][1, 0] += 1

    cases: dict[str, tuple[Path, str]] = {
        "missing tensor": (
            _tamper(good, tmp_path / "a.safetensors", lambda t, m: t.pop("experts.ean")),
            "tensor 'experts.ean' is missing",
        ),
        "nan": (_tamper(good, tmp_path / "b.safetensors", nan), "NaN or infinite"),
        "shape": (_tamper(good, tmp_path / "c.safetensors", narrow), "has shape"),
        "counts": (_tamper(good, tmp_path / "d.safetensors", recount), "routes"),
        "no format": (
            _tamper(good, tmp_path / "e.safetensors", lambda t, m: m.pop("format")),
            "not an mfprune stats file",
        ),
        "metadata": (
            _tamper(good, tmp_path / "f.safetensors", lambda t, m: m.update(tokens="many")),
            "'tokens'",
        ),
        "a model": (model_dir("jetmoe") / "model.safetensors", "not an mfprune stats file"),
        "missing": (tmp_path / "nope.safetensors", "does not exist"),
        "folder": (tmp_path, "is a folder"),
    }
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:100])
    cases["truncated"] = (truncated, "not a valid stats file")
    for name, (path, fragment) in cases.items():
        with pytest.raises(StatsError) as info:
            ProfileStats.load(path)
        assert fragment in str(info.value), (name, str(info.value))


def test_model_without_tokenizer_or_experts(tiny_checkpoint, model_dir, data, tmp_path):
    with pytest.raises(ModelError, match="no tokenizer"):
        profile(tiny_checkpoint("mixtral"), data)
    dense = tmp_path / "dense"
    shutil.copytree(tiny_checkpoint("qwen2_moe", mlp_only_layers=[0, 1]), dense)
    with pytest.raises(ModelError, match="no MoE layer"):
        profile(dense, data)
    with pytest.raises(Exception, match="--batch-size must be at least 1"):
        profile(model_dir("mixtral"), data, batch_size=0)


# ----------------------------------------------------------------------------------------- CLI


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_error(result: Any, *fragments: str, exit_code: int = 2) -> None:
    everything = f"{result.stdout}\n{result.stderr}"
    assert "Traceback" not in everything, everything
    assert result.exit_code == exit_code, everything
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert _ERROR_LINE.match(lines[0]), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_profile_and_merge_stats(model_dir, data, tmp_path):
    model = model_dir("deepseek_v3")
    common = ["--data", data, "--seq-len", SEQ_LEN, "--device", "cpu"]
    result = run(
        "profile", model, *common, "--out", tmp_path / "all.safetensors", "--format", "json"
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # no progress bar off a terminal, no library chatter
    summary = json.loads(result.stdout)
    assert summary["family"] == "deepseek_v3" and summary["experts"]["layers"] == [1, 2]
    assert summary["tokens"] == ProfileStats.load(tmp_path / "all.safetensors").meta.tokens
    for i in (0, 1):
        out = tmp_path / f"s{i}.safetensors"
        result = run("profile", model, *common, "--shard", f"{i}/2", "--out", out)
        assert result.exit_code == 0, result.stderr
        assert result.stdout.startswith(f"wrote {out}") and "tokens/s" in result.stdout
    merged = tmp_path / "merged.safetensors"
    result = run(
        "merge-stats", tmp_path / "s0.safetensors", tmp_path / "s1.safetensors", "-o", merged
    )
    assert result.exit_code == 0, result.stderr
    assert "merged 2 files" in result.stdout
    assert_same_stats(
        ProfileStats.load(tmp_path / "all.safetensors"), ProfileStats.load(merged), rtol=1e-5
    )
    result = run("merge-stats", merged, tmp_path / "s0.safetensors", "--out", tmp_path / "x.st")
    assert_clean_error(result, "same data")
    assert not (tmp_path / "x.st").exists()


def test_cli_errors_leave_nothing_behind(model_dir, data, tmp_path, monkeypatch):
    model = model_dir("mixtral")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"content": "x", "id": 1}])
    work = tmp_path / "work"
    work.mkdir()
    out = work / "stats.safetensors"
    assert_clean_error(run("profile", model, "--data", bad, "--out", out), "--text-field content")
    assert_clean_error(run("profile", model, "--data", data, "--out", work), "is a folder")
    assert_clean_error(
        run("profile", model, "--data", data, "--out", out, "--shard", "2/2"), "cannot read shard"
    )
    assert_clean_error(
        run("profile", model, "--data", data, "--out", out, "--device", "tpu"), "unknown device"
    )
    other = profile(model_dir("mixtral", rope_theta=5000.0), data).save(work / "other.st")
    ours = profile(model, data).save(work / "ours.st")
    assert_clean_error(run("merge-stats", ours, other, "--out", out), "another model")
    (work / "junk.st").write_bytes(b"\x00" * 50)
    assert_clean_error(run("merge-stats", ours, work / "junk.st", "--out", out), "junk.st")
    assert sorted(p.name for p in work.iterdir()) == ["junk.st", "other.st", "ours.st"]

    def disk_full(*_a: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mfprune.io.outputs.os.link", disk_full)
    result = run("profile", model, "--data", data, "--out", out, "--seq-len", SEQ_LEN)
    assert_clean_error(result, "No space left", exit_code=1)
    assert sorted(p.name for p in work.iterdir()) == ["junk.st", "other.st", "ours.st"]


def test_stats_replace_keeps_meta(model_dir, data):
    stats = profile(model_dir("mixtral"), data, max_tokens=20)
    assert stats.meta.tokens == 20
    with pytest.raises(StatsError, match="another model"):
        merge_stats(stats, replace(stats, meta=replace(stats.meta, model_fingerprint="0" * 64)))


def test_a_bypassed_hook_is_an_error_not_silent_zeros(model_dir, data, monkeypatch):
    """A module that runs without our hooks seeing it (e.g. a hub kernel swapped in for the
    MoE block) must not yield stats full of zeros."""
    monkeypatch.setattr(Recorder, "_fused_hook", lambda *_a: lambda *_h: None)
    with pytest.raises(ModelError, match="saw no experts output in layers \\[0, 1\\]"):
        profile(model_dir("mixtral"), data)


def test_cli_profiles_an_encoder_decoder_model_whole(model_dir, data, tmp_path):
    # Switch Transformers: encoder layers 0, 1 and decoder layers 2, 3 in one stats file, the
    # tokens the expert capacity dropped counted for no expert; layer by layer is refused
    model, out = model_dir("switch_transformers"), tmp_path / "stats.safetensors"
    common = ["--data", data, "--seq-len", SEQ_LEN, "--device", "cpu"]
    assert run("profile", model, *common, "--out", out).exit_code == 0
    stats = ProfileStats.load(out).experts
    assert stats.layers == (0, 1, 2, 3)
    assert (stats.extra_slots > 0).any()
    assert (stats.count.sum(dim=1) + stats.extra_slots == stats.tokens).all()  # top-1
    result = run("profile", model, *common, "--out", tmp_path / "s.st", "--sequential")
    assert_clean_error(result, "--sequential profiling is not supported for encoder-decoder")
    result = run("bench", model_dir("switch_transformers"))  # lm-eval and speed: causal LMs
    assert_clean_error(result, "benching is not supported for encoder-decoder models")


def test_per_layer_head_counts_give_no_head_stats(model_dir, data):
    # dots.note 3's sliding-window layers have their own head count (per_layer_config): its
    # adapter refuses head pruning, and the profiler keeps expert stats only
    stats = profile(model_dir("dots3_note"), data)
    assert stats.heads is None
    assert stats.experts is not None and stats.experts.layers == (1, 2)


def test_ernie4_5_vl_moe_is_refused_before_loading(model_dir, data, tmp_path):
    # one count sizes its text and vision expert banks: no adapter, so profile names the reason
    # (unsupported.toml) before it loads the model, and the CLI says it on one line
    model = model_dir("ernie4_5_vl_moe")
    with pytest.raises(ArchError, match="sized by one count") as info:
        profile(model, data)
    assert "unsupported model_type 'ernie4_5_vl_moe'" in str(info.value)
    out = tmp_path / "stats.safetensors"
    result = run("profile", model, "--data", data, "--device", "cpu", "--out", out)
    assert_clean_error(result, "ernie4_5_vl_moe", "sized by one count")
    assert not out.exists()


def test_cli_profiles_a_block_diffusion_model_through_its_encoder(model_dir, data, tmp_path):
    # DiffusionGemma: the calibration tokens are routed in the encoder's (causal) pass, whose
    # layers the decoder's tie; a profile prunes it exactly (--verify runs both passes, the
    # canvas being the tokens); steps that run it as a causal LM are refused
    model, stats = model_dir("diffusion_gemma"), tmp_path / "stats.safetensors"
    common = ["--data", data, "--seq-len", SEQ_LEN, "--device", "cpu"]
    assert run("profile", model, *common, "--out", stats).exit_code == 0
    experts = ProfileStats.load(stats).experts
    assert experts.layers == (0, 1) and (experts.count.sum(dim=1) == experts.tokens * 2).all()
    prune = ["prune", model, "--profile", stats, "--keep", "4"]
    assert run(*prune, "--out", tmp_path / "small", "--verify").exit_code == 0
    result = run(*prune, "--out", tmp_path / "r", "--repair", "refit", "--data", data)
    assert_clean_error(result, "--repair is not supported for block-diffusion models")
    assert_clean_error(run("bench", model), "benching is not supported for block-diffusion")
    result = run("profile", model, *common, "--out", tmp_path / "s.st", "--sequential")
    assert_clean_error(result, "no causal-LM class to run layer by layer")


@pytest.mark.parametrize("family", sorted(LOOPED))
def test_cli_profiles_looped_layers_and_prunes_them_exactly(family, model_dir, data, tmp_path):
    # Inkling 2 Loop: layers 1 and 2 run 3 times per token; their stats sum every pass (token
    # passes: tokens x 3, recorded as experts.passes), a plan from them prunes the model
    # exactly (the oracle masks every pass), and the steps that run each layer once refuse it
    from checks import assert_exact, removed

    from mfprune.plan import PrunePlan

    model, stats = model_dir(family), tmp_path / "stats.safetensors"
    common = ["--data", data, "--seq-len", SEQ_LEN, "--device", "cpu"]
    assert run("profile", model, *common, "--out", stats).exit_code == 0
    loaded = ProfileStats.load(stats)
    real, experts = loaded.meta.tokens, loaded.experts
    assert experts.passes is not None and experts.passes.tolist() == [1, 3, 3, 1]
    assert experts.tokens.tolist() == [real, 3 * real, 3 * real, real]
    prune = ["prune", model, "--profile", stats, "--keep-ratio", "0.5"]
    result = run(*prune, "--out", tmp_path / "small", "--verify")
    assert result.exit_code == 0, result.stderr
    kept = PrunePlan.load(tmp_path / "small" / "mfprune_plan.json").experts
    assert sorted(kept) == [0, 1, 2, 3]
    assert_exact(
        model, tmp_path / "small", experts=removed({L: list(v) for L, v in kept.items()}, 8)
    )
    result = run("profile", model, *common, "--out", tmp_path / "s.st", "--sequential")
    assert_clean_error(
        result,
        "--sequential profiling is not supported for models with looped layers",
        "layers 1..2 (loop_layer_index_start..loop_layer_index_end - 1) run 3 times per token",
        "without --sequential",
    )
    result = run(*prune, "--out", tmp_path / "r", "--repair", "refit", "--data", data)
    assert_clean_error(result, "--repair is not supported for models with looped layers")
    assert not (tmp_path / "s.st").exists() and not (tmp_path / "r").exists()


def test_looped_stats_save_merge_and_are_checked(model_dir, data, tmp_path):
    """Each layer's passes travel with the stats: saved (only where a layer runs more than
    once, so every other file is as before), merged, and checked against the token counts."""
    path = model_dir("inkling2_loop")
    whole = profile(path, data)
    halves = [profile(path, data, shard=Shard(i, 2)) for i in range(2)]
    merged = merge_stats(*halves)
    assert_same_stats(whole, merged, rtol=1e-5)
    assert torch.equal(merged.experts.layer_passes(), torch.tensor([1, 3, 3, 1]))
    good = merged.save(tmp_path / "merged.safetensors")
    loaded = ProfileStats.load(good)
    assert_same_stats(merged, loaded, rtol=0)
    assert torch.equal(loaded.experts.passes, merged.experts.passes)
    with safe_open(good, "pt") as f:
        assert "experts.passes" in f.keys()  # noqa: SIM118 - safe_open API
    plain = profile(model_dir("mixtral"), data).save(tmp_path / "plain.safetensors")
    with safe_open(plain, "pt") as f:
        assert not any(k.endswith(".passes") for k in f.keys())  # noqa: SIM118
    assert ProfileStats.load(plain).experts.passes is None  # every layer once

    def once(t: dict, _m: dict) -> None:
        t["experts.passes"] = torch.ones(4, dtype=torch.int64)

    def never(t: dict, _m: dict) -> None:
        t["experts.passes"][1] = 0

    cases = {
        "passes dropped": (lambda t, _m: t.pop("experts.passes"), "'experts.tokens' = ["),
        "passes edited": (once, "x passes [1, 1, 1, 1]"),
        "zero passes": (never, "a layer runs at least once per token"),
    }
    for name, (edit, fragment) in cases.items():
        bad = _tamper(good, tmp_path / f"{name}.safetensors", edit)
        with pytest.raises(StatsError) as info:
            ProfileStats.load(bad)
        assert fragment in str(info.value), (name, str(info.value))
    with pytest.raises(StatsError, match="passes per layer"):  # the same model, edited stats
        once_more = replace(halves[1], experts=replace(halves[1].experts, passes=None))
        merge_stats(halves[0], once_more)


def test_a_loop_the_adapter_does_not_describe_is_an_error(model_dir, data):
    """Without its [loop] rule, Inkling 2 Loop's looped layers route 3 times as many tokens as
    the profile ran: refused with the reason, never stats that count a pass as a token."""
    import tomllib

    from mfprune.arch import parse_spec

    text = (Path(__file__).parents[1] / "mfprune/arch/families/inkling2_loop.toml").read_text()
    adapter = tomllib.loads(text)
    del adapter["loop"]
    with pytest.raises(ModelError) as info:
        profile(model_dir("inkling2_loop"), data, spec=parse_spec(adapter, source="no-loop.toml"))
    message = str(info.value)
    assert "routed another number of tokens than the model ran" in message
    found = re.findall(r"layer (\d+): (\d+) for 1 x (\d+)", message)
    assert [(L, int(n) // int(t), int(n) % int(t)) for L, n, t in found] == [
        ("1", 3, 0),
        ("2", 3, 0),
    ]
    assert "[loop]" in info.value.hint
