"""Merging LoRA adapters into their base: ``fastrm merge-lora ADAPTER OUT`` and ``fastrm train --merge-lora``.

The merged model is a plain HF sequence-classification folder (no PEFT needed to load it) with the rewards of the
adapter folder: each adapted weight is PEFT's merge of it (``base + get_delta_weight``, what ``merge_and_unload``
computes), the head is the trained one, the tokenizer and token ids are the adapter's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from fastrm import checkpoint as ckpt_io
from fastrm import lora


def merged_state(model: Any) -> dict[str, torch.Tensor]:
    """The state dict of a LoRA ``model`` without its adapters, as a plain RewardModel's keys."""
    deltas = {}
    for name, layer in lora.tuner_layers(model.backbone):
        if hasattr(layer, "get_delta_weight") and lora.ADAPTER in getattr(layer, "lora_A", {}):
            deltas[f"backbone.{name}.weight"] = layer.get_delta_weight(lora.ADAPTER)
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        out[plain] = value + deltas[plain].to(value.dtype) if plain in deltas else value
    return out


def write_merged(model: Any, out_dir: str | os.PathLike, tokenizer: Any = None, run_dir: Path | None = None) -> Path:
    """Write the merged model as a plain HF sequence-classification folder (atomically, free space checked first;
    a failure is one :class:`fastrm.checkpoint.SaveError` line)."""
    if model.lora is None:
        raise ValueError("the model has no LoRA adapters to merge")
    state = merged_state(model)
    return ckpt_io.save_guarded(
        Path(out_dir),
        lambda tmp: model.save_plain(tmp, tokenizer=tokenizer, state_dict=state),
        needed=ckpt_io.save_size(tokenizer, state),
        what="the merged model",
        run_dir=run_dir,
    )


def merge_adapter(adapter: str | os.PathLike, out_dir: str | os.PathLike, base: Any = None) -> Path:
    """Load an adapter folder (its recorded base, or ``base``) and write the merged model to ``out_dir``."""
    from fastrm.loading import load_model

    model = load_model(adapter, base=base)
    return write_merged(model, out_dir, model.tokenizer)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="fastrm merge-lora",
        description="Merge a LoRA adapter folder into its base model: a plain HF sequence-classification folder "
        "with the same rewards (transformers loads it without PEFT).",
    )
    p.add_argument("adapter", help="the adapter folder (adapter_config.json; a LoRA run's output_dir or checkpoint)")
    p.add_argument("out", help="the folder to write (refused if it holds files, unless --overwrite)")
    p.add_argument("--base", help="the base model's folder (default: the one the adapter records)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it already holds files")
    a = p.parse_args(argv)
    if not lora.is_adapter_dir(a.adapter):
        raise ValueError(f"{a.adapter}: not a LoRA adapter folder (no {lora.ADAPTER_CONFIG})")
    if Path(a.out).exists() and any(Path(a.out).iterdir()) and not a.overwrite:
        raise ValueError(f"{a.out} already holds files: pass --overwrite to replace it, or choose another folder")
    out = merge_adapter(a.adapter, a.out, base=a.base)
    print(f"merged {a.adapter} into its base -> {out} (AutoModelForSequenceClassification loads it)", file=sys.stderr)
    return 0
