"""LoRA reward models: PEFT adapters in the backbone, the score head trained fully, adapter folders stock PEFT loads.

``lora_r > 0`` (:class:`fastrm.RewardConfig`) injects PEFT's own LoRA layers (``peft.LoraModel``) into
``RewardModel.backbone`` in place, so the packed path (varlen and shared-prompt packing, the fused head, gradient
checkpointing, step-wide mu_B) runs unchanged; every base weight (the lifted-out final norm included) is frozen and
the ``score`` head is trained fully. Nothing of LoRA is written here by hand: the layers, their dropout and the merge
arithmetic are PEFT's.

A seq2seq RM (fastrm/seq2seq_model.py) takes the same adapters in its causal LM and trains nothing else (its LM head
and final norm frozen); its adapter folder is PEFT's ``CAUSAL_LM`` one, loaded onto
``AutoModelForCausalLM.from_pretrained(BASE)``, with the base always written to ``output_dir/lora_base``.

An adapter folder (:func:`save_adapter`, what ``save_pretrained`` of such a model writes) is what
``PeftModel.save_pretrained`` writes for a sequence-classification model, so stock transformers + PEFT load it::

    base = AutoModelForSequenceClassification.from_pretrained(BASE)  # adapter_config.json's base_model_name_or_path
    model = PeftModel.from_pretrained(base, ADAPTER)  # the same rewards as fastrm's, padded batches too

    adapter_config.json         peft.LoraConfig (task_type SEQ_CLS, modules_to_save ["score"]), the base as a path
    adapter_model.safetensors   the adapters and the score head, under PEFT's keys
    fastrm_adapter.json         the base folder and the sha256 of its config.json (a different base is refused)
    tokenizer files

The base is always a local folder that ``AutoModelForSequenceClassification`` loads and that pools the token fastrm
pools (its pad id is the saved tokenizer's, not the EOS): the folder the model was loaded from when it is such a
folder, else ``output_dir/lora_base`` written at the first save (a random-init preset, a GGUF file, or a folder whose
config pads with the EOS: then ``config.json`` with fastrm's token ids and links to that folder's weight files).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastrm import backbones, saved_tokenizer
from fastrm import checkpoint as ckpt_io

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECORD = "fastrm_adapter.json"
BASE_DIR = "lora_base"  # in output_dir: the base model when the one trained on is not a reusable folder
MERGED_DIR = "merged"  # in output_dir with merge_lora: the adapters merged into the base, a plain HF folder
ADAPTER = "default"  # PEFT's adapter name
# Linear layers in decoder blocks that are MoE routers, not projections: never given adapters by default.
ROUTERS = ("gate", "router", "shared_expert_gate")
# Config keys that do not change the model: left out of the base's config hash.
_VOLATILE = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_attn_implementation")
_VOLATILE += ("attn_implementation", "num_labels", "id2label", "label2id", "problem_type")
# peft.LoraConfig fields fastrm honours; metadata fields that change nothing trained; every other field must be
# left at PEFT's default (fastrm would not train it exactly).
HONOURED = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "modules_to_save", "fan_in_fan_out")
METADATA = ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode")
METADATA += ("megatron_core", "runtime_config", "qalora_group_size")


class LoraError(ValueError):
    """A LoRA setting or adapter folder fastrm cannot use; one line naming the field or the file."""


def _peft():
    try:
        import peft
    except ImportError as e:
        raise LoraError("LoRA (lora_r > 0, adapter folders) needs PEFT: pip install 'fastrm[lora]'") from e
    return peft


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """The LoRA fields of a :class:`fastrm.RewardConfig`."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | None  # None: the attention and MLP projections of every decoder layer

    @classmethod
    def from_config(cls, args: Any) -> LoraSettings | None:
        if not args.lora_r:
            return None
        targets = tuple(args.lora_target_modules) if args.lora_target_modules else None
        return cls(int(args.lora_r), float(args.lora_alpha), float(args.lora_dropout), targets)

    def fields(self) -> dict[str, Any]:
        targets = list(self.target_modules) if self.target_modules is not None else None
        return {
            "lora_r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "lora_target_modules": targets,
        }


@dataclasses.dataclass
class BaseModelRef:
    """Where the adapters' base model is: ``folder`` (absolute; written at the first save when missing, from the
    model's own weights, or as ``config.json`` plus links to ``source``'s weight files)."""

    folder: Path
    source: Path | None = None


@dataclasses.dataclass
class LoraState:
    """``RewardModel.lora`` of a model with adapters (a plain object, not a module: no weights of its own)."""

    settings: LoraSettings
    config: Any  # the peft.LoraConfig injected, target_modules resolved
    base: BaseModelRef | None = None


# ----------------------------------------------------------------------------------------------- adapters in


def tuner_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every PEFT layer or wrapper inside ``module`` (none without peft installed)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:
        return []
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


def refuse_foreign_adapters(model: nn.Module) -> None:
    """Refuse PEFT layers fastrm did not inject (``peft.inject_adapter_in_model`` on the model, a wrapped head):
    fastrm could not say which settings they were made with, so it could neither save nor resume them."""
    if getattr(model, "lora", None) is not None:
        return
    found = tuner_layers(model)
    if found:
        name, m = found[0]
        raise LoraError(
            f"model.{name} is a PEFT {type(m).__name__} injected in place ({len(found)} PEFT modules in all): fastrm "
            "injects adapters itself, so it saves and resumes them. Pass the model without adapters and set lora_r "
            "(lora_alpha, lora_dropout, lora_target_modules; TRL drop-in: peft_config=LoraConfig(...)), or merge "
            "them into the weights first"
        )


def _is_linear(m: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, (nn.Linear, Conv1D))


def _layers_path(model: Any) -> str:
    """The backbone-relative name of the ModuleList holding the decoder blocks (``layers``, ``h``, ...)."""
    first = model.decoder_layers()[0]
    for name, m in model.backbone.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and m[0] is first:
            return name
    raise LoraError(f"cannot find the decoder layers of {type(model.backbone).__name__}")


def default_target_modules(model: Any) -> str:
    """PEFT's regex for the attention and MLP projections (Linear / Conv1D, MoE routers left out) of every decoder
    layer, and nothing outside them (a vision tower's projections are not targeted). It matches the names inside
    the backbone and inside the HF sequence-classification model (``model.layers.0.self_attn.q_proj``)."""
    names = set()
    for layer in model.decoder_layers():
        names |= {n for n, m in layer.named_modules() if _is_linear(m) and n.rsplit(".", 1)[-1] not in ROUTERS}
    names -= set(remapped_by_peft(model, sorted(names)))  # MoE: PEFT would move them onto the fused experts
    if not names:
        raise LoraError(
            f"field 'lora_target_modules': the decoder layers of {type(model.backbone).__name__} hold no Linear "
            "projections to adapt; name the modules"
        )
    prefix = getattr(model.backbone, "base_model_prefix", "model")
    inner = "|".join(re.escape(n) for n in sorted(names))
    return rf"(?:{re.escape(prefix)}\.)?{re.escape(_layers_path(model))}\.\d+\.(?:{inner})"


def remapped_by_peft(model: Any, targets: list[str]) -> list[str]:
    """The names PEFT (>= 0.19 on transformers 5) would not adapt as modules but map onto the fused expert weights of
    an MoE backbone (DeepSeek-V3, Qwen3-MoE, ...: ``gate_proj`` -> ``experts.gate_up_proj`` as target_parameters),
    which fastrm does not train: a shared expert's or a dense layer's ``gate_proj`` is remapped all the same."""
    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # an older PEFT or transformers 4: nothing is remapped
        return []
    conversions = get_model_conversion_mapping(model.backbone)
    out = []
    for t in targets:
        probe = _peft().LoraConfig(target_modules=[t])
        try:
            convert_peft_config_for_transformers(probe, model=model.backbone, conversions=conversions)
        except ValueError:  # "cannot convert gate_proj without up_proj (fused)": remapped too
            out.append(t)
            continue
        if probe.target_parameters:
            out.append(t)
    return out


def _task(model: Any) -> tuple[str, list[str] | None]:
    """(PEFT task type, modules_to_save): the scalar RM's score head is trained fully (SEQ_CLS); a seq2seq RM
    (a causal LM, fastrm/seq2seq_model.py) trains nothing but the adapters (CAUSAL_LM, its LM head frozen)."""
    return ("CAUSAL_LM", None) if getattr(model, "token_level", False) else ("SEQ_CLS", ["score"])


def lora_config(model: Any, settings: LoraSettings) -> Any:
    """The ``peft.LoraConfig`` of ``settings`` for this model (task SEQ_CLS with the head in ``modules_to_save``, or
    CAUSAL_LM for a seq2seq RM: :func:`_task`)."""
    peft = _peft()
    from peft.tuners.tuners_utils import check_target_module_exists

    if settings.target_modules is None:
        targets: Any = default_target_modules(model)
    elif list(settings.target_modules) == ["all-linear"]:
        targets = "all-linear"
    else:
        targets = list(settings.target_modules)
        if "score" in targets and _task(model)[1]:
            raise LoraError("field 'lora_target_modules': 'score' is the reward head, which is trained fully")
        names = [n for n, _ in model.backbone.named_modules()]
        for t in targets:
            one = peft.LoraConfig(target_modules=[t])
            if not any(check_target_module_exists(one, n) for n in names):
                raise LoraError(
                    f"field 'lora_target_modules': {t!r} matches no module of the {type(model.backbone).__name__} "
                    f"backbone (its projections: {', '.join(sorted(_leaf_linear_names(model))[:12])})"
                )
        moved = remapped_by_peft(model, targets)
        if moved:
            raise LoraError(
                f"field 'lora_target_modules': PEFT maps {moved} onto the fused expert weights of this "
                f"{model.backbone.config.model_type} model (target_parameters), which fastrm does not train: leave "
                "them out (the default adapts the attention projections of such models)"
            )
    alpha = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    task, to_save = _task(model)
    return peft.LoraConfig(
        task_type=task,
        r=settings.r,
        lora_alpha=alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=to_save,
        fan_in_fan_out=_conv1d_targets(model, targets),
    )


def _leaf_linear_names(model: Any) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.backbone.named_modules() if _is_linear(m)}


def _conv1d_targets(model: Any, targets: Any) -> bool:
    """GPT-2-style Conv1D weights are stored transposed: PEFT needs fan_in_fan_out=True for them (it would set it
    itself, with a warning). All targets are one kind in every supported family."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    probe = _peft().LoraConfig(target_modules=targets)
    if targets == "all-linear":
        return any(isinstance(m, Conv1D) for m in model.backbone.modules())
    return any(
        isinstance(m, Conv1D) and check_target_module_exists(probe, n) for n, m in model.backbone.named_modules()
    )


def apply(model: Any, settings: LoraSettings, *, seed: int) -> None:
    """Inject PEFT LoRA layers into ``model.backbone`` in place, freeze every base weight, keep the head trainable.

    The adapters' initialisation (PEFT's: A Kaiming-uniform, B zero) draws from the CPU generator seeded with
    ``seed``: the state ``transformers.set_seed(seed)`` leaves, so it equals stock TRL + PEFT's for the same seed."""
    peft = _peft()
    refuse_foreign_adapters(model)
    cfg = lora_config(model, settings)
    with torch.random.fork_rng(devices=[]):  # PEFT builds and initialises the adapters on the CPU
        torch.manual_seed(seed)
        try:
            tuner = peft.LoraModel(model.backbone, cfg, ADAPTER)
        except ValueError as e:  # no module matched, or a matched module PEFT cannot adapt
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise LoraError(f"field 'lora_target_modules': {first}") from None
    resolved = copy.deepcopy(tuner.peft_config[ADAPTER])  # target_modules expanded (all-linear)
    resolved.task_type, resolved.modules_to_save = _task(model)
    resolved.target_parameters = resolved.target_parameters or None  # PEFT's MoE conversion leaves an empty set
    model.lora = LoraState(settings, resolved)
    freeze_base(model)


def freeze_base(model: nn.Module) -> None:
    """Only the adapters (PEFT's ``lora_`` parameters) and the score head train (a seq2seq RM has none: its LM head
    and final norm stay frozen)."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith("score."))


def prepare(model: Any, args: Any, tokenizer: Any = None) -> None:
    """The trainer's hook: give ``model`` the adapters ``args`` asks for (or check the ones it has), before it is
    moved, wrapped or optimised. Refuses PEFT layers fastrm did not inject, and settings that differ from the
    model's adapters (``lora_target_modules`` unset: the model's own). Decides where the base model will be recorded
    (``args.output_dir``)."""
    refuse_foreign_adapters(model)
    want = LoraSettings.from_config(args)
    if model.lora is None:
        if want is not None:
            apply(model, want, seed=args.seed)
    else:
        have = model.lora.settings
        if want is not None and want.target_modules is None:
            want = dataclasses.replace(want, target_modules=have.target_modules)
        got = want.fields() if want is not None else {**have.fields(), "lora_r": 0}
        diffs = [
            f"{k}: the model's {v!r}, the config's {got[k]!r}" for k, v in have.fields().items() if not _same(got[k], v)
        ]
        if diffs:
            raise LoraError(
                f"field '{diffs[0].split(':')[0]}': the model carries LoRA adapters ({'; '.join(diffs)}): train them "
                "with the same settings, or merge them first (fastrm merge-lora) and train the merged model"
            )
        freeze_base(model)
    if model.lora is not None and model.lora.base is None:
        model.lora.base = base_for(model, Path(args.output_dir), tokenizer)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return sorted(a) == sorted(b)
    return a == b


# ----------------------------------------------------------------------------------------------- the base model


def config_sha256(config_file: str | os.PathLike) -> str:
    """sha256 of a config.json without the keys that do not change the model (paths, versions, dtype, labels)."""
    cfg = json.loads(Path(config_file).read_text(encoding="utf-8"))
    for part in [cfg, *(v for v in cfg.values() if isinstance(v, dict))]:
        for k in _VOLATILE:
            part.pop(k, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def _saved_config(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """(the config a checkpoint of ``model`` holds, the tokenizer it saves): fastrm's token ids."""
    import warnings

    cfg = copy.deepcopy(model.backbone.config)
    cfg.num_labels = 1
    with warnings.catch_warnings():  # the save itself warns about a null pad id, once
        warnings.simplefilter("ignore")
        tok = backbones.set_checkpoint_token_ids(cfg, tokenizer if tokenizer is not None else model.tokenizer)
    return cfg, tok


def _token_ids(cfg: dict) -> tuple:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    return tuple(text.get(k, cfg.get(k)) for k in ("pad_token_id", "eos_token_id", "bos_token_id"))


def base_for(model: Any, out_dir: Path, tokenizer: Any = None) -> BaseModelRef:
    """The folder the model was loaded from when transformers loads it and it pools as fastrm does; else
    ``out_dir/lora_base`` (written at the first save)."""
    src = getattr(model, "source_dir", None)
    target = (Path(out_dir) / BASE_DIR).absolute()
    if src is None or not Path(src, "config.json").is_file() or getattr(model, "token_level", False):
        return BaseModelRef(target)  # a seq2seq RM's base: its own causal-LM folder, written from its weights
    cfg, _ = _saved_config(model, tokenizer)
    on_disk = json.loads(Path(src, "config.json").read_text(encoding="utf-8"))
    if _token_ids(cfg.to_dict()) == _token_ids(on_disk):
        return BaseModelRef(Path(src).absolute(), Path(src).absolute())
    return BaseModelRef(target, Path(src).absolute())


def _weight_files(folder: Path) -> list[Path]:
    pats = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
    return sorted({p for pat in pats for p in folder.glob(pat)})


def ensure_base(model: Any, state_dict: dict, tokenizer: Any = None) -> Path:
    """The base folder of ``model.lora.base``, written now (atomically) when it does not exist yet."""
    ref = model.lora.base
    folder = ref.folder
    if Path(folder, "config.json").is_file():
        return folder
    if ref.source is None:  # from the model's own (frozen, so initial) weights
        base = {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if ".lora_" not in k}
        ckpt_io.write_atomically(folder, lambda tmp: model.save_plain(tmp, tokenizer=tokenizer, state_dict=base))
        return folder

    def link(tmp: Path) -> None:  # fastrm's token ids, the source's weights
        tmp.mkdir(parents=True)
        cfg, _ = _saved_config(model, tokenizer)
        cfg.save_pretrained(tmp)
        for f in _weight_files(ref.source):
            os.symlink(f, tmp / f.name)

    ckpt_io.write_atomically(folder, link)
    return folder


def read_record(folder: str | os.PathLike) -> dict:
    path = Path(folder, RECORD)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoraError(f"{path}: unreadable ({e})") from None


def resolve_base(adapter: str | os.PathLike, base: str | os.PathLike | None = None, allow_hub: bool = False) -> str:
    """The base model folder of an adapter folder: ``base`` when given, else the recorded one (or a ``lora_base``
    beside or above the adapter, for a moved run folder); a folder whose config differs from the recorded hash
    is refused, naming both files."""
    adapter = Path(adapter)
    record = read_record(adapter).get("base_model", {})
    named = json.loads(Path(adapter, ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if base is not None:
        candidates = [Path(base)]
    else:
        recorded = record.get("path") or named
        inside = [adapter / recorded] if recorded and not Path(recorded).is_absolute() else []  # embed_base's
        candidates = inside + [Path(p) for p in (recorded, adapter / BASE_DIR, adapter.parent / BASE_DIR) if p]
    found = next((c for c in candidates if Path(c, "config.json").is_file()), None)
    if found is None:
        if base is None and named and not record and allow_hub:
            return str(named)  # a stock PEFT adapter of a hub model, with FASTRM_ALLOW_HUB=1
        what = (
            f"--base {base}" if base is not None else f"its base model {str(candidates[0]) if candidates else None!r}"
        )
        raise LoraError(
            f"{adapter / (RECORD if record else ADAPTER_CONFIG)}: {what} is not a model folder (no config.json); "
            "pass the base model's folder (fastrm merge-lora --base, load_model(..., base=...))"
        )
    want = record.get("config_sha256")
    if want is not None and config_sha256(found / "config.json") != want:
        raise LoraError(
            f"{found / 'config.json'}: not the base model of the adapter {adapter} (its config's sha256 differs from "
            f"the one {adapter / RECORD} records, {want[:12]}...): pass the model the adapter was trained on"
        )
    return str(found)


# ----------------------------------------------------------------------------------------------- folders


def is_adapter_dir(spec: Any) -> bool:
    return isinstance(spec, (str, os.PathLike)) and Path(spec, ADAPTER_CONFIG).is_file()


def _peft_key(model: Any, key: str) -> str | None:
    """This model's state-dict key -> the key in adapter_model.safetensors, or None for weights it does not hold."""
    if key.startswith("score."):
        return "base_model.model." + key
    if key.startswith("backbone.") and ".lora_" in key:
        prefix = getattr(model.backbone, "base_model_prefix", "model")
        rest = re.sub(rf"\.{ADAPTER}(\.|$)", r"\1", key[len("backbone.") :])
        return f"base_model.model.{prefix}.{rest}"
    return None


def save_adapter(model: Any, out_dir: str | os.PathLike, tokenizer: Any = None, state_dict: dict | None = None) -> None:
    """Write the adapter folder of a LoRA ``model`` (module docstring): the one place adapter folders are written
    (``RewardModel.save_pretrained`` calls it; the trainer's checkpoints and final model, the TRL drop-in's
    ``save_model``). The base folder is written first when it does not exist yet. ``state_dict``: the model's full
    state to write instead of ``model.state_dict()`` (FSDP gathers it)."""
    from safetensors.torch import save_file

    if getattr(model, "score", None) is not None and model.score.bias is not None:
        raise ValueError("a head with a bias cannot be saved for AutoModelForSequenceClassification (no bias there)")
    out = Path(out_dir)
    cfg, tok = _saved_config(model, tokenizer)
    if tok is not None:  # refuses, before anything is written, a tokenizer that would reload as another one
        saved_tokenizer.check_savable(tok, cfg)
    own = state_dict if state_dict is not None else model.state_dict()
    if model.lora.base is None:
        model.lora.base = base_for(model, out, tokenizer)
    base = ensure_base(model, own, tokenizer)
    tensors = {pk: v.detach().contiguous() for k, v in own.items() if (pk := _peft_key(model, k)) is not None}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(model.lora.config)
    config.base_model_name_or_path = str(base)
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(out))
    from fastrm.version import __version__

    record = {"base_model": {"path": str(base), "config_sha256": config_sha256(base / "config.json")}}
    (out / RECORD).write_text(json.dumps({**record, "lora": model.lora.settings.fields(), "fastrm": __version__}))
    if tok is not None:
        tok.save_pretrained(out)


def embed_base(folder: str | os.PathLike, within: str | os.PathLike) -> bool:
    """When the adapter folder's recorded base lies under ``within`` (a folder about to disappear: a Ray worker's
    scratch), copy the base into ``folder/lora_base`` (through symlinks) and record it there, relative to the
    adapter folder, so the folder loads wherever it is uploaded or moved. Returns whether it did."""
    import shutil

    folder = Path(folder)
    rec = read_record(folder)
    src = Path(rec.get("base_model", {}).get("path", ""))
    if not src.is_absolute() or not src.resolve().is_relative_to(Path(within).resolve()):
        return False
    shutil.copytree(src, folder / BASE_DIR, symlinks=False)
    rec["base_model"]["path"] = BASE_DIR
    (folder / RECORD).write_text(json.dumps(rec))
    cfg_path = folder / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = BASE_DIR  # relative: PEFT users pass the base model themselves
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return True


def read_weights(model: Any, folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """This model's adapter and head tensors (its own state-dict keys) from an adapter folder."""
    from safetensors.torch import load_file

    path = Path(folder, ADAPTER_WEIGHTS)
    if not path.is_file():
        raise LoraError(f"{folder}: no {ADAPTER_WEIGHTS} (an adapter folder holds the adapters and the head)")
    saved = load_file(str(path))
    keys = {k: pk for k in model.state_dict() if (pk := _peft_key(model, k)) is not None}
    missing = sorted(pk for pk in keys.values() if pk not in saved)
    if missing:
        what = "the score head (train with modules_to_save=['score'])" if any(".score." in m for m in missing) else ""
        raise LoraError(f"{path}: lacks {what or missing[:3]} ({len(missing)} tensors missing)")
    return {k: saved[pk] for k, pk in keys.items()}


def check_peft_config(config: Any, where: str) -> None:
    """Refuse, naming the field, a ``peft.LoraConfig`` that uses anything fastrm does not honour exactly."""
    peft = _peft()
    if not isinstance(config, peft.LoraConfig):
        raise LoraError(f"{where}: a {type(config).__name__}; fastrm trains LoRA adapters only (peft.LoraConfig)")
    default = peft.LoraConfig()
    for f in dataclasses.fields(config):
        if f.name in HONOURED or f.name in METADATA:
            continue
        if getattr(config, f.name) != getattr(default, f.name):
            raise LoraError(
                f"{where}: field '{f.name}'={getattr(config, f.name)!r}: fastrm trains plain LoRA (r, lora_alpha, "
                f"lora_dropout, target_modules, modules_to_save=['score']); leave {f.name} at PEFT's default"
            )


def attach(model: Any, folder: str | os.PathLike, base: str | os.PathLike) -> None:
    """Load the adapter folder ``folder`` onto ``model`` (its base, just loaded from ``base``)."""
    peft = _peft()
    folder = Path(folder)
    config = peft.LoraConfig.from_pretrained(str(folder))
    check_peft_config(config, str(folder / ADAPTER_CONFIG))
    targets = config.target_modules
    targets = tuple(sorted(targets)) if isinstance(targets, (list, set, tuple)) else (targets,)
    settings = LoraSettings(config.r, float(config.lora_alpha), float(config.lora_dropout), targets)
    refuse_foreign_adapters(model)
    config.inference_mode = False
    with torch.random.fork_rng(devices=[]):
        peft.LoraModel(model.backbone, config, ADAPTER)
    model.lora = LoraState(settings, config, BaseModelRef(Path(base).absolute(), Path(base).absolute()))
    freeze_base(model)
    own = model.state_dict()
    with torch.no_grad():
        for k, v in read_weights(model, folder).items():
            own[k].copy_(v)
    from fastrm import formatting  # the adapter folder's own scoring record (written by save_pretrained) decides

    rule = formatting.read_rule(folder)
    if rule is not None:
        model.scoring_rule = rule


def describe(model: Any) -> str:
    """``r=8, alpha=16: 1,234 trainable parameters of 5,678 (21.7%)``."""
    n = sum(p.numel() for p in model.parameters())
    t = sum(p.numel() for p in model.parameters() if p.requires_grad)
    s = model.lora.settings
    return (
        f"r={s.r}, alpha={s.alpha:g}, dropout={s.dropout:g}: {t:,} trainable parameters of {n:,} ({100 * t / n:.2f}%)"
    )
