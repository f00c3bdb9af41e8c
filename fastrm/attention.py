"""Varlen attention for packed batches, plugged into any transformers backbone through ``AttentionInterface``.

The backbone is loaded with ``attn_implementation="fastrm_varlen"``; ``RewardModel`` passes the batch's
:class:`~fastrm.packing.AttentionPlan` as the keyword ``fastrm_plan`` (and the back end as ``fastrm_backend``) to
the backbone's forward, and transformers hands them to :func:`packed_attention` in every layer (keyword arguments
also survive gradient checkpointing, unlike a global). Which families do this, and which are refused, is decided
in :mod:`fastrm.backbones`.

No 4-D mask is built. Instead the mask hook registered here returns a :class:`MaskSpec` naming the mask the model
asked transformers for (causal, sliding window of W keys, chunked, or custom), and the model hands that object to
the attention of each layer in place of the mask. So a layer's window is applied even where the model only puts it
in the mask (Qwen2-MoE, PhiMoE) and not in the ``sliding_window`` keyword.

Per-layer features, applied to the plan as it is (causal, bottom-right aligned):

* sliding window ``W``: a query sees the last ``W`` keys of its sequence, itself included (transformers'
  ``sliding_window_causal_mask_function``); FlashAttention's ``window_size=(W - 1, 0)``. A shared-prompt
  response's keys are the prompt's rows then its own, contiguous in positions, so the window is the same band.
* ``softcap`` (Gemma2): scores become ``tanh(s / cap) * cap`` before the softmax.
* ``s_aux`` sinks (GPT-OSS): one extra logit per head in the softmax denominator. Back ends that return the
  log-sum-exp apply it afterwards as ``out * sigmoid(lse - sink)``.
* value head dim != query/key head dim (DeepSeek MLA).

Back ends, in order of preference for ``backend="auto"``:

* ``flash``: ``flash_attn.flash_attn_varlen_func`` (``pip install fastrm[flash]``, CUDA).
* ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention inside PyTorch >= 2.10, CUDA).
* ``exact``: a loop of ``scaled_dot_product_attention`` (or the softmax written out, for softcap and sinks) over
  the plan's groups; exact, any device; the CPU path and the reference.

``flex`` (FlexAttention with a ``BlockMask`` built once per batch and window from the plan's per-token document,
branch and position ids; compiled on CUDA, eager elsewhere) is available by name, not chosen by ``auto``.

What each back end computes exactly (anything else: a named back end raises, ``auto`` falls back to ``exact`` on
purpose, so ``auto`` is exact on every backbone fastrm accepts):

============  =======  ========  ===================================  =======
back end      window   softcap   sinks                                dropout
============  =======  ========  ===================================  =======
flash         yes      yes*      forward only (its backward drops     yes
                                 the log-sum-exp gradient)
torch_varlen  yes**    no        forward only (same reason)           no
flex          yes      yes       yes                                  no
exact         yes      yes       yes                                  yes
============  =======  ========  ===================================  =======

\\* flash-attn >= 2.6. \\** PyTorch >= 2.12 (``window_size``). A window no sequence of the batch exceeds is no
window at all, on every back end.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from fastrm.packing import AttentionPlan

ATTN_NAME = "fastrm_varlen"


class UnsupportedBackbone(ValueError):
    """A backbone (or a batch for it) fastrm cannot run exactly; the message names the model type, the reason and
    what to do. Raised at ``RewardModel`` construction (fastrm/backbones.py) and by a layer's attention here."""


BACKENDS = ("auto", "flash", "torch_varlen", "exact", "flex")

# Bookkeeping keywords layers pass to attention that change nothing here (RoPE is applied before attention). Any
# other keyword that is set (not None; is_causal other than True; output_attentions true) is refused.
_HARMLESS = {"position_ids", "cache_position", "use_cache", "layer_idx"}


@dataclass(frozen=True)
class MaskSpec:
    """The mask a backbone asked transformers for, handed to each layer's attention instead of a 4-D mask.

    kind: "causal"; "sliding" (``size`` keys, the query's own included); "chunked" (blocks of ``size`` positions);
    "custom" (extra mask functions, e.g. bidirectional image tokens: not implemented).
    """

    kind: str
    size: int | None = None


def _mask_spec(*args, **kwargs) -> MaskSpec:
    """transformers' mask hook: says which mask was requested instead of building it. ``local_size`` is given for
    sliding and chunked masks; ``use_vmap`` means extra or/and mask functions (masking_utils, transformers 5.x)."""
    if kwargs.get("use_vmap"):
        return MaskSpec("custom")
    size = kwargs.get("local_size")
    if size is None:
        return MaskSpec("causal")
    cfg = kwargs.get("config")
    if size == getattr(cfg, "attention_chunk_size", None) and size != getattr(cfg, "sliding_window", None):
        return MaskSpec("chunked", int(size))
    if size == getattr(cfg, "sliding_window", None):
        return MaskSpec("sliding", int(size))
    return MaskSpec("custom", int(size))


@lru_cache(maxsize=None)
def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@lru_cache(maxsize=None)
def _params(backend: str) -> frozenset:
    """Keyword arguments the installed back end takes (decided once: versions differ in window/softcap/lse)."""
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        return frozenset(inspect.signature(flash_attn_varlen_func).parameters)
    if backend == "torch_varlen":
        return frozenset(inspect.signature(_torch_varlen()).parameters)
    from torch.nn.attention.flex_attention import flex_attention

    return frozenset(inspect.signature(flex_attention).parameters)


def resolve_backend(name: str, device: torch.device) -> str:
    """The back end that will run for ``name`` on ``device``; errors if a named one cannot run there."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    on_cuda = device.type == "cuda"
    if name == "auto":
        if on_cuda and has_flash_attn():
            return "flash"
        if on_cuda and _torch_varlen() is not None:
            return "torch_varlen"
        return "exact"
    if name in ("flash", "torch_varlen") and not on_cuda:
        raise ValueError(f"attention backend {name!r} needs CUDA; use 'exact' (or 'auto') on {device.type}")
    if name == "flash" and not has_flash_attn():
        raise ValueError("attention backend 'flash' needs flash-attn: pip install 'fastrm[flash]'")
    if name == "torch_varlen" and _torch_varlen() is None:
        raise ValueError("attention backend 'torch_varlen' needs torch.nn.attention.varlen (PyTorch >= 2.10)")
    return name


def _missing_feature(backend, window, softcap, sinks, dropout_p, needs_grad) -> str | None:
    """The first thing ``backend`` cannot compute exactly for this call, or None (see the module's table)."""
    if backend == "exact":
        return None
    if backend != "flex":
        params = _params(backend)
        lse = "return_attn_probs" if backend == "flash" else "return_aux"
        if window is not None and "window_size" not in params:
            return "a sliding window (needs a newer version)"
        if softcap is not None and (backend == "torch_varlen" or "softcap" not in params):
            return "softcap"
        if sinks is not None and (needs_grad or lse not in params):
            return "attention sinks with gradients (its backward ignores the log-sum-exp)"
    if dropout_p and backend != "flash":
        return "attention dropout"
    return None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over a packed batch.

    Args:
        q: [T, Hq, D] queries of all packed rows.
        k: [T, Hkv, D] keys, v: [T, Hkv, Dv] values (Hq a multiple of Hkv: grouped-query attention; Dv may differ
            from D, as in DeepSeek's MLA).
        plan: groups and their keys (see :class:`AttentionPlan`).
        window: sliding window in keys (the query's own included), or None.
        softcap: logit soft-capping ``tanh(s / cap) * cap``, or None.
        sinks: [Hq] one extra softmax logit per head (GPT-OSS), or None.
    Returns:
        [T, Hq, Dv] attention output, dtype of q.
    """
    named = backend != "auto"
    backend = resolve_backend(backend, q.device)
    if window is not None and plan.max_k <= window:
        window = None  # no sequence of this batch reaches past the window: plain causal attention
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
    missing = _missing_feature(backend, window, softcap, sinks, dropout_p, needs_grad)
    if missing is not None:
        if named:
            raise ValueError(
                f"attention backend {backend!r} cannot compute {missing} exactly; use attn_backend='auto' or 'exact'"
            )
        backend = "exact"  # on purpose: auto means the fastest back end that is exact for this layer
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "flex":
        return _flex_attention(q, k, v, plan, scale, window, softcap, sinks)
    if (
        backend == "exact"
        and plan.segments is not None
        and q.device.type == "cpu"
        and q.shape[-1] == v.shape[-1]  # the fused CPU kernel takes one head dim (MLA goes the masked way)
        and not needs_grad
        and window is None
        and softcap is None
        and sinks is None
        and not dropout_p
    ):
        return _shared_prompt_no_grad(q, k, v, plan.segments, scale)
    if backend != "exact" and torch.is_autocast_enabled(q.device.type):
        # Autocast does not reach these kernels, and RoPE leaves q, k in fp32 beside a bf16 v (HF's flash path casts
        # the same way); SDPA, on the exact path, casts itself.
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    kk, vv = (k, v) if plan.k_index is None else (k.index_select(0, plan.k_index), v.index_select(0, plan.k_index))
    if backend == "exact":
        return _exact_attention(q, kk, vv, plan, scale, dropout_p, window, softcap, sinks)
    # FlashAttention kernels take one head dim: pad the smaller of qk / v with zeros (no change to scores or
    # output) and slice the output back.
    D, Dv = q.shape[-1], v.shape[-1]
    if Dv < D:
        vv = F.pad(vv, (0, D - Dv))
    elif D < Dv:
        q, kk = F.pad(q, (0, Dv - D)), F.pad(kk, (0, Dv - D))
    if backend == "flash":
        out, lse = _call_flash(q, kk, vv, plan, scale, dropout_p, window, softcap, sinks is not None)
    else:
        out, lse = _call_torch_varlen(q, kk, vv, plan, scale, window, sinks is not None)
    out = out[..., :Dv]
    if sinks is not None:  # softmax with one more logit per head: rescale by sum / (sum + e^sink)
        out = (out.float() * torch.sigmoid(lse - sinks.float())[..., None]).to(q.dtype)
    return out


def _call_flash(q, k, v, plan: AttentionPlan, scale, dropout_p, window, softcap, want_lse):
    from flash_attn import flash_attn_varlen_func

    kwargs = {"dropout_p": dropout_p, "softmax_scale": scale, "causal": True}
    if window is not None:
        kwargs["window_size"] = (window - 1, 0)
    if softcap is not None:
        kwargs["softcap"] = softcap
    if want_lse:
        kwargs["return_attn_probs"] = True
    out = flash_attn_varlen_func(q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, **kwargs)
    if want_lse:
        out, lse = out[0], out[1].transpose(0, 1)  # flash-attn 2 varlen: lse is [Hq, T] fp32
        return out, lse
    return out, None


def _call_torch_varlen(q, k, v, plan: AttentionPlan, scale, window, want_lse):
    fn = _torch_varlen()
    params = _params("torch_varlen")
    kwargs = {"scale": scale}
    if "window_size" in params:  # PyTorch >= 2.12: (-1, 0) is causal, bottom-right aligned as in FlashAttention
        kwargs["window_size"] = (-1 if window is None else window - 1, 0)
    else:  # PyTorch 2.10-2.11 (no window: _missing_feature sent windows elsewhere)
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if want_lse:
        from torch.nn.attention.varlen import AuxRequest

        kwargs["return_aux"] = AuxRequest(lse=True)
        out, lse = fn(q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, **kwargs)
        return out, lse.float()  # [T, Hq]
    return fn(q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, **kwargs), None


def _keep(Q: int, K: int, window: int | None, device) -> torch.Tensor:
    """[Q, K] bool: query i (the (i + K - Q)-th key's position) sees keys i + K - Q - window < j <= i + K - Q."""
    i = torch.arange(Q, device=device)[:, None] + (K - Q)
    j = torch.arange(K, device=device)[None, :]
    keep = j <= i
    if window is not None:
        keep &= j > i - window
    return keep


def _attend_with_lse(q, k, v, scale, causal: bool):
    """[1, H, Q, Dv] output and [1, H, Q] fp32 log-sum-exp of SDPA on the CPU (its fused kernel returns both; the
    log-sum-exp carries no gradient, so callers use this without autograd only). GQA heads are expanded here.
    The aten op skips autocast, which can hand it mixed dtypes (RoPE'd q, k in fp32, v in bf16): it computes in the
    dtype SDPA would under autocast (as the masked path does), else in the widest of the three."""
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
    else:
        dt = torch.promote_types(q.dtype, torch.promote_types(k.dtype, v.dtype))
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
    return out, lse


def _shared_prompt_no_grad(q, k, v, segments, scale):
    """Shared-prompt attention on the CPU without autograd (scoring): per segment, the prompt attends causally to
    itself; all its responses attend to the prompt's keys in one unmasked call, and each response causally to its
    own keys; the two parts are merged with their log-sum-exps (the softmax over the union of both key sets).
    No key gather and no mask, and the causal halves are skipped: the masked path computes every response against
    prompt + own keys through a [Q, P + R] mask. q: [T, Hq, D]; k, v: [T, Hkv, D] / [T, Hkv, Dv] (packed rows)."""
    heads = lambda t, a, b: t[a:b].transpose(0, 1)[None]  # noqa: E731  rows a:b as [1, H, n, d]
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    for s0, p1, bounds in segments:
        if p1 > s0:  # the prompt itself: plain causal attention
            out[s0:p1] = _attend_with_lse(heads(q, s0, p1), heads(k, s0, p1), heads(v, s0, p1), scale, True)[0][
                0
            ].transpose(0, 1)
            o_p, l_p = _attend_with_lse(heads(q, p1, bounds[-1]), heads(k, s0, p1), heads(v, s0, p1), scale, False)
        for j in range(len(bounds) - 1):
            r0, r1 = bounds[j], bounds[j + 1]
            o, lse = _attend_with_lse(heads(q, r0, r1), heads(k, r0, r1), heads(v, r0, r1), scale, True)
            if p1 > s0:  # merge with the prompt part of the same rows: weights e^lse / (e^lse_p + e^lse)
                a, b = r0 - p1, r1 - p1
                lp = l_p[:, :, a:b]
                m = torch.maximum(lp, lse)
                wp, wo = torch.exp(lp - m)[..., None], torch.exp(lse - m)[..., None]
                acc = torch.promote_types(q.dtype, torch.float32)  # fp32 for bf16/fp16 inputs, fp64 stays fp64
                wp, wo = wp.to(acc), wo.to(acc)
                o = ((o_p[:, :, a:b].to(acc) * wp + o.to(acc) * wo) / (wp + wo)).to(q.dtype)
            out[r0:r1] = o[0].transpose(0, 1)
    return out


def _cached_keep(plan: AttentionPlan, Q: int, K: int, window: int | None, device) -> torch.Tensor:
    """:func:`_keep`, built once per batch and shape and reused by every layer."""
    key = ("keep", Q, K, window)
    keep = plan.cache.get(key)
    if keep is None:
        keep = plan.cache[key] = _keep(Q, K, window, device)
    return keep


def _exact_attention(q, k, v, plan: AttentionPlan, scale, dropout_p, window=None, softcap=None, sinks=None):
    """Loop over groups: SDPA, or the softmax written out for softcap and sinks. Exact on any device (the CPU
    path and the tests' reference). q: [T, Hq, D]; k, v: the plan's keys [K, Hkv, D] / [K, Hkv, Dv]."""
    cu_q, cu_k = plan.host_bounds()
    gqa = q.shape[1] != k.shape[1]
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    for g in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[g], cu_q[g + 1], cu_k[g], cu_k[g + 1]
        Q, K = q1 - q0, k1 - k0
        if Q == 0:
            continue
        # [1, H, Q, D]: with a batch dimension SDPA takes its fused (flash) CPU kernel; 3-D inputs fall back to
        # the unfused math path, about 1.8x slower end to end on a CPU.
        qg = q[q0:q1].transpose(0, 1)[None]
        kg = k[k0:k1].transpose(0, 1)[None]
        vg = v[k0:k1].transpose(0, 1)[None]
        w = window if window is not None and window < K else None
        if softcap is not None or sinks is not None:
            keep = _cached_keep(plan, Q, K, w, q.device)
            o = _softmax_attention(qg[0], kg[0], vg[0], keep, scale, softcap, sinks, dropout_p)
        elif Q == K and w is None:
            o = F.scaled_dot_product_attention(
                qg, kg, vg, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=gqa
            )[0]
        else:  # bottom-right causal (and window): query i sees keys i + K - Q - w < j <= i + K - Q
            o = F.scaled_dot_product_attention(
                qg,
                kg,
                vg,
                attn_mask=_cached_keep(plan, Q, K, w, q.device),
                scale=scale,
                dropout_p=dropout_p,
                enable_gqa=gqa,
            )[0]
        out[q0:q1] = o.transpose(0, 1)
    return out


def _softmax_attention(q, k, v, keep, scale, softcap, sinks, dropout_p):
    """Attention written out as the eager implementations of Gemma2 / GPT-OSS do it (softmax in fp32 or wider).
    q: [H, Q, D], k: [Hkv, K, D], v: [Hkv, K, Dv], keep: [Q, K] bool, sinks: [H] or None -> [H, Q, Dv]."""
    if k.shape[0] != q.shape[0]:
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype).view(-1, 1, 1).expand(-1, s.shape[1], 1)], dim=-1)
    p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32))
    if sinks is not None:
        p = p[..., :-1]
    p = p.to(v.dtype)
    if dropout_p:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v)


@lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _plan_positions(plan: AttentionPlan, T: int, device) -> torch.Tensor:
    """[T] position of each packed row in its sequence, from the plan alone (no host sync): a row of group g is
    the (row - cu_q[g] + K_g - Q_g)-th key of its group."""
    cu_q, cu_k = plan.cu_q.long(), plan.cu_k.long()
    nq = cu_q.diff()
    group = torch.repeat_interleave(torch.arange(len(nq), device=device), nq, output_size=T)
    return torch.arange(T, device=device) - cu_q[group] + (cu_k.diff() - nq)[group]


def _flex_attention(q, k, v, plan: AttentionPlan, scale, window=None, softcap=None, sinks=None):
    """FlexAttention over the whole packed batch with the plan's per-token rule as a BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = q.shape[0]
    key = ("flex_block_mask", window)
    mask = plan.cache.get(key)
    if mask is None:
        doc, br = plan.doc_ids, plan.branch_ids
        pos = _plan_positions(plan, T, q.device) if window is not None else None

        def rule(b, h, qi, ki):
            keep = (doc[qi] == doc[ki]) & (ki <= qi) & ((br[ki] == 0) | (br[ki] == br[qi]))
            if window is not None:
                keep = keep & (pos[qi] - pos[ki] < window)
            return keep

        mask = create_block_mask(rule, None, None, T, T, device=q.device)
        plan.cache[key] = mask  # built once per batch and window, reused by every layer
    score_mod = None
    if softcap is not None:

        def score_mod(score, b, h, qi, ki):
            return torch.tanh(score / softcap) * softcap

    kwargs = {}
    if sinks is not None:
        if "return_aux" in _params("flex"):
            from torch.nn.attention.flex_attention import AuxRequest

            kwargs["return_aux"] = AuxRequest(lse=True)
        else:
            kwargs["return_lse"] = True
    fn = _compiled_flex() if q.is_cuda else flex_attention
    out = fn(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        score_mod=score_mod,
        block_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        **kwargs,
    )
    if sinks is None:
        return out[0].transpose(0, 1)
    out, aux = out
    lse = aux.lse if hasattr(aux, "lse") else aux  # [1, Hq, T]; flex propagates gradients through it
    out = out.float() * torch.sigmoid(lse - sinks.float()[None, :, None])[..., None]
    return out[0].transpose(0, 1).to(q.dtype)


def _model_type(module) -> str:
    return getattr(getattr(module, "config", None), "model_type", None) or type(module).__name__


def _layer_window(module, attention_mask, sliding_window, plan: AttentionPlan) -> int | None:
    """This layer's window: from the mask the model requested (what its eager path applies) and the
    ``sliding_window`` keyword (what its flash path applies); they must agree."""
    if attention_mask is None:
        return sliding_window
    if not isinstance(attention_mask, MaskSpec):
        raise UnsupportedBackbone(
            f"{_model_type(module)}: a layer passed an attention mask tensor that fastrm's packed attention would "
            "ignore; call the backbone through fastrm.RewardModel without attention_mask"
        )
    kind, size = attention_mask.kind, attention_mask.size
    if kind == "custom":
        raise UnsupportedBackbone(
            f"{_model_type(module)}: the model requests a custom attention mask (bidirectional or block parts), "
            "which packed attention does not implement; use a text-only checkpoint of another family"
        )
    if kind == "chunked":
        if plan.max_k > size:
            raise UnsupportedBackbone(
                f"{_model_type(module)}: chunked attention ({size} positions) is not implemented on packed batches "
                f"and this batch has a sequence of {plan.max_k} tokens; set max_length <= {size}"
            )
        kind = "causal"  # no sequence reaches a chunk boundary
    mask_window = size if kind == "sliding" else None
    if sliding_window is not None and sliding_window != mask_window:
        raise UnsupportedBackbone(
            f"{_model_type(module)}: the layer's sliding_window={sliding_window} disagrees with its mask "
            f"({kind}{'' if mask_window is None else f' {mask_window}'}); transformers' own attention paths differ "
            "for this model, so there is no exact result to match"
        )
    return mask_window


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function registered with transformers' AttentionInterface.

    query: [1, Hq, T, D]; key: [1, Hkv, T, D]; value: [1, Hkv, T, Dv]; returns ([1, T, Hq, Dv], None).
    Implements the keywords ``sliding_window``, ``softcap`` and ``s_aux``; any other keyword that is set raises
    (bookkeeping ones such as ``position_ids`` are allowed).
    """
    plan = kwargs.pop("fastrm_plan", None)
    if plan is None:
        raise RuntimeError(
            f"attention '{ATTN_NAME}' needs a packed batch: call the backbone through fastrm.RewardModel "
            "(it passes fastrm_plan=...), or load the model with another attn_implementation. If you did, the "
            f"{_model_type(module)} layers do not pass keyword arguments on to attention, so fastrm cannot run it"
        )
    if query.shape[0] != 1:
        raise RuntimeError(f"packed batches have batch size 1, got query of shape {tuple(query.shape)}")
    backend = kwargs.pop("fastrm_backend", "auto")
    sliding_window = kwargs.pop("sliding_window", None)
    softcap = kwargs.pop("softcap", None)
    sinks = kwargs.pop("s_aux", None)
    for name, value_ in kwargs.items():
        if value_ is None or name in _HARMLESS:
            continue
        if (name == "is_causal" and value_ is True) or (name == "output_attentions" and not value_):
            continue
        raise UnsupportedBackbone(
            f"{_model_type(module)}: its attention passes {name}={value_!r}, which fastrm's packed attention does not "
            "implement; use a checkpoint of another family"
        )
    window = _layer_window(module, attention_mask, sliding_window, plan)
    out = varlen_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        plan,
        scale=scaling,
        dropout_p=dropout if module.training else 0.0,
        backend=backend,
        window=window,
        softcap=softcap,
        sinks=sinks,
    )
    return out.unsqueeze(0), None


def register() -> str:
    """Register the packed attention and its mask hook with transformers (idempotent); returns the
    attn_implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, packed_attention)
    AttentionMaskInterface.register(ATTN_NAME, _mask_spec)
    return ATTN_NAME
