"""Which transformers backbones fastrm runs exactly, and a clear refusal for the others.

fastrm changes two things in a backbone: attention runs on packed batches (fastrm/attention.py) and the final norm
moves to the pooled rows. Both are exact only when the model's attention goes through transformers'
``AttentionInterface`` with our plan, when nothing but attention mixes tokens, and when no part of the model depends
on the other sequences of the batch. This module checks that, once, when a :class:`~fastrm.model.RewardModel` is
built:

* :func:`check_backbone`: static checks on the model (its class, config and modules) that raise
  :class:`UnsupportedBackbone` with the model type, the reason and what to do; returns :class:`BackboneInfo`.
* :func:`self_test` (:mod:`fastrm.self_test`): inputs chosen from the model's config (past every window) through
  the packed path, scoring and training, both layouts, against the same backbone with transformers' eager
  attention one sequence at a time: hidden states, rewards at the pooled rows, gradients; tolerances calibrated
  for low precision (catches lost or off-by-one windows and masks, state leaking between packed sequences, RoPE
  differences, kwargs that never arrive, a wrong pooled row). :func:`self_test_for_run` repeats it on the device
  and in the precision a run trains in.
* :func:`batch_parts`: RoPE variants that pick their frequencies from the longest sequence of a call
  (``dynamic``, ``longrope``): a batch holding a sequence past the original length runs it alone
  (:mod:`fastrm.long_rope`); a host-side check of ``plan.max_k``, no device sync.
* :func:`set_checkpoint_token_ids`: the bos/eos/pad ids a saved checkpoint needs so that HF's
  ``*ForSequenceClassification`` pools the same token fastrm pools (the EOS that ends each response).
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fastrm.attention import UnsupportedBackbone
from fastrm.long_rope import rope_limit, rope_parts
from fastrm.self_test import self_test, self_test_for_run

__all__ = [
    "UnsupportedBackbone",
    "BackboneInfo",
    "check_backbone",
    "batch_parts",
    "self_test",
    "self_test_for_run",
    "set_checkpoint_token_ids",
]

# Layer kinds whose token mixing is attention that the packed plan reproduces (chunked: up to the chunk size,
# checked per layer call). Anything else in ``config.layer_types`` mixes tokens some other way.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}

# Token mixers outside attention (state-space / linear-attention / short-convolution blocks), by class name, and
# convolutions over the sequence (nn.Conv1d) by type. GPT-2's ``Conv1D`` is a linear layer
# (transformers.pytorch_utils), not one; 2-D convolutions are vision towers' patch embeddings, not token mixers.
_MIXER_NAME = re.compile(
    r"mamba|selectivescan|linearattention|lightningattention|gateddelta|deltanet|shortconv|rwkv|retnet|hyena|xlstm"
    r"|(?-i:SSM)",  # "ssm" in any case would match GptOssModel
    re.IGNORECASE,
)

# Families whose decoder layers drop ``**kwargs`` on the way to attention: the packed-batch plan never arrives.
_DROPS_KWARGS = {"stablelm", "nemotron"}


@dataclass
class BackboneInfo:
    """What :func:`check_backbone` found out about a supported backbone."""

    model_type: str
    head_width: int  # width of the backbone's output rows (OPT-350m: word_embed_proj_dim, not hidden_size)
    position_limit: int | None = None  # longest sequence a batch may hold (dynamic / longrope RoPE), or None
    position_reason: str = ""


def check_backbone(backbone: nn.Module) -> BackboneInfo:
    """Raise :class:`UnsupportedBackbone` if fastrm cannot train ``backbone`` (a transformers base model) exactly,
    with every reason found; else return its :class:`BackboneInfo`."""
    cfg = backbone.config
    model_type = getattr(cfg, "model_type", None) or type(backbone).__name__
    reasons: list[str] = []
    if not getattr(type(backbone), "_supports_attention_backend", False):
        reasons.append(
            f"{type(backbone).__name__} computes attention itself instead of through transformers' "
            "AttentionInterface, so packed sequences would attend to each other"
        )
    if model_type in _DROPS_KWARGS:
        reasons.append(
            "its decoder layers do not pass keyword arguments on to attention, so the packed plan never arrives"
        )
    if getattr(cfg, "is_causal", True) is False:
        reasons.append("its config makes attention bidirectional (is_causal=False)")
    other = sorted({t for t in (getattr(cfg, "layer_types", None) or []) if t not in ATTENTION_LAYER_TYPES})
    if other:
        reasons.append(f"it has layers of type {other}, which mix tokens outside attention (not packable)")
    mixers = sorted({type(m).__name__ for m in backbone.modules() if _is_token_mixer(m)})
    if mixers:
        reasons.append(f"it mixes tokens outside attention ({', '.join(mixers[:3])}), which packing would leak across")
    if getattr(cfg, "attn_temperature_tuning", False) and not all(getattr(cfg, "no_rope_layers", None) or [1]):
        reasons.append(
            "its NoPE layers scale queries by the position in the whole packed row (attention temperature tuning), "
            "not in each sequence"
        )
    head_width, why = _seq_cls_head_width(cfg)
    if why:
        reasons.append(why)
    limit, rope_reason = rope_limit(backbone)
    if limit == -1:
        reasons.append(rope_reason)
    if reasons:
        raise UnsupportedBackbone(
            f"fastrm cannot train {model_type} exactly: " + "; ".join(reasons) + ". Use a checkpoint of another "
            "family (see the 'Backbones' section of the README for the verified ones)"
        )
    return BackboneInfo(model_type, head_width, limit, rope_reason)


def _is_token_mixer(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv1d) or bool(_MIXER_NAME.search(type(m).__name__))


def _seq_cls_head_width(cfg) -> tuple[int, str | None]:
    """In-features of the family's HF sequence-classification head (built on the meta device: no memory), or the
    reason there is none. fastrm checkpoints are such folders, so a family without one is refused."""
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(cfg)
    cfg.num_labels = 1
    try:
        with torch.device("meta"):
            hf = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    except (ValueError, KeyError) as e:
        first = str(e).splitlines()[0][:160]
        return (
            0,
            f"transformers has no sequence-classification class for it ({first}), so its checkpoint could not load",
        )
    score = getattr(hf, "score", None)
    if not isinstance(score, nn.Linear) or score.bias is not None:
        return 0, "its HF sequence-classification head is not a bias-free linear 'score', which fastrm checkpoints are"
    return score.in_features, None


def batch_parts(info: BackboneInfo, batch):
    """None when ``batch`` runs as one call; else the calls a long sequence of ``dynamic`` / ``longrope`` RoPE must
    make alone (host ints only; see :func:`fastrm.long_rope.rope_parts`)."""
    return rope_parts(info.position_limit, batch)


# ---------------------------------------------------------------- checkpoints
def _spare_pad_token(tokenizer) -> str | None:
    """A special token that is neither EOS nor BOS and that text does not use (a pad, reserved or unk token)."""
    avoid = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    candidates = []
    for tid, tok in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items()):
        content = str(tok)
        if getattr(tok, "special", True) and re.search(r"pad|reserved", content, re.IGNORECASE):
            candidates.append((tid, content))
    if tokenizer.unk_token is not None:
        candidates.append((tokenizer.unk_token_id, tokenizer.unk_token))
    for tid, content in candidates:
        if tid is not None and tid not in avoid:
            return content
    return None


def set_checkpoint_token_ids(cfg, tokenizer):
    """Write bos/eos/pad ids into ``cfg`` (a copy of the backbone config about to be saved) so that HF's
    ``*ForSequenceClassification`` scores padded batches as fastrm does, and return the tokenizer to save.

    fastrm pools the true last token of each response (the EOS it appends); HF pools the last token that is not
    ``pad_token_id``. So the ids come from the tokenizer, and the saved pad must differ from EOS: a tokenizer
    whose pad is its EOS (or that has none) is saved as a copy padding with a spare special token (a pad, reserved
    or unk token); without one, ``pad_token_id`` is null and HF refuses batches of more than one text instead of
    pooling the wrong token (with a warning here).
    """
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg  # where HF reads pad_token_id
    if tokenizer is not None:
        text_cfg.bos_token_id, text_cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            spare = _spare_pad_token(tokenizer)
            if spare is not None:
                tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its pad
                tokenizer.pad_token = spare
        pad = tokenizer.pad_token_id
    else:
        pad = getattr(text_cfg, "pad_token_id", None)
    eos = getattr(text_cfg, "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos]
    dropped = pad is not None and (pad in eos or pad >= text_cfg.vocab_size)
    text_cfg.pad_token_id = None if dropped else pad
    if dropped or (tokenizer is not None and text_cfg.pad_token_id is None):
        warnings.warn(
            "the saved checkpoint has pad_token_id=null: the tokenizer pads with its EOS (or has no usable pad) and "
            "has no spare special token, and HF's sequence-classification models pool the last non-pad token, so "
            "they would pool the token before the EOS that fastrm scores. transformers will score such a checkpoint "
            "one text at a time (it refuses batches > 1 without a pad id); give the tokenizer a distinct pad token "
            "(tokenizer.add_special_tokens({'pad_token': '<|pad|>'}), then resize the embeddings) to batch",
            stacklevel=3,
        )
    return tokenizer
