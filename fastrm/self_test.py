"""The backbone self-test: fastrm's runtime guard that the packed path computes what the backbone computes.

The static rules of :mod:`fastrm.backbones` cannot see every change a transformers release makes to a family, so
every :class:`~fastrm.model.RewardModel` also runs :func:`self_test` when it is built (``self_test=False`` skips
it), and the trainer runs it again once the model is on its training device, in the precision it trains in
(:func:`self_test_for_run`: a no-op when that device, back end and precision were already tested). A mismatch
raises :class:`~fastrm.attention.UnsupportedBackbone` naming the model type, the pass, the layout, the sequence or
parameter, the error and the tolerance.

**Inputs**, from the model's own config (:func:`plan_lengths`): four groups, 8 sequences (prompts with 1-3
responses, one prompt empty, one response a single token; random ids, fixed seed). The longest sequence is
``_PAST`` tokens past every length-dependent feature the config declares (sliding windows, in the config or the
layers; the original length of ``dynamic`` / ``longrope`` RoPE, whose long sequences then run alone, see
:mod:`fastrm.long_rope`) and at least ``_MIN_LONGEST`` tokens; learned positions and chunked attention cap it. A
window above ``_MAX_FEATURE`` tokens is shrunk for the test (every config and module attribute holding it, restored
after), so a 4096-token window runs the same code as an 8-token one at the cost of the small one; a RoPE limit
above it is not exercised here (tests/test_long_rope.py checks long sequences against stock transformers).

**Passes**, each against the same backbone in transformers' eager attention (no position ids, no mask; one
right-padded batch, as causal attention never lets a token see a later pad, or one sequence per call for RoPE that
depends on the call's longest sequence):

1. scoring (no grad, eval mode), both layouts: every token's pre-final-norm hidden state; the packer's pooled rows
   are each sequence's last row; the rewards of the model's own forward (pooled rows, final norm, head) equal final
   norm + head on the last token of each sequence alone.
2. training (grad), both layouts: hidden states, rewards, and the gradients of sum_i w_i r_i for the attention
   parameters of the first and last decoder layers, the final norm and the head (``torch.autograd.grad``: no
   ``.grad`` is touched). On the CPU this is the masked shared-prompt path training takes, not scoring's.

**Dropout**: with dropout in the config the training pass runs in train mode, with ``torch.nn.functional.dropout``
and the dropout inside ``scaled_dot_product_attention`` replaced, in the packed and the eager run alike, by one
fixed mask per width (element j of the last dimension is kept iff a hash of j is >= p, scaled by 1/(1-p)). That
dimension is the feature for hidden-state dropout and the key's position in its sequence for attention dropout, in
both paths, so both runs apply the same masks and must agree to the same tolerances as without dropout; a dropout
that packing changes (one not elementwise per sequence) differs. A backbone that draws other random numbers in
train mode (router jitter: two runs differ) runs the pass in eval mode instead, and so does FlashAttention with
attention dropout (its in-kernel masks have no seeded counterpart).

**Precision**: the reference is eager in fp32 (bf16/fp16 weights upcast in place, restored exactly: bf16 -> fp32
-> bf16 is lossless) at "highest" matmul precision. fp32 runs must match it exactly (1e-4); low-precision runs
(bf16/fp16 weights, autocast, TF32) within a few times eager's own error in that precision on the same inputs, and
on a back end that computes fp32 their packed passes also run once in fp32 with the exact tolerances: see
:mod:`fastrm.self_test_judge` for the statistics and how they were calibrated. Cost on a CPU for the tiny presets:
benchmarks/bench_self_test.py.
"""

from __future__ import annotations

import contextlib
import re
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastrm.attention import ATTN_NAME, UnsupportedBackbone, resolve_backend
from fastrm.long_rope import reset_dynamic_rope
from fastrm.packing import pack_prompt_responses
from fastrm.self_test_judge import Judge, Result, Runs

__all__ = ["self_test", "self_test_for_run", "plan_lengths"]

_MIN_LONGEST = 16  # tokens in the longest self-test sequence at least
_PAST = 3  # tokens past the longest length-dependent feature
_MAX_FEATURE = 32  # windows above are shrunk for the test; RoPE limits above are not exercised
_WINDOW_ATTR = re.compile(r"(sliding_)?window(_size)?")  # attribute names holding a window (fullmatch)
_EXACT = {  # fp32 / fp64 runs against the fp32 / fp64 reference
    "hidden": {torch.float64: 1e-7, torch.float32: 1e-4},
    "reward": {torch.float64: 1e-9, torch.float32: 1e-5},
    "grad": {torch.float64: 1e-7, torch.float32: 1e-4},
}
_K = {"hidden": 3.0, "reward": 5.0, "grad": 3.0}  # low precision: multiples of the calibrated eager error
_FLOOR = {"hidden": 1e-3, "reward": 1e-4, "grad": 1e-3}  # so a calibration that happens to be tiny is not a trap

_TESTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> keys of the runs tested


@dataclass(frozen=True)
class _Precision:
    """What a run computes in: device, resolved back end, weight dtype, autocast dtype, fp32 matmul precision."""

    device: torch.device
    backend: str
    dtype: torch.dtype
    autocast: torch.dtype | None
    matmul: str

    @property
    def exact(self) -> bool:
        return self.autocast is None and self.dtype in (torch.float32, torch.float64) and self.matmul == "highest"

    @property
    def key(self) -> tuple:
        return (self.device.type, self.device.index, self.backend, self.dtype, self.autocast, self.matmul)

    def describe(self) -> str:
        what = str(self.dtype).removeprefix("torch.")
        if self.autocast is not None:
            what += f" under {str(self.autocast).removeprefix('torch.')} autocast"
        elif self.dtype == torch.float32 and self.matmul != "highest":
            what += f" with {self.matmul}-precision matmuls"
        return f"{self.backend} back end, {what}, {self.device.type}"

    @property
    def unit_roundoff(self) -> float:
        """Of the run's lowest precision: the autocast dtype, low-precision weights, or TF32 / bf16 matmuls."""
        if self.autocast is not None or self.dtype in (torch.bfloat16, torch.float16):
            return torch.finfo(self.autocast or self.dtype).eps / 2
        return {"high": 2.0**-11, "medium": 2.0**-8}.get(self.matmul, torch.finfo(self.dtype).eps / 2)

    def autocasting(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def self_test_for_run(model, *, autocast: torch.dtype | None = None) -> None:
    """The self-test for the device, back end and precision the model now runs in (the trainer calls it after
    moving the model). No-op for a model built with ``self_test=False`` or already tested so."""
    if model in _TESTED and _precision(model, autocast)[0].key not in _TESTED[model]:
        self_test(model, autocast=autocast)


def self_test(model, *, autocast: torch.dtype | None = None, measure: bool = False) -> dict | None:
    """Compare the packed path with the backbone's eager attention on each sequence alone (module docstring);
    raise :class:`UnsupportedBackbone` on a mismatch. ``autocast``: the dtype the run autocasts to, if any.
    ``measure``: record every statistic, its tolerance and calibrated base in the report's "measured" instead of
    refusing (benchmarks/calibrate_self_test.py; a wrong pooled row or final norm still raises).

    Returns what ran: {"precision", "longest" (tokens), "sequences", "windows_shrunk" ({declared: tested}),
    "train_mode" (the training pass ran in train mode), "fp32_pass" (the packed passes also ran in fp32),
    "calibrated" (low-precision tolerances), "skipped" (no memory for the reference)}; None for a backbone on the
    meta device (not tested). Restores every module's mode, the attention implementation, the back end, windows,
    RoPE state and the global RNG."""
    backbone = model.backbone
    param = next(backbone.parameters(), None)
    if param is None or param.device.type == "meta":
        return None
    prec, backend_name = _precision(model, autocast)
    longest, shrink = plan_lengths(model)
    vocab = backbone.get_input_embeddings().num_embeddings
    prompts, responses = _groups(vocab, longest)
    seqs = [p + r for p, rs in zip(prompts, responses) for r in rs]
    weights = torch.linspace(-1.0, 2.0, len(seqs), device=param.device)
    names, params = _probe_params(model)
    modes = {m: m.training for m in model.modules()}
    backend = model.attn_backend
    model.attn_backend = backend_name
    devices = [param.device] if param.device.type == "cuda" else []
    try:
        with _shrunk_windows(backbone, shrink), torch.random.fork_rng(devices=devices), _threads_for(model, param):
            res = _run(model, prompts, responses, seqs, weights, params, prec)
    finally:
        for m, training in modes.items():
            m.training = training
        model.attn_backend = backend
        if getattr(backbone.config, "_attn_implementation", None) != ATTN_NAME:
            backbone.set_attn_implementation(ATTN_NAME)
        reset_dynamic_rope(backbone)
    measured = None
    if res is not None:
        note = "; windows " + ", ".join(f"{a} -> {b}" for a, b in shrink.items()) + " for the test" if shrink else ""
        u = None if prec.exact else prec.unit_roundoff
        judge = Judge(model.backbone_info.model_type, names, res, torch.float32 if u else prec.dtype, u)
        judge.measured = [] if measure else None
        judge.check(
            prompts,
            responses,
            model.backbone_info.position_limit,
            prec.describe() + note,
            f"{prec.backend} back end, float32 (weights upcast for the test), {prec.device.type}{note}",
        )
        measured = judge.measured
    if not measure:
        _TESTED.setdefault(model, set()).add(prec.key)
    return {
        "precision": prec.describe(),
        "longest": longest,
        "sequences": len(seqs),
        "windows_shrunk": shrink,
        "train_mode": res is not None and res.train_mode,
        "fp32_pass": res is not None and res.strict is not None,
        "calibrated": res is not None and res.low is not None,
        "skipped": res is None,
    } | ({"measured": measured} if measure else {})


@contextlib.contextmanager
def _threads_for(model, param: torch.Tensor):
    """One intra-op thread on the CPU for a small backbone (< 20M parameters outside the embeddings): the test's
    ~100-token tensors are far too small to split, and on a busy machine every parallel op waits for a descheduled
    thread (tiny presets on 2 busy cores: 3-8 s with 2 threads, 0.1-0.2 s with one; benchmarks/bench_self_test.py)."""
    threads = torch.get_num_threads()
    embedding = model.backbone.get_input_embeddings().weight.numel()
    small = sum(p.numel() for p in model.parameters()) - embedding < 20_000_000
    if param.device.type == "cpu" and small and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _precision(model, autocast) -> tuple[_Precision, str]:
    """The run's precision, and the back-end name to test with ("auto" for a CUDA back end named for a model that
    is still on the CPU: it is tested again on the device)."""
    param = next(model.backbone.parameters())
    name = model.attn_backend
    try:
        backend = resolve_backend(name, param.device)
    except ValueError:
        name, backend = "auto", resolve_backend("auto", param.device)
    return _Precision(param.device, backend, param.dtype, autocast, torch.get_float32_matmul_precision()), name


# ---------------------------------------------------------------- inputs
def _configs(backbone: nn.Module) -> list:
    """Every config object the backbone's modules read (a multimodal model's text config included)."""
    from transformers import PretrainedConfig

    found = {id(backbone.config): backbone.config}
    for m in backbone.modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, PretrainedConfig):
            found.setdefault(id(cfg), cfg)
    return list(found.values())


def _is_length(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _window_attrs(backbone: nn.Module):
    """(object, attribute name, value) of every window length in the configs and modules."""
    for obj in _configs(backbone) + list(backbone.modules()):
        for name, value in list(vars(obj).items()):
            if _WINDOW_ATTR.fullmatch(name) and _is_length(value):
                yield obj, name, value


def plan_lengths(model) -> tuple[int, dict[int, int]]:
    """(longest self-test sequence, {declared window: the window used in the test}) from the model's config."""
    backbone = model.backbone
    windows = {v for _, _, v in _window_attrs(backbone)}
    spare = [w for w in range(8, _MAX_FEATURE, 2) if w not in windows]
    shrink = dict(zip(sorted(w for w in windows if w > _MAX_FEATURE), spare))
    features = [w for w in windows if w <= _MAX_FEATURE] + list(shrink.values())
    limit = model.backbone_info.position_limit
    if limit is not None and limit <= _MAX_FEATURE:
        features.append(limit)
    longest = max([_MIN_LONGEST - _PAST, *features]) + _PAST
    caps = ["attention_chunk_size"] + ([] if limit is not None else ["max_position_embeddings", "n_positions"])
    for cfg in _configs(backbone):  # learned positions end there; dynamic RoPE runs past it on purpose
        longest = min([longest] + [v for name in caps if _is_length(v := getattr(cfg, name, None))])
    return longest, shrink


def _groups(vocab: int, longest: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Four groups whose longest sequence has ``longest`` tokens: a prompt and response that both cross a window
    boundary, an empty prompt, a prompt longer than the window, three responses of which one is a single token."""
    g = torch.Generator().manual_seed(1234)
    half = longest // 2
    shapes = [(half, [longest - half, 2]), (0, [5, 3]), (longest - 3, [3]), (3, [4, 1, 6])]
    prompts, responses = [], []
    for p, rs in shapes:
        p = min(p, longest - 1)
        prompts.append(torch.randint(0, vocab, (p,), generator=g).tolist())
        responses.append([torch.randint(0, vocab, (max(1, min(r, longest - p)),), generator=g).tolist() for r in rs])
    return prompts, responses


@contextlib.contextmanager
def _shrunk_windows(backbone: nn.Module, shrink: dict[int, int]):
    saved = [(obj, name, value) for obj, name, value in _window_attrs(backbone) if value in shrink] if shrink else []
    for obj, name, value in saved:
        setattr(obj, name, shrink[value])
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _probe_params(model) -> tuple[list[str], list[nn.Parameter]]:
    """The attention parameters of the first and last decoder layers (the whole layer if no child is named like
    attention), the final norm's and the head's: the few whose gradients the training pass compares."""
    try:
        layers = model.decoder_layers()
    except ValueError:
        layers = []
    modules = []
    for layer in dict.fromkeys(layers[:1] + layers[-1:]):
        attn = [m for n, m in layer.named_children() if re.search("attn|attention", n, re.IGNORECASE)]
        modules.append(attn[0] if attn else layer)
    modules += [model.final_norm, model.score]
    wanted = {id(p) for m in modules for p in m.parameters() if p.requires_grad}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in wanted]
    return [n for n, _ in named], [p for _, p in named]


# ---------------------------------------------------------------- dropout with fixed masks
def _keep_mask(n: int, p: float, device) -> torch.Tensor:
    """[n] bool: element j is kept iff a hash of j, as a uniform in [0, 1), is >= p (int64 arithmetic that never
    overflows)."""
    x = (torch.arange(n, dtype=torch.int64) * 1103515245 + 12345) % 2**31
    x = ((x ^ (x >> 13)) * 1664525 + 1013904223) % 2**31
    return (x.double() / 2**31 >= p).to(device)


def _fixed_dropout(input, p=0.5, training=True, inplace=False):
    if not training or p == 0:
        return input
    if p >= 1:
        return torch.zeros_like(input)
    return input * (_keep_mask(input.shape[-1], p, input.device).to(input.dtype) * (1.0 / (1.0 - p)))


def _fixed_sdpa(orig):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not dropout_p:
            return orig(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
        s = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scale is None else scale)
        if is_causal:  # top-left, as SDPA (fastrm passes it only for square groups)
            s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
        prob = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(value.dtype)
        return torch.matmul(_fixed_dropout(prob, dropout_p), value)

    return sdpa


@contextlib.contextmanager
def _seeded_dropout(on: bool):
    """Every dropout through torch.nn.functional (nn.Dropout, eager attention, SDPA) with fixed masks."""
    if not on:
        yield
        return
    dropout, sdpa = F.dropout, F.scaled_dot_product_attention
    F.dropout, F.scaled_dot_product_attention = _fixed_dropout, _fixed_sdpa(sdpa)
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = dropout, sdpa


def _dropout_attrs(backbone: nn.Module, pattern: str) -> list[float]:
    rx = re.compile(pattern, re.IGNORECASE)
    found = [m.p for n, m in backbone.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and rx.search(n)]
    for cfg in _configs(backbone):
        found += [v for k, v in vars(cfg).items() if rx.search(k) and isinstance(v, float)]
    return found


def _has_dropout(backbone: nn.Module) -> bool:
    ps = _dropout_attrs(backbone, r"^(?!.*(summary|classifier)).*(drop)")
    return any(p > 0 for p in ps)


def _has_attention_dropout(backbone: nn.Module) -> bool:
    return any(p > 0 for p in _dropout_attrs(backbone, r"(attn|attention).*drop"))


# ---------------------------------------------------------------- the runs
def _grads(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
    if not params or not loss.requires_grad:
        return None
    got = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float() for g, p in zip(got, params)]


def _packed(model, batch, weights, params, grad: bool) -> Result:
    """The model's own forward on a packed batch: its hidden states (recorded on the way), rewards and the
    gradients of sum w_i r_i; checks that the lifted final norm was the backbone's last step (a module after it,
    such as OPT's project_out, would then see un-normed rows)."""
    backbone, seen, bad, norm_out, hooks = model.backbone, [], [], [], []
    if model.norm_name is not None:
        norm = getattr(backbone, model.norm_name)
        hooks.append(norm.register_forward_hook(lambda m, a, out: norm_out.append(out)))

        def after(m, a, out):
            h = out.last_hidden_state
            bad.append(len(norm_out) != 1 or norm_out[0].shape != h.shape or not torch.equal(norm_out[0], h))
            norm_out.clear()

        hooks.append(backbone.register_forward_hook(after))
    own = model.hidden_states
    model.hidden_states = lambda b: seen.append(own(b)) or seen[-1]
    try:
        with torch.set_grad_enabled(grad):
            rewards = model(batch)
            grads = _grads((rewards * weights).sum(), params) if grad else None
    except UnsupportedBackbone:
        raise
    except Exception as e:  # e.g. a model that does arithmetic on the mask object it gets
        raise UnsupportedBackbone(
            f"fastrm cannot train {model.backbone_info.model_type} exactly: its packed forward fails ({e}). Use a "
            "checkpoint of another family"
        ) from e
    finally:
        del model.hidden_states
        for h in hooks:
            h.remove()
    if any(bad):
        raise UnsupportedBackbone(
            f"fastrm cannot train {model.backbone_info.model_type} exactly: its final norm "
            f"({model.norm_name}) is not the backbone's last step, so it cannot run on the pooled rows only. Use a "
            "checkpoint of another family"
        )
    if not seen:  # a forward that does not go through hidden_states()
        with torch.no_grad():
            seen.append(model.hidden_states(batch))
    hidden = seen[0]
    return Result(hidden.detach().float(), rewards.detach().float(), grads, batch)


def _eager(model, seqs, weights, params, grad: bool) -> tuple[Result, float]:
    """Stock transformers' eager attention (no position ids, no mask) on the sequences, final norm and head on each
    one's last token; and the reward scale |w_head| * mean |final_norm(h_last)|. One right-padded batch: under
    causal attention no token sees a later pad, so each row is its sequence alone. One sequence per call for RoPE
    that depends on the call's longest sequence, each from the original frequencies (as a fresh model)."""
    backbone, device = model.backbone, weights.device
    with torch.set_grad_enabled(grad):
        if model.backbone_info.position_limit is not None:
            hidden = []
            for s in seqs:
                reset_dynamic_rope(backbone)
                hidden.append(
                    backbone(input_ids=torch.tensor([s], device=device), use_cache=False).last_hidden_state[0]
                )
            reset_dynamic_rope(backbone)
        else:
            longest = max(len(s) for s in seqs)
            ids = torch.tensor([s + s[-1:] * (longest - len(s)) for s in seqs], device=device)
            out = backbone(input_ids=ids, use_cache=False).last_hidden_state
            hidden = [out[i, : len(s)] for i, s in enumerate(seqs)]
        normed = model.final_norm(torch.stack([h[-1] for h in hidden]))  # [S, H]
        r = model.score(normed).reshape(-1).float()
        grads = _grads((r * weights).sum(), params) if grad else None
    scale = model.score.weight.detach().float().norm() * normed.detach().float().norm(dim=-1).mean()
    return Result([h.detach().float() for h in hidden], r.detach(), grads), float(scale)


@contextlib.contextmanager
def _reference_precision(model):
    """fp32 weights (low-precision ones upcast in place, then restored exactly) and fp32 matmuls at full precision."""
    low = (torch.bfloat16, torch.float16)
    saved = [(t, t.dtype) for t in list(model.parameters()) + list(model.buffers()) if t.dtype in low]
    matmul = torch.get_float32_matmul_precision()
    try:
        for t, _ in saved:
            t.data = t.data.float()
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        for t, dtype in saved:
            t.data = t.data.to(dtype)


def _train_mode_is_deterministic(model, seq: list[int], device) -> bool:
    """Two train-mode runs (fixed dropout masks) of one sequence agree: nothing else random in train mode."""
    batch = pack_prompt_responses([[]], [[seq]]).to(device)
    with torch.no_grad():
        return torch.equal(model(batch), model(batch))


def _packed_passes(model, batches, weights, params, train: bool) -> tuple[dict[str, Result], dict[str, Result]]:
    """The scoring pass (eval, no grad) and the training pass (grad; train mode with fixed dropout masks when
    ``train``), both layouts."""
    model.eval()
    scoring = {lay: _packed(model, b, weights, params, grad=False) for lay, b in batches.items()}
    model.train(train)
    with _seeded_dropout(train):
        training = {lay: _packed(model, b, weights, params, grad=True) for lay, b in batches.items()}
    model.eval()
    return scoring, training


def _run(model, prompts, responses, seqs, weights, params, prec: _Precision) -> Runs | None:
    backbone = model.backbone
    batches = {
        lay: pack_prompt_responses(prompts, responses, lay).to(prec.device) for lay in ("separate", "shared_prompt")
    }
    train = _has_dropout(backbone) and not (prec.backend == "flash" and _has_attention_dropout(backbone))
    if train:
        model.train()
        with prec.autocasting(), _seeded_dropout(True):
            train = _train_mode_is_deterministic(model, min(seqs, key=len), prec.device)
    with prec.autocasting():
        scoring, training = _packed_passes(model, batches, weights, params, train)
    backbone.set_attn_implementation("eager")
    strict = low = None
    try:
        if not prec.exact:
            model.train(train)
            with prec.autocasting(), _seeded_dropout(train):
                low = _eager(model, seqs, weights, params, grad=True)[0]
        with _reference_precision(model):
            model.eval()
            ref_scoring, scale = _eager(model, seqs, weights, params, grad=not train)
            ref_training = ref_scoring
            if train:
                model.train()
                with _seeded_dropout(True):
                    ref_training = _eager(model, seqs, weights, params, grad=True)[0]
            if not prec.exact and prec.backend in ("exact", "flex"):  # the logic once more, where nothing hides
                backbone.set_attn_implementation(ATTN_NAME)
                strict = _packed_passes(model, batches, weights, params, train)
    except torch.OutOfMemoryError:
        warnings.warn(
            f"the backbone self-test ({prec.describe()}) was skipped: no memory for an fp32 copy of the weights, "
            "its reference",
            stacklevel=4,
        )
        return None
    finally:
        backbone.set_attn_implementation(ATTN_NAME)
    return Runs(scoring, training, strict, ref_scoring, ref_training, low, scale, train)
