"""The run folder: one training per folder, resumed by the same command, refused to another, never mixed.

A local run (``fastrm train``, ``RewardTrainer.train()``) owns its ``output_dir``; a Ray run owns
``storage_path/name`` (:mod:`fastrm.ray_cluster` claims it on the driver with the identity defined here). What a
local run writes there, and all that ``--overwrite`` removes::

    fastrm_run.json          the run record: what is trained (training fields and inputs), state, final files
    training_config.json     every RewardConfig field of the latest start
    metrics.jsonl            train and eval rows, each step once (a resume restores its checkpoint's copy)
    checkpoint-N/            HF model folder (LoRA: adapter folder) + trainer_state.pt + metrics.jsonl up to step N
    lora_base/, merged/      LoRA: the adapters' base model when it is written here, the merged model (merge_lora)
    config.json, model.safetensors, tokenizer files, ...   the final model (its file names are in the record)
    eval_metrics.json, eval_margins.npy, eval_margin_hist.png, skipped_rows_*.jsonl
    .checkpoint-N.tmp-*, .final-model                      left by a save that was killed (removed at start)
    .fastrm_run.lock         held while a training runs: a second process on the folder is refused

The record's identity is the training fields (RewardConfig minus ``NON_TRAINING_FIELDS``) and the inputs: content
hashes of the training and eval pairs (token ids and margins, after the split and truncation), of the model's
config and the tokenizer, and the data/model/tokenizer as named (for the messages). Starting a training on a folder:

* empty, or holding only files no training writes: a new run;
* holding this training: it resumes from the last complete checkpoint (one line says so), or starts again from
  step 0 when none was written, or, when it finished, does nothing and returns the recorded result;
* holding another training (or a training's files without a record): refused, naming the differing fields and
  ``--overwrite``, which removes the old run's files first (and lists them).
"""

from __future__ import annotations

import atexit
import datetime
import fnmatch
import hashlib
import json
import math
import os
import shutil
import socket
import struct
import sys
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from fastrm import checkpoint as ckpt_io
from fastrm import distributed as dist
from fastrm.config import NON_TRAINING_FIELDS, RewardConfig

if TYPE_CHECKING:
    from fastrm.trainer import RewardTrainer

RUN_FILE = "fastrm_run.json"
LOCK_FILE = ".fastrm_run.lock"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "training_config.json"
# What a training writes into its folder besides checkpoints, temporaries and the final model.
RUN_FILES = (
    RUN_FILE + "*",
    CONFIG_FILE,
    METRICS_FILE + "*",
    "skipped_rows_*.jsonl",
    "eval_metrics.json",
    "eval_margins.npy",
    "eval_margin_hist.png",
    "lora_base",  # LoRA: the base model when the one trained on is no reusable folder (fastrm/lora.py)
    "merged",  # LoRA with merge_lora: the adapters merged into the base
)
# The final model's files in a folder without a record (a run of a fastrm that kept none): what save_pretrained writes.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
FRESH_START_HINT = "start fresh: another --output-dir, or no --resume-from-checkpoint"
# How to start afresh, as the CLI (which names its inputs) and Python callers say it.
OVERWRITE_HINT = {
    True: "pass --overwrite to remove its files first, or choose another --output-dir",
    False: "pass overwrite=True to RewardTrainer to remove its files first, or choose another output_dir",
}


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (another training, nothing to resume, in use); one line."""


# ----------------------------------------------------------------------------------------------- identity


def training_fields(args: RewardConfig) -> dict:
    """The fields that change what is trained (every RewardConfig field but ``NON_TRAINING_FIELDS``)."""
    return {k: v for k, v in args.to_dict().items() if k not in NON_TRAINING_FIELDS}


def run_identity(training_fields: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict:
    """What a run trains: its training fields and inputs (rows given in memory are represented by a hash of their
    content; the local run's inputs are dicts with a ``sha256`` of their content, see :func:`describe_inputs`)."""

    def spec(v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], dict):
            return "rows:" + hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return v

    return {"config": dict(sorted(training_fields.items())), "inputs": {k: spec(v) for k, v in inputs.items()}}


def identity_hash(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]


def config_diffs(saved: Mapping[str, Any], current: Mapping[str, Any], names: tuple[str, str]) -> list[str]:
    """``"loss: that run 'bt', this run 'threshold'"`` for each training field both know and that differs."""
    return [
        f"{k}: {names[0]} {saved[k]!r}, {names[1]} {v!r}"
        for k, v in current.items()
        if k not in NON_TRAINING_FIELDS and k in saved and saved[k] != v
    ]


def input_diffs(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The inputs that differ, by content where both sides carry a ``sha256`` (a moved file with the same pairs is
    the same training), by value otherwise (Ray's inputs are the paths as resolved on the driver)."""
    out = []
    for k, v in current.items():
        if k not in saved:
            continue
        s = saved[k]
        if isinstance(s, dict) and isinstance(v, dict) and "sha256" in s and "sha256" in v:
            if s["sha256"] != v["sha256"]:
                out.append(f"{k}: that run {_show(s)}, this run {_show(v)}")
        elif s != v:
            out.append(f"{k}: that run {_show(s)}, this run {_show(v)}")
    return out


def _show(v: Any) -> str:
    if not isinstance(v, dict):
        return repr(v)
    what = repr(v.get("spec")) if v.get("spec") is not None else "given in Python"
    if "pairs" in v:
        what += f" ({v['pairs']} pairs)"
    return f"{what} [content {str(v.get('sha256'))[:8]}]"


def check_resumable(saved: dict, args: RewardConfig, where: Path | str, fresh_start: str = FRESH_START_HINT) -> None:
    """Refuse to resume a checkpoint whose run trained something else (another loss, data order, schedule, ...).

    ``fresh_start`` ends the error: how to start a new run instead (the Ray entry point names other flags)."""
    diffs = config_diffs(saved, args.to_dict(), ("checkpoint", "this run"))
    if diffs:
        raise ValueError(
            f"{where}: cannot resume, the checkpoint was trained with other settings ({'; '.join(diffs)}). Resume "
            f"with the same settings, or {fresh_start}"
        )


def pairs_sha256(pairs: Sequence | None) -> str | None:
    """Content hash of tokenized pairs: every id and margin, in order (a few seconds for 160k HH-sized pairs)."""
    if pairs is None:
        return None
    h = hashlib.sha256()
    for p in pairs:
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(struct.pack("<I", len(ids)))
            h.update(array("I", ids).tobytes())
        h.update(struct.pack("<d", math.nan if p.margin is None else p.margin))
    return h.hexdigest()


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def describe_inputs(trainer: RewardTrainer, specs: Mapping[str, Any] | None) -> dict:
    """The local run's inputs: the pairs, the model's config and the tokenizer, each by content, with the data,
    model and tokenizer as the user named them (``specs``, from the CLI; None from Python)."""
    specs = dict(specs or {})
    model_cfg = trainer.model.backbone.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation", "attn_implementation"):
        model_cfg.pop(volatile, None)
    tok = trainer.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    tok_content = backend.to_str() if backend is not None else [type(tok).__name__, len(tok) if tok else None]
    out = {
        "data": {"spec": specs.get("data"), "pairs": len(trainer.train_pairs)},
        "model": {"spec": specs.get("model"), "sha256": _sha([model_cfg, specs.get("model")])},
        "tokenizer": {"spec": specs.get("tokenizer"), "sha256": _sha(tok_content)},
    }
    out["data"]["sha256"] = pairs_sha256(trainer.train_pairs)
    if trainer.eval_pairs is not None:
        spec = specs.get("eval_data") or f"eval_fraction={trainer.args.eval_fraction}"
        out["eval_data"] = {"spec": spec, "pairs": len(trainer.eval_pairs), "sha256": pairs_sha256(trainer.eval_pairs)}
    return out


# ----------------------------------------------------------------------------------------------- the folder


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        hint = OVERWRITE_HINT[True]
        raise RunFolderError(f"{Path(folder) / RUN_FILE}: unreadable run record ({e}); {hint}") from None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str, allow_nan=False))
    os.replace(tmp, path)


def run_entries(folder: Path, record: dict | None) -> list[Path]:
    """Everything in ``folder`` that a training wrote: the record's final files (or the HF model files when there
    is no record), checkpoints, temporaries and :data:`RUN_FILES`. Other files are not the run's."""
    if not folder.is_dir():
        return []
    model = record.get("final_files", []) if record is not None else None
    temporaries = set(ckpt_io.stale_temporaries(folder))
    out = []
    for p in folder.iterdir():
        n = p.name
        if (
            ckpt_io.checkpoint_step(p) is not None
            or p in temporaries
            or any(fnmatch.fnmatch(n, pat) for pat in RUN_FILES)
            or (n in model if model is not None else any(fnmatch.fnmatch(n, pat) for pat in MODEL_FILES))
        ):
            out.append(p)
    return sorted(out)


def _names(paths: Sequence[Path]) -> str:
    return ", ".join(p.name + ("/" if p.is_dir() else "") for p in paths)


def remove_entries(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _say(line: str) -> None:
    print(f"[run] {line}", file=sys.stderr, flush=True)


def _on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on the main rank; its result, or its RunFolderError/OSError as one message, on every rank."""
    result, error = None, None
    if dist.is_main():
        try:
            result = fn()
        except (RunFolderError, OSError) as e:
            error = e
    shared = dist.broadcast_object({"result": result, "error": None if error is None else str(error)})
    if error is not None:
        raise error
    if shared["error"] is not None:
        raise RunFolderError(shared["error"])
    return shared["result"]


class RunFolder:
    """The trainer's run folder (``output_dir``). ``enabled=False`` (the TRL drop-in, which follows
    transformers.Trainer: no record, no automatic resume) keeps only what every run gets: stale temporaries
    removed, ``latest`` that finds nothing is an error, a resume restores metrics.jsonl to its step, the lock."""

    def __init__(
        self, path: Path, *, specs: Mapping[str, Any] | None = None, overwrite: bool = False, enabled: bool = True
    ):
        self.path = Path(path)
        self.specs = specs
        self.hint = OVERWRITE_HINT[specs is not None]
        self.flag = "--overwrite" if specs is not None else "overwrite=True"
        self.overwrite = overwrite
        self.enabled = enabled
        self.record: dict | None = None
        self.claimed = False
        self.existing = False  # the folder already held this training when it was claimed
        self.resumed_from: Path | None = None
        self._locked = False
        self._notes: list[str] = []

    # ---------------------------------------------------------------- claim
    def claim(self, trainer: RewardTrainer) -> None:
        """Make the folder this training's (once; every rank calls it): see the module docstring."""
        if self.claimed:
            return
        try:
            _on_main(lambda: self._claim(trainer))
        except BaseException:
            self.release()  # a refused folder is not held
            raise
        self.claimed = True

    def _claim(self, trainer: RewardTrainer) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        if not self.enabled:
            return
        a = trainer.args
        identity = run_identity(training_fields(a), describe_inputs(trainer, self.specs))
        record = read_record(self.path)
        if self.overwrite:
            target = a.resume_from_checkpoint
            inside = target not in (None, "latest") and self.path.resolve() in Path(target).resolve().parents
            if target == "latest" or inside:
                raise RunFolderError(
                    f"--overwrite removes the checkpoints of {self.path}, and --resume-from-checkpoint {target} would "
                    "resume one of them: pass one of the two"
                )
            doomed = run_entries(self.path, record)
            names = _names(doomed)
            remove_entries(doomed)
            if doomed:
                kept = [p for p in self.path.iterdir() if p.name != LOCK_FILE]
                left = f" (left in place, not written by a training: {_names(kept)})" if kept else ""
                _say(f"--overwrite: removed the previous run's files from {self.path}: {names}{left}")
            record = None
        elif record is None:
            found = run_entries(self.path, None)
            if found:
                raise RunFolderError(
                    f"{self.path} holds a training's files ({_names(found[:6])}{', ...' if len(found) > 6 else ''}) "
                    f"but no {RUN_FILE} saying which training: {self.hint}"
                )
        else:
            diffs = config_diffs(record.get("config", {}), identity["config"], ("that run", "this run"))
            diffs += input_diffs(record.get("inputs", {}), identity["inputs"])
            if diffs:
                raise RunFolderError(f"{self.path} holds another training ({'; '.join(diffs)}): {self.hint}")
        self.existing = record is not None
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        base = record if record is not None else {"created": now, "state": "running", "final_files": []}
        self.record = {**base, **identity, "updated": now}
        _write_json(self.path / RUN_FILE, self.record)

    def _lock(self) -> None:
        """Hold ``.fastrm_run.lock`` (pid and host); a lock whose process is gone on this host is taken over."""
        if self._locked:
            return
        lock = self.path / LOCK_FILE
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = json.loads(lock.read_text())
                except (OSError, ValueError):
                    holder = {}
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    break
                if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                    lock.unlink(missing_ok=True)
                    continue
                raise RunFolderError(
                    f"{self.path} is in use by another fastrm training (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('since')}): wait for it to end, or delete {lock} if "
                    "that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({**me, "since": datetime.datetime.now().isoformat(timespec="seconds")}, f)
            break
        self._locked = True
        atexit.register(self.release)

    def release(self) -> None:
        """Give the lock back (the end of train(), however it ends; also at interpreter exit)."""
        if self._locked:
            self._locked = False
            (self.path / LOCK_FILE).unlink(missing_ok=True)

    # ---------------------------------------------------------------- start / resume
    def start(self, trainer: RewardTrainer) -> tuple[Path | None, dict | None]:
        """Before the first step (every rank): claim, clean up, decide where to start.

        Returns ``(checkpoint to resume or None, result of a finished run or None)``."""
        self.claim(trainer)
        decision = _on_main(lambda: self._decide(trainer))
        if decision["finished"] is not None:
            return None, decision["finished"]
        self.resumed_from = Path(decision["checkpoint"]) if decision["checkpoint"] else None
        return self.resumed_from, None

    def _decide(self, trainer: RewardTrainer) -> dict:
        a, folder = trainer.args, self.path
        stale = ckpt_io.stale_temporaries(folder)
        if stale:
            self._notes.append(f"removed {_names(stale)}, left by a save that was interrupted")
        remove_entries(stale)
        target = a.resume_from_checkpoint
        none_written = " (save_steps=0 writes none: only the final model)" if not a.save_steps else ""
        if target == "latest":
            ckpt = ckpt_io.latest_checkpoint(folder)
            if ckpt is None:
                raise RunFolderError(
                    f"--resume-from-checkpoint latest: {folder} holds no complete checkpoint to resume from"
                    f"{none_written}; leave the flag out to start from step 0"
                )
            return {"checkpoint": str(ckpt), "finished": None}
        if target:
            return {"checkpoint": target, "finished": None}
        if not (self.enabled and self.existing):
            return {"checkpoint": None, "finished": None}
        if self.record.get("state") == "finished":
            _say(
                f"{folder}: this training already finished ({self.record.get('steps')} steps; model, metrics and "
                f"evaluation are in this folder). Nothing to do: {self.flag} trains it again"
            )
            return {"checkpoint": None, "finished": self.record.get("result", {})}
        ckpt = ckpt_io.latest_checkpoint(folder)
        if ckpt is None:
            self._notes.insert(
                0, f"this training was interrupted before its first checkpoint{none_written}; starting again at step 0"
            )
        return {"checkpoint": None if ckpt is None else str(ckpt), "finished": None}

    def begin(self, trainer: RewardTrainer) -> None:
        """After a resume (or none), before the first step: metrics.jsonl holds no step beyond this one, the
        config is written, and one line says where training starts (main rank)."""
        if not dist.is_main():
            return
        a = trainer.args
        self.path.mkdir(parents=True, exist_ok=True)
        if self.enabled or self.resumed_from is not None:
            truncate_metrics(self.path / METRICS_FILE, trainer.step)
        (self.path / CONFIG_FILE).write_text(json.dumps(a.to_dict(), indent=2))
        if self.resumed_from is not None:
            where = self.resumed_from.name if self.resumed_from.parent == self.path else str(self.resumed_from)
            auto = self.enabled and not a.resume_from_checkpoint  # the same command found its run
            what = "this training " if auto else ""
            line = f"resuming {what}from {where} (step {trainer.step} of {trainer.total_steps})"
            self._notes = [line, *self._notes, *([f"{self.flag} starts it again"] if auto else [])]
        if self._notes:
            _say(f"{self.path}: " + "; ".join(self._notes))
            self._notes = []
        if self.record is not None and self.record.get("state") != "running":
            self._update(state="running")

    def finish(self, result: dict, steps: int) -> None:
        """Record that this training finished: the same command then does nothing and returns ``result``."""
        if not (dist.is_main() and self.enabled and self.record is not None):
            return
        from fastrm.evaluation import json_safe

        self._update(state="finished", steps=steps, result=json_safe(result))

    def add_final_files(self, names: Sequence[str]) -> None:
        """Name the final model's files in the record as soon as they exist (an --overwrite then removes them)."""
        if dist.is_main() and self.enabled and self.record is not None:
            self._update(final_files=sorted(set(self.record.get("final_files", [])) | set(names)))

    def _update(self, **fields: Any) -> None:
        self.record = {**self.record, **fields}
        _write_json(self.path / RUN_FILE, self.record)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------- metrics history


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` logged after ``step`` (a resume redoes those steps); returns how many."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            row_step = 0  # not a row fastrm wrote: kept as it is
        if isinstance(row_step, (int, float)) and row_step > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return dropped


def save_history(run: Path, checkpoint_tmp: Path) -> None:
    """Put the metrics history so far into a checkpoint being written (a resume restores it exactly)."""
    src = Path(run) / METRICS_FILE
    if src.is_file():
        shutil.copyfile(src, Path(checkpoint_tmp) / METRICS_FILE)


def restore_history(checkpoint: Path, run: Path, step: int) -> None:
    """The history of a resumed run: the checkpoint's copy when it has one, else this folder's cut at ``step``."""
    src, dst = Path(checkpoint) / METRICS_FILE, Path(run) / METRICS_FILE
    if src.is_file():
        if not (dst.exists() and os.path.samefile(src, dst)):
            Path(run).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
            os.replace(dst.with_name(dst.name + ".tmp"), dst)
    else:
        truncate_metrics(dst, step)
