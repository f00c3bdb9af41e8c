"""``fastrm demo --objective seq2seq``: a sequence-to-sequence reward model learns to rewrite rude remarks kindly.

The built-in task (no download): a prompt asks about a person; the chosen response describes them with kind
adjectives, the rejected one is the same sentence with one or two of them replaced by rude counterparts
(kind -> rude, helpful -> lazy, ...). The RM learns the correction mapping (rude sentence -> kind sentence) and the
identity mapping (kind sentence -> itself). After training, the stock ``transformers`` causal LM loaded from the
saved folder rewrites a rude response into the kind one with ``generate``, and the token rewards are negative
exactly on the rude words. A tokenizer with one token per word of the task (byte-level BPE with merges for them)
keeps the printed token rewards readable.
"""

from __future__ import annotations

import random
import sys

from fastrm.synthetic import NAMES, PROMPTS

# kind word -> its rude counterpart: the rejected response swaps kind words for these.
RUDE = {
    "kind": "rude",
    "helpful": "lazy",
    "generous": "selfish",
    "honest": "dishonest",
    "patient": "impatient",
    "gentle": "cruel",
    "thoughtful": "careless",
    "warm": "cold",
    "calm": "bitter",
    "polite": "petty",
}
# Every frame is six tokens long, so the RM's copy of its input sits at one distance from what it writes: a tiny
# random-init model learns that in a minute, where copying from a varying distance takes it far longer.
FRAMES2 = [
    " {n} is {a} and {b}.",
    " I think {n} is {a}.",
    " Everyone says {n} is {a}.",
    " Honestly, {n} seems {a}.",
    " {n} seems {a} and {b}.",
    " {n} was {a} and {b}.",
]


def rewrite_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows {"prompt", "chosen", "rejected"}: the rejected response is the chosen one with one or two of its
    kind adjectives replaced by their rude counterparts (seeded)."""
    rng = random.Random(seed)
    rows = []
    kind = sorted(RUDE)
    for _ in range(n):
        name = rng.choice(NAMES)
        frame = rng.choice(FRAMES2)
        a, b = rng.sample(kind, 2)
        slots = [0] if "{b}" not in frame else rng.choice([[0], [1], [0, 1]])
        good = [a, b]
        bad = [RUDE[w] if i in slots else w for i, w in enumerate(good)]
        rows.append(
            {
                "prompt": rng.choice(PROMPTS).format(n=name) + "\n",
                "chosen": frame.format(n=name, a=good[0], b=good[1]),
                "rejected": frame.format(n=name, a=bad[0], b=bad[1]),
            }
        )
    return rows


def task_words() -> list[str]:
    words = set(NAMES) | set(RUDE) | set(RUDE.values())
    for frame in FRAMES2:
        words |= {w.strip(",.?") for w in frame.split() if "{" not in w}
    return sorted(w for w in words if w)


def word_tokenizer():
    """Byte-level BPE (the demo's byte tokenizer) plus merges that make every word of the task, with its leading
    space, one token: lossless on any text, one token per word on the task's sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = []
    for w in task_words():
        cur = "Ġ"
        for ch in w:
            if (cur, ch) not in merges:
                merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    vocab["<|pad|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


# What the demo shows after training: a prompt and responses with zero, one or two rude words.
PROBE = (
    "What do you think of Ada?\n",
    [" Ada is helpful and rude.", " Ada seems cold and selfish.", " Everyone says Ada is polite."],
)
DEMO_TASK = """\
fastrm demo --objective seq2seq: a tiny Llama-shaped causal LM (random init) becomes a sequence-to-sequence reward
model (Zhou et al. 2024) on a built-in task: the chosen response calls a person kind/helpful/..., the rejected one
is the same sentence with one or two of those words made rude (kind -> rude, helpful -> lazy, ...).
  trained: the correction mapping (prompt, rejected) -> chosen and the identity mapping (prompt, chosen) -> chosen.
  expect: the saved model, loaded with stock transformers, rewrites a rude response into the kind one, and the
          token rewards (+1 agree, -1 would write otherwise, 0 agree after a disagreement) are negative exactly
          on the rude words."""


def run_demo(a) -> int:
    """Train, save, then show a rewrite by stock transformers and the token rewards of a few responses."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastrm.config import RewardConfig
    from fastrm.presets import resolve_config
    from fastrm.seq2seq_model import Seq2SeqRewardModel
    from fastrm.seq2seq_rewards import scoring_branches, token_rewards
    from fastrm.trainer import RewardTrainer, seed_everything

    print(DEMO_TASK, file=sys.stderr)
    tok = word_tokenizer()
    seed_everything(a.seed)
    model = Seq2SeqRewardModel.from_config(resolve_config("tiny-llama", vocab_size=len(tok)))
    cfg = RewardConfig(
        output_dir=a.output_dir,
        objective="seq2seq",
        learning_rate=3e-3,
        pairs_per_step=32,
        num_train_epochs=a.epochs,
        max_tokens_per_batch=4096,
        warmup_ratio=0.05,
        seed=a.seed,
        max_length=128,
        prefix_sharing=True,
    )
    trainer = RewardTrainer(
        model,
        cfg,
        rewrite_pairs(a.pairs, seed=a.seed),
        rewrite_pairs(128, seed=a.seed + 1),
        tokenizer=tok,
        run_inputs={"data": f"rewrite_pairs({a.pairs}, seed={a.seed})", "model": "tiny-llama", "tokenizer": "word"},
        overwrite=a.overwrite,
    )
    result = trainer.train()
    tr, ev = result["train"], result.get("eval", {})
    print(
        f"trained {tr.get('step', 0)} steps in {result['train_runtime_s']:.1f}s; eval: loss per target token "
        f"{ev.get('loss', float('nan')):.4f}, token accuracy {ev.get('token_accuracy', float('nan')):.3f}, "
        f"exact rewrites {ev.get('correction_exact_match', float('nan')):.3f} (correction), "
        f"{ev.get('identity_exact_match', float('nan')):.3f} (identity)"
    )
    # The saved folder is a plain HF causal LM: stock transformers loads it and writes the correction.
    lm = AutoModelForCausalLM.from_pretrained(a.output_dir)
    prompt, rude = PROBE
    p_ids, branches = scoring_branches(trainer.model, tok, prompt, [rude[0]])
    ids = torch.tensor([p_ids + branches[0][0]])
    out = lm.generate(ids, max_new_tokens=len(branches[0][1]) + 4, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"\nprompt:   {prompt.strip()!r}\nresponse: {rude[0]!r}\nrewrite (AutoModelForCausalLM.generate): {text!r}")
    print("\ntoken rewards (fastrm.token_rewards):")
    for toks, rewards in token_rewards(trainer.model, prompt, rude, tokenizer=tok, return_tokens=True):
        shown = "  ".join(f"{tok.convert_tokens_to_string([t]).strip() or t}:{r:+.0f}" for t, r in zip(toks, rewards))
        print(f"  {shown}")
    print(
        f"\n(model in {a.output_dir}: AutoModelForCausalLM.from_pretrained loads it; fastrm.load_model and "
        f"`fastrm score --model {a.output_dir} --token-rewards ...` give token rewards)"
    )
    return 0
