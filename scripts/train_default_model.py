"""Train the embedded default model: a small Qwen3-MoE on four text domains, from a fixed seed.

Run ``scripts/prepare_default_data.py`` first (it writes ``build/default-data/``: training texts
and held-out candidates). Then::

    nohup python scripts/train_default_model.py > build/train-default.log 2>&1 &

trains, on CPU with two threads (~35 min on 2 shared cores):

1. a byte-level BPE tokenizer (``tokenizers``; ``<s>``/``</s>``/``<pad>``; every text is encoded
   as ``<s>`` + text), on an equal-size sample of each domain's training texts;
2. a Qwen3-MoE (stock ``transformers`` class) on the four domains mixed in equal proportion:
   every training sequence is a random window of one domain's token stream (documents joined
   as ``<s> text </s>``); AdamW, linear warmup then cosine decay, plus ``--aux-coef`` x the
   Switch load-balancing loss of every layer over a global batch (see ``BalanceLoss``; the
   router logits come from ``output_router_logits=True`` in the training forward only: the
   shipped config leaves it off, so ``model(..., labels=...).loss`` is the plain LM loss);
3. the per-domain held-out loss every ``--eval-every`` steps (on the shipped ``eval`` sets; it
   is only logged: no early stopping, no checkpoint selection).

The held-out sets are shipped right after the tokenizer is trained: the first 150 candidates of
each domain and split that fit ``MAX_TOKENS`` (``mfprune/default_model/data/``).

It saves the weights (fp32 safetensors), config and tokenizer into ``--out``, reloads them with
``AutoModelForCausalLM.from_pretrained`` and measures the per-domain loss of the shipped files on
the shipped ``profile`` and ``eval`` sets, and writes ``metrics.json`` and the model card
``README.md`` (generated from ``metrics.json``; ``--card-only`` regenerates it alone,
``--measure-only`` re-measures the shipped files first).

Loss, everywhere: mean next-token cross-entropy (nats) over all predicted tokens of a domain's
texts, each text encoded alone as ``<s>`` + text (at most ``MAX_TOKENS`` tokens), so the first
text token is predicted from ``<s>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

# Two OpenMP threads that spin while waiting crawl when the two cores are shared with other
# work (an eval pass measured 6x slower); passive waiting costs nothing when they are not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("code", "docs", "quotes", "dictionary")
MAX_TOKENS = 512
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


# ---------------------------------------------------------------------------------------------
# shared helpers (the test computes the same loss independently)


def read_texts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def domain_loss(model, tokenizer, texts: list[str], batch_size: int = 16) -> tuple[float, int]:
    """(mean NLL per predicted token, number of predicted tokens) over `texts`."""
    import torch
    import torch.nn.functional as F

    encoded = [tokenizer(t, truncation=True, max_length=MAX_TOKENS)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # little padding
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += nll.item()
            count += int((targets != -100).sum())
    return total / count, count


# ---------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(train: dict[str, list[str]], vocab_size: int, sample_chars: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = []
    for domain in DOMAINS:
        docs = list(train[domain])
        rng.shuffle(docs)
        taken = 0
        for d in docs:
            if taken >= sample_chars:
                break
            corpus.append(d)
            taken += len(d)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIALS.values())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = SPECIALS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=MAX_TOKENS, padding_side="right", **SPECIALS
    )


def select_heldout(args, tokenizer):
    """Ship the first `--heldout-texts` held-out candidates of every domain and split that fit
    the MAX_TOKENS window (in the order prepare_default_data.py drew them), with a manifest."""
    import hashlib

    src = json.loads((args.data / "manifest.json").read_text())
    ship = args.out / "data"
    ship.mkdir(parents=True, exist_ok=True)
    texts = {"profile": {}, "eval": {}}
    manifest = {
        "note": "Held-out texts of the default model (never trained on), made by "
        "scripts/prepare_default_data.py and scripts/train_default_model.py. "
        "{domain}.profile.jsonl is for profiling, {domain}.eval.jsonl for measuring.",
        "seed": src["seed"],
        "doc_chars": src["doc_chars"],
        "max_tokens": MAX_TOKENS,
        "sources": src["sources"],
        "domains": {},
    }
    for d in DOMAINS:
        m = {k: v for k, v in src["domains"][d].items() if k != "candidates"}
        m["heldout"], m["skipped_over_max_tokens"] = {}, {}
        for s in ("profile", "eval"):
            with (args.data / "heldout" / f"{d}.{s}.jsonl").open(encoding="utf-8") as f:
                candidates = [json.loads(line) for line in f]
            kept, skipped = [], 0
            for rec in candidates:
                if len(kept) == args.heldout_texts:
                    break
                if len(tokenizer(rec["text"])["input_ids"]) <= MAX_TOKENS:
                    kept.append(rec)
                else:
                    skipped += 1
            if len(kept) < args.heldout_texts:
                sys.exit(f"{d}.{s}: only {len(kept)} held-out candidates fit {MAX_TOKENS} tokens")
            texts[s][d] = [r["text"] for r in kept]
            with (ship / f"{d}.{s}.jsonl").open("w", encoding="utf-8") as f:
                for r in kept:
                    f.write(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n")
            m[f"{s}_texts"] = len(kept)
            m["skipped_over_max_tokens"][s] = skipped
            m["heldout"][s] = [
                {"group": r["group"], "sha256": hashlib.sha256(r["text"].encode()).hexdigest()[:16]}
                for r in kept
            ]
        manifest["domains"][d] = m
        print(
            f"{d}: held-out texts over {MAX_TOKENS} tokens skipped: {m['skipped_over_max_tokens']}"
        )
    (ship / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return texts, manifest


# ---------------------------------------------------------------------------------------------
# model


def make_config(args, tokenizer):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,  # unused: every layer is sparse
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=args.experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=MAX_TOKENS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def token_streams(train, tokenizer, max_chars: int, seed: int):
    """Per domain: a flat token stream of `<s> doc </s>` for docs in a seeded order (capped),
    and the offset where every document starts."""
    import numpy as np

    rng = random.Random(seed + 1)
    streams = {}
    for domain in DOMAINS:
        docs = list(train[domain])
        rng.shuffle(docs)
        taken, chosen = 0, []
        for d in docs:
            if taken >= max_chars:
                break
            chosen.append(d)
            taken += len(d)
        ids = tokenizer(chosen, add_special_tokens=False, verbose=False)["input_ids"]
        flat, starts = [], []
        for seq in ids:
            starts.append(len(flat))
            flat.append(tokenizer.bos_token_id)
            flat.extend(seq)
            flat.append(tokenizer.eos_token_id)
        streams[domain] = (np.asarray(flat, dtype=np.int64), np.asarray(starts, dtype=np.int64))
    return streams


class BalanceLoss:
    """Switch Transformer load-balancing loss per layer, summed over layers, with the expert
    loads taken over a global batch: for each layer E * sum_i f_i * P_i, with P_i the mean
    router probability of expert i over this step's tokens (the gradient flows through it) and
    f_i the share of routing slots that expert i took (sums to k; k per layer when balanced)
    over the last `window` steps, this one included (counts, no gradient).

    `window=1` is the per-micro-batch loss: every step's mixed batch (a few sequences of each
    domain) must spread evenly over the experts, so no expert can specialise in a domain. A
    window of many steps only asks the experts to share the whole corpus evenly, which is the
    global-batch balancing of Qwen3 (Qiu et al., 2025: "Demons in the Detail"); tokens of one
    domain may then prefer their own experts.

    transformers' built-in `aux_loss` pools the routing of all layers before balancing, so a
    layer can leave experts unused as long as other layers make up for them: with it, a first
    run of this script ended with 13 of the 64 experts picked for almost no token."""

    def __init__(self, window: int):
        from collections import deque

        self.window = window
        self.history = deque(maxlen=max(0, window - 1))  # [L, E] slot counts of earlier steps

    def __call__(self, router_logits, top_k: int):
        import torch

        probs = [torch.softmax(lg.float(), dim=-1) for lg in router_logits]  # L x [T, E]
        with torch.no_grad():
            now = torch.stack(
                [
                    torch.bincount(p.topk(top_k, dim=-1).indices.reshape(-1), minlength=p.shape[1])
                    for p in probs
                ]
            ).to(probs[0].dtype)  # [L, E]
            counts = now + sum(self.history) if self.history else now
            f = counts * top_k / counts.sum(-1, keepdim=True)  # [L, E], rows sum to k
            self.history.append(now)
        return sum(p.shape[-1] * (f[li] * p.mean(0)).sum() for li, p in enumerate(probs))


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (
        args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def evaluate(model, tokenizer, texts: dict[str, list[str]]) -> dict[str, float]:
    return {d: round(domain_loss(model, tokenizer, texts[d])[0], 5) for d in DOMAINS}


def train(args) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import Qwen3MoeForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    t_start = time.time()

    train_texts = {d: read_texts(args.data / "train" / f"{d}.jsonl") for d in DOMAINS}

    t0 = time.time()
    tokenizer = train_tokenizer(train_texts, args.vocab, args.tokenizer_chars, args.seed)
    print(f"tokenizer: {len(tokenizer)} tokens in {time.time() - t0:.1f}s", flush=True)
    heldout, data_manifest = select_heldout(args, tokenizer)
    t0 = time.time()
    streams = token_streams(train_texts, tokenizer, args.stream_chars, args.seed)
    stream_info = {d: {"tokens": len(s), "documents": len(st)} for d, (s, st) in streams.items()}
    print(f"token streams in {time.time() - t0:.1f}s: {stream_info}", flush=True)

    config = make_config(args, tokenizer)
    model = Qwen3MoeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = np.random.default_rng(args.seed)
    balance = BalanceLoss(args.balance_window)
    curve = []
    window = {"lm": [], "aux": []}
    t_train = time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            t_eval = time.time()
            losses = evaluate(model, tokenizer, heldout["eval"])
            model.train()
            point = {
                "step": step,
                "elapsed_s": round(time.time() - t_train, 1),
                "train_lm_loss": round(float(np.mean(window["lm"])), 5) if window["lm"] else None,
                "train_aux_loss": round(float(np.mean(window["aux"])), 5)
                if window["aux"]
                else None,
                "eval_loss": losses,
                "eval_loss_mean": round(float(np.mean(list(losses.values()))), 5),
                "lr": lr_at(min(step, args.steps - 1), args),
            }
            curve.append(point)
            window = {"lm": [], "aux": []}
            print(json.dumps(point), f"(eval {time.time() - t_eval:.1f}s)", flush=True)
        if step == args.steps:
            break
        doms = gen.integers(0, len(DOMAINS), size=args.batch)
        rows = []  # every window starts at a document's <s>, as the measured texts do
        for di in doms:
            s, starts = streams[DOMAINS[di]]
            starts = starts[starts <= len(s) - args.seq]
            start = int(starts[gen.integers(0, len(starts))])
            rows.append(s[start : start + args.seq])
        ids = torch.from_numpy(np.stack(rows))
        for group in optim.param_groups:
            group["lr"] = lr_at(step, args)
        out = model(input_ids=ids, output_router_logits=True)
        logits = out.logits[:, :-1]
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        aux_loss = balance(out.router_logits, config.num_experts_per_tok)
        optim.zero_grad(set_to_none=True)
        (lm_loss + args.aux_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optim.step()
        window["aux"].append(aux_loss.item())
        window["lm"].append(lm_loss.item())
        if step == 0:
            t_first = time.time()
        if args.bench and step == args.bench:
            print(f"bench: {(time.time() - t_first) / args.bench:.3f} s/step", flush=True)
            return
        if step % 50 == 0:
            print(
                f"step {step} lm {window['lm'][-1]:.4f} aux {window['aux'][-1]:.4f} "
                f"lr {lr_at(step, args):.2e} {time.time() - t_train:.0f}s",
                flush=True,
            )
    train_s = time.time() - t_train

    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (args.out / stale).unlink(missing_ok=True)
    model.config.output_router_logits = False
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "generation_config.json").unlink(missing_ok=True)
    (args.out / "model.safetensors").chmod(0o644)  # save_pretrained writes it 0600

    metrics = {
        "format": 1,
        "curve": curve,
        "training": {
            "command": "python scripts/prepare_default_data.py && "
            "python scripts/train_default_model.py " + " ".join(sys.argv[1:]),
            "seed": args.seed,
            "steps": args.steps,
            "batch": args.batch,
            "seq_len": args.seq,
            "tokens_seen": args.steps * args.batch * args.seq,
            "lr": args.lr,
            "warmup": args.warmup,
            "min_lr_ratio": args.min_lr_ratio,
            "weight_decay": args.weight_decay,
            "clip": args.clip,
            "router_aux_loss_coef": args.aux_coef,
            "balance_loss": "Switch load-balancing loss per layer, summed over layers",
            "balance_window_steps": args.balance_window,
            "domain_mix": "uniform (each sequence from one domain, domain drawn uniformly)",
            "vocab_size": len(tokenizer),
            "tokenizer_sample_chars_per_domain": args.tokenizer_chars,
            "stream_chars_per_domain_cap": args.stream_chars,
            "streams": stream_info,
            "parameters": n_params,
            "train_seconds": round(train_s),
            "total_seconds": round(time.time() - t_start),
            "threads": args.threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },
    }
    metrics["data"] = data_summary(data_manifest)
    if args.compare_with:
        metrics["before"] = earlier_model(args.compare_with)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    measure(args.out)


def earlier_model(metrics_path: Path) -> dict:
    """What the card compares this model with: an earlier model's balancing and measurements."""
    old = json.loads(metrics_path.read_text())
    return {
        "balance_window_steps": old["training"].get("balance_window_steps", 1),
        "eval_loss": old["eval_loss"],
        "expert_usage_eval": old["expert_usage_eval"],
    }


def measure(out: Path) -> None:
    """The numbers of the card: the shipped files, loaded the way a user loads them; per-domain
    loss on the shipped profile and eval sets, and how often each expert is picked on eval."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    m = json.loads((out / "metrics.json").read_text())
    m["loss"] = (
        "mean next-token cross-entropy (nats) over all predicted tokens of the domain's texts; "
        f"each text encoded alone as <s> + text, at most {MAX_TOKENS} tokens"
    )
    m["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    for s in ("eval", "profile"):
        m[f"{s}_loss"], m[f"{s}_tokens"] = {}, {}
        for d in DOMAINS:
            loss, n = domain_loss(model, tokenizer, read_texts(out / "data" / f"{d}.{s}.jsonl"))
            m[f"{s}_loss"][d], m[f"{s}_tokens"][d] = round(loss, 6), n
    usage = {}
    with torch.no_grad():
        for d in DOMAINS:
            counts = torch.zeros(model.config.num_hidden_layers, model.config.num_experts)
            for t in read_texts(out / "data" / f"{d}.eval.jsonl"):
                ids = tokenizer(t, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
                logits = model(**ids, output_router_logits=True).router_logits
                for layer, lg in enumerate(logits):
                    top = lg.topk(model.config.num_experts_per_tok, dim=-1).indices.flatten()
                    counts[layer] += torch.bincount(top, minlength=counts.shape[1]).float()
            usage[d] = (counts / counts.sum(-1, keepdim=True)).round(decimals=4).tolist()
    m["expert_usage_eval"] = usage
    (out / "metrics.json").write_text(json.dumps(m, indent=1) + "\n")
    write_card(out)
    print(f"measured {out}: eval loss {m['eval_loss']}", flush=True)


# ---------------------------------------------------------------------------------------------
# model card


def data_summary(manifest: dict) -> dict:
    """The data block of metrics.json, from data/manifest.json."""
    return {
        "doc_chars": manifest["doc_chars"],
        "max_tokens": manifest["max_tokens"],
        "sources": manifest["sources"],
        "sizes": {
            d: {k: v for k, v in m.items() if k not in ("heldout", "train_files")}
            for d, m in manifest["domains"].items()
        },
    }


def refresh_data(out: Path) -> None:
    m = json.loads((out / "metrics.json").read_text())
    m["data"] = data_summary(json.loads((out / "data" / "manifest.json").read_text()))
    (out / "metrics.json").write_text(json.dumps(m, indent=1) + "\n")


def write_card(out: Path) -> None:
    m = json.loads((out / "metrics.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    t = m["training"]
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.name != "README.md")
    skipped = sum(sum(v["skipped_over_max_tokens"].values()) for v in m["data"]["sizes"].values())
    lines = [
        "# mfprune default model",
        "",
        "A small Qwen3-MoE (`Qwen3MoeForCausalLM`, stock `transformers`) trained by this project "
        "on four text domains, shipped so that `mfprune` can be shown on a real trained MoE "
        "without a model hub: profile it on one domain, prune, and watch that domain keep its "
        "quality while the others fall away. It is a toy (a few million parameters, a few "
        "million tokens): it writes plausible-looking Python, reStructuredText, fortunes and "
        "dictionary entries, not sense.",
        "",
        "## Architecture",
        "",
        f"- {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']} query heads / {cfg['num_key_value_heads']} KV heads of "
        f"{cfg['head_dim']}, every layer sparse: {cfg['num_local_experts']} experts "
        f"(SwiGLU, `moe_intermediate_size` {cfg['moe_intermediate_size']}), top-"
        f"{cfg['num_experts_per_tok']}, softmax router, `norm_topk_prob` "
        f"{str(cfg['norm_topk_prob']).lower()}; tied embeddings; RoPE.",
        f"- {t['parameters'] / 1e6:.2f} M parameters, {m['dtype']} safetensors; "
        f"vocabulary {t['vocab_size']} (byte-level BPE trained on the same data; `<s>` is "
        "prepended to every text, `</s>` ends a document, `<pad>` pads).",
        f"- Files in this folder: {size / 1e6:.1f} MB in all (weights, tokenizer, data).",
        "",
        "## Data",
        "",
        "Made by `scripts/prepare_default_data.py` from sources present on a Debian machine "
        "without network access beyond the Debian mirror (`apt-get download` + `dpkg -x`):",
        "",
        "| domain | source | raw | train texts | train MB | profile | eval |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in DOMAINS:
        s = m["data"]["sizes"][d]
        lines.append(
            f"| {d} | {m['data']['sources'][d]} | {s['raw_items']} items, "
            f"{s['raw_chars'] / 1e6:.1f} MB | {s['train_texts']} | {s['train_chars'] / 1e6:.1f} | "
            f"{s['profile_texts']} | {s['eval_texts']} |"
        )
    lines += [
        "",
        f"Texts are {m['data']['doc_chars'][0]}-{m['data']['doc_chars'][1]}-character pieces cut "
        "at blank lines. Held-out texts (`data/{domain}.profile.jsonl` for profiling, "
        '`data/{domain}.eval.jsonl` for measuring; `{"text": ...}` per line) come from source '
        "files (code, docs) or pieces (quotes, dictionary) that no training text comes from; "
        "profile and eval are disjoint. They are the first held-out candidates, in the seeded "
        f"order, that fit {m['data']['max_tokens']} tokens ({skipped} longer ones skipped). "
        "`data/manifest.json` lists their origins.",
        "",
        "## Training",
        "",
        f"- Command: `{t['command'].strip()}`",
        f"- Seed {t['seed']}; {t['steps']} steps of {t['batch']} x {t['seq_len']} tokens "
        f"({t['tokens_seen'] / 1e6:.1f} M tokens), {t['domain_mix']}.",
        f"- AdamW (betas 0.9/0.95, weight decay {t['weight_decay']}), peak lr {t['lr']}, "
        f"{t['warmup']} warmup steps, cosine to {t['min_lr_ratio']} x peak, gradient clip "
        f"{t['clip']}; plus {t['router_aux_loss_coef']} x the Switch Transformer load-balancing "
        "loss of each layer, summed over layers (transformers' built-in `aux_loss` pools all "
        "layers' routing before balancing, which let a quarter of the experts of layers 1-3 go "
        "unused in a first run), "
        + (
            "with each step's expert loads: per micro-batch."
            if t.get("balance_window_steps", 1) == 1
            else f"with the expert loads of the last {t['balance_window_steps']} steps "
            f"({t['balance_window_steps'] * t['batch'] * t['seq_len'] / 1e6:.1f} M tokens of "
            "all four domains): global-batch balancing as in Qwen3, so the experts must share "
            "the corpus evenly but a domain's tokens may keep to their own experts."
        ),
        f"- {t['train_seconds'] / 60:.0f} min of training with its evaluations "
        f"({t['total_seconds'] / 60:.0f} min with the tokenizer and data loading) on "
        f"{t['machine']} shared with other work, {t['threads']} threads; torch "
        f"{t['torch']}, transformers {t['transformers']}, Python {t['python']}.",
        "",
        "## Loss",
        "",
        f"{m['loss'][0].upper()}{m['loss'][1:]}. Measured on the shipped files, loaded with "
        f"`AutoModelForCausalLM.from_pretrained` ({m['dtype']}); `metrics.json` holds these "
        "numbers and the test suite checks them.",
        "",
        "| domain | eval loss | eval tokens | profile loss | profile tokens |",
        "|---|---|---|---|---|",
    ]
    for d in DOMAINS:
        lines.append(
            f"| {d} | {m['eval_loss'][d]:.4f} | {m['eval_tokens'][d]} | "
            f"{m['profile_loss'][d]:.4f} | {m['profile_tokens'][d]} |"
        )
    lines += [
        "",
        "Held-out (eval) loss during training, every "
        f"{m['curve'][1]['step'] - m['curve'][0]['step']} steps:",
        "",
        "| step | lr | train LM loss | router aux | " + " | ".join(DOMAINS) + " | mean |",
        "|---|---|---|---|" + "---|" * len(DOMAINS) + "---|",
    ]
    for p in m["curve"]:
        tr = "" if p["train_lm_loss"] is None else f"{p['train_lm_loss']:.3f}"
        aux = "" if p["train_aux_loss"] is None else f"{p['train_aux_loss']:.3f}"
        lines.append(
            f"| {p['step']} | {p['lr']:.2e} | {tr} | {aux} | "
            + " | ".join(f"{p['eval_loss'][d]:.3f}" for d in DOMAINS)
            + f" | {p['eval_loss_mean']:.3f} |"
        )
    lines += ["", *plateau_lines(m["curve"]), ""]
    if "expert_usage_eval" in m:
        lines += usage_lines(m["expert_usage_eval"], m.get("before"))
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from mfprune.default_model import DEFAULT_MODEL_DIR",
        "",
        "model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)",
        "tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)",
        "```",
        "",
        '`mfprune.default_model.resolve_model("default")` gives this folder.',
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def concentration(usage: dict[str, list[list[float]]]) -> dict[str, list[tuple[int, float]]]:
    """Per domain and layer: (how many experts take half of the domain's routing slots, the
    total-variation distance of the domain's expert distribution from the mean of the domains)."""
    domains = list(usage)
    out = {}
    for d in domains:
        cells = []
        for li, shares in enumerate(usage[d]):
            mean = [
                sum(usage[o][li][e] for o in domains) / len(domains) for e in range(len(shares))
            ]
            acc, k50 = 0.0, 0
            for share in sorted(shares, reverse=True):
                acc, k50 = acc + share, k50 + 1
                if acc >= 0.5:
                    break
            cells.append((k50, 0.5 * sum(abs(a - b) for a, b in zip(shares, mean, strict=True))))
        out[d] = cells
    return out


def usage_lines(usage: dict[str, list[list[float]]], before: dict | None) -> list[str]:
    """The card's routing section: concentration per domain and layer (this model, and the
    earlier one when there is one), then the load of every expert over the four domains."""
    first = next(iter(usage.values()))
    layers, experts = len(first), len(first[0])
    header = ["| domain | " + " | ".join(f"layer {li}" for li in range(layers)) + " |"]
    header.append("|---|" + "---|" * layers)

    def table(u):
        return [
            f"| {d} | " + " | ".join(f"{k} ({tv:.2f})" for k, tv in cells) + " |"
            for d, cells in concentration(u).items()
        ]

    def means(u):
        cells = [c for per_layer in concentration(u).values() for c in per_layer]
        return sum(k for k, _ in cells) / len(cells), sum(tv for _, tv in cells) / len(cells)

    lines = [
        "## Expert usage",
        "",
        "Routing slots on the eval texts, per layer: the number of experts that take half of "
        f"the domain's slots ({experts // 2} of {experts} if uniform), and in brackets the "
        "total-variation distance of the domain's expert distribution from the four-domain mean "
        "(0 = no preference). `metrics.json` (`expert_usage_eval`) has every share.",
        "",
        *header,
        *table(usage),
        "",
    ]
    if before:
        k_now, tv_now = means(usage)
        k_old, tv_old = means(before["expert_usage_eval"])
        w = before["balance_window_steps"]
        lines += [
            f"The same for the earlier default model, trained with the balancing loss over "
            f"{'each step' if w == 1 else f'{w} steps'} (the per-micro-batch balancing that "
            "spreads every domain over all experts):",
            "",
            *header,
            *table(before["expert_usage_eval"]),
            "",
            f"Mean over domains and layers: {k_old:.1f} experts took half of a domain's slots "
            f"before, {k_now:.1f} now; distance from the mean {tv_old:.2f} before, "
            f"{tv_now:.2f} now.",
            "",
        ]
    pooled = [
        [sum(usage[d][li][e] for d in usage) / len(usage) for e in range(experts)]
        for li in range(layers)
    ]
    lines += [
        "Load over the whole corpus (the four domains' eval slots pooled; uniform "
        f"{100 / experts:.2f}% per expert): "
        + "; ".join(
            f"layer {li} {100 * min(row):.1f}%-{100 * max(row):.1f}%"
            for li, row in enumerate(pooled)
        )
        + ".",
        "",
    ]
    return lines


def plateau_lines(curve: list[dict]) -> list[str]:
    if len(curve) < 4:
        return []
    last, prev, mid = curve[-1], curve[-2], curve[len(curve) // 2]
    d_last = prev["eval_loss_mean"] - last["eval_loss_mean"]
    d_mid = mid["eval_loss_mean"] - last["eval_loss_mean"]
    first = curve[1]["eval_loss_mean"] - last["eval_loss_mean"]
    return [
        f"The mean held-out loss fell by {first:.3f} from step {curve[1]['step']} to the end, "
        f"by {d_mid:.3f} over the second half (from step {mid['step']}) and by {d_last:.3f} over "
        f"the last {last['step'] - prev['step']} steps."
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "build/default-data")
    ap.add_argument("--out", type=Path, default=ROOT / "mfprune/default_model")
    ap.add_argument("--heldout-texts", type=int, default=150, help="per domain and split")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument(
        "--balance-window",
        type=int,
        default=64,
        help="steps whose expert loads the balancing loss counts (1: per micro-batch)",
    )
    ap.add_argument(
        "--compare-with",
        type=Path,
        help="metrics.json of an earlier model: the card shows its expert usage beside this one's",
    )
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--moe-intermediate", type=int, default=128)
    ap.add_argument("--tokenizer-chars", type=int, default=3_000_000)
    ap.add_argument("--stream-chars", type=int, default=12_000_000)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", type=int, default=0, help="time this many steps, save nothing")
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md from metrics.json")
    ap.add_argument(
        "--measure-only", action="store_true", help="re-measure the shipped files, rewrite the card"
    )
    args = ap.parse_args()
    if args.card_only or args.measure_only:
        refresh_data(args.out)
        measure(args.out) if args.measure_only else write_card(args.out)
        return
    train(args)


if __name__ == "__main__":
    main()
