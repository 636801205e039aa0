"""Forward hooks that sum, over the non-padding tokens, how each expert and head is used.

They only read: the model's outputs are unchanged (a test checks the logits).

* Routed experts of transformers v5 ``*Experts`` modules (every family but JetMoE): while
  profiling, the module's ``forward`` is wrapped (on the instance; the class is untouched). The
  wrapper gets ``(hidden [T, D], top_k_index [T, K], top_k_weights [T, K])`` — the routing
  weights exactly as the model applies them, after whatever the family's router does (softmax
  or sigmoid, bias, groups, renormalisation, scaling) — and calls the module's own forward
  (whatever experts implementation the config selects) once, with every (token, slot) pair as
  its own row and a weight of 1: that gives each slot's unweighted output E_i(x) [T*K, D],
  whose norms are summed, and the wrapper returns Σ_k g_k·E_k(x) [T, D] from them. Each expert
  runs once per slot, as in a plain forward; with transformers' default ``grouped_mm``
  implementation the result is bit-for-bit the module's own (same rows, same order, same
  reduction).
* Switch Transformers: its experts module takes a one-hot dispatch mask ``[T, 1, E]``, all
  zeros where the expert capacity dropped the token, and the routing weight ``[T, 1]``; the
  wrapper runs every token through its chosen expert once with weight 1 and returns the
  weighted outputs (0 for a dropped token, as the module does); a dropped token's slot is
  counted for no expert (``extra_slots``, like LongCat's zero experts).
* Llama 4: its experts module takes E copies of the tokens, each scaled by that expert's gate
  (0 where it was not chosen); a hook on the router keeps the tokens and the routing, and one
  on the experts runs their own forward once more on unscaled copies for each slot's E_i(x).
* JetMoE (MLP experts and attention experts): its ``TopKGating`` router returns the routing in
  expert-sorted order ``(sorted slot ids, token of each slot, gate of each slot, slots per
  expert, logits)``, and the module's ``output_linear`` returns every slot's unweighted output
  in that order — a forward hook on each reads them, nothing is recomputed.
* Heads: a forward pre-hook on ``self_attn.o_proj`` splits its input into the H heads' outputs
  x_h and sums ‖W_h x_h‖₂, W_h = head h's columns of o_proj, as sqrt(x_hᵀ (W_hᵀ W_h) x_h) with
  the [H, w, w] Gram matrices computed once.

Hooks see flattened tokens (B*S rows); ``Recorder.set_mask`` gives the [B, S] attention mask of
the batch about to run, and rows where it is 0 (padding) are dropped before anything is summed.

A looped layer (Inkling 2 Loop: the adapter's ``[loop]``) runs its modules once per pass, so
every hook above fires once per pass and adds: its sums cover every pass, and its ``tokens``
count token passes (tokens x passes), the number of times its router routed a token.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mfprune.arch.layout import ExpertLayout, ModelLayout
from mfprune.errors import ModelError
from mfprune.modules import find_o_projs, moe_block, routing_modules
from mfprune.profiling.stats import ExpertStats, HeadStats


class ExpertSums:
    """Running sums for one kind of experts: rows are MoE layers, columns experts."""

    def __init__(self, layout: ExpertLayout, *, device: torch.device, dtype: torch.dtype) -> None:
        self.layers = layout.layers
        self.top_k = layout.top_k
        self.num_experts = layout.num_experts
        shape = (len(self.layers), self.num_experts)  # [L, E]
        self.count = torch.zeros(shape, dtype=torch.int64, device=device)
        self.soft = torch.zeros(shape, dtype=dtype, device=device)
        self.ean = torch.zeros(shape, dtype=dtype, device=device)
        self.reap_num = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens = torch.zeros(len(self.layers), dtype=torch.int64, device=device)  # [L]
        self.passes = [layout.passes.of(L) for L in self.layers]  # [L] runs per token
        # slots routed to rows that are not prunable experts (LongCat's zero experts)  [L]
        self.extra = torch.zeros(len(self.layers), dtype=torch.int64, device=device)

    def add(
        self,
        row: int,
        *,
        expert: torch.Tensor,
        gate: torch.Tensor,
        norm: torch.Tensor,
        tokens: int,
    ) -> None:
        """Add N routed (token, slot) pairs: ``expert`` [N] ids, ``gate`` [N] g_i(t),
        ``norm`` [N] ‖E_i(x_t)‖₂; ``tokens`` real tokens went through the layer (in one
        pass: a looped layer's hook adds once per pass)."""
        acc = self.soft.dtype
        # not counted as routed: LongCat's zero-compute experts (ids >= E), and slots of weight
        # 0, which add nothing (Zaya passes its skip class on as expert 0 with weight 0)
        routed = (expert < self.num_experts) & (gate != 0)
        self.extra[row] += (~routed).sum()
        expert, gate, norm = expert[routed], gate[routed].to(acc), norm[routed].to(acc)
        self.count[row].index_add_(0, expert, torch.ones_like(expert))
        self.soft[row].index_add_(0, expert, gate)
        self.ean[row].index_add_(0, expert, norm)
        self.reap_num[row].index_add_(0, expert, gate * norm)
        self.tokens[row] += tokens

    def stats(self) -> ExpertStats:
        def cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return t.detach().to("cpu", dtype)

        return ExpertStats(
            layers=tuple(self.layers),
            top_k=self.top_k,
            count=cpu(self.count, torch.int64),
            soft=cpu(self.soft, torch.float64),
            ean=cpu(self.ean, torch.float64),
            reap_num=cpu(self.reap_num, torch.float64),
            tokens=cpu(self.tokens, torch.int64),
            extra_slots=cpu(self.extra, torch.int64) if bool(self.extra.any()) else None,
            passes=_passes_tensor(self.passes),
        )


def _passes_tensor(passes: list[int]) -> torch.Tensor | None:
    """[L] int64 runs per token of each row's layer; None when every layer runs once."""
    return torch.tensor(passes, dtype=torch.int64) if any(p != 1 for p in passes) else None


class Recorder:
    """Attach with ``with recorder.attached():``; before each forward call ``set_mask``."""

    def __init__(
        self,
        model: nn.Module,
        layout: ModelLayout,
        *,
        heads: bool = True,
        device: torch.device | None = None,
    ) -> None:
        """``device``: where the sums live (default: the model's; pass it for a model whose
        weights are still on the meta device, as the layer-by-layer profiler does)."""
        self.model = model
        self.device = device if device is not None else next(model.parameters()).device
        acc = torch.float32 if self.device.type == "mps" else torch.float64
        self._keep: torch.Tensor | None = None  # [B*S] bool, True for real tokens
        self._rows: torch.Tensor | None = None  # [T] indices of the real tokens
        self.sums: dict[str, ExpertSums] = {}
        self._plan: list[tuple[nn.Module, str, Any]] = []  # (module, hook kind, callback)
        for kind in ("experts", "attention_experts"):
            expert_layout: ExpertLayout | None = getattr(layout, kind)
            if expert_layout is None:
                continue
            self.sums[kind] = ExpertSums(expert_layout, device=self.device, dtype=acc)
            self._plan_experts(kind, expert_layout)
        self.head_layers: tuple[int, ...] = ()
        self._head_passes: list[int] = []  # runs per token of each head layer
        self._head_usage: torch.Tensor | None = None  # [L_all, H]
        self._head_tokens: torch.Tensor | None = None  # [L_all]
        if heads:
            self._plan_heads(layout, acc)

    # ------------------------------------------------------------------------------ state

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        """The [B, S] mask of the next forward (1 = real token); None counts every token."""
        if attention_mask is None:
            self._keep = self._rows = None
            return
        self._keep = attention_mask.reshape(-1).to(self.device, torch.bool)  # [B*S]
        self._rows = self._keep.nonzero().flatten()  # [T] real rows: one sync per batch

    def _real(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` [B*S, ...] that are real tokens [T, ...]."""
        if self._rows is None or self._keep is None:
            return x
        if self._keep.numel() != x.shape[0]:
            raise RuntimeError(
                f"a hook saw {x.shape[0]} token rows but the batch's mask has {self._keep.numel()}"
            )
        return x.index_select(0, self._rows.to(x.device))

    @contextmanager
    def attached(self) -> Iterator[Recorder]:
        handles = []
        try:
            for module, how, fn in self._plan:
                if how == "pre":
                    handles.append(module.register_forward_pre_hook(fn))
                elif how == "slots":
                    handles.append(_wrap_forward(module, fn))
                elif how == "dispatch":
                    handles.append(_wrap_dispatch_forward(module, fn))
                else:
                    handles.append(module.register_forward_hook(fn))
            yield self
        finally:
            for h in reversed(handles):
                h.remove()
            self._keep = self._rows = None

    def accumulators(self) -> list[torch.Tensor]:
        """Every running sum, in a fixed order (to all-reduce them across processes)."""
        found = [
            t
            for sums in self.sums.values()
            for t in (sums.count, sums.soft, sums.ean, sums.reap_num, sums.tokens, sums.extra)
        ]
        if self._head_usage is not None and self._head_tokens is not None:
            found += [self._head_usage, self._head_tokens]
        return found

    def expert_stats(self, kind: str) -> ExpertStats | None:
        sums = self.sums.get(kind)
        return sums.stats() if sums else None

    def head_stats(self) -> HeadStats | None:
        if self._head_usage is None or self._head_tokens is None:
            return None
        return HeadStats(
            layers=self.head_layers,
            usage=self._head_usage.detach().to("cpu", torch.float64),
            tokens=self._head_tokens.detach().to("cpu", torch.int64),
            passes=_passes_tensor(self._head_passes),
        )

    # ---------------------------------------------------------------------------- experts

    def _plan_experts(self, kind: str, layout: ExpertLayout) -> None:
        try:  # from the adapter's router names, whatever the router class is called
            routers = routing_modules(self.model, layout.spec, layout.layers, stacks=layout.stacks)
        except ValueError as exc:
            raise ModelError(
                f"the loaded model does not hold the {kind} routers the checkpoint has: {exc}",
                hint="the adapter does not match how transformers builds this model",
            ) from None
        sums = self.sums[kind]
        for row, layer in enumerate(layout.layers):
            name, router = routers[layer]
            block = moe_block(self.model, name)
            experts = getattr(block, "experts", None)
            output_linear = getattr(block, "output_linear", None)
            if isinstance(experts, nn.Module) and _takes_scaled_copies(experts):
                routing = {}
                self._plan.append((router, "post", _stash_router_io(routing)))
                self._plan.append((experts, "post", self._scaled_copies_hook(sums, row, routing)))
            elif isinstance(experts, nn.Module) and _takes_dispatch_mask(experts):
                self._plan.append((experts, "dispatch", self._fused_hook(sums, row, experts)))
            elif isinstance(experts, nn.Module):
                self._plan.append((experts, "slots", self._fused_hook(sums, row, experts)))
            elif isinstance(output_linear, nn.Module):
                routing: dict[str, Any] = {}
                self._plan.append((router, "post", _stash_sorted_routing(routing)))
                self._plan.append((output_linear, "post", self._sorted_hook(sums, row, routing)))
            else:
                raise ModelError(
                    f"cannot read the expert outputs of {type(block).__name__} ({name})",
                    hint="mfprune knows transformers' *Experts modules and JetMoE; please report "
                    "this model",
                )

    def _fused_hook(self, sums: ExpertSums, row: int, experts: nn.Module) -> Any:
        """The tap ``_wrap_forward`` calls with each forward's routing and slot outputs."""

        def tap(index: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> None:
            # index, weights [B*S, K]; slots [B*S*K, D] unweighted outputs of each (token, slot)
            rows, top_k = index.shape
            # ‖E_i(x)‖ of every slot, in fp32 without a copy of the slots  [B*S, K]
            norm = torch.linalg.vector_norm(slots, dim=-1, dtype=torch.float32).view(rows, top_k)
            index, weights, norm = self._real(index), self._real(weights), self._real(norm)
            tokens = index.shape[0]
            if tokens:
                sums.add(
                    row,
                    expert=index.reshape(-1),
                    gate=weights.reshape(-1),
                    norm=norm.reshape(-1),
                    tokens=tokens,
                )

        return tap

    def _scaled_copies_hook(self, sums: ExpertSums, row: int, routing: dict[str, Any]) -> Any:
        """Llama 4: the experts module gets E copies of the tokens, copy e scaled by expert e's
        gate (0 where e was not chosen), so E_i(x) is never computed. The hook runs the
        module's own forward once more on unscaled copies (outputs unchanged) and reads each
        chosen slot's ‖E_i(x)‖; the gates and choices come from the router."""

        def hook(module: nn.Module, _args: tuple, _output: torch.Tensor) -> None:
            if "x" not in routing:
                raise RuntimeError(f"{type(module).__name__} ran before its router")
            x, scores, logits = routing.pop("x"), routing.pop("scores"), routing.pop("logits")
            rows, num_experts = scores.shape  # [T, E]
            index = torch.topk(logits, sums.top_k, dim=1).indices  # [T, K]: the router's choice
            gate = scores.gather(1, index)  # [T, K]
            with torch.no_grad():
                plain = module.forward(x.repeat(num_experts, 1)).view(num_experts, rows, -1)
            slots = plain[index, torch.arange(rows, device=x.device).unsqueeze(1)]  # [T, K, D]
            norm = torch.linalg.vector_norm(slots, dim=-1, dtype=torch.float32)  # [T, K]
            index, gate, norm = self._real(index), self._real(gate), self._real(norm)
            if index.shape[0]:
                sums.add(
                    row,
                    expert=index.reshape(-1),
                    gate=gate.reshape(-1),
                    norm=norm.reshape(-1),
                    tokens=index.shape[0],
                )

        return hook

    def _sorted_hook(self, sums: ExpertSums, row: int, routing: dict[str, Any]) -> Any:
        def hook(module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if "token" not in routing:
                raise RuntimeError(f"{type(module).__name__} ran before its router")
            token, gate, per_expert = routing.pop("token"), routing.pop("gate"), routing.pop("n")
            expert = torch.repeat_interleave(
                torch.arange(len(per_expert), device=token.device),
                torch.tensor(per_expert, device=token.device),
            )  # [T*K] expert of each slot, in sorted order
            rows = routing.pop("rows")  # B*S
            if self._keep is None:
                real, tokens = torch.ones_like(token, dtype=torch.bool), rows
            elif self._keep.numel() != rows:
                raise RuntimeError(f"{type(module).__name__} saw {rows} token rows, not B*S")
            else:
                real, tokens = self._keep.to(token.device)[token], self._rows.numel()
            sums.add(  # the slots of real tokens
                row,
                expert=expert[real],
                gate=gate[real],
                norm=output[real].float().norm(dim=-1),
                tokens=tokens,
            )

        return hook

    # ------------------------------------------------------------------------------ heads

    def _plan_heads(self, layout: ModelLayout, acc: torch.dtype) -> None:
        """Hook every layer's ``self_attn.o_proj``: all layers, or the attention layers of a
        hybrid (Mamba / linear-attention layers have none); JetMoE has attention experts.
        Where the adapter names head tensors, only the layers holding them (``HeadLayout.
        layers``): Kimi Linear's delta-attention and GLM-5 Next's linear-attention layers have a
        ``self_attn.o_proj`` too, over heads of another count."""
        o_projs = find_o_projs(self.model)
        if layout.heads is not None and layout.spec.heads.tensors:
            o_projs = {L: m for L, m in o_projs.items() if L in layout.heads.layers}
        if not o_projs:
            return
        config = self.model.config.get_text_config()
        try:
            heads = int(config.num_attention_heads)
        except RuntimeError as exc:  # per-layer head counts (dots.note 3's sliding layers)
            if "per-layer attribute" not in str(exc):
                raise
            if layout.spec.heads.unsupported:  # nothing to plan from head stats: none kept
                return
            raise ModelError(
                f"the {layout.spec.family} model's layers have different head counts",
                hint="its adapter must refuse head pruning (heads.unsupported)",
            ) from None
        self.head_layers = tuple(sorted(o_projs))
        self._head_passes = [layout.passes.of(L) for L in self.head_layers]
        self._head_usage = torch.zeros(len(o_projs), heads, dtype=acc, device=self.device)
        self._head_tokens = torch.zeros(len(o_projs), dtype=torch.int64, device=self.device)
        for row, layer in enumerate(self.head_layers):
            o_proj = o_projs[layer]
            width, rest = divmod(o_proj.in_features, heads)
            if rest:
                raise ModelError(
                    f"layer {layer}: o_proj takes {o_proj.in_features} inputs, not a multiple "
                    f"of {heads} heads"
                )
            self._plan.append((o_proj, "pre", self._head_hook(row, o_proj, heads, width)))

    def _head_hook(self, row: int, o_proj: nn.Linear, heads: int, width: int) -> Any:
        usage, tokens = self._head_usage, self._head_tokens  # [L_att, H], [L_att]
        assert usage is not None and tokens is not None  # set by _plan_heads
        gram: list[torch.Tensor] = []  # [H, w, w], computed on first use (weights are fixed)

        def hook(_module: nn.Module, args: tuple) -> None:
            x = self._real(args[0].reshape(-1, heads, width)).float()  # [T, H, w]
            if not gram:
                w = o_proj.weight.detach().float().reshape(-1, heads, width)  # [D, H, w]
                gram.append(torch.einsum("dhw,dhv->hwv", w, w))
            projected = torch.einsum("thw,hwv->thv", x, gram[0])  # [T, H, w]
            squared = (projected * x).sum(dim=-1)  # [T, H]: ‖W_h x_h‖²
            usage[row] += squared.clamp_min(0).sqrt().sum(dim=0).to(usage.dtype)
            tokens[row] += x.shape[0]

        return hook


def _stash_sorted_routing(routing: dict[str, Any]) -> Any:
    """JetMoE router hook: keep (token, gate, slots per expert) of each sorted slot."""

    def hook(_module: nn.Module, args: tuple, output: tuple) -> None:
        _sorted_ids, token, gate, per_expert, _logits = output
        rows = args[0].reshape(-1, args[0].shape[-1]).shape[0]  # T
        routing.update(token=token, gate=gate, n=list(per_expert), rows=rows)

    return hook


def _takes_scaled_copies(experts: nn.Module) -> bool:
    """An experts module whose forward takes the tokens alone, as E gate-scaled copies
    ``[E*T, D]`` (Llama 4), not ``(hidden, top_k_index, top_k_weights)``."""
    return len(inspect.signature(experts.forward).parameters) == 1


def _takes_dispatch_mask(experts: nn.Module) -> bool:
    """Switch Transformers' experts: ``(hidden [N, D], selected_experts [N, 1, E], routing
    weights [N, 1])``, a one-hot dispatch mask that is all zeros where the expert capacity
    dropped the token, not ``(hidden, top_k_index, top_k_weights)``."""
    names = list(inspect.signature(experts.forward).parameters)
    return len(names) == 3 and names[1] == "selected_experts"


def _stash_router_io(routing: dict[str, Any]) -> Any:
    """Llama 4 router hook: keep its input ``x`` [T, D] and its ``(scores, logits)``, each
    [T, E] (scores: the sigmoid of the chosen logits, 0 elsewhere)."""

    def hook(_module: nn.Module, args: tuple, output: tuple) -> None:
        scores, logits = output
        routing.update(x=args[0], scores=scores, logits=logits)

    return hook


class _Restore:
    """Undoes ``_wrap_forward`` (the same ``remove()`` as a hook handle)."""

    def __init__(self, module: nn.Module, previous: Any) -> None:
        self.module, self.previous = module, previous

    def remove(self) -> None:
        if self.previous is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous


def _slot_outputs(inner: Any, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``inner(rows [N, D], ids [N, 1], ones [N, 1])``: each row's unweighted output of its
    expert. An experts module that cannot take one slot per row (LongCat's squeezes the slot
    axis away) gets two, the same expert with weights 1 and 0: ``E(x) * 1 + E(x) * 0`` is
    ``E(x)`` exactly."""
    ones = torch.ones(ids.shape, dtype=rows.dtype, device=rows.device)
    try:
        return inner(rows, ids, ones)
    except torch.OutOfMemoryError:
        raise
    except (ValueError, RuntimeError, IndexError) as exc:
        try:
            pair = torch.cat([ones, torch.zeros_like(ones)], dim=1)  # [N, 2]
            return inner(rows, ids.expand(-1, 2), pair)
        except Exception:
            raise exc from None


def _wrap_dispatch_forward(module: nn.Module, tap: Any) -> _Restore:
    """``_wrap_forward`` for an experts module fed a dispatch mask (``_takes_dispatch_mask``):
    every token runs through its chosen expert once, with weight 1, for ``tap(index [N, 1],
    weights [N, 1], slots [N, D])``; a token the capacity dropped has weight 0 there (no expert
    processes it: the sums count it as a slot to no expert, like LongCat's zero experts) and
    in the output, which is ``slots * weights`` as the module's own."""
    previous = module.__dict__.get("forward")
    inner = module.forward

    def forward(hidden: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor) -> Any:
        # hidden [N, D]; selected [N, 1, E] one-hot, zeros where dropped; weights [N, 1]
        index = selected.argmax(dim=-1)  # [N, 1]
        kept = selected.sum(dim=-1) > 0  # [N, 1]
        every = torch.nn.functional.one_hot(index, selected.shape[-1]).to(selected.dtype)
        slots = inner(hidden, every, torch.ones_like(weights))  # [N, D] unweighted
        gate = weights * kept
        tap(index, gate, slots)
        return (slots * gate).to(hidden.dtype)

    module.forward = forward
    return _Restore(module, previous)


def _wrap_forward(module: nn.Module, tap: Any) -> _Restore:
    """Run the experts ``module`` one (token, slot) pair per row, hand each slot's unweighted
    output to ``tap(index [N, K], weights [N, K], slots [N*K, D])``, and return the weighted
    sum over the slots [N, D] — what the module itself returns, computed from the same rows."""
    previous = module.__dict__.get("forward")
    inner = module.forward  # bound: whatever experts implementation the config selects
    names = list(inspect.signature(inner).parameters)[:3]

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        given = list(args) + [kwargs.pop(n) for n in names[len(args) :] if n in kwargs]
        if len(given) != 3 or kwargs:
            raise RuntimeError(
                f"{type(module).__name__} was called without exactly (hidden, top_k_index, "
                "top_k_weights)"
            )
        hidden, index, weights = given  # [N, D], [N, K], [N, K]
        flat = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(flat.shape[0], -1)
        weights = weights.reshape_as(index)
        rows, top_k = index.shape
        slots = _slot_outputs(inner, flat.repeat_interleave(top_k, dim=0), index.reshape(-1, 1))
        tap(index, weights, slots)
        # the same reduction as transformers' grouped_mm / batched_mm: weight, then sum over K
        out = (slots.view(rows, top_k, -1) * weights.unsqueeze(-1)).sum(dim=1)
        return out.to(hidden.dtype).reshape(*hidden.shape[:-1], out.shape[-1])

    module.forward = forward
    return _Restore(module, previous)
