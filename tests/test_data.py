"""Tests for fastrm.data: loading, validation, tokenization, truncation and splitting."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fastrm.data import (
    DataError,
    LoadStats,
    PreferencePair,
    TokenizedPair,
    load_pairs,
    read_prompt_responses,
    split_hh_transcript,
)
from fastrm.tokenization import load_tokenized, tokenize_pairs, train_eval_split

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH = SHARED / "hh-rlhf"
TOKENIZER_FILE = SHARED / "tokenizers" / "gpt-neox-20b_tokenizer.json"
NEOX_EOS = 0  # <|endoftext|>

needs_hh = pytest.mark.skipif(not HH.is_dir(), reason=f"HH-RLHF test splits not found at {HH}")
needs_tokenizer = pytest.mark.skipif(not TOKENIZER_FILE.is_file(), reason=f"tokenizer not found at {TOKENIZER_FILE}")


@pytest.fixture(scope="module")
def neox():
    from transformers import PreTrainedTokenizerFast

    if not TOKENIZER_FILE.is_file():
        pytest.skip(f"tokenizer not found at {TOKENIZER_FILE}")
    # The bare tokenizer.json does not say which token is EOS; GPT-NeoX uses <|endoftext|> (id 0).
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), eos_token="<|endoftext|>")


class CharTokenizer:
    """Minimal non-HF tokenizer: one id per character, lower-cased, spaces dropped (to provoke edge cases)."""

    eos_token_id = 1

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t.lower() if c != " "] for t in texts]}


def write_jsonl(path: Path, rows: list, *, raw_lines: dict[int, str] | None = None) -> Path:
    """Write rows as JSONL; ``raw_lines`` maps a 0-based position to a literal line (for invalid JSON)."""
    lines = [json.dumps(r) for r in rows]
    for pos, text in (raw_lines or {}).items():
        lines.insert(pos, text)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


GOOD = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}


# ------------------------------------------------------------------------------------------- real HH files


@needs_hh
@pytest.mark.parametrize(
    ("name", "rows", "ties", "unshared", "empty"),
    [("helpful-base", 2354, 2, 9, 4), ("harmless-base", 2312, 0, 5, 4), ("helpful-rejection-sampled", 2749, 32, 3, 0)],
)
def test_hh_real_files_counts_and_split(name, rows, ties, unshared, empty):
    """Every row of the real files is a pair or counted: ties, unshared prompts, and (skip mode) the few rows whose
    last assistant turn is empty or whitespace (listed with their line and field)."""
    path = HH / f"{name}_test.jsonl.gz"
    pairs, stats = load_pairs(path, on_bad_row="skip")
    assert (stats.rows, stats.ties_dropped, stats.unshared_prompt) == (rows, ties, unshared)
    assert stats.bad_rows_skipped == len(stats.skipped) == empty
    assert all("empty response after the last" in s["reason"] for s in stats.skipped)
    assert stats.pairs == len(pairs) == rows - ties - empty
    with gzip.open(path, "rt") as fh:
        raw = [json.loads(line) for line in fh]
    n_unshared = 0
    for p in pairs:
        # The source names the 1-based line, which lets us find the raw row again.
        file, line = p.source.rsplit(":", 1)
        assert file == str(path)
        r = raw[int(line) - 1]
        if p.prompt == "":
            n_unshared += 1
            assert (p.chosen, p.rejected) == (r["chosen"], r["rejected"])
        else:
            assert p.prompt.endswith("\n\nAssistant:") and "\n\nAssistant:" not in p.chosen + p.rejected
            assert p.prompt + p.chosen == r["chosen"] and p.prompt + p.rejected == r["rejected"]
    assert n_unshared == unshared


@needs_hh
def test_hh_real_file_tokenized_fits_max_length(neox):
    pairs, stats = load_tokenized(HH / "helpful-base_test.jsonl.gz", neox, max_length=256, on_bad_row="skip")
    assert len(pairs) == stats.pairs == 2354 - 2 - 4
    assert stats.prompt_truncated > 0
    for p in pairs:
        assert p.chosen_len <= 256 and p.rejected_len <= 256
        assert p.chosen_ids[-1] == NEOX_EOS and p.rejected_ids[-1] == NEOX_EOS
        assert len(p.chosen_ids) >= 1 and len(p.rejected_ids) >= 1
    # With room to spare nothing is truncated, and the shared prompt saves tokens.
    full, fstats = load_tokenized(HH / "helpful-base_test.jsonl.gz", neox, max_length=4096, on_bad_row="skip")
    assert fstats.prompt_truncated == fstats.response_truncated == 0
    shared = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in full)  # the prompt once
    assert shared < 0.8 * sum(p.num_tokens for p in full)


# ------------------------------------------------------------------------------------------------ parsing


def test_split_hh_transcript():
    text = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
    prompt, response = split_hh_transcript(text)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    assert response == " Fine, thanks."
    assert split_hh_transcript("no marker here") == ("", "no marker here")
    assert split_hh_transcript("\n\nHuman: x\n\nAssistant:") == ("\n\nHuman: x\n\nAssistant:", "")


def test_three_formats_and_margin(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away", "margin": 2},
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},  # unshared
        {"chosen": "plain text", "rejected": "other text"},  # no marker -> separate sequences
        {"prompt": "P", "chosen": " c", "rejected": " r", "margin": 0.5, "extra": 1},
        {"prompt": "", "chosen": "c", "rejected": "r", "margin": None},
        {"prompt": "P", "chosen": " same", "rejected": " same"},  # tie
        {"chosen": "\n\nHuman: T\n\nAssistant: t", "rejected": "\n\nHuman: T\n\nAssistant: t"},  # tie
    ]
    pairs, stats = load_pairs(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(p.prompt, p.chosen, p.rejected, p.margin) for p in pairs] == [
        ("\n\nHuman: Hi\n\nAssistant:", " Hello", " Go away", 2.0),
        ("", rows[1]["chosen"], rows[1]["rejected"], None),
        ("", "plain text", "other text", None),
        ("P", " c", " r", 0.5),
        ("", "c", "r", None),
    ]
    assert isinstance(pairs[0].margin, float)
    assert [p.source for p in pairs] == [f"{tmp_path / 'd.jsonl'}:{i}" for i in (1, 2, 3, 4, 5)]
    assert (stats.rows, stats.pairs, stats.ties_dropped, stats.unshared_prompt) == (7, 5, 2, 2)


def test_token_id_rows_common_prefix(tmp_path):
    rows = [
        {"chosen_input_ids": [5, 6, 7, 8], "rejected_input_ids": [5, 6, 9]},
        {"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 6, 7, 8]},  # chosen is a prefix of rejected
        {"chosen_input_ids": [4], "rejected_input_ids": [5]},
        {"chosen_input_ids": [5, 6], "rejected_input_ids": [5, 6]},  # tie
        {"prompt_input_ids": [1, 2], "chosen_input_ids": [2], "rejected_input_ids": [3], "margin": 1.5},
        {"prompt_input_ids": [], "chosen_input_ids": [2], "rejected_input_ids": [2]},  # tie
        {"prompt": "The quick", "chosen": " brown fox", "rejected": " fox"},  # text row in between
    ]
    items, stats = load_tokenized(write_jsonl(tmp_path / "ids.jsonl", rows), CharTokenizer(), append_eos=False)
    got = [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.margin) for p in items]
    assert got == [
        ([5, 6], [7, 8], [9], None),
        ([5, 6], [7], [7, 8], None),  # capped so chosen keeps one token
        ([], [4], [5], None),
        ([1, 2], [2], [3], 1.5),
        ([ord(c) for c in "thequick"], [ord(c) for c in "brownfox"], [ord(c) for c in "fox"], None),
    ]
    assert [p.source.rsplit(":", 1)[1] for p in items] == ["1", "2", "3", "5", "7"]
    assert (stats.rows, stats.pairs, stats.ties_dropped) == (7, 5, 2)
    with pytest.raises(DataError, match="load_tokenized"):
        load_pairs(rows)


# ------------------------------------------------------------------------------------------------ bad rows

BAD_ROWS = [
    ({"prompt": "P", "rejected": " r"}, "chosen", "missing"),
    ({"prompt": "P", "chosen": 3, "rejected": " r"}, "chosen", "got int"),
    ({"prompt": "P", "chosen": " c", "rejected": ""}, "rejected", "non-empty string"),
    ({"prompt": 1, "chosen": " c", "rejected": " r"}, "prompt", "got int"),
    ({"chosen": "\n\nHuman: x\n\nAssistant:", "rejected": "\n\nHuman: x\n\nAssistant: y"}, "chosen", "empty response"),
    ({**GOOD, "margin": "1.0"}, "margin", "got str"),
    ({**GOOD, "margin": True}, "margin", "got bool"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": " c", "rejected": " r"}, "prompt", "chat template"),
    ({"chosen_input_ids": [1, 2.0], "rejected_input_ids": [1]}, "chosen_input_ids", "int token ids"),
    ({"chosen_input_ids": [1, 2], "rejected_input_ids": "12"}, "rejected_input_ids", "got str"),
    ({"chosen_input_ids": [], "rejected_input_ids": [1]}, "chosen_input_ids", "empty list"),
    ({"prompt_input_ids": [1], "chosen_input_ids": [-1], "rejected_input_ids": [2]}, "chosen_input_ids", "-1"),
]


@pytest.mark.parametrize(("row", "field", "reason"), BAD_ROWS)
def test_bad_row_error_names_file_line_field(tmp_path, row, field, reason):
    # Line 1 good, line 2 blank (still counts as a line), line 3 good, line 4 bad.
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, row], raw_lines={1: ""})
    with pytest.raises(DataError) as exc:
        load_pairs(path)
    msg = str(exc.value)
    assert f"bad.jsonl:4: field '{field}'" in msg and reason in msg


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('{"prompt": "P", "chosen": ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt": "P", "chosen": " c", "rejected": " r", "margin": NaN}', "field 'margin': expected a finite"),
    ],
)
def test_bad_line_error(tmp_path, raw, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD], raw_lines={1: raw})
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{reason}"):
        load_pairs(path)


def test_skip_mode_counts(tmp_path):
    rows = [GOOD] + [r for r, _, _ in BAD_ROWS] + [GOOD, {"prompt": "P", "chosen": "x", "rejected": "x"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows, raw_lines={3: "not json", 5: "7"})
    pairs, stats = load_pairs(path, on_bad_row="skip")
    n_bad = len(BAD_ROWS) + 2
    assert (stats.rows, stats.pairs, stats.bad_rows_skipped, stats.ties_dropped) == (len(rows) + 2, 2, n_bad, 1)
    assert len(pairs) == 2 and pairs[1].source.endswith(f":{len(rows) + 1}")
    assert len(stats.skipped_examples) == n_bad
    assert stats.skipped_examples[0] == f"{path}:2: field 'chosen': missing"
    assert any(s.startswith(f"{path}:4: invalid JSON") for s in stats.skipped_examples)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="data.csv: unknown file type"):
        load_pairs(tmp_path / "data.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no pairs left"):
        load_pairs(tmp_path / "empty.jsonl")
    all_bad = write_jsonl(tmp_path / "allbad.jsonl", [{"x": 1}, {"y": 2}])
    with pytest.raises(DataError, match=r"allbad.jsonl: no pairs left after loading \(2 bad rows skipped\)"):
        load_pairs(all_bad, on_bad_row="skip")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="broken.json:1: invalid JSON"):
        load_pairs(tmp_path / "broken.json")
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match="obj.json: expected"):
        load_pairs(tmp_path / "obj.json")
    (tmp_path / "notgz.jsonl.gz").write_text("plain")
    with pytest.raises(DataError, match="notgz.jsonl.gz: cannot read"):
        load_pairs(tmp_path / "notgz.jsonl.gz")


def test_non_utf8_bytes_name_their_line_and_can_be_skipped(tmp_path):
    """A bad byte used to name only the file and a chunk offset, and could not be skipped."""
    good = json.dumps(GOOD).encode() + b"\n"
    bad_line = b'{"prompt": "Q?", "chosen": " caf\xe9", "rejected": " no"}\n'
    for name, opener in (("d.jsonl", open), ("d.jsonl.gz", gzip.open)):
        with opener(tmp_path / name, "wb") as fh:
            fh.write(good + good + bad_line + good)
        with pytest.raises(DataError, match=rf"{name}:3: not valid UTF-8"):
            load_pairs(tmp_path / name)
        pairs, stats = load_pairs(tmp_path / name, on_bad_row="skip")
        assert len(pairs) == 3 and stats.skipped[0]["source"].endswith(f"{name}:3")
    (tmp_path / "d.json").write_bytes(b"[\n" + good.strip() + b",\n" + bad_line.strip() + b"\n]")
    with pytest.raises(DataError, match=r"d.json:3: not valid UTF-8"):
        load_pairs(tmp_path / "d.json")


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_whitespace_only_responses_are_bad_rows(tmp_path, field):
    with pytest.raises(DataError, match=f"rows\\[0\\]: field '{field}': expected a non-empty string, got only"):
        load_pairs([{**GOOD, field: " \n\t"}])
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"}
    with pytest.raises(DataError, match=f"field '{field}': empty response after the last"):
        load_pairs([{**hh, field: "\n\nHuman: Hi\n\nAssistant:   "}])


def test_margin_policies():
    rows = [{**GOOD, "margin": 1.0}, GOOD]
    pairs, _ = load_pairs(rows)  # keep: as given
    assert [p.margin for p in pairs] == [1.0, None]
    pairs, stats = load_pairs(rows, margins="ignore")
    assert [p.margin for p in pairs] == [None, None] and stats.margins_ignored == 1
    with pytest.raises(DataError, match=r"rows\[1\]: field 'margin': missing \(loss='margin'"):
        load_pairs(rows, margins="require")
    pairs, stats = load_pairs(rows, margins="require", on_bad_row="skip")
    assert len(pairs) == 1 and stats.skipped == [{"source": "rows[1]", "reason": stats.skipped[0]["reason"]}]


# ------------------------------------------------------------------------------------------ input sources


def test_json_gz_dataset_and_lists(tmp_path):
    rows = [GOOD, {**GOOD, "chosen": " maybe", "margin": 1}]
    expected = [("Q?", " yes", " no", None), ("Q?", " maybe", " no", 1.0)]

    def key(pairs):
        return [(p.prompt, p.chosen, p.rejected, p.margin) for p in pairs]

    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "obj.json").write_text(json.dumps({"data": rows}))
    with gzip.open(tmp_path / "list.json.gz", "wt") as fh:
        json.dump({"train": rows}, fh)
    gz = write_jsonl(tmp_path / "rows.jsonl.gz", rows)
    for name in ("list.json", "obj.json", "list.json.gz", "rows.jsonl.gz"):
        pairs, stats = load_pairs(tmp_path / name)
        assert key(pairs) == expected and stats.rows == 2, name
    assert load_pairs(str(tmp_path / "obj.json"))[0][1].source == f"{tmp_path / 'obj.json'}:data[1]"
    assert load_pairs(gz)[0][1].source == f"{gz}:2"

    pairs, stats = load_pairs([tmp_path / "list.json", gz])
    assert key(pairs) == expected * 2 and (stats.rows, stats.pairs) == (4, 4)
    pairs, _ = load_pairs(rows)
    assert key(pairs) == expected and pairs[1].source == "rows[1]"

    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{**r, "margin": r.get("margin")} for r in rows])
    pairs, _ = load_pairs(ds)
    assert key(pairs) == expected and pairs[0].source == "dataset[0]"
    bad = datasets.Dataset.from_list([GOOD, {"prompt": "Q?", "chosen": " c", "rejected": None}])
    with pytest.raises(DataError, match=r"dataset\[1\]: field 'rejected': expected a non-empty string, got null"):
        load_pairs(bad)
    with pytest.raises(DataError, match="pass one split"):
        load_pairs(datasets.DatasetDict({"train": ds}))


def test_stats_accumulate(tmp_path):
    stats = LoadStats()
    load_pairs([GOOD], stats=stats)
    load_pairs([GOOD, {**GOOD, "rejected": GOOD["chosen"]}], stats=stats)
    assert (stats.rows, stats.pairs, stats.ties_dropped) == (3, 2, 1)
    assert "2 pairs from 3 rows, ties_dropped=1" in stats.summary()


# -------------------------------------------------------------------------------------------- tokenization


def test_tokenize_real_tokenizer(neox):
    assert neox("The quick brown fox", add_special_tokens=False)["input_ids"] == [510, 3158, 8516, 30013]
    pairs = [PreferencePair("The quick", " brown fox", " fox", margin=1.0, source="x:1")]
    (tp,), stats = tokenize_pairs(pairs, neox)
    assert tp == TokenizedPair([510, 3158], [8516, 30013, NEOX_EOS], [30013, NEOX_EOS], 1.0, "x:1")
    assert (tp.chosen_len, tp.rejected_len, tp.num_tokens) == (5, 4, 9)
    assert stats.pairs == 1 and stats.prompt_truncated == 0
    (tp,), _ = tokenize_pairs(pairs, neox, append_eos=False)
    assert tp.prompt_ids + tp.chosen_ids == [510, 3158, 8516, 30013]


def test_truncation_keeps_response_end(neox):
    prompt = " ".join(f"word{i}" for i in range(200))
    chosen, rejected = " The quick brown fox", " jumps over the lazy dog again and again"
    full_prompt = neox(prompt, add_special_tokens=False)["input_ids"]
    c_ids = neox(chosen, add_special_tokens=False)["input_ids"] + [NEOX_EOS]
    r_ids = neox(rejected, add_special_tokens=False)["input_ids"] + [NEOX_EOS]
    (tp,), stats = tokenize_pairs([PreferencePair(prompt, chosen, rejected)], neox, max_length=40, batch_size=1)
    assert (stats.prompt_truncated, stats.response_truncated) == (1, 0)
    assert max(tp.chosen_len, tp.rejected_len) == 40
    assert tp.prompt_ids == full_prompt[-(40 - len(r_ids)) :]  # cut from the left, shared by both
    assert tp.chosen_ids == c_ids and tp.rejected_ids == r_ids
    assert tp.chosen_ids[-4:] == [3158, 8516, 30013, NEOX_EOS]


def test_response_longer_than_max_length(neox):
    long = " ".join(f"tok{i}" for i in range(100)) + " The quick brown fox"
    (tp,), stats = tokenize_pairs([PreferencePair("Some prompt", long, " short")], neox, max_length=16)
    assert (stats.prompt_truncated, stats.response_truncated) == (1, 1)
    assert tp.prompt_ids == [] and len(tp.chosen_ids) == 16
    full = neox(long, add_special_tokens=False)["input_ids"] + [NEOX_EOS]
    assert tp.chosen_ids == full[-16:] and tp.chosen_ids[-4:] == [3158, 8516, 30013, NEOX_EOS]
    assert tp.rejected_ids == neox(" short", add_special_tokens=False)["input_ids"] + [NEOX_EOS]


def test_token_id_rows_truncated_and_not_given_eos():
    rows = [{"prompt_input_ids": list(range(10, 20)), "chosen_input_ids": [1, 2, 3], "rejected_input_ids": [4]}]
    (tp,), stats = load_tokenized(rows, CharTokenizer(), max_length=5)
    assert tp.prompt_ids == [18, 19] and tp.chosen_ids == [1, 2, 3] and stats.prompt_truncated == 1


def test_tokenization_ties_and_zero_token_responses():
    tok = CharTokenizer()
    pairs = [
        PreferencePair("p", "Same", "same", source="a"),  # identical after tokenization -> tie
        PreferencePair("p", " ", "x", source="b"),  # zero tokens without eos -> bad row
        PreferencePair("p", "ab", "cd", source="c"),
    ]
    with pytest.raises(DataError, match="b: field 'chosen': response tokenizes to zero tokens"):
        tokenize_pairs(pairs, tok, append_eos=False)
    out, stats = tokenize_pairs(pairs, tok, append_eos=False, on_bad_row="skip")
    assert [p.source for p in out] == ["c"] and (stats.pairs, stats.ties_dropped, stats.bad_rows_skipped) == (1, 1, 1)
    # With an EOS the " " response is a lone EOS token: still a valid sequence.
    out, stats = tokenize_pairs(pairs, tok)
    assert [p.source for p in out] == ["b", "c"] and out[0].chosen_ids == [1] and stats.ties_dropped == 1
    # Two responses that differ only in their starts become a tie once cut to their last tokens.
    (_, s) = tokenize_pairs([PreferencePair("", "aXYZ", "bXYZ"), PreferencePair("", "q", "r")], tok, max_length=3)
    assert (s.ties_dropped, s.response_truncated, s.pairs) == (1, 1, 1)
    with pytest.raises(DataError, match="no pairs left"):
        tokenize_pairs([pairs[0]], tok)


def test_no_eos_token_warns(neox):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE))
    with pytest.warns(UserWarning, match="no eos_token_id"):
        (tp,), _ = tokenize_pairs([PreferencePair("The", " quick", " brown")], bare)
    assert tp.chosen_ids == [3158]


def test_progress_bar_large_input(capsys):
    pairs = [PreferencePair("p", f"c{i}", f"r{i}") for i in range(5000)]
    out, stats = tokenize_pairs(pairs, CharTokenizer(), progress=True, batch_size=700)
    assert len(out) == stats.pairs == 5000 and out[4999].rejected_ids == [ord("r"), 52, 57, 57, 57, 1]
    assert "tokenizing" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- split, best-of-N


def test_train_eval_split():
    items = list(range(1000))
    train, evals = train_eval_split(items, 0.1, seed=3)
    assert (train, evals) == train_eval_split(items, 0.1, seed=3)
    assert len(evals) == 100 and sorted(train + evals) == items
    assert train == sorted(train) and evals == sorted(evals)  # input order kept within each side
    assert train_eval_split(items, 0.1, seed=4)[1] != evals
    assert train_eval_split(items, 0.0, seed=3) == (items, [])
    assert train_eval_split([1, 2], 0.01, seed=0)[1] in ([1], [2])  # a positive fraction gives >= 1 eval item
    assert train_eval_split([7], 0.5, seed=0) == ([7], [])
    with pytest.raises(ValueError):
        train_eval_split(items, 1.0, seed=0)


def test_read_prompt_responses(tmp_path):
    rows = [
        {"prompt": "a", "responses": ["x", "y"]},
        {"prompt": "b", "responses": []},
        {"prompt": "c", "responses": ["z"], "id": 3},
        {"prompt": "d", "responses": ["ok", 5]},
    ]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows, raw_lines={2: "{oops"})
    errors: list = []
    out = read_prompt_responses(path, on_bad_row="skip", errors=errors)
    assert out == [
        {"prompt": "a", "responses": ["x", "y"], "source": f"{path}:1"},
        {"prompt": "c", "responses": ["z"], "source": f"{path}:4"},
    ]
    assert [e["source"] for e in errors] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert "field 'responses'" in errors[0]["reason"] and "invalid JSON" in errors[1]["reason"]
    assert "field 'responses[1]'" in errors[2]["reason"]
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: field 'responses': expected a non-empty list"):
        read_prompt_responses(path)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([rows[0], rows[2]])
    assert [r["source"] for r in read_prompt_responses(ds)] == ["dataset[0]", "dataset[1]"]


@pytest.mark.parametrize(
    "row, field, id_",
    [
        ({"chosen_input_ids": [5, 70000], "rejected_input_ids": [5, 6]}, "chosen_input_ids", 70000),
        ({"chosen_input_ids": [5, 7], "rejected_input_ids": [5, 50304]}, "rejected_input_ids", 50304),
        ({"prompt_input_ids": [99999], "chosen_input_ids": [7], "rejected_input_ids": [6]}, "prompt_input_ids", 99999),
    ],
)
def test_token_ids_outside_the_vocabulary_are_bad_rows(tmp_path, row, field, id_):
    """An id the model has no embedding for fails at load as a bad row (it was an IndexError mid-training on CPU,
    a device-side assert on CUDA); skip mode counts and lists it."""
    ok = {"chosen_input_ids": [5, 7], "rejected_input_ids": [5, 6]}
    path = write_jsonl(tmp_path / "ids.jsonl", [ok, row])
    with pytest.raises(DataError) as e:
        load_tokenized(path, CharTokenizer(), vocab_size=50304)
    assert str(e.value) == f"{path}:2: field '{field}': id {id_} >= vocab size 50304"
    pairs, stats = load_tokenized(path, CharTokenizer(), vocab_size=50304, on_bad_row="skip")
    assert len(pairs) == 1 and stats.skipped == [
        {"source": f"{path}:2", "reason": f"field '{field}': id {id_} >= vocab size 50304"}
    ]
    assert len(load_tokenized(path, CharTokenizer())[0]) == 2  # no vocabulary given: not checked


def test_a_tokenizer_larger_than_the_model_names_the_row_and_the_fix():
    rows = [{"prompt": "p", "chosen": "ab", "rejected": "a~"}]  # ord('~') = 126
    with pytest.raises(DataError, match=r"rows\[0\]: field 'rejected': id 126 >= vocab size 120 \(the tokenizer"):
        load_tokenized(rows, CharTokenizer(), vocab_size=120)


def test_the_trainer_checks_ids_against_its_model(tmp_path):
    from fastrm.config import RewardConfig
    from fastrm.model import RewardModel
    from fastrm.synthetic import byte_tokenizer
    from fastrm.trainer import RewardTrainer

    model = RewardModel.from_config("tiny-llama", self_test=False)
    vocab = model.backbone.get_input_embeddings().num_embeddings
    path = write_jsonl(tmp_path / "ids.jsonl", [{"chosen_input_ids": [3, vocab], "rejected_input_ids": [3, 4]}])
    args = RewardConfig(output_dir=str(tmp_path / "o"), progress=False)
    with pytest.raises(DataError, match=rf"ids.jsonl:1: field 'chosen_input_ids': id {vocab} >= vocab size {vocab}$"):
        RewardTrainer(model, args, str(path), tokenizer=byte_tokenizer())
    pairs, _ = load_tokenized(path, byte_tokenizer())
    with pytest.raises(DataError, match=rf"ids.jsonl:1: field 'chosen_ids': id {vocab} >= vocab size {vocab}$"):
        RewardTrainer(model, args, pairs, tokenizer=byte_tokenizer())
