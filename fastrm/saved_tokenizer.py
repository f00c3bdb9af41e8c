"""The tokenizer a checkpoint holds: checked on save to reload as it was trained, and loaded as it was written.

A reward is a function of token ids, so a checkpoint whose tokenizer reloads differently scores other inputs than
the ones it was trained on, silently. transformers 5.24 can do that: ``AutoTokenizer.from_pretrained(folder)``
picks the tokenizer class from the folder's ``config.json`` model type for some types, whatever
``tokenizer_config.json`` names (``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`` in
``transformers/models/auto/tokenization_auto.py``: for ``qwen2`` it builds a ``Qwen2Tokenizer``), and those
classes rebuild their pre-tokenizer from code, keeping only the vocabulary and merges of ``tokenizer.json``. A
qwen2-type model trained with the GPT-NeoX tokenizer then reloads with the Qwen pre-tokenizer (``"Hello\\n\\nworld"``
becomes ``[12092, 535, 10186]`` instead of ``[12092, 187, 187, 10186]``). No file a checkpoint can hold changes
that choice (the class is forced, and the pipeline is code, not data), so:

* :func:`check_reload`: reload a folder holding the tokenizer and the model's config exactly as a user would
  (stock ``AutoTokenizer.from_pretrained``, and fastrm's loader) and compare with the trained tokenizer on
  :func:`probe_texts` (token ids with and without special tokens, special-token ids, chat template); a difference is a
  :class:`TokenizerRoundTripError` that names the class transformers built, the model type, the first text that
  differs and both encodings.
* :func:`check_savable`: that check on a scratch folder, which ``RewardModel.save_pretrained`` runs before it
  writes anything and the trainer at construction, so that a run never trains for hours and then cannot save.
* :func:`load_folder_tokenizer`: how fastrm loads a saved tokenizer. A folder whose ``tokenizer_config.json``
  names the generic ``TokenizersBackend`` / ``PreTrainedTokenizerFast`` is loaded from its ``tokenizer.json`` as
  written (that class has no pipeline of its own to impose); anything else goes through ``AutoTokenizer``. So a
  checkpoint written before this check existed still reloads in fastrm with the tokenizer it was trained with.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

# What a tokenizer round trip is checked on: the whitespace and newline runs that pre-tokenizer regexes split
# differently (HH-RLHF's "\n\nHuman:" turns), leading/trailing/tab/CRLF whitespace, contractions in both cases,
# digit runs (Qwen's regex splits digits one by one), accents (composed and combining), CJK, emoji with
# modifiers, symbols, full-width forms and code. The special tokens of the tokenizer itself are added per check.
PROBE_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris, of course.",
    "Hello\n\nworld",
    "x\n\n\ny\n",
    "line one\r\nline two\r\n",
    "  two leading spaces",
    "trailing spaces   ",
    "tab\tseparated\t\tvalues",
    "many      spaces between",
    "don't I'll we've THEY'RE She'S",
    "1234567890 3.14159 1,000,000 2024-06-01",
    "héllo wörld ñandú ça straße",
    "e\u0301 a\u0308 combining marks",
    "中文字符 日本語のテキスト 한국어",
    "emoji 😀👍🏽 🇺🇸 ❤️",
    "math ∑ ∫ √ ≤ ≥ ≠ ∞",
    "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
    "def f(x):\n    return x ** 2  # square\n",
    '<html><body class="a">tag</body></html>',
    "",
)
_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
_CHECKED: set[str] = set()  # sha256 of scratch folders (config + tokenizer files) that passed check_reload


class TokenizerRoundTripError(ValueError):
    """A checkpoint's tokenizer would reload as another tokenizer; the message says why and what to do."""


def probe_texts(tokenizer: Any) -> list[str]:
    """:data:`PROBE_TEXTS` plus each special and added token of ``tokenizer`` alone and inside text."""
    specials = list(dict.fromkeys([*getattr(tokenizer, "all_special_tokens", []), *_added_tokens(tokenizer)]))
    return [*PROBE_TEXTS, *specials, *(f"a {t} b{t}\n{t}" for t in specials)]


def _added_tokens(tokenizer: Any) -> list[str]:
    try:
        return list(tokenizer.get_added_vocab())
    except (AttributeError, NotImplementedError):
        return []


def _encode(tokenizer: Any, texts: list[str], special: bool) -> list:
    """Token ids of each text; a text the tokenizer cannot encode (a WordLevel vocabulary without an unk token)
    gives its error message, which the reloaded tokenizer must reproduce too."""
    out: list = []
    for t in texts:
        try:
            out.append(list(tokenizer(t, add_special_tokens=special)["input_ids"]))
        except Exception as e:  # the tokenizers library raises plain Exception
            out.append(f"cannot encode: {e}")
    return out


def _fingerprint(tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """Everything scoring depends on, in comparable form."""
    return {
        "input_ids": _encode(tokenizer, texts, special=False),
        "input_ids with special tokens": _encode(tokenizer, texts, special=True),
        **{f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None) for name in ("eos", "bos", "pad")},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _saved_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def check_reload(tokenizer: Any, folder: str | os.PathLike, *, what: str = "the checkpoint") -> None:
    """Raise :class:`TokenizerRoundTripError` unless ``AutoTokenizer.from_pretrained(folder)`` (stock transformers,
    as any user loads it) and :func:`load_folder_tokenizer` (fastrm) both encode :func:`probe_texts` exactly as
    ``tokenizer`` does, with the same special-token ids and chat template.

    ``folder`` holds the saved tokenizer and the model's ``config.json`` (the model type decides which class
    transformers builds)."""
    import transformers
    from transformers import AutoTokenizer

    folder = Path(folder)
    texts = probe_texts(tokenizer)
    want = _fingerprint(tokenizer, texts)
    for loader, reloaded in (
        (f"transformers {transformers.__version__}'s AutoTokenizer", lambda: AutoTokenizer.from_pretrained(folder)),
        ("fastrm's loader", lambda: load_folder_tokenizer(folder)),
    ):
        got = _fingerprint(back := reloaded(), texts)
        diff = next((k for k in want if want[k] != got[k]), None)
        if diff is None:
            continue
        model_type, saved = _model_type(folder), _saved_class(folder)
        built, trained = type(back).__name__, type(tokenizer).__name__
        if diff.startswith("input_ids"):  # the shortest text that differs makes the shortest message
            i = min((i for i, (a, b) in enumerate(zip(want[diff], got[diff])) if a != b), key=lambda i: len(texts[i]))
            detail = f"encodes {texts[i]!r} as {got[diff][i]} where the trained {trained} gives {want[diff][i]}"
            if diff != "input_ids":
                detail += f" ({diff})"
        else:
            detail = f"has {diff} {got[diff]!r} where the trained {trained} has {want[diff]!r}"
        if built.removesuffix("Fast") != (saved or built).removesuffix("Fast"):
            raise TokenizerRoundTripError(
                f"the tokenizer would not reload as trained: {loader} builds a {built} for a model_type "
                f"{model_type!r} checkpoint whatever tokenizer_config.json names (here {saved}), and it {detail}. "
                f"No saved file changes that choice: train this {model_type} model with a tokenizer that {built} "
                "reproduces (its pretrained tokenizer), or use a model type whose tokenizer transformers loads as "
                "saved (llama, mistral, gpt_neox, ...)"
            )
        raise TokenizerRoundTripError(
            f"the tokenizer would not reload as trained: {loader} loads {what} (model_type {model_type!r}) as a "
            f"{built} that {detail}; save the tokenizer in a form that reloads as itself (tokenizer.save_pretrained "
            "then AutoTokenizer.from_pretrained should encode the same), or train with one that does"
        )


def check_savable(tokenizer: Any, config: Any) -> None:
    """:func:`check_reload` on a scratch folder holding ``config`` (the backbone's transformers config) and
    ``tokenizer`` as a checkpoint saves them (:func:`fastrm.backbones.set_checkpoint_token_ids`).

    ``RewardModel.save_pretrained`` calls it before writing anything, and the trainer at construction, so a run
    never trains for hours and then cannot save. About a second for a 50k-token vocabulary."""
    from fastrm import backbones

    cfg = copy.deepcopy(config)
    with warnings.catch_warnings():  # save_pretrained itself warns about a null pad id, once
        warnings.simplefilter("ignore")
        tok = backbones.set_checkpoint_token_ids(cfg, tokenizer)
    with tempfile.TemporaryDirectory(prefix="fastrm-tokcheck-") as tmp:
        cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # The same files reload the same way: a folder already checked (every checkpoint of a run) is not reloaded.
        key = hashlib.sha256(type(tok).__name__.encode())
        for f in sorted(Path(tmp).iterdir()):
            key.update(f.name.encode() + b"\0" + f.read_bytes())
        if key.hexdigest() in _CHECKED:
            return
        check_reload(tok, tmp, what="a checkpoint of this model")
        _CHECKED.add(key.hexdigest())


def load_folder_tokenizer(folder: str | os.PathLike) -> Any:
    """The tokenizer saved in ``folder``, as it was written (see the module docstring)."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    folder = Path(folder)
    if _saved_class(folder) in _GENERIC_CLASSES and (folder / "tokenizer.json").is_file():
        return TokenizersBackend.from_pretrained(str(folder), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
