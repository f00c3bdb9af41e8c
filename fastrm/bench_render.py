"""Benchmark renderings: the token ids a benchmark's reference script scores, as a named step of ``fastrm bench``.

``fastrm bench`` scores every benchmark with fastrm's own formatting by default (``--rendering default``: the
(prompt, response) tokenization of training and ``fastrm eval``, :mod:`fastrm.bench_data`), so bench = eval. A
benchmark's own convention is used only when asked for: ``--rendering rm-bench`` (alias ``rewardbench``) is the
rendering of RewardBench's ``scripts/run_rm.py`` (allenai/reward-bench), which RM-Bench's ``scripts/run_rm.py``
(THU-KEG/RM-Bench) copies and RewardBench 2's ``scripts/run_v2.py`` shares:

* **the conversation**: the prompt's turns (a message-list prompt, an HH-RLHF transcript's turns, or one user turn)
  with roles by position (user, assistant, user, ...; the reference ignores the given roles) and the response as
  the last, assistant turn; the prompt must end with a user turn;
* **with a chat template** (the tokenizer's, as the reference's ``check_tokenizer_chat_template``; or
  ``--chat-template FILE``): the template applied to the whole conversation, ``tokenize=False`` and no generation
  prompt, so whatever the template puts after the assistant turn (end-of-turn tokens) is part of the text;
* **without one** (or ``--chat-template none``): a named FastChat conversation template (:data:`CONV_TEMPLATES`,
  written out here as data; default ``tulu``, the reference's ``--chat_template`` default) renders the
  conversation, and the tokenizer's EOS is appended (the reference sets ``tokenizer.add_eos_token = True``);
* **tokens**: the text tokenized by the tokenizer's default call (special tokens on: a BOS where the tokenizer adds
  one, even if the template wrote one too), cut from the left to ``max_length`` (2048; ``truncation_side="left"``),
  the appended EOS kept;
* **where the reward is read**: the reference scores through a ``text-classification`` pipeline after setting the
  pad token to the EOS when the tokenizer has none and the model's ``pad_token_id`` to the tokenizer's when the
  config has none; transformers then reads the reward at the last token that is not that pad id. Trailing pad-id
  tokens are therefore dropped here (causal attention: they cannot change the reward at an earlier token), and the
  report counts the sequences where that moved the reward off the last token (a model whose pad is its EOS has its
  reward read before the appended EOS, exactly as the reference reads it).

A record's responses are then one shared-prompt group again: the shared prompt is the longest common run of
leading ids of its full sequences (each response keeps at least one token), so each score is that of the full
sequence alone. The FastChat templates were checked against ``fastchat/conversation.py`` (lm-sys/FastChat at
0e6d3e4, the ``get_prompt`` of each separator style below); no chat-serving package is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastrm.bench_data import BenchFile, BenchRecord, hh_messages
from fastrm.data import split_hh_transcript
from fastrm.rows import DataError, OnBadRow, RowError

RENDERINGS = ("default", "rm-bench", "rewardbench")
REFERENCE_RENDERINGS = ("rm-bench", "rewardbench")  # the same rendering: RM-Bench's script is RewardBench's
REFERENCE_SCRIPTS = "RewardBench scripts/run_rm.py and run_v2.py; RM-Bench scripts/run_rm.py (a copy)"


@dataclass(frozen=True)
class ConvTemplate:
    """One FastChat conversation template (``fastchat.conversation.Conversation``), as data: its separator style,
    role names, separators and system prompt; :meth:`render` is FastChat's ``get_prompt`` for that style."""

    name: str
    style: str  # FastChat SeparatorStyle: ADD_NEW_LINE_SINGLE | ADD_COLON_TWO | NO_COLON_SINGLE | LLAMA2 | CHATML
    roles: tuple[str, str]
    sep: str = "\n"
    sep2: str | None = None
    system_template: str = "{system_message}"
    system_message: str = ""

    def render(self, turns: list[str]) -> str:
        """The text of a conversation whose turns alternate user, assistant, ... (``turns[i]`` is said by
        ``roles[i % 2]``); an empty turn renders as its role alone, as FastChat does."""
        system = self.system_template.format(system_message=self.system_message)
        seps = (self.sep, self.sep2 if self.sep2 is not None else self.sep)
        out = []
        if self.style == "ADD_NEW_LINE_SINGLE":
            out.append("" if system == "" else system + self.sep)
            out += [r + "\n" + m + self.sep if m else r + "\n" for r, m in self._pairs(turns)]
        elif self.style == "ADD_COLON_TWO":
            out.append(system + seps[0])
            out += [r + ": " + m + seps[i % 2] if m else r + ":" for i, (r, m) in enumerate(self._pairs(turns))]
        elif self.style == "NO_COLON_SINGLE":
            out.append(system)
            out += [r + m + self.sep if m else r for r, m in self._pairs(turns)]
        elif self.style == "CHATML":
            out.append("" if system == "" else system + self.sep + "\n")
            out += [r + "\n" + m + self.sep + "\n" if m else r + "\n" for r, m in self._pairs(turns)]
        elif self.style == "LLAMA2":
            out.append(system if self.system_message else "[INST] ")
            for i, (tag, m) in enumerate(self._pairs(turns)):
                out.append((m + " " if i == 0 else tag + " " + m + seps[i % 2]) if m else tag)
        else:
            raise ValueError(f"conversation template {self.name!r}: unknown separator style {self.style!r}")
        return "".join(out)

    def _pairs(self, turns: list[str]) -> list[tuple[str, str]]:
        return [(self.roles[i % 2], t) for i, t in enumerate(turns)]


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CONV_TEMPLATES: dict[str, ConvTemplate] = {
    t.name: t
    for t in (
        ConvTemplate("tulu", "ADD_NEW_LINE_SINGLE", ("<|user|>", "<|assistant|>"), sep="\n"),
        ConvTemplate("zephyr", "CHATML", ("<|user|>", "<|assistant|>"), "</s>", None, "<|system|>\n{system_message}"),
        ConvTemplate("vicuna_v1.1", "ADD_COLON_TWO", ("USER", "ASSISTANT"), " ", "</s>", system_message=_VICUNA_SYSTEM),
        ConvTemplate(
            "llama-2",
            "LLAMA2",
            ("[INST]", "[/INST]"),
            sep=" ",
            sep2=" </s><s>",
            system_template="[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
        ),
        ConvTemplate("mistral", "LLAMA2", ("[INST]", "[/INST]"), " ", "</s>", "[INST] {system_message}\n"),
        ConvTemplate("oasst_pythia", "NO_COLON_SINGLE", ("<|prompter|>", "<|assistant|>"), sep="<|endoftext|>"),
        ConvTemplate("raw", "NO_COLON_SINGLE", ("", ""), sep=""),
    )
}
DEFAULT_CONV_TEMPLATE = "tulu"


@dataclass(frozen=True)
class ReferenceRendering:
    """A resolved reference rendering (module docstring): the chat template text or the conversation template,
    whether the EOS is appended, and the pad id the reward position skips."""

    name: str  # "rm-bench" | "rewardbench"
    chat_template: str | None  # Jinja text, or None: the conversation template renders
    chat_template_source: str | None  # "the tokenizer's" | "file PATH"
    conv: ConvTemplate | None
    eos_token_id: int | None
    pad_token_id: int | None  # the reward is read at the last token that is not this id
    max_length: int

    @property
    def append_eos(self) -> bool:
        return self.chat_template is None

    def describe(self) -> str:
        how = (
            f"chat template ({self.chat_template_source}) over the whole conversation, no generation prompt"
            if self.chat_template is not None
            else f"conversation template {self.conv.name!r} (FastChat's, as data) + EOS"  # type: ignore[union-attr]
        )
        return (
            f"{self.name} reference rendering: {how}; tokenizer special tokens on; left-truncated to "
            f"{self.max_length} tokens; reward at the last token that is not pad id {self.pad_token_id}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reference": REFERENCE_SCRIPTS,
            "text": "chat_template" if self.chat_template is not None else "conversation_template",
            "chat_template": self.chat_template_source,
            "conversation_template": None if self.conv is None else self.conv.name,
            "add_special_tokens": True,
            "eos_appended": self.append_eos,
            "max_length": self.max_length,
            "truncation_side": "left",
            "reward_token": f"last token that is not pad id {self.pad_token_id}",
            "description": self.describe(),
        }


def resolve_reference(
    name: str,
    tokenizer: Any,
    *,
    chat_template: str | None = "auto",
    conv_template: str = DEFAULT_CONV_TEMPLATE,
    model_pad_token_id: int | None = None,
    max_length: int = 2048,
) -> ReferenceRendering:
    """The reference rendering for this tokenizer and model. ``chat_template``: "auto" (the tokenizer's if it has
    one, as the reference), "none" (the conversation template even so) or a Jinja file; ``model_pad_token_id``: the
    model config's pad id (the reference uses the tokenizer's pad, else its EOS, when the config has none)."""
    if name not in REFERENCE_RENDERINGS:
        raise ValueError(f"unknown rendering {name!r}; known: {', '.join(RENDERINGS)}")
    if conv_template not in CONV_TEMPLATES:
        raise ValueError(f"unknown conversation template {conv_template!r}; known: {', '.join(CONV_TEMPLATES)}")
    choice = "auto" if chat_template is None else str(chat_template)
    text, source = None, None
    if choice == "auto":
        if getattr(tokenizer, "chat_template", None) is not None:
            text, source = tokenizer.chat_template, "the tokenizer's"
    elif choice != "none":
        p = Path(choice)
        if not p.is_file():
            raise ValueError(f"--chat-template {choice!r}: expected auto, none or a Jinja template file")
        text, source = p.read_text(encoding="utf-8"), f"file {p}"
    eos = getattr(tokenizer, "eos_token_id", None)
    if text is None and eos is None:
        raise DataError("the reference rendering appends the tokenizer's EOS, and this tokenizer has none")
    tok_pad = getattr(tokenizer, "pad_token_id", None)
    pad = model_pad_token_id if model_pad_token_id is not None else (tok_pad if tok_pad is not None else eos)
    conv = None if text is not None else CONV_TEMPLATES[conv_template]
    return ReferenceRendering(name, text, source, conv, eos, pad, max_length)


# ------------------------------------------------------------------------------------------------ conversations


def prompt_turns(prompt: str | list[dict]) -> list[str]:
    """The prompt's turns as the reference sees them: a message list's contents, an HH-RLHF transcript's turns,
    or the prompt as one user turn. The reference assigns roles by position, so the count must be odd."""
    if isinstance(prompt, list):
        turns = [m["content"] for m in prompt]
    else:
        hh = hh_messages(prompt)
        turns = [m["content"] for m in hh] if hh else [prompt]
    if len(turns) % 2 == 0:
        raise RowError(
            "prompt",
            f"{len(turns)} turns: the reference rendering reads a prompt's turns as user, assistant, ... by position "
            "and needs it to end with a user turn (an odd number of turns)",
        )
    return turns


def conversations(rec: BenchRecord) -> list[list[str]]:
    """One conversation (turns, the response last) per response of a text record."""
    if rec.prompt_ids is not None:
        raise RowError(None, "token ids cannot be rendered as text: use --rendering default for pre-tokenized rows")
    if rec.label.get("transcripts"):  # unshared HH transcripts: each one's own prompt part
        out = []
        for text in rec.responses:
            p, r = split_hh_transcript(text)  # type: ignore[arg-type]
            out.append(prompt_turns(p) + [r] if p else [r])
        return out
    turns = prompt_turns(rec.label.get("messages") or rec.prompt)
    return [turns + [r] for r in rec.responses]  # type: ignore[list-item]


def render_text(tokenizer: Any, ref: ReferenceRendering, turns: list[str]) -> str:
    """The reference's text of one conversation."""
    if ref.chat_template is None:
        return ref.conv.render(turns)  # type: ignore[union-attr]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    try:
        return tokenizer.apply_chat_template(messages, chat_template=ref.chat_template, tokenize=False)
    except Exception as e:  # jinja2 errors and errors raised by the template itself
        raise RowError(None, f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------------ token ids


def reference_ids(tokenizer: Any, ref: ReferenceRendering, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each text as the reference tokenizes it (special tokens on, EOS appended for conversation
    templates, cut from the left to ``max_length``) and whether each was cut."""
    if not texts:
        return [], []
    extra = 1 if ref.append_eos else 0
    budget = ref.max_length - extra
    if budget < 1:
        raise ValueError(f"max_length must be > {extra}, got {ref.max_length}")
    ids = [list(x) for x in tokenizer(texts)["input_ids"]]
    cut = [len(x) > budget for x in ids]
    long = [i for i, c in enumerate(cut) if c]
    if long:
        side = tokenizer.truncation_side
        tokenizer.truncation_side = "left"  # the reference sets it for good; here only for this call
        try:
            redo = tokenizer([texts[i] for i in long], truncation=True, max_length=budget)["input_ids"]
        finally:
            tokenizer.truncation_side = side
        for i, x in zip(long, redo):
            ids[i] = list(x)
    if extra:
        ids = [x + [ref.eos_token_id] for x in ids]  # type: ignore[list-item]
    return ids, cut


def _reward_end(ids: list[int], pad: int | None) -> int:
    """Length up to and including the token the reward is read at: the last that is not ``pad`` (the first token
    when every token is pad, as transformers' argmax does)."""
    n = len(ids)
    while pad is not None and n > 1 and ids[n - 1] == pad:
        n -= 1
    return n


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs) - 1  # every response keeps at least one token
    first = seqs[0]
    for i in range(max(n, 0)):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return max(n, 0)


def render_reference_file(
    bf: BenchFile, tokenizer: Any, ref: ReferenceRendering, *, on_bad_row: OnBadRow = "error"
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """The reference's token ids of every record of ``bf`` (a :class:`fastrm.bench_data.BenchFile`) as shared-prompt
    groups ``(prompt_ids [G][P], response_ids [G][N][R])``, like :func:`fastrm.bench_data.tokenize_bench_file`.

    Records that cannot be rendered are bad records (raised, or counted and removed). ``bf.stats`` counts groups
    with a sequence cut to ``max_length`` (``prompt_truncated``) and ``bf.render_stats`` the sequences whose reward
    is read before trailing pad-id tokens.
    """
    convs: list[tuple[BenchRecord, list[str]]] = []
    for rec in bf.records:
        try:
            convs.append((rec, [render_text(tokenizer, ref, t) for t in conversations(rec)]))
        except RowError as e:
            bf.bad_record(rec.source, e.detail(), on_bad_row)
    ids, cut = reference_ids(tokenizer, ref, [t for _, texts in convs for t in texts])
    prompts, responses, kept, k, moved = [], [], [], 0, 0
    for rec, texts in convs:
        seqs, was_cut = ids[k : k + len(texts)], any(cut[k : k + len(texts)])
        k += len(texts)
        ends = [_reward_end(s, ref.pad_token_id) for s in seqs]
        moved += sum(e < len(s) for e, s in zip(ends, seqs))
        seqs = [s[:e] for s, e in zip(seqs, ends)]
        if any(not s for s in seqs):
            bf.bad_record(rec.source, "a response renders to zero tokens", on_bad_row)
            continue
        n = _common_prefix(seqs)
        prompts.append(seqs[0][:n])
        responses.append([s[n:] for s in seqs])
        kept.append(rec)
        bf.stats.prompt_truncated += was_cut
    bf.records = kept
    bf.render_stats = {"reward_before_trailing_pad": moved, "sequences": k}
    if not kept:
        raise DataError(f"{bf.path}: no records left to score after rendering")
    return prompts, responses


def model_pad_token_id(model: Any) -> int | None:
    """The pad id in the model's config (the text config of a multimodal one), which the reference keeps."""
    cfg = getattr(getattr(model, "backbone", None), "config", None) or getattr(model, "config", None)
    if cfg is None:
        return None
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text_cfg, "pad_token_id", None)
