"""What happens when a run is killed, its loss explodes, or it is fed garbage (README table
"What happens when…"). Every case: one sentence, a non-zero exit, nothing on disk lost."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import a2mim
import runtime
import train

HERE = os.path.dirname(os.path.abspath(__file__))
# 512 fake images / batch 64 = 8 steps per epoch.
RUN = ["--data", "fake", "--arch", "resnet18", "--width", "8", "--batch-size", "64", "--workers", "0",
       "--vis-every", "0", "--log-every", "4", "--save-every", "1"]
CKPT = "a2mim_resnet18_fake/checkpoint.pt"


def train_cli(*argv, **kw):
    """train.py in a fresh process, one thread, so that two runs are bit-for-bit comparable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=HERE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def finish(*argv):
    proc = train_cli(*argv)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]


def assert_same_model(path_a, path_b):
    a, b = train.load_checkpoint(path_a)["model"], train.load_checkpoint(path_b)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-epoch run to compare the interrupted ones with."""
    out = tmp_path_factory.mktemp("reference")
    finish(*RUN, "--epochs", "4", "--out-dir", str(out))
    return out / CKPT


def test_kill_9_while_writing_a_checkpoint_then_rerun_ends_with_the_same_weights(tmp_path, reference):
    """Poll for the temporary file that save_checkpoint writes, and SIGKILL the run the moment it
    appears: the kill lands inside the checkpoint write. The rerun must ignore the half-written
    file, resume from the last complete checkpoint and finish bit-identical."""
    argv = [*RUN, "--epochs", "4", "--out-dir", str(tmp_path)]
    tmp_file = tmp_path / (CKPT + ".tmp")
    proc = train_cli(*argv)
    deadline = time.time() + 300
    while not tmp_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.0005)
    assert proc.poll() is None, "the run ended before it wrote a checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = tmp_path / CKPT
    if ckpt.exists():  # the first save was caught: no complete checkpoint yet is fine too
        train.load_checkpoint(ckpt)  # whatever is there under the real name is complete
    finish(*argv)
    assert_same_model(ckpt, reference)


@pytest.mark.parametrize("delay", [1.5, 4.0])
def test_kill_9_at_a_random_moment_then_rerun_ends_with_the_same_weights(tmp_path, reference, delay):
    argv = [*RUN, "--epochs", "4", "--out-dir", str(tmp_path)]
    proc = train_cli(*argv)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finish(*argv)
    assert_same_model(tmp_path / CKPT, reference)
    steps = [line for line in (tmp_path / "a2mim_resnet18_fake" / "log.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps)), "log.jsonl repeats steps after the resume"


def _nan_at_call(monkeypatch, k):
    """Make the k-th loss computation (0-based) return NaN."""
    real, calls = a2mim.a2mim_loss, {"n": 0}

    def loss(*args, **kw):
        out = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] == k + 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(a2mim, "a2mim_loss", loss)


def test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    argv = [*RUN, "--epochs", "3", "--out-dir", str(tmp_path)]
    assert train.main([*argv, "--max-steps", "8"]) == 0  # one clean epoch → a checkpoint
    good = (tmp_path / CKPT).read_bytes()
    _nan_at_call(monkeypatch, 3)  # the 4th step of the resumed run: global step 11
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 11" in err and "last good checkpoint" in err
    assert (tmp_path / CKPT).read_bytes() == good


def test_nonfinite_loss_step_is_skipped_when_asked(tmp_path, monkeypatch, capsys):
    _nan_at_call(monkeypatch, 2)
    assert train.main([*RUN, "--epochs", "1", "--out-dir", str(tmp_path), "--on-nonfinite", "skip"]) == 0
    assert "step 2: non-finite loss, step skipped" in capsys.readouterr().err
    state = train.load_checkpoint(tmp_path / CKPT)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------
# Bad inputs: exit code 2, one line on stderr, nothing written.
# ---------------------------------------------------------------------------------------------


def _image_folder(root, classes=("cat", "dog"), n=4):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), (60 * i, 30, 90)).save(root / split / c / f"{i}.jpg")
    return root


def run_fails(tmp_path, capsys, *argv, expect):
    out = tmp_path / "out"
    code = train.main([*argv, "--out-dir", str(out), "--workers", "0", "--batch-size", "4", "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) >= 1 and err[-1].startswith("error: ") and expect in err[-1], err
    return out


def test_missing_dataset_folder_names_the_expected_layout(tmp_path, capsys):
    out = run_fails(tmp_path, capsys, "--data", "imagenet", "--data-dir", str(tmp_path / "nope"), expect="train")
    assert not out.exists()


def test_image_folder_without_classes_is_refused(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    out = run_fails(tmp_path, capsys, "--data", "folder", "--data-dir", str(tmp_path / "data"), "--img-size", "32",
                    expect="<class>")
    assert not out.exists()


def test_truncated_jpeg_is_a_clear_error_naming_the_file_even_from_a_worker(tmp_path, capsys):
    root = _image_folder(tmp_path / "data")
    bad = root / "train" / "cat" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    out = tmp_path / "out"
    code = train.main(["--data", "folder", "--data-dir", str(root), "--img-size", "32", "--batch-size", "4",
                       "--workers", "1", "--out-dir", str(out), "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and str(bad) in err and "Traceback" not in err


@pytest.mark.parametrize("argv, expect", [
    (["--img-size", "32", "--mask-patch-size", "5"], "divisible by the mask block size"),
    (["--img-size", "36", "--mask-patch-size", "4"], "divisible by the resnet18 output stride 8"),
    (["--data", "mnist"], "fashion-mnist"),  # lists the choices
    (["--accum-steps", "0"], "at least 1"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, capsys, argv, expect):
    out = run_fails(tmp_path, capsys, "--data", "fake", *argv, expect=expect)
    assert not out.exists()


def test_unknown_arch_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--arch", "resnet51"])
    assert e.value.code == 2 and "resnet50" in capsys.readouterr().err


def test_resume_from_a_pickle_that_weights_only_refuses_is_a_clear_error(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"model": runtime.Dist()}, evil)  # an arbitrary object: weights_only=True refuses it
    out = run_fails(tmp_path, capsys, "--data", "fake", "--resume", str(evil), expect="not a readable PyTorch checkpoint")
    assert not out.exists()


def test_resume_from_a_truncated_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert train.main([*RUN, "--max-steps", "1", "--out-dir", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "a" / CKPT).read_bytes()[:5000])
    run_fails(tmp_path, capsys, *RUN, "--resume", str(cut), expect="not a readable PyTorch checkpoint")
