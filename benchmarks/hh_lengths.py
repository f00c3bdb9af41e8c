"""Real HH-RLHF token lengths, carried in the repository, so GPU benchmarks measure HH's workload on any machine.

The device machine gets the repository and nothing beside it (``../shared`` stays behind), and the benchmarks'
former fallback there was synthetic pairs of ~82 tokens instead of HH's ~401: a GPU figure would have been measured
on the wrong workload without a word. Instead ``data/hh_rlhf_lengths.json`` (beside this file, ~100 KB) holds,
for every pair of the three HH-RLHF test splits that fastrm keeps, the token counts (prompt, chosen, rejected)
under the GPT-NeoX tokenizer exactly as ``fastrm.tokenization.load_tokenized`` makes them (EOS appended,
max_length 2048, empty responses skipped, ties dropped): counts only, no text. Benchmarks build pairs of random ids
with these lengths (:func:`hh_like_pairs`); attention, packing and the kernels see the lengths, not the ids, and
the models are randomly initialised. Without the file the benchmarks stop (:class:`MissingHHLengths`).

Rebuild it (and commit) after a change to tokenization, from the shared data:
    python benchmarks/hh_lengths.py write          # reads ../shared/data (hh-rlhf/*.jsonl.gz, the NeoX tokenizer)
tests/test_device_runbook.py checks the committed file against a fresh build when the shared data is there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LENGTHS_FILE = HERE / "data" / "hh_rlhf_lengths.json"
SHARED = HERE.parent.parent / "shared" / "data"
TOKENIZER = "tokenizers/gpt-neox-20b_tokenizer.json"
MAX_LENGTH = 2048


class MissingHHLengths(RuntimeError):
    """The committed lengths file is absent or unreadable: a benchmark refuses to invent a workload."""


def build(shared: Path = SHARED, tokenizer=None) -> dict:
    """The lengths file's content from the shared data: per split, [[P, C, R], ...] in file order."""
    from fastrm.loading import load_tokenizer
    from fastrm.tokenization import load_tokenized

    files = sorted((shared / "hh-rlhf").glob("*.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"{shared / 'hh-rlhf'}: no *.jsonl.gz files (the shared data lies beside the repo)")
    tok = tokenizer if tokenizer is not None else load_tokenizer(str(shared / TOKENIZER))
    splits = {}
    for f in files:
        pairs, stats = load_tokenized(f, tok, max_length=MAX_LENGTH, on_bad_row="skip")
        splits[f.name.removesuffix(".jsonl.gz")] = {
            "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
            "rows": stats.rows,
            "skipped_empty_response": stats.bad_rows_skipped,
            "ties_dropped": stats.ties_dropped,
            "unshared_prompt": stats.unshared_prompt,
            "truncated": stats.prompt_truncated + stats.response_truncated,
            "pairs": [[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)] for p in pairs],
        }
    return {
        "what": "token counts [prompt, chosen response, rejected response] of HH-RLHF test pairs; counts only",
        "tokenizer": f"GPT-NeoX-20B ({TOKENIZER}), vocab {len(tok)}",
        "vocab_size": len(tok),
        "tokenization": f"fastrm.tokenization.load_tokenized(max_length={MAX_LENGTH}, append_eos=True, "
        "on_bad_row='skip')",
        "command": "python benchmarks/hh_lengths.py write",
        "splits": splits,
    }


def dumps(content: dict) -> str:
    """JSON with one split's pairs on one line (small, and a diff shows which split changed)."""
    head = {k: v for k, v in content.items() if k != "splits"}
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + ['  "splits": {']
    names = list(content["splits"])
    for i, name in enumerate(names):
        s = content["splits"][name]
        meta = {k: v for k, v in s.items() if k != "pairs"}
        body = json.dumps(meta)[:-1] + ', "pairs": ' + json.dumps(s["pairs"], separators=(",", ":")) + "}"
        lines.append(f"    {json.dumps(name)}: {body}{',' if i < len(names) - 1 else ''}")
    return "\n".join(lines + ["  }", "}", ""])


def load(path: Path | None = None) -> dict:
    """The committed lengths file, checked; MissingHHLengths (one line naming the file) when it is not usable."""
    path = path or LENGTHS_FILE
    try:
        content = json.loads(path.read_text())
        splits = content["splits"]
        vocab = int(content["vocab_size"])
        ok = splits and all(len(t) == 3 and t[1] > 0 and t[2] > 0 for s in splits.values() for t in s["pairs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MissingHHLengths(
            f"{path}: real HH-RLHF lengths are needed and this file is missing or unreadable ({e}); "
            "restore it from git or rebuild it with `python benchmarks/hh_lengths.py write`"
        ) from e
    if not ok or vocab < 2:
        raise MissingHHLengths(f"{path}: field 'splits' holds no valid [prompt, chosen, rejected] token counts")
    return content


def hh_lengths(path: Path | None = None) -> list[tuple[int, int, int]]:
    """All pairs' (P, C, R) token counts, splits in file order."""
    return [tuple(t) for s in load(path)["splits"].values() for t in s["pairs"]]


def hh_like_pairs(n: int, max_length: int = MAX_LENGTH, seed: int = 0, vocab: int | None = None) -> list:
    """n ``TokenizedPair``s of random token ids with real HH lengths: the pairs of all three splits shuffled with
    ``seed`` (cycled if n exceeds them), cut to ``max_length`` as fastrm's tokenization cuts (prompt from the left,
    ``fastrm.tokenization.truncate_group``). Random ids are fine for randomly initialised models: attention, packing
    and the kernels depend on the lengths."""
    from fastrm.data import TokenizedPair
    from fastrm.tokenization import truncate_group

    content = load()
    vocab = vocab or content["vocab_size"]
    lengths = [tuple(t) for s in content["splits"].values() for t in s["pairs"]]
    rng = random.Random(seed)
    rng.shuffle(lengths)
    ids = lambda k: [rng.randrange(vocab) for _ in range(k)]  # noqa: E731
    out = []
    for i in range(n):
        P, C, R = lengths[i % len(lengths)]
        prompt, (chosen, rejected) = truncate_group(ids(P), [ids(C), ids(R)], max_length)
        out.append(TokenizedPair(prompt, chosen, rejected, None, f"hh-lengths[{i}]"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["write", "check"], help="write: rebuild the file; check: compare with a build")
    p.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder (hh-rlhf/, tokenizers/)")
    p.add_argument("--out", type=Path, default=LENGTHS_FILE)
    a = p.parse_args(argv)
    text = dumps(build(a.shared))
    if a.action == "write":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        print(f"wrote {a.out} ({len(text) // 1024} KiB)")
        return 0
    same = a.out.exists() and a.out.read_text() == text
    print(f"{a.out}: {'up to date' if same else 'STALE: run `python benchmarks/hh_lengths.py write`'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # run from a checkout without an install
    sys.exit(main())
