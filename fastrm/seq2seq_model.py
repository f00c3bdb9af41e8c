"""Seq2SeqRewardModel: a Hugging Face causal LM trained as a sequence-to-sequence reward model, and its token rewards.

A sibling of :class:`fastrm.model.RewardModel`: the same packed backbone (fastrm's attention plan, the final norm
lifted out of the backbone), but the LM head instead of a score head, run only on the rows that predict a target
token, through the fused linear + cross-entropy op (``fastrm_kernels.linear_cross_entropy``: no [T, V] logits, not
even [L, V] for the L target rows; fp64 runs the plain PyTorch head on those rows). Checkpoints are plain HF causal-LM
folders (``AutoModelForCausalLM.from_pretrained`` loads them, ``generate`` writes the correction) plus
``fastrm_seq2seq.json`` (the template and the reward constants), which :func:`fastrm.load_model` recognises.

Reward extraction (the paper's "reward extracting"): to score y for x the RM reads [x | input(y) | y] in one
teacher-forced forward, and at each target position t compares y_t with its greedy prediction given y_<t. Greedy
decoding from [x | input(y)] produces exactly these predictions while its output equals y (up to and including
the first divergence); after it the paper feeds y token by token, which is teacher forcing: so one forward is the
paper's procedure, and fastrm defines the decisions by it (tests/test_seq2seq.py checks it against stock HF
``generate`` followed by teacher forcing). Token rewards from the decisions (``reward_rule``, fastrm's choice where
the paper is silent): ``after_zero`` (default): +positive for each token before the first divergence, -negative for
every mismatching token from it on, 0 for tokens that match after it (the RM can copy them from its input, so a
match there says little); ``match_positive``: +positive for every match, -negative for every mismatch. The sequence
score is the ``mean`` (default) or ``sum`` of a response's token rewards.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastrm import attention, backbones, long_rope, saved_tokenizer
from fastrm.model import FINAL_NORM_NAMES
from fastrm.seq2seq import CORRECTION, Seq2SeqBatch, Seq2SeqSettings, pack_branches

SETTINGS_FILE = "fastrm_seq2seq.json"
_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def find_final_norm(backbone: nn.Module) -> tuple[str | None, nn.Module | None]:
    """The backbone's final norm (RewardModel's rule: the first of ``FINAL_NORM_NAMES`` that is a module)."""
    for name in FINAL_NORM_NAMES:
        m = getattr(backbone, name, None)
        if isinstance(m, nn.Module) and not isinstance(m, nn.Identity):
            return name, m
    return None, None


def is_seq2seq_dir(spec: Any) -> bool:
    return isinstance(spec, (str, os.PathLike)) and Path(spec, SETTINGS_FILE).is_file()


def read_settings(folder: str | os.PathLike) -> Seq2SeqSettings:
    """The template and reward constants a seq2seq checkpoint (or adapter folder) records."""
    return Seq2SeqSettings.from_json(json.loads(Path(folder, SETTINGS_FILE).read_text()))


class Seq2SeqRewardModel(nn.Module):
    """Causal LM backbone + LM head on target rows (module docstring).

    Args:
        lm: a transformers causal LM (``AutoModelForCausalLM``: Llama, Qwen2, GPT-NeoX, GPT-2, ...).
        settings: the template and reward constants (:class:`fastrm.seq2seq.Seq2SeqSettings`; defaults if None).
        attn_backend: as for RewardModel. fused: the linear + cross-entropy op: "auto" (for fp32/bf16/fp16 hidden
            states), True, False (the plain head on the target rows).
        self_test: compare the packed path with eager attention at construction (fastrm/self_test.py, on the
            backbone) and the head's logits with the causal LM's own (both always refuse what cannot be exact).
    """

    def __init__(
        self,
        lm: nn.Module,
        *,
        settings: Seq2SeqSettings | None = None,
        attn_backend: str = "auto",
        fused: bool | str = "auto",
        self_test: bool = True,
    ):
        super().__init__()
        backbone = getattr(lm, lm.base_model_prefix)
        self.backbone_info = backbones.check_backbone(backbone)
        head = lm.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise backbones.UnsupportedBackbone(f"{type(lm).__name__}'s output embedding is not an nn.Linear LM head")
        self.head_name = next(n for n, m in lm.named_modules() if m is head)
        self.lm_class = type(lm).__name__
        self.lm_config = copy.deepcopy(lm.config)
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)
        probe = _head_probe(lm) if self_test else None  # the stock logits, before anything is changed
        attention.register()
        if getattr(backbone.config, "_attn_implementation", None) != attention.ATTN_NAME:
            backbone.set_attn_implementation(attention.ATTN_NAME)
        self.backbone = backbone
        self.norm_name, norm = find_final_norm(backbone)
        self.final_norm = norm if norm is not None else nn.Identity()
        if self.norm_name is not None:
            setattr(backbone, self.norm_name, nn.Identity())
        self.lm_head = head
        self.tied = head.weight is backbone.get_input_embeddings().weight
        self.settings = settings if settings is not None else Seq2SeqSettings()
        self.attn_backend = attn_backend
        self.fused = fused
        self.tokenizer = None
        self.lora = None  # fastrm.lora.LoraState with LoRA adapters (only they train; the LM head stays frozen)
        self._self_test = self_test
        self._tested: set = set()
        if self_test:
            self._check_head(*probe)
            self.self_test_for_run()

    @property
    def template(self):
        return self.settings.template

    # ---------------------------------------------------------------- construction and checkpoints
    @classmethod
    def from_config(cls, config, **kwargs) -> "Seq2SeqRewardModel":
        """A randomly initialised causal LM from a transformers config (or a preset name, see presets.py)."""
        from transformers import AutoModelForCausalLM

        from fastrm.presets import resolve_config

        lm = AutoModelForCausalLM.from_config(resolve_config(config), attn_implementation="eager")
        return cls(lm, **kwargs)

    @classmethod
    def from_pretrained(cls, path, *, settings: Seq2SeqSettings | None = None, **kwargs) -> "Seq2SeqRewardModel":
        """A seq2seq checkpoint (its ``fastrm_seq2seq.json`` settings) or any causal-LM checkpoint (default settings,
        or ``settings``). ``hf_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``gguf_file``, ``dtype``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf_kwargs = kwargs.pop("hf_kwargs", {})
        hf_kwargs.setdefault("local_files_only", True)
        lm = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **hf_kwargs)
        if settings is None and is_seq2seq_dir(path):
            settings = read_settings(path)
        model = cls(lm, settings=settings, **kwargs)
        if "gguf_file" in hf_kwargs:
            gguf = hf_kwargs["gguf_file"]
            model.tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf, local_files_only=True)
        elif Path(path, "tokenizer.json").exists() or Path(path, "tokenizer_config.json").exists():
            model.tokenizer = saved_tokenizer.load_folder_tokenizer(path)
        return model

    def _hf_skeleton(self):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(copy.deepcopy(self.lm_config), attn_implementation="eager")

    def hf_key_map(self, keys=None) -> dict[str, str]:
        """This module's state-dict keys (or ``keys``) -> the causal-LM checkpoint's (a tied head maps to nothing: HF
        ties it)."""
        prefix = getattr(self.backbone, "base_model_prefix", "model")
        out = {}
        for key in self.state_dict() if keys is None else keys:
            if key.startswith("backbone."):
                out[key] = f"{prefix}.{key[len('backbone.') :]}"
            elif key.startswith("final_norm."):
                out[key] = f"{prefix}.{self.norm_name}.{key[len('final_norm.') :]}"
            elif key.startswith("lm_head.") and not self.tied:
                out[key] = f"{self.head_name}.{key[len('lm_head.') :]}"
        return out

    def save_pretrained(self, out_dir, tokenizer=None, state_dict: dict | None = None) -> None:
        """Write an HF causal-LM folder (+ the tokenizer) and ``fastrm_seq2seq.json``; with LoRA adapters an adapter
        folder ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`` loads
        (:func:`fastrm.lora.save_adapter`), with the same settings file. ``state_dict``: this module's full state to
        write instead of ``self.state_dict()`` (FSDP gathers it)."""
        if self.lora is not None:
            from fastrm import lora

            lora.save_adapter(self, out_dir, tokenizer, state_dict)
            Path(out_dir, SETTINGS_FILE).write_text(json.dumps(self.settings.to_json(), indent=2) + "\n")
            return
        self.save_plain(out_dir, tokenizer, state_dict)

    def save_plain(self, out_dir, tokenizer=None, state_dict: dict | None = None) -> None:
        """:meth:`save_pretrained` without adapters: ``state_dict`` may hold a plain model's keys (a LoRA base, a
        merged model)."""
        tok = tokenizer if tokenizer is not None else self.tokenizer
        cfg = copy.deepcopy(self.lm_config)
        if tok is not None:
            saved_tokenizer.check_savable(tok, cfg)
            cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
            cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        hf = self._hf_skeleton()
        hf.config = cfg
        own = state_dict if state_dict is not None else self.state_dict()
        state = {hk: own[k] for k, hk in self.hf_key_map(own).items()}
        missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
        if self.tied:
            hf.tie_weights()
            missing = [k for k in missing if not k.startswith(self.head_name + ".")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint layout mismatch: missing {missing}, unexpected {unexpected}")
        hf.config.architectures = [type(hf).__name__]
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(hf.generation_config, name, getattr(cfg, name, None))
        hf.save_pretrained(out_dir)
        if tok is not None:
            tok.save_pretrained(out_dir)
        Path(out_dir, SETTINGS_FILE).write_text(json.dumps(self.settings.to_json(), indent=2) + "\n")

    def read_weights(self, ckpt_dir) -> dict[str, torch.Tensor]:
        """This module's state from a checkpoint :meth:`save_pretrained` wrote (with adapters: the adapters); the
        scalar model's reader, through this model's :meth:`hf_key_map`."""
        from fastrm.model import RewardModel

        return RewardModel.read_weights(self, ckpt_dir)

    def load_weights(self, ckpt_dir) -> None:
        from fastrm.model import RewardModel

        RewardModel.load_weights(self, ckpt_dir)

    def decoder_layers(self) -> list[nn.Module]:
        from fastrm.model import RewardModel

        return RewardModel.decoder_layers(self)

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---------------------------------------------------------------- checks
    def self_test_for_run(self, autocast: torch.dtype | None = None) -> None:
        """fastrm's construction self-test (packed vs eager attention, scoring and training) on this backbone, for
        the device, back end and precision it now runs in; a no-op when built with ``self_test=False``."""
        if not self._self_test:
            return
        param = next(self.backbone.parameters())
        key = (param.device.type, param.dtype, autocast, self.attn_backend)
        if key in self._tested or param.device.type == "meta":
            return
        from fastrm.model import RewardModel

        devices = [param.device] if param.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            width = self.backbone_info.head_width
            score = nn.Linear(width, 1, bias=False, device=param.device, dtype=param.dtype)
            view = RewardModel(self.backbone, score, attn_backend=self.attn_backend, fused=False, self_test=False)
            view.final_norm = self.final_norm
        backbones.self_test(view, autocast=autocast)
        self._tested.add(key)

    @torch.no_grad()
    def _check_head(self, ids: torch.Tensor | None, want: torch.Tensor | None) -> None:
        """The causal LM's own logits (computed before the norm was lifted out) equal final norm + head here."""
        if ids is None:
            return
        was = self.training
        self.eval()
        plan = pack_branches([[]], [[(ids.tolist()[:-1], ids.tolist()[-1:])]], "separate")
        hidden = self.hidden_states(plan)
        got = self.logits(self.final_norm(hidden.index_select(0, plan.target_index))).float()
        self.train(was)
        scale = want.abs().max().item() + 1e-6
        err = (got - want).abs().max().item() / scale
        tol = 1e-4 if want.dtype in (torch.float32, torch.float64) else 3e-2
        if not err <= tol:
            raise backbones.UnsupportedBackbone(
                f"{self.lm_class} computes its logits from the last hidden state in a way fastrm does not reproduce "
                f"(relative difference {err:.2e} > {tol}: a logit scale or another transform after the LM head)"
            )

    # ---------------------------------------------------------------- forward
    def hidden_states(self, batch) -> torch.Tensor:
        parts = backbones.batch_parts(self.backbone_info, batch)
        if parts is not None:
            return long_rope.stitch(self.backbone, batch, parts, self._backbone_hidden)
        return self._backbone_hidden(batch)

    def _backbone_hidden(self, batch) -> torch.Tensor:
        out = self.backbone(
            input_ids=batch.input_ids.unsqueeze(0),
            position_ids=batch.position_ids.unsqueeze(0),
            fastrm_plan=batch.attn,
            fastrm_backend=self.attn_backend,
            use_cache=False,
        )
        return out.last_hidden_state[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The plain head on normed rows [L, H] -> [L, V] (softcap applied), as the causal LM computes them."""
        z = self.lm_head(h)
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def _use_op(self, h: torch.Tensor) -> bool:
        if self.fused == "auto":
            return h.dtype in _OP_DTYPES
        return bool(self.fused)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed cross-entropy 0-d, per-token nll [L] no grad, argmax == target [L] bool) on normed rows."""
        if self._use_op(h):
            from fastrm_kernels.linear_cross_entropy import linear_cross_entropy

            out = linear_cross_entropy(h, self.lm_head.weight, targets, bias=self.lm_head.bias, softcap=self.softcap)
            return out.loss_sum, -out.target_logprob, out.argmax_match
        z = self.logits(h)
        z = z if z.dtype == torch.float64 else z.float()
        nll = F.cross_entropy(z, targets, reduction="none")
        return nll.sum(), nll.detach(), z.detach().argmax(dim=-1) == targets

    def forward(self, batch: Seq2SeqBatch, *, normalizer: float | None = None):
        """Training: (loss = summed target cross-entropy / ``normalizer``, sums [10] in ``SUM_FIELDS`` order, maxes
        [1] = (largest token nll,)). The LM head runs on ``batch.target_index`` rows only."""
        hidden = self.hidden_states(batch)
        h = self.final_norm(hidden.index_select(0, batch.target_index))
        loss_sum, nll, match = self.head_loss(h, batch.targets)
        norm = float(batch.targets.numel()) if normalizer is None else float(normalizer)
        loss = loss_sum / norm
        with torch.no_grad():
            nb = batch.branch_kind.numel()
            miss = torch.zeros(nb, device=h.device).index_add_(0, batch.target_branch, (~match).float())
            exact = (miss == 0).float()
            corr = (batch.branch_kind == CORRECTION).float()
            tok_corr = corr.index_select(0, batch.target_branch)
            nll32, m32 = nll.float(), match.float()
            sums = torch.stack(
                [
                    nll32.sum(),
                    torch.tensor(float(batch.targets.numel()), device=h.device),
                    m32.sum(),
                    torch.tensor(float(nb), device=h.device),
                    exact.sum(),
                    (nll32 * tok_corr).sum(),
                    tok_corr.sum(),
                    (m32 * tok_corr).sum(),
                    corr.sum(),
                    (exact * corr).sum(),
                ]
            )
            maxes = nll32.max().reshape(1) if nll32.numel() else torch.zeros(1, device=h.device)
        return loss, sums, maxes

    @torch.no_grad()
    def predictions(self, batch: Seq2SeqBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(argmax == target [L] bool, target log-probability [L]) at the target rows, without [L, V] logits."""
        hidden = self.hidden_states(batch)
        h = self.final_norm(hidden.index_select(0, batch.target_index))
        _, nll, match = self.head_loss(h, batch.targets)
        return match, -nll

    # ---------------------------------------------------------------- rewards
    token_level = True  # its rewards are per token; fastrm.scoring asks for sequence scores (no import of this module)

    def sequence_scores(self, tokenizer, prompts, responses, *, max_tokens_per_batch: int = 16384):
        """[G][N] sequence scores of prompts' responses (see :func:`fastrm.seq2seq_rewards.score_groups`)."""
        from fastrm.seq2seq_rewards import score_groups

        return score_groups(self, tokenizer, prompts, responses, max_tokens_per_batch=max_tokens_per_batch)[0]

    def token_rewards(self, prompt, responses, tokenizer=None, **kwargs):
        """See :func:`fastrm.seq2seq_rewards.token_rewards`."""
        from fastrm.seq2seq_rewards import token_rewards

        return token_rewards(self, prompt, responses, tokenizer=tokenizer, **kwargs)


def _head_probe(lm) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Stock logits of a short seeded sequence (eager attention), for :meth:`Seq2SeqRewardModel._check_head`."""
    param = next(lm.parameters(), None)
    if param is None or param.device.type == "meta":
        return None, None
    vocab = lm.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(0)).to(param.device)
    was = lm.training
    lm.eval()
    with torch.no_grad():
        logits = lm(input_ids=ids[:-1].unsqueeze(0), use_cache=False).logits[0, -1:]
    lm.train(was)
    return ids, logits.float()
