"""The embedded default: a byte-level tokenizer and a synthetic preference task that need no download.

The task: a prompt asks for a remark about a person; the chosen response uses a kind adjective and the rejected
one an unkind adjective, in varied sentence frames, with 10% of the labels flipped (so accuracy tops out near 0.9
and the margin distribution has a visible left tail). A tiny backbone learns it in a minute on a CPU.
"""

from __future__ import annotations

import random

NAMES = [
    "Ada",
    "Bob",
    "Chen",
    "Dana",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivan",
    "Jo",
    "Kai",
    "Lena",
    "Mo",
    "Nia",
    "Omar",
    "Pia",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
]
KIND = ["kind", "generous", "helpful", "honest", "patient", "brave", "clever", "warm", "thoughtful", "gentle"]
UNKIND = ["rude", "lazy", "selfish", "dishonest", "impatient", "cruel", "careless", "cold", "petty", "bitter"]
FRAMES = [
    "{n} is {a}.",
    "I think {n} is very {a}.",
    "Everyone says {n} is {a}.",
    "{n}? Always so {a}.",
    "Honestly, {n} seems {a} to me.",
]
PROMPTS = [
    "Say something about {n}.",
    "What do you think of {n}?",
    "Describe {n} in a sentence.",
    "Tell me about {n}, please.",
]


def synthetic_pairs(n: int, seed: int = 0, flip: float = 0.1) -> list[dict]:
    """``n`` rows of {"prompt", "chosen", "rejected"} (seeded)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name = rng.choice(NAMES)
        frame_c, frame_r = rng.choice(FRAMES), rng.choice(FRAMES)
        good = frame_c.format(n=name, a=rng.choice(KIND))
        bad = frame_r.format(n=name, a=rng.choice(UNKIND))
        if rng.random() < flip:
            good, bad = bad, good
        rows.append({"prompt": rng.choice(PROMPTS).format(n=name) + "\n", "chosen": " " + good, "rejected": " " + bad})
    return rows


def synthetic_candidates(n: int, k: int = 8, seed: int = 0) -> list[dict]:
    """``n`` best-of-N rows {"prompt", "responses": [k remarks]} of the same task (seeded): each remark is about the
    prompt's person, with a kind or an unkind adjective (half and half on average) in a random frame, so a reward
    model that learned the task ranks the kind remarks first. Duplicates can occur (they tie under any model)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name = rng.choice(NAMES)
        responses = [
            " " + rng.choice(FRAMES).format(n=name, a=rng.choice(KIND if rng.random() < 0.5 else UNKIND))
            for _ in range(k)
        ]
        rows.append({"prompt": rng.choice(PROMPTS).format(n=name) + "\n", "responses": responses})
    return rows


def byte_tokenizer():
    """A byte-level Hugging Face fast tokenizer (256 byte tokens + <|endoftext|> + <|pad|>), built locally.

    Its pad is not its EOS: HF sequence-classification models pool the last non-pad token, which must be the EOS
    fastrm appends and scores, so saved demo checkpoints score padded batches in HF as fastrm does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    vocab["<|pad|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
