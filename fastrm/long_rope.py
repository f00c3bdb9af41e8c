"""RoPE variants whose frequencies depend on the longest sequence of a call (``dynamic``, ``longrope``).

transformers' ``dynamic_rope_update`` picks the frequencies of a whole forward call from its largest position:
``dynamic`` recomputes them above ``original_max_seq_len`` (and caches the grown ones: module state),
``longrope`` switches to its long factors above ``original_max_position_embeddings``. Packing several sequences
into one call would give a short sequence the frequencies of its long neighbour. So:

* :func:`rope_limit` (at construction, from :func:`fastrm.backbones.check_backbone`): the longest sequence a call
  may hold with other sequences, or None when the RoPE does not depend on it.
* :func:`rope_parts` (per batch, host ints only): a batch whose longest sequence is past the limit runs as parts:
  each such sequence alone (exactly what stock transformers computes for that sequence alone), the others packed
  together within the limit; :func:`stitch` puts the rows back in the batch's order.
* :func:`reset_dynamic_rope`: puts grown ``dynamic`` frequencies back to the original ones, so that a sequence's
  result does not depend on which sequences ran before it (stock transformers keeps the grown frequencies for any
  later call longer than the original length).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from fastrm.packing import PackedBatch, pack_prompt_responses


def rope_limit(backbone: nn.Module) -> tuple[int | None, str]:
    """(longest sequence a packed call may hold, why) for RoPE variants that pick their frequencies from the
    largest position of the call. Within the limit every call uses the original frequencies, as each sequence alone
    does. (None, "") when no such RoPE; (-1, reason) when its limit cannot be found."""
    limits: list[tuple[int, str]] = []
    for m in backbone.modules():
        rope_type = getattr(m, "rope_type", None)  # rotary modules: a string, or a dict per layer type (Gemma3)
        if not isinstance(rope_type, (str, dict)) or not hasattr(m, "config"):
            continue
        per_layer = rope_type.items() if isinstance(rope_type, dict) else [(None, rope_type)]
        for layer_type, rt in per_layer:
            if "dynamic" in str(rt):
                limit = getattr(m, "original_max_seq_len", None)
            elif rt == "longrope":
                params = getattr(m.config, "rope_parameters", None) or {}
                if layer_type is not None:
                    params = params.get(layer_type, {})
                limit = params.get("original_max_position_embeddings")
                limit = limit or getattr(m.config, "original_max_position_embeddings", None)
            else:
                continue
            if not isinstance(limit, int):
                return -1, f"its {rt} RoPE depends on the longest sequence of a batch and its limit cannot be found"
            limits.append((limit, rt))
    if not limits:
        return None, ""
    limit, rt = min(limits)
    return limit, f"its {rt} RoPE picks frequencies from the longest sequence of a call (original length {limit})"


def _sequences(batch: PackedBatch) -> list[tuple[list[int], list[list[int]]]]:
    """The batch's groups as packed rows: (prompt rows, [rows of each response]); a separate-layout sequence is a
    group with an empty prompt. Host lists from the packer (no device sync)."""
    plan = batch.attn
    if batch.layout == "shared_prompt":
        if plan.segments is None:
            raise ValueError("a shared-prompt batch without its host segments cannot be split")
        return [
            (list(range(s0, p1)), [list(range(a, b)) for a, b in zip(bounds, bounds[1:])])
            for s0, p1, bounds in plan.segments
        ]
    cu, _ = plan.host_bounds()
    return [([], [list(range(a, b))]) for a, b in zip(cu, cu[1:])]


def rope_parts(limit: int | None, batch: PackedBatch) -> list[tuple[PackedBatch, torch.Tensor]] | None:
    """None when ``batch`` may run as one call; else the calls to make instead, as (sub-batch, rows): the rows
    [T_sub] int64 of ``batch`` that the sub-batch's rows are. Each sequence (prompt + response) longer than
    ``limit`` runs alone; the other sequences stay packed in the batch's layout. A shared prompt all of whose
    responses run alone gets its rows from the first of them. Host work only, except moving the small index
    tensors to the batch's device."""
    if limit is None or batch.attn.max_k <= limit:
        return None
    groups = _sequences(batch)
    if sum(len(rs) for _, rs in groups) == 1:
        return None  # one sequence: the call is that sequence alone
    alone: list[tuple[list[int], list[int]]] = []
    rest_prompts: list[list[int]] = []
    rest_responses: list[list[list[int]]] = []
    for prompt, responses in groups:
        short = [r for r in responses if len(prompt) + len(r) <= limit]
        alone += [(prompt, r) for r in responses if len(prompt) + len(r) > limit]
        if short:
            rest_prompts.append(prompt)
            rest_responses.append(short)
    # The packer with row numbers as token ids: the sub-batch's ids are the rows it takes from ``batch``, and its
    # positions and plan are what packing those sequences gives (positions equal the batch's own).
    subs = [pack_prompt_responses(rest_prompts, rest_responses, batch.layout)] if rest_prompts else []
    subs += [pack_prompt_responses([prompt], [[response]], "separate") for prompt, response in alone]
    out = []
    for sub in subs:
        sub = sub.to(batch.input_ids.device)
        out.append((replace(sub, input_ids=batch.input_ids.index_select(0, sub.input_ids)), sub.input_ids))
    return out


def stitch(
    backbone: nn.Module,
    batch: PackedBatch,
    parts: list[tuple[PackedBatch, torch.Tensor]],
    run: Callable[[PackedBatch], torch.Tensor],
) -> torch.Tensor:
    """[T, H] rows of ``batch`` from ``run(sub_batch) -> [T_sub, H]`` on each part of :func:`rope_parts`, each
    call starting from the original ``dynamic`` frequencies. Parts run last to first, so the packed part writes
    last and a shared prompt's rows come from it when it has one, else from the first response run alone (prompt
    rows are never pooled; overwritten rows get no gradient, as with any index_copy)."""
    out = None
    for sub, rows in reversed(parts):
        reset_dynamic_rope(backbone)
        h = run(sub)
        if out is None:
            out = h.new_zeros(batch.num_tokens, h.shape[-1])
        out = out.index_copy(0, rows, h)
    reset_dynamic_rope(backbone)
    return out


def reset_dynamic_rope(backbone: nn.Module) -> None:
    """Put the frequencies of ``dynamic`` RoPE modules back to the original ones (what transformers itself does
    when a call is shorter than the original length), so the next call grows them from its own length."""
    for m in backbone.modules():
        rope_type = getattr(m, "rope_type", None)
        if not isinstance(rope_type, (str, dict)) or not hasattr(m, "original_max_seq_len"):
            continue
        per_layer = rope_type.items() if isinstance(rope_type, dict) else [(None, rope_type)]
        for layer_type, rt in per_layer:
            prefix = "" if layer_type is None else f"{layer_type}_"
            original = getattr(m, f"{prefix}original_inv_freq", None)
            cached = getattr(m, f"{prefix}max_seq_len_cached", getattr(m, "max_seq_len_cached", None))
            if "dynamic" in str(rt) and original is not None and cached != m.original_max_seq_len:
                inv = getattr(m, f"{prefix}inv_freq")
                m.register_buffer(f"{prefix}inv_freq", original.to(inv.device), persistent=False)
                setattr(m, f"{prefix}max_seq_len_cached", m.original_max_seq_len)
