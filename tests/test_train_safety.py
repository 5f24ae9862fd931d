"""Nothing of a training run is lost or overwritten: a stop during the final save, two runs on one
folder, kills before the first checkpoint, resumes (recorded settings, the same metrics), failed saves;
and the command answers expected failures with one line and exit status 2."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from dpt_fast import train as trainer
from helpers import one_thread  # noqa: F401 (autouse: one intra-op thread)
from train_helpers import SignalAt, run_metrics, run_state

TINY = dict(data=["synthetic"], backbone="vit_tiny_patch16_224", hooks=[0, 1, 2, 3], features=32, size=64,
            num_workers=0, backend="reference", device="cpu", progress=False, batch_size=2, lr=1e-3)
# the same run on the command line
TINY_FLAGS = ["--data", "synthetic", "--backbone", "vit_tiny_patch16_224", "--hooks", "0,1,2,3", "--features", "32",
              "--size", "64", "--num-workers", "0", "--backend", "reference", "--device", "cpu", "--no-progress",
              "--batch-size", "2", "--lr", "1e-3"]


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("dpt-fast train: error:"), err
    for word in words:
        assert word in err, err
    return err


def test_sigterm_during_the_final_save_still_ends_with_checkpoint_and_model(tmp_path, monkeypatch):
    def killed(signum, frame):  # what SIGTERM does to a process without the trainer's handler
        raise RuntimeError("killed by SIGTERM")

    previous = signal.signal(signal.SIGTERM, killed)
    real_save = trainer.save_atomic

    def save_with_sigterm(obj, path):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives as the final checkpoint is being written
        real_save(obj, path)

    monkeypatch.setattr(trainer, "save_atomic", save_with_sigterm)
    try:
        result = trainer.train(TINY, steps=2, save_every=0, out=str(tmp_path))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result["step"] == 2 and run_state(tmp_path)["step"] == 2
    assert (tmp_path / "model" / "config.json").exists()
    assert signal.getsignal(signal.SIGTERM) is previous  # the trainer's handler is gone afterwards


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_dead_ones_lock_is_not(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / trainer._FolderLock.NAME
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'%d\\n' % os.getpid())\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert trainer.main([*TINY_FLAGS, "--steps", "1", "--out", str(out)]) == 2
        _one_line_error(capsys, "in use", str(holder.pid), "--out")
        assert sorted(p.name for p in out.iterdir()) == [lock.name]  # nothing written
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, unlocked
        holder.wait()
    assert lock.exists()
    assert trainer.main([*TINY_FLAGS, "--steps", "1", "--out", str(out)]) == 0
    assert run_state(out)["step"] == 1 and not lock.exists()  # released (and removed) at the end


def test_failed_save_removes_its_temporary_file_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    trainer.save_atomic({"step": 1}, target)
    before = target.read_bytes()

    def disk_full(obj, f):
        f.write(b"x" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        trainer.save_atomic({"step": 2}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"] and target.read_bytes() == before


def test_stale_temporaries_of_interrupted_saves_are_removed_at_start(tmp_path):
    leftovers = [tmp_path / ".checkpoint.pt.tmp-4242", tmp_path / ".metrics.jsonl.tmp-17",
                 tmp_path / ".args.json.tmp-99", tmp_path / "model" / "model.safetensors.tmp"]
    others = [tmp_path / "notes.tmp-1", tmp_path / ".checkpoint.pt.bak", tmp_path / "model" / "README"]
    (tmp_path / "model").mkdir()
    for path in leftovers + others:
        path.write_bytes(b"0" * 100)
    trainer.train(TINY, steps=1, out=str(tmp_path))
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in others)


def test_resume_after_a_kill_before_the_first_save_restarts_with_the_recorded_settings(tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    trainer.train(TINY, steps=4, log_every=1, out=str(whole))
    parts = tmp_path / "parts"
    monkeypatch.setattr(trainer, "_loss_fn", SignalAt(3, error=SystemExit(137)))  # killed in step 3
    with pytest.raises(SystemExit):
        trainer.train(TINY, steps=4, log_every=1, save_every=0, out=str(parts))
    monkeypatch.undo()
    assert [r["step"] for r in run_metrics(parts)] == [1, 2] and not (parts / "checkpoint.pt").exists()
    capsys.readouterr()

    # `dpt-fast train --resume --out OUT`: the settings, --data included, come from OUT/args.json
    assert trainer.main(["--resume", "--out", str(parts), "--save-every", "0"]) == 0
    assert "stopped before its first save" in capsys.readouterr().err
    assert [r["step"] for r in run_metrics(parts)] == [1, 2, 3, 4]  # no step twice
    assert [r["loss"] for r in run_metrics(parts)] == [r["loss"] for r in run_metrics(whole)]


def test_resumed_and_extended_runs_log_and_compute_what_an_uninterrupted_run_does(tmp_path, monkeypatch):
    options = dict(TINY, log_every=5, save_every=0)
    whole = tmp_path / "whole"
    expected = trainer.train(options, steps=12, out=str(whole))["model"].state_dict()

    parts = tmp_path / "parts"
    monkeypatch.setattr(trainer, "_loss_fn", SignalAt(3))  # Ctrl-C in step 3, between two metrics lines
    with pytest.raises(KeyboardInterrupt):
        trainer.train(options, steps=10, out=str(parts))
    monkeypatch.undo()
    assert run_state(parts)["step"] == 3 and not (parts / "metrics.jsonl").read_text()
    # README: `dpt-fast train --resume --out OUT` continues it; `--steps` extends a finished run
    assert trainer.main(["--resume", "--out", str(parts)]) == 0
    assert run_state(parts)["step"] == 10
    assert trainer.main(["--resume", "--out", str(parts), "--steps", "12"]) == 0

    logged = [(r["step"], r["loss"], r["lr"]) for r in run_metrics(parts)]
    assert [s for s, _, _ in logged] == [5, 10, 12]
    assert logged == [(r["step"], r["loss"], r["lr"]) for r in run_metrics(whole)]
    assert run_metrics(parts)[-1]["elapsed_s"] > run_metrics(parts)[0]["elapsed_s"]  # the clock continues too
    resumed = run_state(parts)["model"]
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    recorded = json.loads((parts / "args.json").read_text())
    assert recorded["size"] == 64 and recorded["steps"] == 12 and recorded["data"] == ["synthetic"]


def test_resume_refuses_options_that_contradict_the_recorded_run(tmp_path, capsys):
    trainer.train(TINY, steps=1, out=str(tmp_path))
    recorded = (tmp_path / "args.json").read_bytes()
    checkpoint = (tmp_path / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    refused = ["--resume", "--out", str(tmp_path), "--size", "384", "--backbone", "vit_small_patch16_224"]
    assert trainer.main(refused) == 2
    _one_line_error(capsys, "--size 384", "recorded: 64", "--backbone", "another --out")
    assert trainer.main(["--resume", "--out", str(tmp_path), "--steps", "0"]) == 2
    _one_line_error(capsys, "--steps 0", "step 1")
    assert (tmp_path / "args.json").read_bytes() == recorded and (tmp_path / "checkpoint.pt").read_bytes() == checkpoint
    # repeating a recorded value, or changing how the run executes, is fine
    assert trainer.main(["--resume", "--out", str(tmp_path), "--data", "synthetic", "--size", "64", "--steps", "2",
                         "--num-workers", "0", "--log-every", "1"]) == 0
    assert run_state(tmp_path)["step"] == 2
    # --resume CKPT without --out continues in the checkpoint's folder
    assert trainer.main(["--resume", str(tmp_path / "checkpoint.pt"), "--steps", "3"]) == 0
    assert run_state(tmp_path)["step"] == 3 and [r["step"] for r in run_metrics(tmp_path)] == [1, 2, 3]


def test_expected_failures_end_with_one_line_and_status_2(tmp_path, capsys):
    trainer.train(TINY, steps=1, out=str(tmp_path / "done"))
    capsys.readouterr()
    assert trainer.main([*TINY_FLAGS, "--steps", "1", "--out", str(tmp_path / "done")]) == 2
    _one_line_error(capsys, "checkpoint.pt exists", "--resume")
    missing_data = ["--data", str(tmp_path / "nope")]
    assert trainer.main([*TINY_FLAGS, "--steps", "1", "--out", str(tmp_path / "a"), *missing_data]) == 2
    _one_line_error(capsys, "--data", "nope")
    assert trainer.main(["--resume", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "b")]) == 2
    _one_line_error(capsys, "no such checkpoint")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert trainer.main(["--resume", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "c")]) == 2
    _one_line_error(capsys, "junk.pt")
    assert trainer.main(["--resume", "--out", str(tmp_path / "empty")]) == 2
    _one_line_error(capsys, "no checkpoint.pt or args.json", "--data")
    assert not (tmp_path / "empty").exists()  # a refused run leaves no empty folder behind
    (tmp_path / "a-file").write_text("")
    assert trainer.main([*TINY_FLAGS, "--out", str(tmp_path / "a-file" / "run")]) == 2
    _one_line_error(capsys, "--out", "a-file")


def test_every_option_has_help_and_states_its_default_once():
    from dpt_fast import cli_args
    parser = cli_args.train_parser()
    formatter = cli_args.TrainHelpFormatter("dpt-fast train")
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        text = formatter._expand_help(action)  # as --help prints it
        assert text.lower().count("default") <= 1, text
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    assert "required for a new run" in text and "exit status" in text
