"""The embedded default model: it loads offline in stock transformers, its per-domain losses are
the ones its model card states, and its held-out sets are disjoint from each other and from the
training data."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from mfprune.default_model import (
    DEFAULT_DATA_DIR,
    DEFAULT_MODEL_DIR,
    DOMAINS,
    resolve_model,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("profile", "eval")
METRICS = json.loads((DEFAULT_MODEL_DIR / "metrics.json").read_text())


def texts(domain: str, split: str) -> list[str]:
    path = DEFAULT_DATA_DIR / f"{domain}.{split}.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"text"} and isinstance(r["text"], str) for r in records), path
    return [r["text"] for r in records]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(
        DEFAULT_MODEL_DIR, output_loading_info=True, local_files_only=True
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    model.eval()
    torch.manual_seed(0)
    return model, tokenizer


def test_resolve_model():
    assert resolve_model("default") == DEFAULT_MODEL_DIR
    assert resolve_model("some/dir") == "some/dir"
    assert resolve_model(Path("default")) == Path("default")


def test_shipped_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    total = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file())
    assert total <= 20e6, f"default model folder is {total / 1e6:.1f} MB"


def test_config_is_the_documented_architecture(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cfg = model.config
    assert cfg.model_type == "qwen3_moe" and type(model).__name__ == "Qwen3MoeForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts) == (4, 128, 16)
    assert (cfg.num_experts_per_tok, cfg.norm_topk_prob) == (2, True)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 32)
    assert cfg.output_router_logits is False  # `.loss` with labels is the plain LM loss
    assert str(next(model.parameters()).dtype) == f"torch.{METRICS['dtype']}"
    ids = tokenizer("def f(x):\n    return x")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == cfg.bos_token_id
    assert tokenizer.eos_token_id == cfg.eos_token_id
    assert tokenizer.pad_token_id == cfg.pad_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "def f(x):\n    return x"


def domain_loss(model, tokenizer, items: list[str]) -> float:
    """Token-weighted mean next-token loss, written independently of the training script: texts
    in right-padded batches of similar length, the model's own `labels` loss."""
    import torch

    max_tokens = json.loads((DEFAULT_DATA_DIR / "manifest.json").read_text())["max_tokens"]
    items = sorted(items, key=len)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(items), 25):
            enc = tokenizer(
                items[start : start + 25],
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            out = model(**enc, labels=labels)
            total, count = total + out.loss.item() * n, count + n
    return total / count


@pytest.mark.slow
def test_eval_losses_match_the_model_card(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    for domain in DOMAINS:
        loss = domain_loss(model, tokenizer, texts(domain, "eval"))
        assert loss == pytest.approx(METRICS["eval_loss"][domain], abs=1e-3), domain
    # a trained model, not a random one (ln 4096 = 8.3)
    assert max(METRICS["eval_loss"].values()) < 5.0


def test_model_card_states_the_metrics():
    card = (DEFAULT_MODEL_DIR / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\w+) \| (\d+\.\d{4}) \| \d+ \|", card, re.MULTILINE))
    assert set(rows) == set(DOMAINS)
    for domain in DOMAINS:
        assert float(rows[domain]) == pytest.approx(METRICS["eval_loss"][domain], abs=6e-5)
    # the curve flattened: the last tenth of training gained at most 2% of the whole gain
    curve = [p["eval_loss_mean"] for p in METRICS["curve"]]
    assert len(curve) >= 10
    assert curve[-2] - curve[-1] <= 0.02 * (curve[0] - curve[-1])


def test_every_expert_is_used():
    """The balancing loss (over a global batch, per layer) kept every expert in use: on the
    eval texts of the four domains together, each expert of each layer takes at least 1% of
    the routing slots (uniform: 6.25%)."""
    usage = METRICS["expert_usage_eval"]
    for layer in range(4):
        for expert in range(16):
            share = sum(usage[d][layer][expert] for d in DOMAINS) / len(DOMAINS)
            assert share >= 0.01, (layer, expert, share)


def test_heldout_sets_are_disjoint():
    manifest = json.loads((DEFAULT_DATA_DIR / "manifest.json").read_text())
    seen: dict[str, str] = {}
    for domain in DOMAINS:
        m = manifest["domains"][domain]
        origins = {}
        for split in SPLITS:
            items = texts(domain, split)
            assert 100 <= len(items) <= 200
            hashes = [hashlib.sha256(t.encode()).hexdigest()[:16] for t in items]
            assert hashes == [h["sha256"] for h in m["heldout"][split]]
            for t in items:
                assert t not in seen, f"{domain}.{split} repeats a text of {seen.get(t)}"
                seen[t] = f"{domain}.{split}"
            origins[split] = {h["group"].split("#")[0] for h in m["heldout"][split]}
        assert not origins["profile"] & origins["eval"], domain
        if m["train_files"] is not None:  # code, docs: no held-out source file is trained on
            train_files = set(m["train_files"])
            assert train_files and not (origins["profile"] | origins["eval"]) & train_files


@pytest.mark.needs_data
def test_heldout_texts_are_not_in_the_training_data():
    """Run with `pytest -m needs_data` after scripts/prepare_default_data.py (deselected in CI,
    which has no training texts; the manifest check above always runs)."""
    train_dir = ROOT / "build/default-data/train"
    assert train_dir.is_dir(), "run scripts/prepare_default_data.py first"
    for domain in DOMAINS:
        with (train_dir / f"{domain}.jsonl").open(encoding="utf-8") as f:
            train = {json.loads(line)["text"] for line in f}
        for split in SPLITS:
            assert not train & set(texts(domain, split)), (domain, split)
