"""The model a TRL script hands the drop-in -> a :class:`~fastrm.RewardModel` that trains it in place, or a refusal
before any training step.

Accepted, and each one trains, saves and reloads (``tests/test_trl_models.py``):

* a path or preset name, loaded through :mod:`fastrm.loading` with TRL's ``model_init_kwargs`` honoured where
  they apply (:func:`init_kwargs`: ``dtype``, ``attn_implementation``, ``revision``, ``trust_remote_code``, ...);
* a ``*ForSequenceClassification`` model with ``num_labels=1`` whose ``score`` is ``nn.Linear(H, 1, bias=False)``
  (what transformers builds), or PEFT's ``ModulesToSaveWrapper`` around one (``modules_to_save=["score"]``): that
  very head is trained, so the object the user holds is the trained reward model;
* a causal LM: its backbone is trained under a new score head, with a warning saying where the reward model is
  (``trainer.model``: the sequence-classification model sharing that backbone);
* a :class:`fastrm.RewardModel`.

Refused at construction, naming the module and what to pass instead, because fastrm could not train it exactly or
could not save what it trained: PEFT adapter layers (LoRA, ...) and ``PeftModel`` wrappers (pass the plain model
and ``peft_config`` instead: fastrm injects the adapters itself), quantized weights, a head that is not a bias-free
``Linear`` (or several active PEFT copies of one), and any model whose weights have no place in an HF
sequence-classification checkpoint (:func:`check_saveable`).
"""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from fastrm import attention
from fastrm.loading import hub_allowed, is_pretrained, load_model
from fastrm.lora import LoraError, check_peft_config, tuner_layers
from fastrm.model import RewardModel

# model_init_kwargs handed to from_pretrained unchanged when weights are loaded from a folder or file.
PASSED_TO_FROM_PRETRAINED = ("trust_remote_code", "use_safetensors", "variant", "low_cpu_mem_usage")
# model_init_kwargs that change nothing fastrm computes.
NO_EFFECT = {"use_cache": "fastrm never runs a KV cache"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PEFT_HINT = (
    "fastrm injects LoRA adapters itself (so it saves and resumes them): pass the model without adapters and "
    "peft_config=LoraConfig(...), or merge the adapters into the weights first (PeftModel.merge_and_unload())"
)


class Forms:
    """Switches a RewardModel built around a Hugging Face model between fastrm's form (final norm lifted out of
    the backbone, packed attention) and HF's (norm back in place, the model's own attention), so the HF model the
    user holds keeps working between train() and evaluate() calls. Re-entrant."""

    def __init__(self, rm: RewardModel, hf_attn: str):
        self.rm, self.hf_attn, self.depth = rm, hf_attn, 0
        self._set(fastrm_form=False)

    def _set(self, fastrm_form: bool) -> None:
        backbone = self.rm.backbone
        if self.rm.norm_name is not None:
            setattr(backbone, self.rm.norm_name, nn.Identity() if fastrm_form else self.rm.final_norm)
        backbone.set_attn_implementation(attention.ATTN_NAME if fastrm_form else self.hf_attn)

    @contextmanager
    def fastrm(self) -> Iterator[None]:
        if self.depth == 0:
            self._set(fastrm_form=True)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self._set(fastrm_form=False)


def _hf_attn(backbone: nn.Module) -> str:
    impl = getattr(backbone.config, "_attn_implementation", None)
    return "sdpa" if impl in (None, attention.ATTN_NAME) else impl


def _dtype(value: Any) -> torch.dtype | str | None:
    """TRL's dtype rule (``trl.trainer.utils.create_model_from_path``): a torch.dtype, a name, "auto" or None."""
    if isinstance(value, torch.dtype) or value in ("auto", None):
        return value
    if value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"model_init_kwargs dtype={value!r}: expected 'auto', 'bfloat16', 'float32' or a torch.dtype")


def init_kwargs(spec: Any, kwargs: dict | None, trust_remote_code: bool) -> tuple[dict, torch.dtype | None, str]:
    """TRL's ``model_init_kwargs`` for the model path ``spec`` -> (keyword arguments for
    :func:`fastrm.load_model`, the dtype to cast a randomly initialised model to, the attention of the HF form).

    ``dtype`` loads the weights in that dtype, as TRL does (default float32; "auto" keeps the checkpoint's);
    ``attn_implementation`` is the attention ``trainer.model`` runs between calls (training always runs fastrm's
    packed attention, which gives the same numbers); ``revision`` applies to hub models only (with
    FASTRM_ALLOW_HUB=1), so a local folder accepts only the default "main"; ``trust_remote_code``, ``use_safetensors``,
    ``variant`` and ``low_cpu_mem_usage`` go to ``from_pretrained``. Anything else, and float16 weights, is refused.
    """
    kw = dict(kwargs or {})
    kw.setdefault("trust_remote_code", trust_remote_code)  # as TRL does
    errors = []
    if "dtype" in kw and "torch_dtype" in kw:
        errors.append("both dtype and torch_dtype (give one)")
    try:
        dtype = _dtype(kw.pop("dtype", kw.pop("torch_dtype", "float32")))
    except ValueError as e:
        errors.append(str(e).removeprefix("model_init_kwargs "))
        dtype = None
    if dtype == torch.float16:
        errors.append("dtype=float16 (fastrm trains float32 or bfloat16 weights: fp16 weights need loss scaling)")
    attn = kw.pop("attn_implementation", None) or "sdpa"  # transformers' default when none is named
    from_weights = is_pretrained(spec)
    local = isinstance(spec, (str, os.PathLike)) and Path(spec).exists()
    from_hub = isinstance(spec, str) and not local and hub_allowed()
    revision = kw.pop("revision", None)
    if revision not in (None, "main") and not from_hub:
        errors.append(
            f"revision={revision!r} (the model is {'the local path' if local else 'the preset'} {str(spec)!r}; "
            "fastrm loads hub revisions only with FASTRM_ALLOW_HUB=1: check that revision out locally)"
        )
    if kw.pop("num_labels", 1) != 1:
        errors.append("num_labels (a reward model has num_labels=1)")
    if kw.pop("device_map", None) is not None:
        errors.append("device_map (fastrm places the model itself: one device per process, use_cpu=True for CPU)")
    if kw.pop("quantization_config", None) is not None:
        errors.append("quantization_config (fastrm trains full-precision weights)")
    for key in NO_EFFECT:
        kw.pop(key, None)
    passed = {k: kw.pop(k) for k in PASSED_TO_FROM_PRETRAINED if k in kw}
    errors += [f"{k}={v!r} (not implemented)" for k, v in kw.items()]
    if errors:
        raise ValueError("fastrm's RewardTrainer cannot honour these model_init_kwargs: " + "; ".join(errors))
    load_kwargs: dict[str, Any] = {}
    if from_weights or from_hub:  # weights are read: from_pretrained takes the dtype and the rest
        load_kwargs = {**passed, "dtype": dtype} if dtype is not None else dict(passed)
        if from_hub and revision is not None:
            load_kwargs["revision"] = revision
        return load_kwargs, None, attn
    return load_kwargs, dtype if isinstance(dtype, torch.dtype) else None, attn  # random init: cast after building


def _refuse_peft_and_quantization(model: nn.Module) -> None:
    try:
        from peft import PeftModel
    except ImportError:
        PeftModel = ()  # noqa: N806 - no PEFT model can exist without peft
    if isinstance(model, PeftModel):
        raise ValueError(f"model is a {type(model).__name__} (PEFT adapters): {_PEFT_HINT}")
    adapters = [(n, m) for n, m in tuner_layers(model) if n != "score"]  # a wrapped head is adopted (_head)
    if adapters:
        name, m = adapters[0]
        raise ValueError(
            f"model.{name} is a PEFT {type(m).__module__.split('.')[-2]} {type(m).__name__} ({len(adapters)} PEFT "
            f"modules in all): {_PEFT_HINT}"
        )
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError("model has quantized weights: fastrm trains full-precision weights; load it unquantized")


def _head(model: PreTrainedModel) -> nn.Linear:
    """The score head of a sequence-classification model, as the module its forward uses: the ``Linear`` itself,
    or the active copy inside PEFT's ``ModulesToSaveWrapper``. Refuses any head fastrm cannot train exactly."""
    head, where = model.score, "model.score"
    try:
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        ModulesToSaveWrapper = ()  # noqa: N806
    if isinstance(head, ModulesToSaveWrapper):  # the module its forward runs (peft.utils.other.forward)
        active = list(head.active_adapters)
        if head.disable_adapters or any(a not in head.modules_to_save for a in active):
            head, where = head.original_module, "model.score.original_module"
        elif len(active) != 1:
            raise ValueError(
                f"model.score is a PEFT ModulesToSaveWrapper with {len(active)} active adapters {active}: fastrm "
                "trains the one head the model scores with; activate one (model.score.set_adapter(name))"
            )
        else:
            head, where = head.modules_to_save[active[0]], f"model.score.modules_to_save.{active[0]}"
    if type(head) is not nn.Linear:
        raise ValueError(
            f"{where} is a {type(head).__name__}, not the nn.Linear(hidden, 1, bias=False) head of a transformers "
            "*ForSequenceClassification model: fastrm trains that head only. Pass a model whose score is such a "
            "Linear, or pass the causal LM (or its path) to train a new head"
        )
    if head.bias is not None:
        raise ValueError(
            f"{where} has a bias: transformers' sequence-classification heads have none, so the trained model could "
            "not be saved as one. Pass a head built with nn.Linear(hidden, 1, bias=False)"
        )
    return head


def seq_cls_view(rm: RewardModel) -> PreTrainedModel:
    """An ``AutoModelForSequenceClassification`` that shares ``rm``'s backbone, head and config (built on the meta
    device, so no weights are allocated), for callers that expect TRL's ``trainer.model``."""
    from transformers import AutoModelForSequenceClassification

    rm.backbone.config.num_labels = 1  # the view shares this config; a reward model has one label
    cfg = copy.deepcopy(rm.backbone.config)
    with torch.device("meta"):
        hf = AutoModelForSequenceClassification.from_config(cfg)
    setattr(hf, hf.base_model_prefix, rm.backbone)
    hf.score = rm.score
    hf.config = rm.backbone.config
    return hf


def check_saveable(rm: RewardModel) -> None:
    """Raise now if :meth:`RewardModel.save_pretrained` would fail after training: the model's weights must be
    exactly those of the HF sequence-classification model its config builds (compared on the meta device)."""
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(rm.backbone.config)
    cfg.num_labels = 1
    try:
        with torch.device("meta"):
            hf = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    except Exception as e:  # transformers raises ValueError/KeyError for configs without such a class
        raise ValueError(
            f"fastrm saves reward models as transformers sequence-classification checkpoints, and transformers "
            f"builds none for this {type(rm.backbone).__name__} config ({type(e).__name__}: {e})"
        ) from None
    expected, got = set(hf.state_dict()), set(rm.hf_key_map().values())
    if expected != got:
        extra, missing = sorted(got - expected), sorted(expected - got)
        raise ValueError(
            f"the model could not be saved after training: its weights do not match {type(hf).__name__}'s "
            f"checkpoint (unexpected: {extra[:4]}{' ...' if len(extra) > 4 else ''}; missing: {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}). Pass a plain transformers model or its path"
        )


def reward_model(model: Any, tokenizer: Any, args: Any) -> tuple[RewardModel, PreTrainedModel, str]:
    """(fastrm model, the HF sequence-classification model sharing its weights, the HF attention to restore) for
    any model the drop-in accepts (module docstring); refusals raise ``ValueError``/``TypeError`` before training."""
    hf = None
    if isinstance(model, (str, os.PathLike)):
        load_kwargs, cast, hf_attn = init_kwargs(model, args.model_init_kwargs, args.trust_remote_code)
        rm = load_model(model, tokenizer=tokenizer, **load_kwargs)
        if cast is not None:
            rm.to(cast)
    else:
        if args.model_init_kwargs is not None:  # TRL's rule for a model that is already built
            warnings.warn("model_init_kwargs are ignored: the model is already instantiated", stacklevel=3)
        rm, hf, hf_attn = _from_object(model)
    check_saveable(rm)
    rm.tokenizer = tokenizer
    return rm, hf if hf is not None else seq_cls_view(rm), hf_attn


def _from_object(model: Any) -> tuple[RewardModel, PreTrainedModel | None, str]:
    """An instantiated model -> (fastrm model, the user's model when it is the reward model, its HF attention)."""
    if isinstance(model, nn.Module):
        _refuse_peft_and_quantization(model)
    if isinstance(model, RewardModel):
        if type(model.score) is not nn.Linear or model.score.bias is not None:
            raise ValueError(
                f"the RewardModel's score head is a {type(model.score).__name__}"
                f"{' with a bias' if isinstance(model.score, nn.Linear) else ''}: fastrm saves nn.Linear(hidden, 1, "
                "bias=False) heads only (as transformers' sequence-classification checkpoints hold them)"
            )
        return model, None, "sdpa"
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(model, PreTrainedModel) or not isinstance(backbone, nn.Module):
        raise TypeError(
            "model must be a transformers *ForSequenceClassification or causal-LM model, a path or a "
            f"fastrm.RewardModel, got {type(model).__name__}"
        )
    hf_attn = _hf_attn(backbone)
    if getattr(model, "score", None) is None and (hasattr(model, "lm_head") or type(model).__name__.endswith("LM")):
        # a causal LM: a new head, and the user is told where it is
        rm = RewardModel(backbone)
        warnings.warn(
            f"model is a {type(model).__name__}: fastrm trains its backbone under a new score head. The reward "
            "model is trainer.model (a sequence-classification model sharing that backbone), which save_model() "
            "writes; the object passed in has no reward head",
            stacklevel=4,
        )
        return rm, None, hf_attn
    if getattr(model, "score", None) is None or not type(model).__name__.endswith("ForSequenceClassification"):
        raise ValueError(
            f"model is a {type(model).__name__}: pass a *ForSequenceClassification model (num_labels=1), a causal "
            "LM or a path"
        )
    if getattr(model.config, "num_labels", None) != 1:
        raise ValueError(
            f"the model has num_labels={model.config.num_labels}; a reward model has num_labels=1 (one score per "
            "sequence): load it with num_labels=1, or pass its path"
        )
    rm = RewardModel(backbone, _head(model))
    src = getattr(model.config, "_name_or_path", "")  # a LoRA base is recorded as the folder it was loaded from
    rm.source_dir = Path(src).absolute() if src and Path(src, "config.json").is_file() else None
    return rm, model, hf_attn


def fields_from_peft_config(config: Any, model: Any, *, disable_dropout: bool = False) -> dict[str, Any]:
    """TRL's ``peft_config`` (a ``peft.LoraConfig``) -> the RewardConfig LoRA fields that train what stock TRL +
    PEFT train from it: unset ``target_modules`` are PEFT's default for the model type, ``disable_dropout`` (TRL's,
    on by default) zeroes the adapters' dropout as TRL does. Anything else is refused, naming the field."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    check_peft_config(config, "peft_config")
    task = getattr(config.task_type, "value", config.task_type)
    saved = set(config.modules_to_save or [])
    why = None
    if task not in (None, "SEQ_CLS"):
        why = f"field 'task_type'={task!r}: a reward model is SEQ_CLS"
    elif task is None and "score" not in saved:
        why = (
            f"field 'modules_to_save'={config.modules_to_save!r}: with task_type=None PEFT leaves the score head "
            "frozen, and fastrm trains it fully: set task_type='SEQ_CLS' or modules_to_save=['score']"
        )
    elif saved - {"score", "classifier"}:
        why = f"field 'modules_to_save'={sorted(saved)!r}: fastrm trains the score head fully and no other module"
    elif config.inference_mode:
        why = "field 'inference_mode'=True: PEFT would freeze the adapters"
    targets = config.target_modules
    if why is None and targets is None:
        model_type = model.backbone.config.model_type
        if model_type not in DEFAULTS:
            why = f"field 'target_modules' is unset and PEFT has no default for model_type {model_type!r}: name them"
        targets = list(DEFAULTS.get(model_type, []))
    elif why is None and isinstance(targets, str):
        if targets != "all-linear":
            why = f"field 'target_modules'={targets!r} is a regex: fastrm takes module names (a list) or 'all-linear'"
        elif task != "SEQ_CLS":
            why = "field 'target_modules'='all-linear' without task_type='SEQ_CLS' would adapt the score head too"
        targets = [targets]
    if why is not None:
        raise LoraError(f"peft_config: {why}")
    return {
        "lora_r": int(config.r),
        "lora_alpha": float(config.lora_alpha),
        "lora_dropout": 0.0 if disable_dropout else float(config.lora_dropout),
        "lora_target_modules": sorted(targets),
    }
