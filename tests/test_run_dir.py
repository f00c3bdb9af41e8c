"""The local run folder as a user meets it (fastrm/run_dir.py): `fastrm train` on a folder that holds nothing, this
training (interrupted by Ctrl-C or SIGKILL, or finished), another training, or a training's files without a record;
and saves on a full disk (a failing write, a free-space check, a real tiny tmpfs where the machine allows one)."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastrm import checkpoint as ckpt_io
from fastrm.checkpoint import SaveError, latest_checkpoint
from fastrm.cli import main
from fastrm.run_dir import LOCK_FILE, RUN_FILE
from fastrm.synthetic import synthetic_pairs
from fastrm.trainer import RewardTrainer

# 24 pairs, 8 per step, 4 steps, a checkpoint every 2: the smallest run with a checkpoint to resume and steps to redo.
RUN = ["--tokenizer", "byte", "--model", "tiny-llama", "--pairs-per-step", "8", "--max-steps", "4", "--max-length"]
RUN += ["64", "--learning-rate", "3e-3", "--warmup-ratio", "0", "--progress", "false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(24, seed=1)))
    return path


def train(capsys, data, out, *extra) -> tuple[int, str]:
    """`fastrm train` in this process; returns (exit code, stderr + stdout)."""
    rc = main(["train", "--data", str(data), *RUN, "--output-dir", str(out), *map(str, extra)])
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


def steps(out: Path, split: str = "train") -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r.get("split") == split]


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C right after step ``step`` is logged (before its checkpoint would be written)."""
    real = RewardTrainer._log

    def log(self, record):
        real(self, record)
        if record.get("split") == "train" and record["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(RewardTrainer, "_log", log)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> dict:
    """The weights of the run trained without interruption (what every resumed run must reach)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", "--data", str(data), *RUN, "--save-steps", "2", "--output-dir", str(out)]) == 0
    assert steps(out) == [1, 2, 3, 4]
    return weights(out)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------------------------- resume


def test_ctrl_c_then_the_same_command_resumes_exactly_and_a_finished_run_is_not_redone(
    tmp_path, capsys, monkeypatch, data, straight
):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 3)
    rc, err = train(capsys, data, out, "--save-steps", 2)
    assert rc == 130 and "interrupted" in err
    assert steps(out) == [1, 2, 3] and latest_checkpoint(out).name == "checkpoint-2"
    monkeypatch.undo()

    rc, err = train(capsys, data, out, "--save-steps", 2)
    assert rc == 0, err
    assert f"[run] {out}: resuming this training from checkpoint-2 (step 2 of 4); --overwrite starts it again\n" in err
    assert steps(out) == [1, 2, 3, 4]  # step 3 once: the resume restored the history of checkpoint-2
    assert_same(weights(out), straight)
    assert not (out / LOCK_FILE).exists()

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, err = train(capsys, data, out, "--save-steps", 2)
    assert rc == 0
    assert f"[run] {out}: this training already finished (4 steps; model, metrics and evaluation are in this " in err
    assert "Nothing to do: --overwrite trains it again" in err and "trained 4 steps" in err  # the recorded result
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != RUN_FILE} == {
        k: v for k, v in before.items() if k != RUN_FILE
    }
    assert steps(out) == [1, 2, 3, 4]


def test_sigkill_mid_save_then_the_same_command_resumes_and_removes_the_stale_folder(tmp_path, capsys, data, straight):
    """A real SIGKILL while checkpoint-4 is being written (model files done, trainer state half written): the
    temporary folder and the lock of the dead process stay behind; the same command removes the one, takes over
    the other and resumes from checkpoint-2."""
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), *RUN, "--save-steps", "2", "--output-dir", str(out)]
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "import fastrm.checkpoint as c\n"
        "real = c.save_trainer_state\n"
        "def die(folder, state):\n"
        "    if state['step'] == 4:\n"
        "        (Path(folder) / c.STATE_FILE).write_bytes(b'half a file')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(folder, state)\n"
        "c.save_trainer_state = die\n"
        "from fastrm.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    stale = [q.name for q in out.iterdir() if q.name.startswith(".checkpoint-4.tmp-")]
    assert len(stale) == 1 and (out / LOCK_FILE).exists() and latest_checkpoint(out).name == "checkpoint-2"

    rc, err = train(capsys, data, out, "--save-steps", 2)
    assert rc == 0, err
    assert (
        f"[run] {out}: resuming this training from checkpoint-2 (step 2 of 4); removed {stale[0]}/, left by a save "
        "that was interrupted; --overwrite starts it again" in err
    )
    assert not [q for q in out.iterdir() if ".tmp-" in q.name]
    assert steps(out) == [1, 2, 3, 4]
    assert_same(weights(out), straight)


def test_interrupted_before_the_first_checkpoint_starts_again_at_step_0(tmp_path, capsys, monkeypatch, data):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 2)
    assert train(capsys, data, out)[0] == 130
    monkeypatch.undo()
    rc, err = train(capsys, data, out)
    assert rc == 0, err
    assert (
        f"[run] {out}: this training was interrupted before its first checkpoint (save_steps=0 writes none: only "
        "the final model); starting again at step 0\n" in err
    )
    assert steps(out) == [1, 2, 3, 4]


def test_latest_with_nothing_to_resume_is_an_error(tmp_path, capsys, data):
    out = tmp_path / "run"
    rc, err = train(capsys, data, out, "--resume-from-checkpoint", "latest")
    assert rc == 1
    assert (
        f"fastrm train: error: --resume-from-checkpoint latest: {out} holds no complete checkpoint to resume from "
        "(save_steps=0 writes none: only the final model); leave the flag out to start from step 0\n" in err
    )
    assert not (out / "metrics.jsonl").exists()
    rc, err = train(capsys, data, out, "--resume-from-checkpoint", "latest", "--overwrite")
    assert rc == 1 and "--overwrite removes the checkpoints of" in err and "pass one of the two" in err


# ----------------------------------------------------------------------------------------------- another training


def test_another_training_is_refused_and_overwrite_removes_only_the_runs_files(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert train(capsys, data, out, "--max-steps", 2, "--save-steps", 1)[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "eval-hh").mkdir()  # what `fastrm eval --model run` writes: not the training's
    listing = sorted(p.name for p in out.iterdir())

    rc, err = train(capsys, data, out, "--max-steps", 2, "--save-steps", 1, "--loss", "threshold")
    assert rc == 1
    assert (
        f"fastrm train: error: {out} holds another training (loss: that run 'bt', this run 'threshold'): pass "
        "--overwrite to remove its files first, or choose another --output-dir\n" in err
    )
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(24, seed=2)))
    rc, err = train(capsys, other, out, "--max-steps", 2, "--save-steps", 1)
    assert rc == 1 and f"holds another training (data: that run ['{data}'] (24 pairs) [content " in err
    assert f"this run ['{other}'] (24 pairs) [content " in err
    assert sorted(p.name for p in out.iterdir()) == listing  # refused: nothing touched

    rc, err = train(capsys, data, out, "--max-steps", 2, "--save-steps", 1, "--loss", "threshold", "--overwrite")
    assert rc == 0, err
    assert (
        f"[run] --overwrite: removed the previous run's files from {out}: checkpoint-1/, checkpoint-2/, config.json, "
        "fastrm_run.json, fastrm_scoring.json, metrics.jsonl, model.safetensors, tokenizer.json, "
        "tokenizer_config.json, training_config.json (left in place, not written by a training: eval-hh/, "
        "notes.txt)\n" in err
    )
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval-hh").is_dir()
    assert steps(out) == [1, 2]
    assert json.loads((out / RUN_FILE).read_text())["config"]["loss"] == "threshold"


def test_a_folder_with_a_model_but_no_run_record_is_refused(tmp_path, capsys, data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights of something else")
    rc, err = train(capsys, data, out)
    assert rc == 1
    assert (
        f"{out} holds a training's files (config.json, model.safetensors) but no fastrm_run.json saying which "
        "training: pass --overwrite to remove its files first, or choose another --output-dir" in err
    )
    assert (out / "model.safetensors").read_bytes() == b"weights of something else"


def test_a_second_process_on_the_folder_is_refused(tmp_path, capsys, data):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        host = __import__("socket").gethostname()
        (out / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": host, "since": "now"}))
        rc, err = train(capsys, data, out)
        assert rc == 1
        assert f"{out} is in use by another fastrm training (pid {holder.pid} on {host}, since now)" in err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_python_callers_get_the_same_rules(tmp_path, data):
    """RewardTrainer(...).train() owns its output_dir as the CLI does; the hint names the Python argument."""
    from fastrm.config import RewardConfig
    from fastrm.model import RewardModel
    from fastrm.run_dir import RunFolderError
    from fastrm.synthetic import byte_tokenizer

    def trainer(seed: int, overwrite: bool = False) -> RewardTrainer:
        args = RewardConfig(output_dir=str(tmp_path), progress=False, pairs_per_step=12, max_steps=1, seed=seed)
        model = RewardModel.from_config("tiny-llama")
        return RewardTrainer(model, args, str(data), tokenizer=byte_tokenizer(), overwrite=overwrite)

    trainer(0).train()
    with pytest.raises(RunFolderError, match="seed: that run 0, this run 7.*pass overwrite=True to RewardTrainer"):
        trainer(7).train()
    trainer(7, overwrite=True).train()
    assert json.loads((tmp_path / RUN_FILE).read_text())["config"]["seed"] == 7


# ----------------------------------------------------------------------------------------------- full disk


ENFORCE = (
    "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file write failed"
)


def test_a_failed_write_keeps_the_previous_checkpoint_and_is_one_line(tmp_path, capsys, monkeypatch, data, straight):
    """torch.save fails half-way through checkpoint-4 (what a full disk looked like before): the partial folder
    is removed, checkpoint-2 stays the latest, the error is one line; the same command then resumes and finishes."""
    out = tmp_path / "run"
    real = ckpt_io.save_trainer_state

    def full_disk(folder, state):
        if state["step"] == 4:
            (Path(folder) / ckpt_io.STATE_FILE).write_bytes(b"half")
            raise RuntimeError(ENFORCE + "\nException raised from write_record at ../caffe2/serialize/...")
        real(folder, state)

    monkeypatch.setattr(ckpt_io, "save_trainer_state", full_disk)
    rc, err = train(capsys, data, out, "--save-steps", 2)
    assert rc == 1 and "Traceback" not in err
    assert err.endswith(
        f"fastrm train: error: {out}: saving checkpoint-4 failed ({ENFORCE}); its partial files were removed and "
        "checkpoint-2 (step 2) is still its latest complete checkpoint: re-run the same command to resume from it\n"
        "(run with --debug for the traceback)\n"
    )
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert not (out / "model.safetensors").exists()

    with pytest.raises(SaveError) as e:  # --debug: the traceback, with the original error chained
        main(["train", "--data", str(data), *RUN, "--save-steps", "2", "--output-dir", str(out), "--debug"])
    assert isinstance(e.value.__cause__, RuntimeError)
    monkeypatch.undo()

    rc, err = train(capsys, data, out, "--save-steps", 2)
    assert rc == 0 and "resuming this training from checkpoint-2 (step 2 of 4)" in err
    assert steps(out) == [1, 2, 3, 4]
    assert_same(weights(out), straight)


def test_too_little_free_space_is_refused_before_writing(tmp_path, capsys, monkeypatch, data):
    out = tmp_path / "run"
    calls = []

    def free(folder):
        calls.append(folder)
        return 10**12 if len(calls) == 1 else 5000  # room for checkpoint-2, then the disk is full

    monkeypatch.setattr(ckpt_io, "free_bytes", free)
    rc, err = train(capsys, data, out, "--save-steps", 2)
    assert rc == 1
    line = next(x for x in err.splitlines() if x.startswith("fastrm train: error:"))
    assert line.startswith(f"fastrm train: error: {out}: not enough free space to save checkpoint-4: it needs about ")
    needed = int(line.split(" (")[1].split(" bytes")[0])
    size = sum(f.stat().st_size for f in (out / "checkpoint-2").iterdir())
    assert size < needed < size + 2 * (1 << 20)  # the estimate covers the checkpoint, and is no wild guess
    assert line.endswith(
        "and 5.0 KB (5000 bytes) are free. Nothing was written; checkpoint-2 (step 2) is still its latest complete "
        "checkpoint: re-run the same command to resume from it once there is room (free space, or lower "
        "save_total_limit)"
    )
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]


def test_a_failed_final_save_keeps_the_last_checkpoint_and_the_rerun_saves_the_model(tmp_path, capsys, data):
    out = tmp_path / "run"
    from fastrm.model import RewardModel

    real = RewardModel.save_pretrained

    def no_space(self, folder, **kw):
        if Path(folder).name.startswith("..final-model"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, folder, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RewardModel, "save_pretrained", no_space)
        rc, err = train(capsys, data, out, "--save-steps", 2)
    assert rc == 1
    assert (
        f"fastrm train: error: {out}: saving the final model failed (no space left on device); its partial files "
        "were removed and checkpoint-4 (step 4) is still its latest complete checkpoint: re-run the same command to "
        "resume from it\n" in err
    )
    assert not (out / "model.safetensors").exists() and not list(out.glob(".*final-model*"))
    rc, err = train(capsys, data, out, "--save-steps", 2)
    assert rc == 0 and "resuming this training from checkpoint-4 (step 4 of 4)" in err
    assert (out / "model.safetensors").exists() and steps(out) == [1, 2, 3, 4]


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 3 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("no tmpfs quota here (needs root and mount)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_disk(tiny_disk, capsys, monkeypatch, data):
    """On a 3 MB disk one checkpoint (1.1 MB) fits with room to spare and the next does not: the free-space check
    refuses it with the disk's real numbers; with the check fooled, the write itself fails (ENOSPC) and is handled
    the same way. Either way checkpoint-1 stays complete and nothing partial is left."""
    out = tiny_disk / "run"
    rc, err = train(capsys, data, out, "--save-steps", 1, "--save-total-limit", 0)
    assert rc == 1 and f"{out}: not enough free space to save checkpoint-2: it needs about " in err, err
    assert latest_checkpoint(out).name == "checkpoint-1"

    monkeypatch.setattr(ckpt_io, "SAVE_SLACK_BYTES", -(1 << 30))  # the estimate now says a save needs nothing
    rc, err = train(capsys, data, out, "--save-steps", 1, "--save-total-limit", 0)
    assert rc == 1 and "saving checkpoint-" in err and "its partial files were removed and checkpoint-" in err, err
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    last = latest_checkpoint(out)
    assert ckpt_io.load_trainer_state(last)["step"] == ckpt_io.checkpoint_step(last)  # complete and readable
