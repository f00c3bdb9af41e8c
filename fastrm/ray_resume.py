"""Resuming a Ray run from its own run folder when Ray has no record of its checkpoints.

Ray Train resumes a run (same ``storage_path/name``) from the checkpoints listed in its
``checkpoint_manager_snapshot.json``, which its controller writes when it registers a reported checkpoint. A driver
killed between an upload and that registration (SIGKILL to the job's entrypoint, a lost head) leaves complete
``checkpoint-N`` folders that no snapshot lists, and a resubmitted job retrained from step 1. So the driver looks
in the run folder itself (:func:`find_resume_point`):

* A checkpoint counts when it is **complete and of this run**: rank 0 writes :data:`MANIFEST` into the folder
  before Ray uploads it (:func:`write_manifest`: every file with its size, and the run's identity hash, the hash of
  ``fastrm_run.json``); a folder counts only when the manifest is there, names this run, and every file it lists is
  in storage with that size. A half-uploaded folder never does (uploads are not atomic: Ray copies file by file).
* The highest complete step checkpoint is resumed when it is newer than what Ray restores (none, after a driver
  kill); a complete final checkpoint means the run is finished, and the driver returns it without starting workers.
* Checkpoints Ray does not track are never pruned by Ray: once the resumed run ends, :func:`prune_untracked`
  applies ``save_total_limit`` to them, as Ray applies it to its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fastrm import ray_cluster as cluster
from fastrm.checkpoint import checkpoint_step

MANIFEST = "fastrm_upload.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants (Ray 2.5x-2.60)


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint of this run in its run folder: ``uri`` is a storage URI or an absolute path."""

    uri: str
    step: int | None  # None for the final checkpoint
    name: str

    @property
    def final(self) -> bool:
        return self.step is None


def write_manifest(folder: str | os.PathLike, run_id: str) -> None:
    """Record every file of the local checkpoint ``folder`` with its size, and the run it belongs to."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"run": run_id, "files": files}, indent=1))


def is_complete(fs, path: str, run_id: str) -> bool:
    """True when the checkpoint at ``path`` (on pyarrow filesystem ``fs``) is fully in storage and of run ``run_id``."""
    import pyarrow.fs

    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            manifest = json.loads(f.read().decode())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):  # missing, half-written or not ours
        return False
    if manifest.get("run") != run_id or not isinstance(files, dict) or not files:
        return False
    infos = fs.get_file_info([f"{path}/{rel}" for rel in files])
    return all(i.type == pyarrow.fs.FileType.File and i.size == size for i, size in zip(infos, files.values()))


def _run_folder(storage: str, name: str) -> tuple[object, str, str]:
    fs, root = cluster.storage_fs(storage)
    return fs, f"{root.rstrip('/')}/{name}", f"{storage.rstrip('/')}/{name}"


def has_ray_snapshot(storage: str, name: str) -> bool:
    import pyarrow.fs

    fs, run, _ = _run_folder(storage, name)
    return fs.get_file_info(f"{run}/{RAY_SNAPSHOT}").type == pyarrow.fs.FileType.File


def complete_checkpoints(storage: str, name: str, run_id: str, final_name: str) -> list[ResumePoint]:
    """The complete checkpoints of this run in ``storage/name``, oldest first (the final one last)."""
    import pyarrow.fs

    fs, run, where = _run_folder(storage, name)
    entries = fs.get_file_info(pyarrow.fs.FileSelector(run, allow_not_found=True))
    found = []
    for e in entries:
        if e.type != pyarrow.fs.FileType.Directory:
            continue
        step = checkpoint_step(e.base_name)
        if (step is not None or e.base_name == final_name) and is_complete(fs, e.path, run_id):
            found.append(ResumePoint(f"{where}/{e.base_name}", step, e.base_name))
    return sorted(found, key=lambda p: (p.final, p.step or 0))


def find_resume_point(storage: str, name: str, run_id: str, final_name: str) -> ResumePoint | None:
    """The checkpoint to resume from when Ray has none to restore: the final one if complete, else the highest
    complete step checkpoint; None when the folder holds none (or Ray's snapshot lists its checkpoints)."""
    found = complete_checkpoints(storage, name, run_id, final_name)
    return found[-1] if found else None


def prefer_run_folder(ray_checkpoint_path: str | None, point: dict | None) -> tuple[bool, str | None]:
    """Whether a worker resumes from the run folder's ``point`` (``{"uri", "step"}``, from the driver) rather than
    from the checkpoint Ray restores (its path, or None), and the line to print when that overrides Ray's."""
    if point is None:
        return False, None
    if ray_checkpoint_path is None:
        return True, None  # the driver has said so
    ray_at = checkpoint_step(Path(str(ray_checkpoint_path).rstrip("/")).name)  # None: Ray's is the final one
    if ray_at is not None and ray_at < point["step"]:
        return True, f"fastrm: resuming from {point['uri']} (step {point['step']}), newer than Ray's step {ray_at}"
    return False, None


def prune_untracked(storage: str, name: str, run_id: str, keep_last: int, tracked: list[str], upto: int) -> list[str]:
    """Delete the complete ``checkpoint-N`` folders (N <= ``upto``) that Ray does not track, keeping the newest of
    them while Ray's ``tracked`` ones (folder names) number fewer than ``keep_last``; returns the deleted names."""
    if keep_last <= 0:
        return []
    fs, run, _ = _run_folder(storage, name)
    untracked = [
        p
        for p in complete_checkpoints(storage, name, run_id, final_name="")
        if p.step is not None and p.step <= upto and p.name not in tracked
    ]
    room = max(0, keep_last - len(tracked))
    doomed = untracked[: max(0, len(untracked) - room)]
    for p in doomed:
        fs.delete_dir(f"{run}/{p.name}")
    return [p.name for p in doomed]
