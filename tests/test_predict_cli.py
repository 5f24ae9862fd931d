"""`dpt-fast predict` as a user meets it: one clear line and a documented exit status for every
expected failure, help texts, Ctrl-C / SIGTERM, and README agreeing with the behaviour."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_fast import DPTDepthModel, inference, predict
from dpt_fast.weights import save_model
from model_helpers import TINY

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = ["--backend", "reference", "--num-workers", "0", "--size", "64"]


def _photo(path, h=40, w=50, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _predict(capsys, *argv):
    rc = predict.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_inputs_without_images_are_usage_errors(tmp_path, model_dir, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no image here")
    for folder in ("empty", "texts"):
        rc, err = _predict(capsys, tmp_path / folder, "-o", tmp_path / "out", "--model", model_dir, *FAST)
        assert rc == 2 and "holds no image files" in err and len(err.strip().splitlines()) == 1, err
    # a missing input is a usage error, found before the model is even read
    rc, err = _predict(capsys, tmp_path / "missing", "-o", tmp_path / "out", "--model", tmp_path / "no-model.pt")
    assert rc == 2 and err.strip() == f"dpt-fast predict: {tmp_path / 'missing'}: no such file or directory"
    assert not (tmp_path / "out").exists()


def test_a_training_folder_as_model_points_to_its_model(tmp_path, model_dir, capsys):
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"")
    save_model(DPTDepthModel(**TINY), run / "model")
    rc, err = _predict(capsys, _photo(tmp_path / "in" / "a.png"), "-o", tmp_path / "out", "--model", run, *FAST)
    assert rc == 2 and f"--model {run / 'model'}" in err and len(err.strip().splitlines()) == 1, err


def test_a_non_image_named_explicitly_gives_one_clear_line(tmp_path, model_dir, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    rc, err = _predict(capsys, notes, "-o", tmp_path / "out", "--model", model_dir, *FAST)
    assert rc == 1 and f"{notes}: cannot read the image: not an image file" in err
    assert "UnidentifiedImageError" not in err


def test_an_output_name_held_by_the_users_file_is_a_conflict(tmp_path, model_dir, capsys):
    _photo(tmp_path / "in" / "photo.jpg")
    _photo(tmp_path / "in" / "other.png", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo.png").write_bytes(b"my own photo")
    for extra in ([], ["--overwrite"]):
        rc, err = _predict(capsys, tmp_path / "in", "-o", out, "--model", model_dir, *FAST, *extra)
        assert rc == 1 and "conflict: " in err and "photo.jpg" in err and "1 conflict(s)" in err, err
        assert (out / "photo.png").read_bytes() == b"my own photo" and (out / "other.png").is_file()


def test_a_constant_output_is_warned_about_once_naming_the_images(tmp_path, capsys):
    dead = DPTDepthModel(**TINY)
    with torch.no_grad():
        dead.scratch.output_conv[4].weight.zero_()
        dead.scratch.output_conv[4].bias.fill_(-1.0)  # the final ReLU sees negatives only: all zeros
    folder = tmp_path / "in"
    _photo(folder / "a.png")
    _photo(folder / "b.png", seed=1)
    rc, err = _predict(capsys, folder, "-o", tmp_path / "out", "--model", save_model(dead, tmp_path / "dead"), *FAST)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert rc == 0 and len(warnings) == 1, err
    assert "same value everywhere in 2 image(s)" in warnings[0] and "a.png" in warnings[0] and "b.png" in warnings[0]


def test_help_shows_required_options_and_defaults_once(capsys):
    with pytest.raises(SystemExit):
        predict.main(["--help"])
    text = capsys.readouterr().out
    usage = " ".join(text.split("\n\n")[0].split())
    assert "-o OUT --model MODEL" in usage and "[--model" not in usage and "[-o" not in usage
    assert "(default: " not in text  # argparse's automatic defaults would repeat the written ones
    for block in re.split(r"\n(?=  -)", text.split("options:", 1)[1].strip("\n")):  # every option has a help
        assert len(re.split(r"\s{2,}", block.strip(), maxsplit=1)) == 2, block


def test_sigint_and_sigterm_stop_cleanly_and_a_rerun_continues(tmp_path, model_dir):
    folder = tmp_path / "many"
    for i in range(40):
        _photo(folder / f"{i:03d}.png", 48, 48, seed=i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dpt_fast.predict", str(folder), "-o", str(out), "--model", str(model_dir),
           "--backend", "reference", "--size", "96", "--format", "npy"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    written = 0
    # Ctrl-C in a terminal reaches the whole process group, decoding workers included; SIGTERM the process
    for sig, status, workers in ((signal.SIGINT, 130, "1"), (signal.SIGTERM, 143, "0")):
        proc = subprocess.Popen(cmd + ["--num-workers", workers], stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        deadline = time.monotonic() + 240
        while len(list(out.glob("*.npy"))) <= written and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        err = proc.communicate(timeout=240)[1]
        assert proc.returncode == status, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
        summary = re.search(r"stopped: (\d+) written, (\d+) left", err)
        assert summary, err
        written += int(summary.group(1))
        assert int(summary.group(2)) == 40 - written and len(list(out.glob("*.npy"))) == written
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{40 - written} written, {written} skipped" in done.stderr
    assert len(list(out.glob("*.npy"))) == 40


def _readme_section(title):
    text = README.read_text()
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_readme_states_the_naming_rule_and_exit_statuses_as_they_are(tmp_path):
    section = _readme_section("Batch inference")
    for rel in ("coffee.jpg", "coffee.png", "x/photo.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    items, _ = inference.collect_inputs([tmp_path])
    names = {j.src.name: sorted(p.name for p in j.outputs.values())
             for j in inference.plan_jobs(items, tmp_path / "out", ("png16", "color"))}
    assert names["coffee.jpg"] == ["coffee.jpg-color.png", "coffee.jpg.png"]
    assert "`coffee.jpg.png`" in section and "`coffee.png.png`" in section and "`coffee.jpg-color.png`" in section
    for status in ("130", "143"):
        assert status in section and status in predict.__doc__
    assert inference.MANIFEST_NAME in section


def test_max_pixels_is_the_limit_that_holds(tmp_path, model_dir, capsys):
    _photo(tmp_path / "in" / "big.png", 40, 50)   # 2000 pixels
    _photo(tmp_path / "in" / "fits.png", 20, 25)  # 500 pixels: exactly the limit
    rc, err = _predict(capsys, tmp_path / "in", "-o", tmp_path / "out", "--model", model_dir, *FAST,
                       "--max-pixels", "500")
    assert rc == 1 and "big.png: cannot read the image: 50x40 = 2000 pixels is over the limit of 500" in err, err
    assert (tmp_path / "out" / "fits.png").is_file() and not (tmp_path / "out" / "big.png").exists()
