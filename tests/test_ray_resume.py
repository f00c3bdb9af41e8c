"""What a Ray driver resumes from when Ray has no record: complete checkpoints of this run only, the newest first
(fastrm/ray_resume.py). No cluster: the run folder is built here; the killed-driver job is
tests/test_ray_driver_kill.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")

from fastrm import ray_resume  # noqa: E402

RUN = "1a2b3c4d"


def _fs():
    import pyarrow.fs

    return pyarrow.fs.LocalFileSystem()


def _checkpoint(run: Path, name: str, run_id: str = RUN, *, result: bool = False) -> Path:
    folder = run / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 1000)
    (folder / "trainer_state.pt").write_bytes(b"s" * 100)
    if result:
        (folder / "result.json").write_text('{"train": {"step": 9, "loss": 0.5}}')
    ray_resume.write_manifest(folder, run_id)
    return folder


def test_only_complete_checkpoints_of_this_run_count(tmp_path):
    run = tmp_path / "storage" / "rm-x"
    ok = _checkpoint(run, "checkpoint-3")
    assert ray_resume.is_complete(_fs(), str(ok), RUN)
    assert not ray_resume.is_complete(_fs(), str(ok), "another-run")  # another fastrm_run.json

    half = _checkpoint(run, "checkpoint-6")  # an upload cut short: a file smaller than its manifest says
    (half / "model.safetensors").write_bytes(b"w" * 10)
    gone = _checkpoint(run, "checkpoint-9")  # a file not uploaded yet
    (gone / "trainer_state.pt").unlink()
    bad = _checkpoint(run, "checkpoint-12")  # the manifest itself cut short
    (bad / ray_resume.MANIFEST).write_text('{"run": "1a2b3c4d", "files": {"model.saf')
    _checkpoint(run, "checkpoint-15", "another-run")
    (run / "checkpoint-18").mkdir()  # no manifest at all (fastrm before this, or the upload had not begun)
    for folder in (half, gone, bad):
        assert not ray_resume.is_complete(_fs(), str(folder), RUN)

    point = ray_resume.find_resume_point(str(tmp_path / "storage"), "rm-x", RUN, "model")
    assert point == ray_resume.ResumePoint(f"{tmp_path / 'storage'}/rm-x/checkpoint-3", 3, "checkpoint-3")
    _checkpoint(run, "checkpoint-21")
    assert ray_resume.find_resume_point(str(tmp_path / "storage"), "rm-x", RUN, "model").step == 21
    _checkpoint(run, "model", result=True)  # a complete final model: the run is finished
    final = ray_resume.find_resume_point(str(tmp_path / "storage"), "rm-x", RUN, "model")
    assert final.final and final.name == "model"
    assert ray_resume.find_resume_point(str(tmp_path / "storage"), "nothing-here", RUN, "model") is None


def test_a_worker_takes_the_newer_of_rays_checkpoint_and_the_run_folders():
    point = {"uri": "/s/rm-x/checkpoint-8", "step": 8}
    assert ray_resume.prefer_run_folder(None, point) == (True, None)  # nothing from Ray: the driver said so
    use, line = ray_resume.prefer_run_folder("/s/rm-x/checkpoint-4", point)  # Ray's snapshot lags (issue 32)
    assert use and line == "fastrm: resuming from /s/rm-x/checkpoint-8 (step 8), newer than Ray's step 4"
    assert ray_resume.prefer_run_folder("/s/rm-x/checkpoint-12", point) == (False, None)  # a restart in this job
    assert ray_resume.prefer_run_folder("/s/rm-x/model", point) == (False, None)
    assert ray_resume.prefer_run_folder("/s/rm-x/checkpoint-4", None) == (False, None)


def test_leftovers_ray_never_tracked_follow_save_total_limit(tmp_path):
    run = tmp_path / "rm-x"
    for step in (3, 6, 9, 12):
        _checkpoint(run, f"checkpoint-{step}")
    # Resumed from checkpoint-6; Ray then recorded checkpoint-12 and the final model.
    deleted = ray_resume.prune_untracked(str(tmp_path), "rm-x", RUN, 2, ["checkpoint-12", "model"], upto=6)
    assert deleted == ["checkpoint-3", "checkpoint-6"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-12", "checkpoint-9"]  # 9: not <= upto, kept
    # Ray recorded only the final model: the newest leftover fills the limit.
    deleted = ray_resume.prune_untracked(str(tmp_path), "rm-x", RUN, 2, ["model"], upto=12)
    assert deleted == ["checkpoint-9"] and [p.name for p in run.iterdir()] == ["checkpoint-12"]
    assert ray_resume.prune_untracked(str(tmp_path), "rm-x", RUN, 0, [], upto=12) == []  # 0: keep all


def test_manifest_lists_every_file_with_its_size(tmp_path):
    folder = _checkpoint(tmp_path, "checkpoint-1")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.bin").write_bytes(b"12345")
    ray_resume.write_manifest(folder, RUN)
    manifest = json.loads((folder / ray_resume.MANIFEST).read_text())
    assert manifest == {
        "run": RUN,
        "files": {"model.safetensors": 1000, "sub/x.bin": 5, "trainer_state.pt": 100},
    }
