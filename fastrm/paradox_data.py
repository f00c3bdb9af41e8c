"""``fastrm paradox``'s inputs: the models of a run folder, their tokenizers, and the pairs and candidates files.

A run folder gives its ``checkpoint-N`` folders (by step) and its final model; any other folder with a model is a
model. Each model tokenizes with its own tokenizer; models whose tokenizers map text to the same ids share one
tokenization (:func:`group_tokenizers`). Rows that one tokenizer cannot score are bad rows for all models, so every
model is judged on the same pairs and prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fastrm.checkpoint import checkpoint_step
from fastrm.data import DataError, OnBadRow
from fastrm.loading import is_pretrained

# Where a run keeps its final model: the local trainer writes it at the top of the run folder, a Ray run in
# model/ (fastrm.ray_train.FINAL_NAME).
FINAL_FOLDERS = (".", "model")
GOLD = "gold"  # the gold RM's name in the report and the scores file


@dataclass
class ModelRef:
    """One model to score: a checkpoint of a run, a run's final model, a model folder, or the gold RM."""

    name: str
    path: str
    role: str  # "checkpoint" | "final" | "model" | "gold"
    step: int | None = None
    run: str | None = None
    is_final: bool = False  # a checkpoint whose weights are the run's final model
    tokenizer: Any = field(default=None, repr=False)
    tokenizer_group: int = 0

    def info(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "path", "role", "step", "run", "is_final")}


# ------------------------------------------------------------------------------------------------ models


def _weights_digest(folder: str | os.PathLike) -> str:
    p = Path(folder).resolve()
    files = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in _weight_files(p))
    key = (str(p), files)
    if key not in _DIGESTS:  # each model's weights are read at most once per process (unless rewritten)
        _DIGESTS[key] = _digest(p)
    return _DIGESTS[key]


_DIGESTS: dict[tuple, str] = {}


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in _weight_files(folder):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def _weights_size(folder: str | os.PathLike) -> list[int]:
    return sorted(f.stat().st_size for f in _weight_files(Path(folder)))


def same_weights(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two model folders hold byte-identical weight files (sizes compared first: hashing is the rare case)."""
    return _weights_size(a) == _weights_size(b) and _weights_digest(a) == _weights_digest(b)


def _final_step(run: Path) -> int | None:
    """The last training step in the run's metrics.jsonl, if it has one."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("split") == "train" and isinstance(rec.get("step"), int):
            steps.append(rec["step"])
    return max(steps) if steps else None


def _is_model(folder: Path) -> bool:
    return folder.is_dir() and is_pretrained(folder)  # weights with a config.json, or a LoRA adapter folder


def discover_models(inputs: Sequence[str | os.PathLike]) -> list[ModelRef]:
    """The models of each input, in order: a run folder gives its ``checkpoint-N`` folders (by step) and its final
    model (folded into the checkpoint with the same weights, which the trainer writes when ``save_steps`` is set);
    a model folder gives itself. Raises a one-line error for a path that is neither."""
    refs: list[ModelRef] = []
    for spec in inputs:
        path = Path(spec)
        if not path.is_dir():
            raise DataError(
                f"{spec}: no such folder (expected a run folder with checkpoint-N folders, or a model folder)"
            )
        ckpts = sorted(
            (c for c in path.iterdir() if c.is_dir() and checkpoint_step(c) is not None), key=checkpoint_step
        )
        if not ckpts:
            if not _is_model(path):
                raise DataError(
                    f"{spec}: no checkpoints: no checkpoint-N folder with a model in it, and no model at its top "
                    "(config.json and *.safetensors); train with --save-steps, or pass model folders"
                )
            step = checkpoint_step(path)  # a checkpoint-N folder, or a run's final model with its metrics.jsonl
            refs.append(ModelRef(path.name, str(path), "model", step if step is not None else _final_step(path)))
            continue
        for c in ckpts:
            if not _is_model(c):
                raise DataError(f"{c}: a checkpoint folder without a model (config.json and *.safetensors)")
        run = [ModelRef(c.name, str(c), "checkpoint", checkpoint_step(c), run=str(path)) for c in ckpts]
        final = next((path / f for f in FINAL_FOLDERS if _is_model(path / f)), None)
        if final is not None:
            twin = next((r for r in reversed(run) if same_weights(r.path, final)), None)
            if twin is not None:
                twin.is_final = True
            else:
                run.append(ModelRef("final", str(final.resolve()), "final", _final_step(path), run=str(path)))
        refs.extend(run)
    if len(inputs) > 1:  # several runs or models: prefix each checkpoint with its run's folder name
        for r in refs:
            if r.run is not None:
                r.name = f"{Path(r.run).name}/{r.name}"
    seen: dict[str, int] = {GOLD: 1}  # the gold RM's name is taken
    for r in refs:
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}#{seen[r.name]}"
    return refs


def gold_warnings(gold: ModelRef, models: Sequence[ModelRef]) -> list[str]:
    """Warnings when the gold RM is (a checkpoint of) one of the runs measured: the measurement is then
    self-referential (the paper's setting, where the judge is the best checkpoint of the same RM family)."""
    out = []
    gp = Path(gold.path).resolve() if Path(gold.path).exists() else None
    for run in sorted({m.run for m in models if m.run}):
        if gp is not None and (gp == Path(run).resolve() or Path(run).resolve() in gp.parents):
            out.append(
                f"the gold RM {gold.path} is a checkpoint of the run {run}: the outcome is judged by the same run "
                "(self-referential, as in Chen et al. 2024); a separately trained gold RM is a stricter test"
            )
    if gp is not None and gp.is_dir():
        twins = [m.name for m in models if same_weights(m.path, gp)]
        if twins:
            out.append(f"the gold RM has the same weights as {', '.join(twins)}: that model is its own judge")
    return out


# ------------------------------------------------------------------------------------------------ tokenizers


def tokenizer_fingerprint(tok: Any) -> str:
    """A digest of what decides the token ids (vocabulary, merges, normalizer, pre-tokenizer, special tokens)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for call_setting in ("truncation", "padding"):  # how a call pads and cuts, not how text maps to ids
            spec.pop(call_setting, None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(f"{text}|eos={getattr(tok, 'eos_token_id', None)}".encode()).hexdigest()[:16]


def group_tokenizers(refs: Sequence[ModelRef]) -> list[dict]:
    """Assign ``tokenizer_group`` to each model (one group per distinct tokenizer); returns the groups."""
    groups: list[dict] = []
    for r in refs:
        fp = tokenizer_fingerprint(r.tokenizer)
        g = next((i for i, x in enumerate(groups) if x["fingerprint"] == fp), None)
        if g is None:
            name = getattr(r.tokenizer, "name_or_path", None) or type(r.tokenizer).__name__
            groups.append({"fingerprint": fp, "name": str(name), "models": [], "tokenizer": r.tokenizer})
            g = len(groups) - 1
        r.tokenizer_group = g
        groups[g]["models"].append(r.name)
    return groups


# ------------------------------------------------------------------------------------------------ data


def read_candidates(files: Sequence[str], *, on_bad_row: OnBadRow, limit: int | None) -> tuple[list, list, list]:
    """(rows, per-file counts, skipped) of best-of-N files: every row of :func:`fastrm.data.read_prompt_responses`
    with at least 2 responses (a row with one is a bad row: there is nothing to choose), the first ``limit`` of each
    file."""
    from fastrm.data import read_prompt_responses

    rows, counts, skipped = [], [], []
    for f in files:
        errors: list[dict] = []
        kept = []
        for r in read_prompt_responses(f, on_bad_row=on_bad_row, errors=errors):
            if len(r["responses"]) < 2:
                reason = f"field 'responses': best-of-N needs at least 2 responses, got {len(r['responses'])}"
                if on_bad_row == "error":
                    raise DataError(f"{r['source']}: {reason}")
                errors.append({"source": r["source"], "reason": reason})
                continue
            kept.append({**r, "file": str(f)})
        if not kept:
            raise DataError(f"{f}: no best-of-N rows with at least 2 responses ({len(errors)} bad rows skipped)")
        used = kept[:limit] if limit else kept
        counts.append(
            {"path": str(f), "rows": len(kept) + len(errors), "scored": len(used), "skipped": len(errors)}
            | ({"left_out_by_limit": len(kept) - len(used)} if limit else {})
        )
        skipped.extend(errors)
        rows.extend(used)
    return rows, counts, skipped


def tokenize_candidates(rows: Sequence[dict], tok: Any, max_length: int) -> tuple[list, list, dict, dict]:
    """(prompt ids [G][P], response ids [G][N][R], truncation counts, {row index: reason} for rows that cannot
    be scored with this tokenizer). Truncation is :func:`fastrm.tokenization.truncate_group`, counted here."""
    from fastrm.scoring import tokenize_groups
    from fastrm.tokenization import truncate_group

    prompts, responses = [r["prompt"] for r in rows], [r["responses"] for r in rows]
    bad: dict[int, str] = {}
    try:
        p_ids, r_ids = tokenize_groups(tok, prompts, responses, max_length=sys.maxsize)
    except ValueError:  # find the row(s): a response with no tokens and no EOS to append
        p_ids, r_ids = [], []
        for i in range(len(rows)):
            try:
                p, r = tokenize_groups(tok, prompts[i : i + 1], responses[i : i + 1], max_length=sys.maxsize)
                p_ids.append(p[0]), r_ids.append(r[0])
            except ValueError as e:
                bad[i] = str(e).removeprefix("prompt 0, ")
                p_ids.append([]), r_ids.append([[0]])
    counts = {"prompt_truncated": 0, "response_truncated": 0}
    out_p, out_r = [], []
    for p, rs in zip(p_ids, r_ids):
        new_p, new_rs = truncate_group(p, rs, max_length)
        counts["prompt_truncated"] += len(new_p) < len(p)
        counts["response_truncated"] += max(len(r) for r in rs) > max_length
        out_p.append(new_p)
        out_r.append(new_rs)
    return out_p, out_r, counts, bad


def load_pair_files(files: Sequence[str], tok: Any, *, max_length: int, on_bad_row: OnBadRow, limit: int | None):
    """Tokenized pairs of every file (the loader of ``fastrm train`` / ``fastrm eval``; margins ignored), the first
    ``limit`` of each file, and per file (path, load counts, pairs loaded, pairs used)."""
    from fastrm.tokenization import load_tokenized

    pairs, stats = [], []
    for f in files:
        got, st = load_tokenized(f, tok, max_length=max_length, on_bad_row=on_bad_row, margins="ignore")
        used = got[:limit] if limit else got
        pairs.extend(used)
        stats.append((str(f), st, len(got), len(used)))
    return pairs, stats


def refuse_token_ids_with_several_tokenizers(files: Sequence[str]) -> None:
    """Token-id pair rows are one tokenizer's ids: with models that tokenize differently they cannot be scored."""
    from fastrm.rows import iter_file

    for f in files:
        for src, row in iter_file(Path(f)):
            if isinstance(row, dict) and ("chosen_input_ids" in row or "rejected_input_ids" in row):
                raise DataError(
                    f"{src}: token-id rows hold one tokenizer's ids, but the models use different tokenizers: "
                    "give the pairs as text"
                )


# ------------------------------------------------------------------------------------------------ all inputs


@dataclass
class Inputs:
    """Everything scored, tokenized once per tokenizer group ``g``; rows ``keep`` and pairs ``common`` are what
    every model is judged on."""

    refs: list[ModelRef]  # the checkpoints / models, in report order
    gold: ModelRef
    groups: list[dict]  # {"fingerprint", "name", "models", "tokenizer"} per distinct tokenizer
    warnings: list[str]
    rows: list[dict]  # candidate rows {"prompt", "responses", "source", "file"}
    keep: list[int]  # indices of the rows every tokenizer can score
    tokens: list[tuple[list, list]]  # per group: prompt ids [G][P], response ids [G][N][R] of every row
    truncated: list[dict]  # per group: candidate groups truncated
    pairs: list[dict]  # per group: {source: TokenizedPair}
    common: list[str]  # pair sources every tokenizer kept, in file order
    pair_stats: list[list]  # per group: [(file, LoadStats, pairs loaded, pairs used)] per pairs file
    candidate_files: list[dict]
    skipped: list[dict] = field(default_factory=list)  # candidate rows left out: {"source", "reason"}


def prepare_inputs(
    models: Sequence[str | os.PathLike],
    gold_model: str | os.PathLike,
    pairs: Sequence[str | os.PathLike],
    candidates: Sequence[str | os.PathLike],
    *,
    tokenizer: str | None,
    gold_tokenizer: str | None,
    max_length: int,
    on_bad_row: OnBadRow,
    limit: int | None,
) -> Inputs:
    """Find the models, load their tokenizers, read and check both files, tokenize once per distinct tokenizer.
    Everything that can fail on the input fails here, before any model is loaded."""
    from fastrm.loading import load_tokenizer

    refs = discover_models(models)
    gold = ModelRef(GOLD, str(gold_model), "gold")
    for r in refs:
        r.tokenizer = load_tokenizer(tokenizer, r.path)
    gold.tokenizer = load_tokenizer(gold_tokenizer, gold.path)
    groups = group_tokenizers([*refs, gold])
    if len(groups) > 1:
        refuse_token_ids_with_several_tokenizers([str(p) for p in pairs])
    rows, files, skipped = read_candidates([str(c) for c in candidates], on_bad_row=on_bad_row, limit=limit)
    tokens, truncated, pair_sets, pair_stats, bad = [], [], [], [], {}
    for g in groups:
        p_ids, r_ids, cut, bad_g = tokenize_candidates(rows, g["tokenizer"], max_length)
        for i, reason in bad_g.items():
            if on_bad_row == "error":
                raise DataError(f"{rows[i]['source']}: {reason} (tokenizer {g['name']})")
            bad.setdefault(i, reason)
        tokens.append((p_ids, r_ids))
        truncated.append(cut)
        ps, st = load_pair_files(
            [str(p) for p in pairs], g["tokenizer"], max_length=max_length, on_bad_row=on_bad_row, limit=limit
        )
        pair_sets.append({p.source: p for p in ps})
        pair_stats.append(st)
    skipped.extend({"source": rows[i]["source"], "reason": bad[i]} for i in sorted(bad))
    keep = [i for i in range(len(rows)) if i not in bad]
    common = [s for s in pair_sets[0] if all(s in ps for ps in pair_sets[1:])]
    if not keep:
        raise DataError("no candidate rows left to score")
    if not common:
        raise DataError("no pairs left that every model's tokenizer can score")
    return Inputs(
        refs,
        gold,
        groups,
        gold_warnings(gold, refs),
        rows,
        keep,
        tokens,
        truncated,
        pair_sets,
        common,
        pair_stats,
        files,
        skipped,
    )
