"""Sequence-to-sequence reward modeling (Zhou, Ji, Dai, Yang 2024, arXiv 2409.00162): the objective.

The paper's method: from each preference pair (x, y_w chosen, y_l rejected) a causal LM learns, by sequence MLE on
the target tokens only, the **correction mapping** (x, y_l) -> y_w and the **identity mapping** (x, y_w) -> y_w. A
:class:`Seq2SeqTemplate` turns (x, y_in, y_target) into tokens: ``prompt`` (x), ``input`` (the template's input
marker, y_in, its output marker) and ``target`` (y_target, then EOS). Both branches of a pair share x, so with
``prefix_sharing`` a pair packs as one segment ``[x | in_l tgt_w | in_w tgt_w]`` (x once; the packer's shared-prompt
layout, each branch attending to x and to itself), otherwise as two sequences. The LM head runs only on the rows
that predict a target token (``Seq2SeqBatch.target_index``): for a branch starting at packed row s with an input of
n_in tokens and a target of n_t tokens, rows ``s + n_in - 1 + j`` predict ``target[j]`` (the output marker's last row
predicts the first target token; the EOS row predicts nothing). The loss is the summed token cross-entropy divided
by the step's target tokens over all micro-batches and ranks (``step_units``).

Not in the paper (fastrm's choices, each a :class:`~fastrm.config.RewardConfig` field): the template's text, the
identity:correction mix (``seq2seq_mix``, default 1:1: both branches of every pair), the per-token normalisation of
the loss, and the truncation rule: prompt first, then the input response, each cut from the left; a target that
cannot fit ``max_length`` even then is a bad row (never truncated). Reward extraction is in fastrm/seq2seq_model.py.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fastrm import distributed as dist
from fastrm.objectives import Objective
from fastrm.packing import PackedBatch, pack_prompt_responses

PLAIN_INPUT_PREFIX = "\n\nResponse to review:"
PLAIN_OUTPUT_PREFIX = "\n\nImproved response:"
CHAT_INSTRUCTION = "Rewrite your last response into the best possible response."
_SENTINELS = ("\x00FASTRM_X\x00", "\x00FASTRM_YIN\x00", "\x00FASTRM_YT\x00")
CORRECTION, IDENTITY = 0, 1
# Sums of a micro-batch (fp32, all-reduced by sum): all branches, then the correction branches alone.
SUM_FIELDS = ("nll", "tokens", "matches", "branches", "exact")
SUM_FIELDS += tuple("c_" + f for f in SUM_FIELDS)


@dataclass
class Seq2SeqTemplate:
    """(x, y_in, y_target) -> (prompt ids, input ids, target ids); recorded in ``fastrm_seq2seq.json``.

    ``kind="plain"``: prompt = x, input = ``input_prefix`` + y_in + ``output_prefix``, target = y_target + EOS, each
    piece tokenized alone (``add_special_tokens=False``, as fastrm tokenizes prompts and responses).
    ``kind="chat"``: the tokenizer's chat template renders [user: x, assistant: y_in, user: ``instruction``,
    assistant: y_target]; prompt = the text up to y_in, input = y_in + the text up to y_target, target = y_target +
    the end of its turn (+ EOS when the turn does not end with it)."""

    kind: str = "plain"
    input_prefix: str = PLAIN_INPUT_PREFIX
    output_prefix: str = PLAIN_OUTPUT_PREFIX
    instruction: str = CHAT_INSTRUCTION
    chat_parts: list[str] | None = None  # kind="chat": [before x, x -> y_in, y_in -> y_target, after y_target]

    def pieces(self, tokenizer) -> dict[str, list[int]]:
        """The template's own tokens: ``in_prefix``, ``out_prefix`` (plain) or ``before``, ``between``,
        ``in_suffix``, ``turn_end`` (chat)."""
        ids = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []  # noqa: E731
        if self.kind == "plain":
            return {"in_prefix": ids(self.input_prefix), "out_prefix": ids(self.output_prefix)}
        a, b, c, d = self.chat_parts or render_chat_parts(tokenizer, self.instruction)
        return {"in_prefix": [], "out_prefix": ids(c), "turn_end": ids(d.rstrip()), "_chat": [a, b]}


def render_chat_parts(tokenizer, instruction: str) -> list[str]:
    """The chat template's text around x, y_in and y_target, found by rendering sentinel strings."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("seq2seq_template='chat' needs a tokenizer with a chat template (tokenizer.chat_template)")
    X, YI, YT = _SENTINELS
    msgs = [
        {"role": "user", "content": X},
        {"role": "assistant", "content": YI},
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": YT},
    ]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not all(text.count(s) == 1 for s in _SENTINELS) or not text.index(X) < text.index(YI) < text.index(YT):
        raise ValueError("the tokenizer's chat template does not render each message's content once and in order")
    a, rest = text.split(X)
    b, rest = rest.split(YI)
    c, d = rest.split(YT)
    return [a, b, c, d]


@dataclass
class Seq2SeqExample:
    """One preference pair as seq2seq training data: its (truncated) prompt and one (input, target) per branch.
    ``prompt_ids``/``chosen_ids``/``rejected_ids``/``margin`` keep the pair's tokens (the run folder hashes them)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    branches: list[tuple[list[int], list[int], int]]  # (input ids, target ids, CORRECTION | IDENTITY)
    source: str = ""
    margin: float | None = None

    @property
    def target_tokens(self) -> int:
        return sum(len(t) for _, t, _ in self.branches)


@dataclass
class Seq2SeqBatch(PackedBatch):
    """A :class:`PackedBatch` whose LM head runs on ``target_index`` rows [L] with labels ``targets`` [L];
    ``target_branch`` [L] numbers each row's branch within the batch, ``branch_kind`` [NB] its mapping."""

    target_index: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    target_branch: torch.Tensor | None = None
    branch_kind: torch.Tensor | None = None


def pack_branches(
    prompts: Sequence[list[int]], branches: Sequence[Sequence[tuple[list[int], list[int]]]], layout: str, kinds=None
) -> Seq2SeqBatch:
    """Pack groups (prompt, [(input ids, target ids), ...]) with the packer's layouts: each branch is the response
    ``input + target``; the rows predicting target tokens become ``target_index``."""
    batch = pack_prompt_responses(list(prompts), [[i + t for i, t in bs] for bs in branches], layout)
    last = batch.pool_index.tolist()  # the last row of every branch, in group-then-branch order
    index, labels, branch_of = [], [], []
    k = 0
    for bs in branches:
        for inp, tgt in bs:
            start = last[k] - len(inp) - len(tgt) + 1
            if not inp:
                raise ValueError("a seq2seq branch needs at least one input token (the row that predicts its target)")
            index.extend(range(start + len(inp) - 1, start + len(inp) - 1 + len(tgt)))
            labels.extend(tgt)
            branch_of.extend([k] * len(tgt))
            k += 1
    flat_kinds = [kd for ks in kinds for kd in ks] if kinds is not None else [CORRECTION] * k
    return Seq2SeqBatch(
        **{f: getattr(batch, f) for f in PackedBatch.__dataclass_fields__},
        target_index=torch.tensor(index, dtype=torch.int64),
        targets=torch.tensor(labels, dtype=torch.int64),
        target_branch=torch.tensor(branch_of, dtype=torch.int64),
        branch_kind=torch.tensor(flat_kinds, dtype=torch.int64),
    )


# ---------------------------------------------------------------------------------------------- examples
def parse_mix(mix: str) -> tuple[float, float]:
    """``"a:b"`` (identity:correction) -> the probabilities (a, b) / max(a, b) that a pair trains each branch."""
    try:
        a, b = (float(x) for x in str(mix).split(":"))
    except ValueError:
        raise ValueError(f"seq2seq_mix must be 'identity:correction' such as '1:1', got {mix!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)) or a < 0 or b < 0 or a + b == 0:
        raise ValueError(f"seq2seq_mix needs two numbers >= 0, not both 0, got {mix!r}")
    top = max(a, b)
    return a / top, b / top


def _branches_wanted(index: int, seed: int, mix: tuple[float, float]) -> tuple[bool, bool]:
    """(correction, identity) for the pair at ``index``: seeded per pair, so the mix is the same on every rank."""
    p_id, p_corr = mix
    rng = random.Random(seed * 1000003 + index)
    u_corr, u_id = rng.random(), rng.random()
    return u_corr < p_corr, u_id < p_id


def build_example(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    pieces: dict,
    *,
    eos: int | None,
    max_length: int,
    wanted: tuple[bool, bool],
    stats=None,
    source: str = "",
) -> Seq2SeqExample:
    """One pair -> its branches under the template ``pieces``, truncated to ``max_length`` per sequence: the prompt
    from the left first; a branch still too long loses input-response tokens from the left; a target that cannot
    fit even then raises :class:`fastrm.rows.RowError` (field ``chosen``: the target is the chosen response)."""
    from fastrm.rows import RowError

    target = list(chosen) + pieces.get("turn_end", [])
    if eos is not None and (not target or target[-1] != eos):
        target.append(eos)
    pre, post = pieces["in_prefix"], pieces["out_prefix"]
    fixed = len(pre) + len(post) + len(target)
    if fixed > max_length or not pre + post:
        if not pre + post:
            raise RowError("chosen", "the template has no input marker: nothing would predict the first target token")
        raise RowError(
            "chosen",
            f"the target needs {len(target)} tokens and the template {len(pre) + len(post)} more: more than "
            f"max_length={max_length} even with the prompt and the input response cut away (raise max_length)",
        )
    branches = []
    cut_input = False
    for y_in, kind, keep in ((rejected, CORRECTION, wanted[0]), (chosen, IDENTITY, wanted[1])):
        if not keep:
            continue
        room = max_length - fixed
        if len(y_in) > room:
            y_in, cut_input = (y_in[len(y_in) - room :] if room else []), True
        branches.append((pre + list(y_in) + post, target, kind))
    longest = max(len(i) + len(t) for i, t, _ in branches)
    room = max_length - longest
    new_prompt = prompt[len(prompt) - room :] if len(prompt) > room else list(prompt)
    if stats is not None:
        stats.prompt_truncated += len(new_prompt) < len(prompt)
        stats.response_truncated += cut_input
    return Seq2SeqExample(new_prompt, list(chosen), list(rejected), branches, source)


def encode_chat_pair(tokenizer, template: Seq2SeqTemplate, pieces: dict, pair) -> tuple[list[int], ...]:
    """Chat template: (prompt ids incl. the text around x, chosen ids, rejected ids) of a text pair."""
    a, b = pieces["_chat"]
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    return enc(a + pair.prompt + b), enc(pair.chosen), enc(pair.rejected)


# ---------------------------------------------------------------------------------------------- objective
class Seq2SeqObjective(Objective):
    """``objective="seq2seq"``: sequence MLE of the correction and identity mappings (module docstring)."""

    name = "seq2seq"
    progress_fields = {"loss": ("loss", ".4f"), "tok_acc": ("token_accuracy", ".3f")}

    def check(self, trainer) -> None:
        from fastrm.config import ConfigError

        a = trainer.args
        if a.loss != "bt" or a.center_rewards_coefficient is not None:
            raise ConfigError("loss", f"{a.loss!r} is a pairwise loss: objective='seq2seq' trains token cross-entropy")
        parse_mix(a.seq2seq_mix)
        if not hasattr(trainer.model, "lm_head"):
            raise ValueError(
                "objective='seq2seq' trains a causal LM: pass a fastrm.seq2seq_model.Seq2SeqRewardModel (fastrm.load_"
                "model(spec, objective='seq2seq')), not a scalar RewardModel"
            )

        trainer.model.settings = Seq2SeqSettings.from_config(a, trainer.tokenizer)

    def template(self, trainer) -> Seq2SeqTemplate:
        return trainer.model.settings.template

    def prepare(self, trainer, ds: Any, what: str) -> list:
        from fastrm.data import handle_bad_row, load_pairs
        from fastrm.rows import RowError, check_vocab
        from fastrm.tokenization import load_tokenized

        self.check(trainer)
        if isinstance(ds, (list, tuple)) and ds and all(isinstance(e, Seq2SeqExample) for e in ds):
            return list(ds)
        tok = trainer.tokenizer
        if tok is None:
            raise ValueError(f"{what} data is not tokenized: pass tokenizer=...")
        a = trainer.args
        tmpl = self.template(trainer)
        pieces = tmpl.pieces(tok)
        for key in ("in_prefix", "out_prefix", "turn_end"):
            try:
                check_vocab(pieces.get(key, []), f"template {key}", trainer.vocab_size)
            except RowError as e:
                raise ValueError(e.message("the seq2seq template")) from None
        big = 1 << 40  # no truncation by the loader: the seq2seq rule below cuts prompt and input, never targets
        if tmpl.kind == "chat":
            text, stats = load_pairs(ds, on_bad_row=a.on_bad_row, margins="ignore")
            pairs = [(encode_chat_pair(tok, tmpl, pieces, p), p.source) for p in text]
        else:
            tokd, stats = load_tokenized(
                ds,
                tok,
                max_length=big,
                append_eos=False,
                on_bad_row=a.on_bad_row,
                margins="ignore",
                vocab_size=trainer.vocab_size,
            )
            pairs = [((p.prompt_ids, p.chosen_ids, p.rejected_ids), p.source) for p in tokd]
        mix = parse_mix(a.seq2seq_mix)
        eos = getattr(tok, "eos_token_id", None) if a.append_eos else None
        out = []
        for i, ((prompt, chosen, rejected), src) in enumerate(pairs):
            try:
                wanted = _branches_wanted(i, a.seed, mix)
                ex = build_example(
                    prompt, chosen, rejected, pieces, eos=eos, max_length=a.max_length, wanted=wanted, stats=stats
                )
                ex.source = src
            except RowError as e:
                handle_bad_row(e, src, a.on_bad_row, stats)
                stats.pairs -= 1
                continue
            out.append(ex)
        trainer.load_stats[what] = stats
        if not out:
            raise ValueError(f"{what}: no pairs left after building the seq2seq examples")
        return out

    def cost(self, example: Seq2SeqExample, layout: str) -> int:
        from fastrm.packing import group_cost

        return group_cost(len(example.prompt_ids), [len(i) + len(t) for i, t, _ in example.branches], layout)

    def pack(self, examples: Sequence[Seq2SeqExample], layout: str) -> Seq2SeqBatch:
        batch = pack_branches(
            [e.prompt_ids for e in examples],
            [[(i, t) for i, t, _ in e.branches] for e in examples],
            layout,
            kinds=[[k for _, _, k in e.branches] for e in examples],
        )
        batch.sources = [e.source for e in examples]
        batch.num_pairs = len(examples)
        return batch

    def step_units(self, examples: Sequence[Seq2SeqExample]) -> int:
        return sum(e.target_tokens for e in examples)

    def forward(self, trainer, module, mb, state, normalizer: float):
        return trainer._forward(module, mb, normalizer=normalizer)

    def metrics(self, sums, maxes, counts, world, r, common) -> dict:
        return {**summarize(sums), "num_pairs": int(counts[0]), "max_token_nll": maxes[0], **common}

    def evaluate(self, trainer, examples, out_dir) -> dict:
        """Loss per target token, token accuracy and exact-rewrite rate on ``examples`` (sums over every rank's
        share under DDP, so every rank gets the numbers one process computes); eval_metrics.json in ``out_dir``."""
        model = trainer.model
        a = trainer.args
        share = examples[dist.rank() :: dist.world_size()] if trainer.replication.kind == "ddp" else examples
        was = model.training
        model.eval()
        total = torch.zeros(len(SUM_FIELDS), device=trainer.device, dtype=torch.float64)
        with torch.no_grad():
            for mb in self.micro_batches(share, a.max_tokens_per_batch, trainer.layout) if share else []:
                _, s, _ = trainer._forward(model, mb.to(trainer.device), normalizer=1.0)
                total += s.double()
        if trainer.replication.kind == "ddp":
            total = dist.all_reduce_sum(total)
        model.train(was)
        m = {**summarize(total.tolist()), "num_pairs": len(examples)}
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            Path(out_dir, "eval_metrics.json").write_text(json.dumps(_json_safe(m), indent=2))
        return m

    def self_test_for_run(self, trainer) -> None:
        trainer.model.self_test_for_run(autocast=torch.bfloat16 if trainer.autocast else None)


def summarize(s: Sequence[float]) -> dict:
    """Metrics from the :data:`SUM_FIELDS` sums: per target token, per branch, and for each mapping."""
    d = dict(zip(SUM_FIELDS, s))
    it = {k: d[k] - d["c_" + k] for k in ("nll", "tokens", "matches", "branches", "exact")}
    div = lambda a, b: a / b if b else math.nan  # noqa: E731
    return {
        "loss": div(d["nll"], d["tokens"]),
        "token_accuracy": div(d["matches"], d["tokens"]),
        "exact_match": div(d["exact"], d["branches"]),
        "correction_loss": div(d["c_nll"], d["c_tokens"]),
        "correction_token_accuracy": div(d["c_matches"], d["c_tokens"]),
        "correction_exact_match": div(d["c_exact"], d["c_branches"]),
        "identity_loss": div(it["nll"], it["tokens"]),
        "identity_token_accuracy": div(it["matches"], it["tokens"]),
        "identity_exact_match": div(it["exact"], it["branches"]),
        "target_tokens": int(d["tokens"]),
        "branches": int(d["branches"]),
    }


def _json_safe(m: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}


@dataclass
class Seq2SeqSettings:
    """What a seq2seq checkpoint records beside its HF causal-LM folder (``fastrm_seq2seq.json``): the template and
    the reward-extraction constants (see fastrm/seq2seq_model.py)."""

    template: Seq2SeqTemplate = field(default_factory=Seq2SeqTemplate)
    append_eos: bool = True
    reward_rule: str = "after_zero"
    positive: float = 1.0
    negative: float = 1.0
    sequence_score: str = "mean"
    max_length: int = 2048

    def to_json(self) -> dict:
        return {"format": "fastrm-seq2seq", "version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "Seq2SeqSettings":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["template"] = Seq2SeqTemplate(**known.get("template", {}))
        return cls(**known)

    @classmethod
    def from_config(cls, args, tokenizer=None) -> "Seq2SeqSettings":
        tmpl = Seq2SeqTemplate(kind=args.seq2seq_template)
        if tmpl.kind == "chat" and tokenizer is not None:
            tmpl.chat_parts = render_chat_parts(tokenizer, tmpl.instruction)
        return cls(
            template=tmpl,
            append_eos=args.append_eos,
            reward_rule=args.seq2seq_reward_rule,
            positive=args.seq2seq_positive,
            negative=args.seq2seq_negative,
            sequence_score=args.seq2seq_sequence_score,
            max_length=args.max_length,
        )
