"""RewardModel: any Hugging Face decoder backbone + a linear head on each sequence's last token.

The backbone runs *without* its final norm on a packed batch; the final norm and the head are then applied to the
2B pooled rows only (stock HF reward models norm and score every token, then gather). The result is identical,
because the norm is per token. On CUDA the gather + norm + head + loss run as one fused Triton op
(``fastrm_kernels.reward_head_loss``); the PyTorch path here is the reference and the CPU path.

Checkpoints are plain ``XForSequenceClassification`` folders: ``transformers.AutoModelForSequenceClassification
.from_pretrained(dir)`` loads them and gives the same rewards, and :meth:`RewardModel.from_pretrained` loads
those, fastrm's own, and causal-LM checkpoints (the head is then freshly initialised).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastrm import attention, backbones, formatting, long_rope, saved_tokenizer
from fastrm.losses import LossKind, pairwise_loss_sums
from fastrm.packing import PackedBatch

# Attribute names of the final norm in the backbones we know (Llama/Qwen2/Mistral: norm, GPT-NeoX:
# final_layer_norm, GPT-2: ln_f, OPT/Falcon-style: final_layernorm, ln_f).
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "final_norm")


@dataclass
class LossConfig:
    """What the reward head is trained with (see fastrm/losses.py)."""

    kind: LossKind = "bt"
    detach_mean: bool = True
    center_rewards_coefficient: float | None = None


@dataclass
class NormSpec:
    """The final norm in the form the fused kernel takes."""

    norm_type: str  # "rms" | "layer" | "none"
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


_WARNED_UNFUSED: set[str] = set()


def _fused_loss_kind(kind: str) -> bool:
    """Whether the fused head+loss op implements loss ``kind``; if not, warn once per kind (the caller then runs the
    PyTorch loss, the same function): a new loss must not need a kernel before it can train on a GPU."""
    from fastrm_kernels.pairwise_loss import FUSED_KINDS

    if kind in FUSED_KINDS:
        return True
    if kind not in _WARNED_UNFUSED:
        _WARNED_UNFUSED.add(kind)
        warnings.warn(
            f"fastrm: the fused head+loss kernel lacks loss {kind!r}; running the PyTorch loss for it", stacklevel=3
        )
    return False


def _find_final_norm(backbone: nn.Module) -> tuple[str | None, nn.Module | None]:
    for name in FINAL_NORM_NAMES:
        m = getattr(backbone, name, None)
        if isinstance(m, nn.Module) and not isinstance(m, nn.Identity):
            return name, m
    return None, None


def norm_spec(norm: nn.Module | None) -> NormSpec | None:
    """Describe ``norm`` for the fused kernel, or None if the kernel does not implement it (then the module itself
    runs on the pooled rows)."""
    if norm is None:
        return NormSpec("none", None, None, 0.0)
    if isinstance(norm, nn.LayerNorm):
        if not norm.elementwise_affine:
            return None
        return NormSpec("layer", norm.weight, norm.bias, float(norm.eps))
    cls = type(norm).__name__
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    # Gemma-style RMSNorm scales by (1 + w): a different function, so only the plain form is fused.
    if "RMSNorm" in cls and "Gemma" not in cls and eps is not None and getattr(norm, "weight", None) is not None:
        return NormSpec("rms", norm.weight, None, float(eps))
    return None


class RewardModel(nn.Module):
    """Decoder backbone + ``score`` head on the last token of every packed sequence.

    Args:
        backbone: a transformers base model (``AutoModel``: Llama, Qwen2, GPT-NeoX/Pythia, GPT-2, ...).
        score: the head, ``nn.Linear(hidden, 1)``; created (HF initialisation) if None.
        attn_backend: "auto" | "flash" | "torch_varlen" | "exact" (see fastrm/attention.py).
        fused: use the fused Triton head+loss op: "auto" (on CUDA when the final norm is supported), True, False.
        self_test: compare the packed path with the backbone's eager attention on a few short sequences at
            construction (see fastrm/backbones.py); a backbone fastrm cannot run exactly raises UnsupportedBackbone
            either way.
    """

    def __init__(
        self,
        backbone: nn.Module,
        score: nn.Linear | None = None,
        *,
        attn_backend: str = "auto",
        fused: bool | str = "auto",
        self_test: bool = True,
    ):
        super().__init__()
        self.backbone_info = backbones.check_backbone(backbone)  # refuses what fastrm cannot run exactly
        attention.register()
        if getattr(backbone.config, "_attn_implementation", None) != attention.ATTN_NAME:
            backbone.set_attn_implementation(attention.ATTN_NAME)
        self.backbone = backbone
        hidden = self.backbone_info.head_width  # the rows the backbone outputs (OPT-350m: word_embed_proj_dim)
        self.norm_name, norm = _find_final_norm(backbone)
        # Lift the final norm out of the backbone: it runs on the pooled rows only.
        self.final_norm = norm if norm is not None else nn.Identity()
        if self.norm_name is not None:
            setattr(backbone, self.norm_name, nn.Identity())
        if score is None:
            # No bias, as in HF sequence-classification heads: it cancels in every pairwise loss anyway.
            score = nn.Linear(hidden, 1, bias=False)
            nn.init.normal_(score.weight, std=getattr(backbone.config, "initializer_range", 0.02))
        if score.out_features != 1 or score.in_features != hidden:
            raise ValueError(
                f"the score head must map {hidden} features to 1, got {score.in_features} -> {score.out_features}"
            )
        self.score = score  # the head module, named as in HF checkpoints; text scoring is score_texts()
        self.attn_backend = attn_backend
        self.fused = fused
        self.tokenizer = None  # set by from_pretrained / the trainer when known
        # How texts become ids for this model (fastrm/formatting.py): the checkpoint's record, the trainer's rule,
        # or stock transformers' for a checkpoint without one; None for a model built here (training's defaults).
        self.scoring_rule: formatting.ScoringRule | None = None
        self.source_dir: Path | None = None  # the local HF folder the weights were loaded from (a LoRA base)
        self.lora = None  # fastrm.lora.LoraState when the backbone carries LoRA adapters (fastrm/lora.py)
        if self_test:
            backbones.self_test(self)

    def reset_head(self, seed: int) -> None:
        """Re-draw the score head from normal(0, initializer_range) with a seeded generator, so a run's head does
        not depend on the global RNG at load time."""
        std = getattr(self.backbone.config, "initializer_range", 0.02)
        with torch.no_grad():
            w = torch.empty(self.score.weight.shape, dtype=torch.float32)
            w.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
            self.score.weight.copy_(w)
            if self.score.bias is not None:
                self.score.bias.zero_()

    # ---------------------------------------------------------------- construction and checkpoints
    @classmethod
    def from_config(cls, config, **kwargs) -> "RewardModel":
        """A randomly initialised reward model from a transformers config (or a preset name, see presets.py)."""
        from transformers import AutoModel

        from fastrm.presets import resolve_config

        config = resolve_config(config)
        # Built with eager attention: __init__ checks the backbone, then switches it to fastrm's (some families,
        # e.g. Falcon and GPT-J, cannot even be built with an attention they do not know).
        backbone = AutoModel.from_config(config, attn_implementation="eager")
        return cls(backbone, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        attn_backend: str = "auto",
        fused: bool | str = "auto",
        self_test: bool = True,
        **hf_kwargs: Any,
    ) -> "RewardModel":
        """Load a fastrm or HF sequence-classification checkpoint, or a causal-LM checkpoint (new head).

        ``hf_kwargs`` go to ``from_pretrained`` (e.g. ``gguf_file=...``, ``dtype=torch.bfloat16``).
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        hf_kwargs.setdefault("local_files_only", True)  # fastrm contacts no hub unless the caller allows it
        hf = AutoModelForSequenceClassification.from_pretrained(  # eager until __init__ has checked the backbone
            path, num_labels=1, attn_implementation="eager", **hf_kwargs
        )
        backbone = getattr(hf, hf.base_model_prefix)
        model = cls(backbone, hf.score, attn_backend=attn_backend, fused=fused, self_test=self_test)
        if "gguf_file" not in hf_kwargs and Path(path).is_dir():
            model.source_dir = Path(path).absolute()
        if "gguf_file" in hf_kwargs:  # a GGUF file carries its tokenizer
            model.tokenizer = AutoTokenizer.from_pretrained(
                path, gguf_file=hf_kwargs["gguf_file"], local_files_only=True
            )
        elif Path(path, "tokenizer.json").exists() or Path(path, "tokenizer_config.json").exists():
            model.tokenizer = saved_tokenizer.load_folder_tokenizer(path)  # as saved (see saved_tokenizer.py)
        model.scoring_rule = formatting.read_rule(path) if Path(path).is_dir() else None
        if model.scoring_rule is None and Path(path).is_dir():  # a fastrm run written before records existed
            model.scoring_rule = formatting.legacy_rule(path, model.tokenizer)
        trained_head = any(a.endswith("ForSequenceClassification") for a in hf.config.architectures or [])
        if model.scoring_rule is None and trained_head:  # another library's reward model: scored as stock HF does
            model.scoring_rule = formatting.stock_rule(hf.config)
        return model

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer=None, state_dict: dict | None = None) -> None:
        """Write an HF sequence-classification checkpoint (+ the tokenizer, if given or attached, and the scoring
        rule as ``fastrm_scoring.json``: :func:`fastrm.formatting.write_rule`); a model with LoRA adapters writes an
        adapter folder that PEFT loads (:func:`fastrm.lora.save_adapter`), with the same record."""
        if self.lora is not None:
            from fastrm import lora

            lora.save_adapter(self, out_dir, tokenizer, state_dict)
            tok = tokenizer if tokenizer is not None else self.tokenizer
            formatting.write_rule(out_dir, self.scoring_rule or formatting.training_rule(tok))
            return
        self.save_plain(out_dir, tokenizer, state_dict)

    def save_plain(self, out_dir: str | os.PathLike, tokenizer=None, state_dict: dict | None = None) -> None:
        """Write an HF sequence-classification checkpoint (+ the tokenizer, if given or attached, and the scoring
        rule).

        The config's bos/eos/pad ids come from the tokenizer, with a pad that is not EOS, so that HF pools the EOS
        fastrm pools (see :func:`fastrm.backbones.set_checkpoint_token_ids`). A tokenizer that would reload as
        another one (transformers picks some model types' tokenizer class itself) is refused before anything is
        written (:class:`fastrm.saved_tokenizer.TokenizerRoundTripError`, see fastrm/saved_tokenizer.py).
        ``state_dict``: this module's full state to write instead of ``self.state_dict()`` (FSDP gathers it), or a
        state without adapters (the keys of a plain RewardModel: a LoRA base, a merged model)."""
        from transformers import AutoModelForSequenceClassification

        if self.score.bias is not None:
            raise ValueError(
                "a head with a bias cannot be saved as an HF sequence-classification checkpoint (their score heads "
                "have no bias); pass a head without bias"
            )
        cfg = copy.deepcopy(self.backbone.config)
        cfg.num_labels = 1
        tok = backbones.set_checkpoint_token_ids(cfg, tokenizer if tokenizer is not None else self.tokenizer)
        if tok is not None:  # refuses, before anything is written, a tokenizer that would reload as another one
            saved_tokenizer.check_savable(tok, cfg)
        with torch.device("meta"):  # eager: every family has it (Gemma2, GPT-OSS, ... refuse sdpa)
            hf = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
        own = state_dict if state_dict is not None else self.state_dict()
        state = {hf_key: own[key] for key, hf_key in self.hf_key_map(own).items()}
        missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint layout mismatch: missing {missing}, unexpected {unexpected}")
        hf.config.architectures = [type(hf).__name__]
        hf.save_pretrained(out_dir)
        if tok is not None:
            tok.save_pretrained(out_dir)
        # How this checkpoint scores (fastrm/formatting.py): read back by every inference path.
        rule = self.scoring_rule or formatting.training_rule(tok if tok is not None else self.tokenizer)
        formatting.write_rule(out_dir, rule)

    def hf_key_map(self, keys=None) -> dict[str, str]:
        """This module's state-dict keys (or ``keys``) -> the keys of the equivalent HF sequence-classification
        checkpoint."""
        prefix = getattr(self.backbone, "base_model_prefix", "model")
        out = {}
        for key in self.state_dict() if keys is None else keys:
            if key.startswith("backbone."):
                out[key] = f"{prefix}.{key[len('backbone.') :]}"
            elif key.startswith("final_norm."):
                out[key] = f"{prefix}.{self.norm_name}.{key[len('final_norm.') :]}"
            else:
                out[key] = key  # score.weight
        return out

    def read_weights(self, ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
        """This module's full state dict from a checkpoint written by :meth:`save_pretrained` (with LoRA adapters:
        the adapters and the head, the trained weights)."""
        from safetensors.torch import load_file

        if self.lora is not None:
            from fastrm import lora

            return lora.read_weights(self, ckpt_dir)

        files = sorted(Path(ckpt_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{ckpt_dir}: no *.safetensors weights")
        hf_state = {}
        for f in files:
            hf_state.update(load_file(str(f)))
        missing = [k for k, hk in self.hf_key_map().items() if hk not in hf_state]
        if missing:
            raise RuntimeError(f"{ckpt_dir}: checkpoint lacks {missing[:5]}")
        return {key: hf_state[hf_key] for key, hf_key in self.hf_key_map().items()}

    def load_weights(self, ckpt_dir: str | os.PathLike) -> None:
        """Load the weights of a checkpoint written by :meth:`save_pretrained` into this model (for resuming)."""
        own = self.state_dict()
        with torch.no_grad():
            for key, value in self.read_weights(ckpt_dir).items():
                own[key].copy_(value)

    def decoder_layers(self) -> list[nn.Module]:
        """The backbone's decoder blocks (the FSDP sharding units)."""
        for path in ("layers", "h", "decoder.layers", "transformer.h", "language_model.layers"):
            mod = self.backbone
            for part in path.split("."):
                mod = getattr(mod, part, None)
            if isinstance(mod, nn.ModuleList):
                return list(mod)
        raise ValueError(f"cannot find the decoder layers of {type(self.backbone).__name__}")

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---------------------------------------------------------------- forward
    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """[T, H] pre-final-norm hidden states of the packed batch. With ``dynamic`` / ``longrope`` RoPE a sequence
        past the original length runs alone, as stock transformers computes it (fastrm/long_rope.py)."""
        parts = backbones.batch_parts(self.backbone_info, batch)  # host ints; None for almost every batch
        if parts is not None:
            return long_rope.stitch(self.backbone, batch, parts, self._backbone_hidden)
        return self._backbone_hidden(batch)

    def _backbone_hidden(self, batch: PackedBatch) -> torch.Tensor:
        """[T, H] the backbone's output rows for a packed batch, in one call."""
        out = self.backbone(
            input_ids=batch.input_ids.unsqueeze(0),
            position_ids=batch.position_ids.unsqueeze(0),
            fastrm_plan=batch.attn,
            fastrm_backend=self.attn_backend,
            use_cache=False,
        )
        return out.last_hidden_state[0]

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Final norm + score head on pooled rows [R, H] -> rewards [R] fp32 (reference path)."""
        return self.score(self.final_norm(pooled)).squeeze(-1).float()

    def use_fused(self, device: torch.device) -> bool:
        if self.fused == "auto":
            return device.type == "cuda" and norm_spec(self._norm_module()) is not None
        if self.fused and norm_spec(self._norm_module()) is None:
            raise ValueError(f"the fused head does not support the final norm {type(self.final_norm).__name__}")
        return bool(self.fused)

    def _norm_module(self) -> nn.Module | None:
        return None if isinstance(self.final_norm, nn.Identity) else self.final_norm

    def forward(
        self,
        batch: PackedBatch,
        loss: LossConfig | None = None,
        *,
        mu: torch.Tensor | None = None,
        mu_grad: torch.Tensor | None = None,
        normalizer: float | None = None,
        hidden: torch.Tensor | None = None,
    ):
        """Rewards, or the pairwise loss, of a packed batch.

        Without ``loss``: returns rewards [R] fp32 in ``batch.pool_index`` order.
        With ``loss``: returns (loss 0-d fp32, rewards [2B] fp32 detached, stats [5] sums), see losses.py for
        ``mu``, ``mu_grad`` and ``normalizer``. ``hidden``: this batch's :meth:`hidden_states` [T, H], already
        computed (with its graph) so the backbone does not run again (the trainer's step-wide mu_B).
        """
        hidden = self.hidden_states(batch) if hidden is None else hidden
        if loss is None:
            return self.head(hidden.index_select(0, batch.pool_index))
        B = batch.num_pairs
        margin = batch.margin if loss.kind == "margin" else None
        if loss.kind == "margin" and margin is None:
            raise ValueError("loss='margin' needs a 'margin' column in the data")
        if self.use_fused(hidden.device) and _fused_loss_kind(loss.kind):
            from fastrm_kernels.reward_head_loss import reward_head_loss

            spec = norm_spec(self._norm_module())
            return reward_head_loss(
                hidden,
                batch.pool_index,
                spec.weight,
                spec.bias,
                self.score.weight.view(-1),
                self.score.bias,
                norm_type=spec.norm_type,
                eps=spec.eps,
                loss_kind=loss.kind,
                margin=margin,
                detach_mean=loss.detach_mean,
                center_rewards_coefficient=loss.center_rewards_coefficient,
                mu=mu,
                mu_grad=mu_grad,
                normalizer=normalizer,
            )
        rewards = self.head(hidden.index_select(0, batch.pool_index))
        # The sums form: the same loss as the fused op, and no host sync (the stats dict would read them back).
        value, sums = pairwise_loss_sums(
            rewards[:B],
            rewards[B:],
            loss.kind,
            margin,
            loss.detach_mean,
            loss.center_rewards_coefficient,
            mu=mu,
            mu_grad=mu_grad,
            normalizer=normalizer,
        )
        return value, rewards.detach(), sums

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def score_texts(self, prompts, responses, tokenizer=None, **kwargs):
        """Rewards of texts: ``model.score_texts("Q", ["A1", "A2"]) -> [r1, r2]``; see :func:`fastrm.scoring.score`
        for the accepted shapes. (``model.score`` is the head module, as in HF checkpoints.)"""
        from fastrm.scoring import score

        return score(self, prompts, responses, tokenizer=tokenizer, **kwargs)
