"""Step checkpoints: an HF-loadable model folder plus the trainer state, written atomically, read without pickle.

A checkpoint ``checkpoint-N/`` holds the model as written by ``RewardModel.save_pretrained`` (an HF
sequence-classification folder, with the tokenizer) and ``trainer_state.pt`` (step, optimizer, scheduler, RNG
states, the training config). It is built in a temporary sibling folder and renamed into place only when complete,
so a crash mid-write never leaves a folder that :func:`latest_checkpoint` would take for a checkpoint (a SIGKILL
leaves the temporary folder, which :func:`stale_temporaries` finds at the next start). The state holds only tensors
and plain Python data and is loaded with ``torch.load(weights_only=True)``: a checkpoint folder cannot run code when
it is read.

A save never leaves the user with nothing (:func:`save_guarded`): the free space is checked against the save's size
first, and a failed write (a full disk, a quota) removes its partial files, keeps the previous complete checkpoint
and is one :class:`SaveError` line saying so.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fastrm import distributed as dist

STATE_FILE = "trainer_state.pt"
PREFIX = "checkpoint-"
FINAL_STAGING = ".final-model"  # the final model is built here, then its files move into the run folder
# Temporary folders of write_atomically (".checkpoint-8.tmp-1a2b3c4d", "..final-model.old-...") and the staging one.
_TEMPORARY = re.compile(r"^\.(?:checkpoint-\d+|\.final-model)\.(?:tmp|old)-[0-9a-f]{8}$")
# Room a save needs beyond its tensors and tokenizer: configs, the RNG state, file headers.
SAVE_SLACK_BYTES = 1 << 20


class SaveError(OSError):
    """A save that did not complete (no room, or the write failed); its partial files are gone and the previous
    complete checkpoint is kept. The message is one line saying so."""


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N for a folder named ``checkpoint-N``, else None (temporary folders never match)."""
    name = Path(path).name
    if not name.startswith(PREFIX) or not name[len(PREFIX) :].isdigit():
        return None
    return int(name[len(PREFIX) :])


def is_complete(path: str | os.PathLike) -> bool:
    return checkpoint_step(path) is not None and Path(path, STATE_FILE).is_file()


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The complete ``checkpoint-N`` folder with the largest N in ``out_dir``, or None."""
    ckpts = [p for p in Path(out_dir).glob(PREFIX + "*") if is_complete(p)]
    return max(ckpts, key=checkpoint_step) if ckpts else None


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary folder beside ``final``, then rename it to ``final``.

    An existing ``final`` (a re-save of the same step) is replaced only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # the previous complete folder goes back in place
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporary folders a save left in ``folder`` when its process was killed (never a complete checkpoint)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _TEMPORARY.match(p.name) or p.name == FINAL_STAGING)


def tensor_bytes(*trees: Any) -> int:
    """Bytes of the tensors in nested dicts/lists (what ``torch.save`` / safetensors write, give or take headers)."""
    total = 0
    stack = list(trees)
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def save_size(tokenizer: Any, *trees: Any) -> int:
    """About the bytes a save writes: its tensors, the tokenizer's tokenizer.json (2 MB for GPT-NeoX, 33 MB for
    Gemma) and :data:`SAVE_SLACK_BYTES`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return tensor_bytes(*trees) + (len(backend.to_str()) if backend is not None else 0) + SAVE_SLACK_BYTES


def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes on the filesystem holding ``folder`` (its nearest existing parent), as an unprivileged user."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _kept(run_dir: Path | None) -> str:
    """What the user still has after a failed save of ``run_dir``'s next checkpoint or final model."""
    if run_dir is None:
        return "the previous checkpoints are untouched"
    last = latest_checkpoint(run_dir)
    if last is None:
        return "there is no earlier complete checkpoint in it to resume from"
    return (
        f"{last.name} (step {checkpoint_step(last)}) is still its latest complete checkpoint: re-run the same "
        "command to resume from it"
    )


def save_guarded(final: Path, write: Callable[[Path], None], *, needed: int, what: str, run_dir: Path | None) -> Path:
    """:func:`write_atomically` after checking that ``needed`` bytes are free; any failure is one SaveError line.

    ``what`` names the save ("checkpoint-8", "the final model"); ``run_dir`` is the run folder whose latest complete
    checkpoint the message names. The original exception is chained (``--debug`` shows its traceback)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    free = free_bytes(final.parent)
    if free < needed:
        raise SaveError(
            f"{final.parent}: not enough free space to save {what}: it needs about {human_bytes(needed)} ({needed} "
            f"bytes) and {human_bytes(free)} ({free} bytes) are free. Nothing was written; {_kept(run_dir)} once "
            "there is room (free space, or lower save_total_limit)"
        )
    try:
        return write_atomically(final, write)
    except Exception as e:  # torch.save, safetensors and tokenizers each raise their own type for a failed write
        raise SaveError(
            f"{final.parent}: saving {what} failed ({_reason(e, final.parent, needed)}); its partial files were "
            f"removed and {_kept(run_dir)}"
        ) from e


def _reason(e: Exception, folder: Path, needed: int) -> str:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
    else:  # e.g. torch's "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file ..."
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    free = free_bytes(folder)
    if free < needed:
        why += f"; {human_bytes(free)} free, the save needs about {human_bytes(needed)}"
    return why


def agree(error: SaveError | None) -> None:
    """Raise the main rank's save error on every rank (a collective: every rank calls it after a save)."""
    message = dist.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise SaveError(message)


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer draws from, as tensors and plain data (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def _tuples(x: Any) -> Any:
    # random.setstate needs tuples; a weights_only round trip keeps them, but be lenient with lists.
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    torch.save(state, Path(folder) / STATE_FILE)


def load_trainer_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of a complete checkpoint (tensors and plain data only; no code runs)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a fastrm checkpoint (no {STATE_FILE})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error names the offending global
        raise ValueError(f"{path}: not a trainer state fastrm can read safely ({e})") from e


def prune(out_dir: Path, keep_last: int, protect: Path) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints of this run (never ``protect``)."""
    if keep_last <= 0:
        return
    ckpts = sorted((p for p in Path(out_dir).glob(PREFIX + "*") if is_complete(p)), key=checkpoint_step)
    for old in ckpts[: max(0, len(ckpts) - keep_last)]:
        if old.resolve() != Path(protect).resolve():
            shutil.rmtree(old, ignore_errors=True)
