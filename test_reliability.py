"""What happens when a run is killed, its loss explodes, or it is fed garbage (README table
"What happens when…"). Every case: one sentence, a non-zero exit, nothing on disk lost."""

import errno
import gc
import json
import multiprocessing
import os
import shutil
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
from a2mim import A2MIM

HERE = os.path.dirname(os.path.abspath(__file__))
# 512 fake images / batch 64 = 8 steps per epoch.
RUN = (
    "--data fake --arch resnet18 --width 8 --batch-size 64 --workers 0 --vis-every 0 --log-every 4 --save-every 1"
).split()
CKPT = "a2mim_resnet18_fake/checkpoint.pt"


def train_cli(*argv, **kw):
    """train.py in a fresh process, one thread, so that two runs are bit-for-bit comparable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "train.py", *argv],
        cwd=HERE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def train_steps(out_dir, steps, *argv):
    """train.main in this process: the small RUN for `steps` optimiser steps into `out_dir` → its exit code."""
    return train.main([*RUN, "--max-steps", str(steps), "--out-dir", str(out_dir), *argv])


def train_on_folder(root, out_dir, *argv):
    """train.main in this process on the image folder `root`, into `out_dir` → its exit code."""
    return train.main(
        ["--data", "folder", "--data-dir", str(root), "--out-dir", str(out_dir), *argv]
    )


def finish(*argv):
    proc = train_cli(*argv)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]


def assert_same_model(path_a, path_b):
    a, b = runtime.load_checkpoint(path_a).model, runtime.load_checkpoint(path_b).model
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-epoch run to compare the interrupted ones with."""
    out = tmp_path_factory.mktemp("reference")
    finish(*RUN, "--epochs", "4", "--out-dir", str(out))
    return out / CKPT


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint_then_rerun_ends_with_the_same_weights(
    tmp_path, reference
):
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
        runtime.load_checkpoint(ckpt)  # whatever is there under the real name is complete
    finish(*argv)
    assert_same_model(ckpt, reference)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [1.5, 4.0])
def test_kill_9_at_a_random_moment_then_rerun_ends_with_the_same_weights(
    tmp_path, reference, delay
):
    argv = [*RUN, "--epochs", "4", "--out-dir", str(tmp_path)]
    proc = train_cli(*argv)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finish(*argv)
    assert_same_model(tmp_path / CKPT, reference)
    steps = [
        line for line in (tmp_path / "a2mim_resnet18_fake" / "log.jsonl").read_text().splitlines()
    ]
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


def test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, capsys
):
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
    assert (
        train.main([*RUN, "--epochs", "1", "--out-dir", str(tmp_path), "--on-nonfinite", "skip"])
        == 0
    )
    assert "step 2: non-finite loss or gradients, step skipped" in capsys.readouterr().err
    state = runtime.load_checkpoint(tmp_path / CKPT)
    assert all(torch.isfinite(v).all() for v in state.model.values() if v.is_floating_point())


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
    code = train.main(
        [*argv, "--out-dir", str(out), "--workers", "0", "--batch-size", "4", "--epochs", "1"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) >= 1 and err[-1].startswith("error: ") and expect in err[-1], err
    return out


def test_missing_dataset_folder_names_the_expected_layout(tmp_path, capsys):
    out = run_fails(
        tmp_path, capsys, "--data", "imagenet", "--data-dir", str(tmp_path / "nope"), expect="train"
    )
    assert not out.exists()


def test_image_folder_without_classes_is_refused(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    out = run_fails(
        tmp_path,
        capsys,
        "--data",
        "folder",
        "--data-dir",
        str(tmp_path / "data"),
        "--img-size",
        "32",
        expect="<class>",
    )
    assert not out.exists()


def test_truncated_jpeg_is_a_clear_error_naming_the_file_even_from_a_worker(tmp_path, capsys):
    root = _image_folder(tmp_path / "data")
    bad = root / "train" / "cat" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    out = tmp_path / "out"
    code = train_on_folder(
        root, out, *"--img-size 32 --batch-size 4 --workers 1".split(), "--epochs", "1"
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and str(bad) in err and "Traceback" not in err


def worker_error(tmp_path):
    """train.py's arguments for a run whose DataLoader workers meet a truncated JPEG, and that file."""
    root = _image_folder(tmp_path / "data")
    bad = root / "train" / "cat" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    return [
        "--data",
        "folder",
        "--data-dir",
        str(root),
        *"--img-size 32 --batch-size 4 --workers 2 --vis-every 0".split(),
        "--out-dir",
        str(tmp_path / "out"),
        "--epochs",
        "1",
    ], bad


def test_a_worker_error_leaves_no_dataloader_worker_behind(tmp_path, capsys):
    """A worker ignores the stop signals; one left alive by an error (its pass held by the traceback) would make the
    interpreter's exit wait for it for ever (multiprocessing SIGTERMs it, then joins it)."""
    argv, bad = worker_error(tmp_path)
    before = set(multiprocessing.active_children())
    assert train.main(argv) == 2 and str(bad) in capsys.readouterr().err
    left = [p for p in multiprocessing.active_children() if p not in before]
    try:
        for p in left:
            p.join(timeout=10)  # a worker told to end is gone well within this
        assert not [p for p in left if p.is_alive()]
    finally:
        gc.collect()  # had one been left: its pass, collected, ends it (so that pytest itself can exit)


@pytest.mark.slow
def test_a_process_whose_run_failed_in_a_worker_exits_instead_of_waiting_for_the_worker(tmp_path):
    argv, bad = worker_error(tmp_path)
    code = f"import sys, train; sys.exit(train.main({argv!r}))"
    # The timeout is a hang guard, not a speed limit.
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and str(bad) in last, out.stderr[-2000:]


def test_an_out_dir_inside_the_image_folder_is_refused_before_anything_is_written(
    tmp_path, capsys, folder_state
):
    """The run's recon_*.png would be read as training images by the next run."""
    root = _image_folder(tmp_path / "data")
    for out in (root / "out", root / "train" / "cat" / "runs", root):
        before = folder_state(tmp_path)
        code = train_on_folder(
            root, out, *"--img-size 32 --batch-size 4 --workers 0 --max-steps 1".split()
        )
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and err == (
            f"error: --out-dir {out} lies inside --data-dir {root}, where the next run would "
            "read this run's reconstruction PNGs as training images; choose an --out-dir "
            "outside it"
        )
        assert folder_state(tmp_path) == before
    link = tmp_path / "link"  # the same folder through a symlink is still inside
    link.symlink_to(root)
    assert train_on_folder(link, root / "out") == 2
    assert "lies inside --data-dir" in capsys.readouterr().err
    assert (
        train_on_folder(
            root,
            tmp_path / "out",
            *"--img-size 32 --batch-size 4 --workers 0 --max-steps 1 --vis-every 0".split(),
        )
        == 0
    )


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--img-size", "32", "--mask-patch-size", "5"], "of the mask block size 5"),
        (
            ["--img-size", "36", "--mask-patch-size", "4"],
            "divisible by the resnet18 output stride 8",
        ),
        (["--data", "mnist"], "fashion-mnist"),  # lists the choices
        (["--accum-steps", "0"], "at least 1"),
    ],
)
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
    out = run_fails(
        tmp_path,
        capsys,
        "--data",
        "fake",
        "--resume",
        str(evil),
        expect="loading it could run code",
    )
    assert not out.exists()


def test_resume_from_a_truncated_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert train_steps(tmp_path / "a", 1) == 0
    capsys.readouterr()
    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "a" / CKPT).read_bytes()[:5000])
    run_fails(
        tmp_path, capsys, *RUN, "--resume", str(cut), expect="not a readable PyTorch checkpoint"
    )


# ---------------------------------------------------------------------------------------------
# Pre-emption: SIGTERM / SIGUSR1 / Ctrl-C finish the step, checkpoint, exit 128 + signal.
# ---------------------------------------------------------------------------------------------


def wait_for_first_log_line(proc, run_dir):
    log = run_dir / "log.jsonl"
    deadline = time.time() + 300
    while (
        not (log.exists() and log.read_text().strip())
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it logged a step"


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 138)]
)
def test_signal_checkpoints_the_current_step_exits_128_plus_signal_and_resume_is_exact(
    tmp_path, reference, sig, code
):
    argv = [*RUN, "--epochs", "4", "--out-dir", str(tmp_path)]
    proc = train_cli(*argv)
    wait_for_first_log_line(proc, tmp_path / "a2mim_resnet18_fake")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    state = runtime.load_checkpoint(tmp_path / CKPT)
    assert f"stopped by {sig.name} after step {state.step}: checkpoint" in err
    assert "run the same command again" in err
    assert 4 <= state.step < 32
    # One resume suffices: the checkpoint is the same code path for all three.
    if sig == signal.SIGTERM:
        finish(*argv)
        assert_same_model(tmp_path / CKPT, reference)


@pytest.mark.slow
def test_second_train_py_on_one_folder_is_refused_and_kill_9_leaves_no_stuck_lock(
    tmp_path, reference, folder_state
):
    argv = [*RUN, "--epochs", "4", "--out-dir", str(tmp_path)]
    first = train_cli(*argv)
    run_dir = tmp_path / "a2mim_resnet18_fake"
    wait_for_first_log_line(first, run_dir)
    first.send_signal(signal.SIGSTOP)  # hold it still, lock held, while the second one tries
    before = folder_state(tmp_path)
    second = train_cli(*argv)
    _, err = second.communicate(timeout=300)
    assert (
        second.returncode == 2
        and f"another train.py is running in {run_dir}" in err.strip().splitlines()[-1]
    )
    assert folder_state(tmp_path) == before
    first.send_signal(signal.SIGKILL)
    first.wait()
    finish(*argv)  # the lock died with its process
    assert_same_model(tmp_path / CKPT, reference)


# ---------------------------------------------------------------------------------------------
# Non-finite gradients and weights
# ---------------------------------------------------------------------------------------------


def _nan_gradient_at_call(monkeypatch, k):
    """The k-th forward (0-based) of A2MIM keeps its finite loss, but its backward gives NaN gradients."""
    real, calls = A2MIM.forward, {"n": 0}

    def forward(self, *args, **kw):
        out = real(self, *args, **kw)
        if calls["n"] == k:
            out["pred"].register_hook(lambda grad: grad * float("nan"))
        calls["n"] += 1
        return out

    monkeypatch.setattr(A2MIM, "forward", forward)


def _inf_weight_before_call(monkeypatch, k):
    """Before the k-th forward (0-based) of A2MIM, after the optimiser step before it: an inf weight."""
    real, calls = A2MIM.forward, {"n": 0}

    def forward(self, *args, **kw):
        if calls["n"] == k:
            with torch.no_grad():
                self.decoder.conv.weight[0] = float("inf")
        calls["n"] += 1
        return real(self, *args, **kw)

    monkeypatch.setattr(A2MIM, "forward", forward)


def test_skip_mode_skips_a_step_whose_gradients_are_not_finite_while_the_loss_is(
    tmp_path, monkeypatch, capsys
):
    _nan_gradient_at_call(monkeypatch, 2)
    assert (
        train.main([*RUN, "--epochs", "1", "--out-dir", str(tmp_path), "--on-nonfinite", "skip"])
        == 0
    )
    assert "step 2: non-finite loss or gradients, step skipped" in capsys.readouterr().err
    state = runtime.load_checkpoint(tmp_path / CKPT)
    assert state.step == 8
    assert train.first_nonfinite(state.model, state.optimizer["state"]) is None


def test_non_finite_weights_are_never_checkpointed_and_stop_the_run(
    tmp_path, monkeypatch, capsys, folder_state
):
    argv = [*RUN, "--epochs", "1", "--out-dir", str(tmp_path), "--on-nonfinite", "skip"]
    assert train.main([*argv, "--max-steps", "2"]) == 0
    good = folder_state(tmp_path)
    # The loss and gradients of the step before are finite: the weights go non-finite in its update.
    _inf_weight_before_call(monkeypatch, 2)
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "the weights became non-finite (decoder.conv.weight)" in err
        and "last good checkpoint" in err
    )
    assert (tmp_path / CKPT).read_bytes() == good[CKPT]


# ---------------------------------------------------------------------------------------------
# Refused before anything is written (the folder is compared before and after)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run: the folder that refused commands must leave untouched."""
    out = tmp_path_factory.mktemp("finished")
    assert train_steps(out, 2) == 0
    return out


@pytest.fixture
def refused(capsys, folder_state):
    """refused(folder, argv, expect): the run of RUN + argv in `folder` exits 2 with `expect` in its one-line
    error, and leaves the folder as it was."""

    def check(folder, argv, expect):
        before = folder_state(folder)
        code = train_steps(folder, 2, *argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err and err[-1].startswith("error: ") and expect in err[-1], err
        assert folder_state(folder) == before

    return check


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
        (["--max-steps", "-1"], "--max-steps must be at least 1"),
        (["--img-size", "0"], "--img-size must be at least 1"),
        (["--mask-patch-size", "0"], "--mask-patch-size must be at least 1"),
        (["--width", "0"], "--width must be at least 1"),
        (["--warmup-epochs", "-1"], "--warmup-epochs must be at least 0"),
        (["--fft-weight", "-1"], "--fft-weight must be at least 0"),
        (["--drop-path", "1.5"], "--drop-path must be in [0, 1)"),
        (["--mask-ratio", "1"], "--mask-ratio must be in (0, 1)"),
        (["--mask-ratio", "0"], "--mask-ratio must be in (0, 1)"),
        (["--accum-steps", "0"], "--accum-steps must be at least 1"),
        (["--blr", "0"], "--blr must be greater than 0"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--schedule", "step"], "--schedule step needs --step-epoch"),
        (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number at least 0, got inf"),
        (["--fft-weight", "inf"], "--fft-weight must be a finite number at least 0, got inf"),
        (["--blr", "nan"], "--blr must be a finite number greater than 0, got nan"),
        (["--mask-ratio", "nan"], "--mask-ratio must be a finite number in (0, 1), got nan"),
        (["--clip-grad", "inf"], "--clip-grad must be a finite number greater than 0, got inf"),
        (
            ["--save-every-minutes", "nan"],
            "--save-every-minutes must be a finite number at least 0, got nan",
        ),
        (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
        (["--warmup-epochs", "3"], "--warmup-epochs must be at most --epochs (2), got 3"),
        (
            ["--schedule", "step", "--step-epoch", "5"],
            "--step-epoch must be at most --epochs (2), got 5",
        ),
        (
            ["--step-epoch", "1"],
            "--step-epoch is the epoch of the ×0.1 step of --schedule step; this run's schedule is cosine",
        ),
        (
            ["--min-lr", "1"],
            "--min-lr must be at most the peak lr 0.0005 (--blr × global batch / 512), got 1",
        ),
        (
            ["--assume-world-size", "2"],
            "--assume-world-size only goes with --print-config; this run has 1 process(es)",
        ),
    ],
)
def test_out_of_range_setting_is_refused_with_its_range_and_nothing_changes(
    finished, argv, expect, refused
):
    refused(finished, argv, expect)


def test_resume_of_another_runs_checkpoint_into_this_runs_folder_is_refused_unless_overwrite(
    tmp_path, capsys, refused
):
    assert train_steps(tmp_path, 2, *"--run-name A --mask-ratio 0.5".split()) == 0
    assert train_steps(tmp_path, 2, "--run-name", "B") == 0
    capsys.readouterr()
    other = str(tmp_path / "B" / "checkpoint.pt")
    refused(
        tmp_path,
        ["--run-name", "A", "--resume", other, "--max-steps", "3"],
        f"{tmp_path / 'A'} holds a different run",
    )
    assert train_steps(tmp_path, 3, "--run-name", "A", "--resume", other, "--overwrite") == 0
    assert runtime.load_checkpoint(tmp_path / "A" / "checkpoint.pt").step == 3


def test_grid_mismatch_is_found_before_anything_is_written_so_the_corrected_command_runs(
    tmp_path, capsys
):
    out = tmp_path / "out"
    # 6 px = 48 / 8, the preferred block, makes an 8×8 grid; the default block is one that fits (a2mim.py).
    assert train_steps(out, 1, *"--img-size 48 --mask-patch-size 6".split()) == 2
    assert "does not map onto the 12×12 token site" in capsys.readouterr().err and not out.exists()
    assert train_steps(out, 1, *"--img-size 48 --mask-patch-size 4".split()) == 0


def test_nonexistent_data_dir_is_one_sentence_naming_it_and_the_source_is_printed(tmp_path, capsys):
    out = run_fails(
        tmp_path,
        capsys,
        "--data",
        "cifar10",
        "--data-dir",
        str(tmp_path / "nope"),
        expect=str(tmp_path / "nope"),
    )
    assert not out.exists()
    root = _image_folder(tmp_path / "data")
    assert (
        train_on_folder(
            root,
            out,
            *"--img-size 32 --batch-size 4 --workers 0 --max-steps 1 --vis-every 0".split(),
        )
        == 0
    )
    assert f"images from {root / 'train'}" in capsys.readouterr().out


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one_and_removes_the_tmp(
    tmp_path, monkeypatch, capsys
):
    assert train_steps(tmp_path, 2) == 0
    good = (tmp_path / CKPT).read_bytes()

    def full_disk(obj, f, *a, **kw):
        f.write(b"x" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime.torch, "save", full_disk)
    assert train_steps(tmp_path, 4) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "no space left on the device while writing" in err
        and "the previous checkpoint.pt is intact" in err
    )
    assert (tmp_path / CKPT).read_bytes() == good and not (tmp_path / (CKPT + ".tmp")).exists()


def test_output_folder_that_cannot_be_created_is_one_sentence_before_training(
    tmp_path, capsys, folder_state
):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = train_steps(blocker / "out", 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2
        and err[-1]
        == f"error: cannot create the output folder {blocker / 'out' / 'a2mim_resnet18_fake'}: "
        f"{blocker} is a file, not a folder"
    )
    assert folder_state(tmp_path) == {"file": b"not a folder"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder_is_one_sentence_before_training(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert train_steps(tmp_path / "ro", 1) == 2
    assert "is not writable" in capsys.readouterr().err and not list((tmp_path / "ro").iterdir())


def test_rerun_of_a_finished_run_does_nothing_and_says_so(finished, capsys, folder_state):
    before = folder_state(finished)
    assert train_steps(finished, 2) == 0
    assert "nothing to do" in capsys.readouterr().out and folder_state(finished) == before


def test_changed_epochs_on_resume_is_stated_in_one_line(tmp_path, capsys):
    assert train.main([*RUN, "--epochs", "1", "--max-steps", "3", "--out-dir", str(tmp_path)]) == 0
    assert train.main([*RUN, "--epochs", "2", "--max-steps", "4", "--out-dir", str(tmp_path)]) == 0
    notes = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("note: --epochs")
    ]
    assert notes == [
        "note: --epochs is 2, the checkpoint's run planned 1: the lr schedule from step 3 on is the 2-epoch one"
    ]


def test_a_bug_keeps_its_traceback_main_catches_only_the_projects_errors(tmp_path, monkeypatch):
    def bug(*a, **kw):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(train, "build_model", bug)
    with pytest.raises(ValueError, match="a bug"):
        train_steps(tmp_path, 1)


def test_threads_flag_sets_torchs_cpu_threads(tmp_path):
    # The tests run on one thread (conftest.py, which also sets it back after this test): ask for another.
    assert torch.get_num_threads() == 1
    argv = [*RUN, "--max-steps", "1", "--out-dir", str(tmp_path), "--threads", "2"]
    assert train.main(argv) == 0
    assert torch.get_num_threads() == 2


# ---------------------------------------------------------------------------------------------
# The run folder: only ours is taken over, and what it holds is never lost
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "ABSOLUTE", "", ".", "..", "a/b"])
def test_run_name_must_be_a_plain_folder_name_under_out_dir_and_nothing_is_written(
    tmp_path, capsys, name, folder_state
):
    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    code = train_steps(out, 1, "--run-name", name)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (
        "error: --run-name must be a plain folder name under --out-dir (no path separator, "
        f"not '.', '..' or empty, at most 255 bytes), got {name!r}"
    )
    assert folder_state(tmp_path) == {"a": None, "a/b": None, "a/b/out": None}


def test_folder_of_someone_elses_files_is_not_taken_over_unless_overwrite(tmp_path, refused):
    theirs = tmp_path / "a2mim_resnet18_fake"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    refused(tmp_path, [], f"{theirs} holds files but no config.json: not a train.py run folder")
    assert train_steps(tmp_path, 2, "--overwrite") == 0
    assert (theirs / "thesis.tex").read_text() == "years of work"
    assert runtime.load_checkpoint(tmp_path / CKPT).step == 2


def test_folder_whose_checkpoint_went_missing_is_refused_instead_of_restarted_over_its_log(
    tmp_path, capsys, refused
):
    assert train_steps(tmp_path, 2) == 0
    (tmp_path / CKPT).rename(tmp_path / "elsewhere.pt")
    refused(
        tmp_path,
        ["--max-steps", "3"],
        "a2mim_resnet18_fake has a log and a config but no checkpoint.pt (log.jsonl "
        "records one written after step 2): put it back to resume, or pass --overwrite to start afresh",
    )
    assert train_steps(tmp_path, 3, "--resume", str(tmp_path / "elsewhere.pt")) == 0
    assert "resuming at epoch 0, step 2" in capsys.readouterr().out


def test_a_run_that_failed_before_its_first_checkpoint_starts_afresh_with_the_same_command(
    tmp_path, monkeypatch, capsys
):
    argv = [*RUN, "--max-steps", "3", "--log-every", "1", "--out-dir", str(tmp_path)]

    def full_disk(obj, f, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(runtime.torch, "save", full_disk)
        assert train.main(argv) == 2
    log = (tmp_path / "a2mim_resnet18_fake" / "log.jsonl").read_text().splitlines()
    # Steps 0 and 1 logged, no checkpoint ever written.
    assert len(log) == 2 and not (tmp_path / CKPT).exists()
    assert train.main(argv) == 0
    assert (
        "starting in" in capsys.readouterr().out
        and runtime.load_checkpoint(tmp_path / CKPT).step == 3
    )


def test_resume_of_an_older_checkpoint_into_the_folder_holding_a_later_one_is_refused(
    tmp_path, capsys, refused
):
    assert train_steps(tmp_path, 2) == 0
    older = tmp_path / "older.pt"
    older.write_bytes((tmp_path / CKPT).read_bytes())
    assert train_steps(tmp_path, 4) == 0
    capsys.readouterr()
    refused(
        tmp_path,
        ["--max-steps", "6", "--resume", str(older)],
        f"--resume {older} is at step 2, but {tmp_path / CKPT} is at the later step 4, which resuming here would "
        "replace; to go on from step 2, pass --run-name for a new folder",
    )
    assert train_steps(tmp_path, 3, "--resume", str(older), "--run-name", "b") == 0
    assert runtime.load_checkpoint(tmp_path / "b" / "checkpoint.pt").step == 3


@pytest.mark.parametrize("change, now", [("shrank", 6), ("grew", 10)])
def test_resume_after_the_image_folder_changed_size_is_one_sentence(
    tmp_path, capsys, change, now, folder_state
):
    root = _image_folder(tmp_path / "data")  # 8 training images: 4 steps of 2
    argv = [
        "--data",
        "folder",
        "--data-dir",
        str(root),
        *"--img-size 32 --batch-size 2 --workers 0 --vis-every 0".split(),
        "--out-dir",
        str(tmp_path / "out"),
    ]
    assert train.main([*argv, "--max-steps", "3"]) == 0
    capsys.readouterr()
    if change == "shrank":
        for i in (0, 1):
            (root / "train" / "cat" / f"{i}.jpg").unlink()
    else:
        for i in (4, 5):
            shutil.copy(root / "train" / "dog" / "0.jpg", root / "train" / "dog" / f"{i}.jpg")
    before = folder_state(tmp_path / "out")
    assert train.main([*argv, "--max-steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err.startswith("error: the dataset changed since") and f"(8 images then, {now} now)" in err
    )
    assert folder_state(tmp_path / "out") == before


def test_a_checkpoint_written_before_it_recorded_its_dataset_size_still_resumes(tmp_path, capsys):
    assert train_steps(tmp_path, 2) == 0
    state = torch.load(tmp_path / CKPT, weights_only=True)
    assert state.pop("images") == 512
    torch.save(state, tmp_path / CKPT)
    assert train_steps(tmp_path, 3) == 0
    assert "resuming at epoch 0, step 2" in capsys.readouterr().out


def test_torn_last_log_line_is_dropped_and_said_and_the_run_resumes(tmp_path, capsys):
    assert (
        train.main([*RUN, "--max-steps", "2", "--log-every", "1", "--out-dir", str(tmp_path)]) == 0
    )
    log = tmp_path / "a2mim_resnet18_fake" / "log.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"step": 2, "epoch": 0, "lo')  # a kill in the middle of a write
    assert (
        train.main([*RUN, "--max-steps", "3", "--log-every", "1", "--out-dir", str(tmp_path)]) == 0
    )
    captured = capsys.readouterr()
    assert (
        "resuming at epoch 0, step 2" in captured.out
        and f"dropped the damaged last line 3 of {log}" in captured.err
    )
    lines = log.read_text().splitlines()
    assert log.read_text().startswith(whole) and len(lines) == 3 and '"step": 2' in lines[-1]


def test_damaged_log_line_before_the_last_is_one_sentence_and_nothing_changes(tmp_path, refused):
    assert (
        train.main([*RUN, "--max-steps", "2", "--log-every", "1", "--out-dir", str(tmp_path)]) == 0
    )
    log = tmp_path / "a2mim_resnet18_fake" / "log.jsonl"
    first, second = log.read_text().splitlines()
    log.write_text(f"{first}\nnot json\n{second}\n")
    refused(
        tmp_path, ["--max-steps", "3", "--log-every", "1"], f"{log}, line 2, is not a JSON record"
    )


def test_a_log_line_that_cannot_be_written_leaves_the_log_as_it_was(tmp_path, monkeypatch, capsys):
    argv = [*RUN, "--log-every", "1", "--out-dir", str(tmp_path)]
    assert train.main([*argv, "--max-steps", "2"]) == 0
    log = tmp_path / "a2mim_resnet18_fake" / "log.jsonl"
    good = log.read_bytes()
    real_fsync, writes = os.fsync, []

    # The resume's trim of the log passes, its first new line does not.
    def full_disk_for_the_log(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("log.jsonl.tmp"):
            writes.append(fd)
            if len(writes) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(runtime.os, "fsync", full_disk_for_the_log)
    assert train.main([*argv, "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err
        == f"error: no space left on the device while writing {log}; the previous log.jsonl is intact"
    )
    assert len(writes) == 2 and log.read_bytes() == good and not list(log.parent.glob("*.tmp"))


def test_disk_full_while_writing_a_reconstruction_png_is_one_sentence_and_leaves_no_tmp(
    tmp_path, capsys, fill_disk_for_pngs
):
    fill_disk_for_pngs()
    assert (
        train.main([*RUN, "--max-steps", "3", "--vis-every", "2", "--out-dir", str(tmp_path)]) == 2
    )
    png = tmp_path / "a2mim_resnet18_fake" / f"recon_step000002_{train.COLUMNS}.png"
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: no space left on the device while writing {png}; nothing was written"
    assert not png.exists() and not list(png.parent.glob("*.tmp"))


def test_checkpoint_that_cannot_be_replaced_is_one_sentence_keeps_the_old_one_and_leaves_no_tmp(
    tmp_path, monkeypatch, capsys
):
    """An immutable (chattr +i) or read-only checkpoint.pt: the rename onto it fails with EPERM / EACCES."""
    assert train_steps(tmp_path, 2) == 0
    good = (tmp_path / CKPT).read_bytes()
    real_replace = os.replace

    def immutable_checkpoint(src, dst):
        if str(dst).endswith("checkpoint.pt"):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_replace(src, dst)

    monkeypatch.setattr(runtime.os, "replace", immutable_checkpoint)
    assert train_steps(tmp_path, 4) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err
        == f"error: Operation not permitted while writing {tmp_path / CKPT}; the previous checkpoint.pt is intact"
    )
    assert (tmp_path / CKPT).read_bytes() == good and not list(
        (tmp_path / CKPT).parent.glob("*.tmp")
    )


def _damage(run_dir, how, other_ckpt):
    if how == "config.json: a JSON list":
        (run_dir / "config.json").write_text("[1, 2]")
    elif how == "config.json: garbage":
        (run_dir / "config.json").write_bytes(b"\x00\xff garbage")
    elif how == "checkpoint.pt: garbage":
        (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    elif how == "checkpoint.pt: another run's":
        shutil.copy(other_ckpt, run_dir / "checkpoint.pt")
    else:  # "<name>: a folder"
        name = how.split(":")[0]
        (run_dir / name).unlink()
        (run_dir / name).mkdir()
        (run_dir / name / "keep").write_text("theirs")


@pytest.mark.parametrize(
    "how, expect",
    [
        (
            "config.json: a JSON list",
            "config.json is unreadable or not a train.py config; pass --overwrite",
        ),
        (
            "config.json: garbage",
            "config.json is unreadable or not a train.py config; pass --overwrite",
        ),
        ("checkpoint.pt: garbage", "checkpoint.pt is not a readable PyTorch checkpoint"),
        (
            "checkpoint.pt: another run's",
            "checkpoint.pt was trained with other settings (mask_ratio)",
        ),
        (
            "checkpoint.pt: a folder",
            "checkpoint.pt is not a file (a folder, or a link to nothing), where train.py keeps",
        ),
        (
            "log.jsonl: a folder",
            "log.jsonl is not a file (a folder, or a link to nothing), where train.py keeps its log",
        ),
        ("config.json: a folder", "config.json is not a file (a folder, or a link to nothing)"),
        (
            ".lock: a folder",
            ".lock is not a file (a folder, or a link to nothing), where train.py keeps its .lock",
        ),
    ],
)
def test_run_folder_files_damaged_between_two_runs_are_one_sentence_and_nothing_changes(
    tmp_path, capsys, how, expect, refused
):
    assert train_steps(tmp_path, 2) == 0
    assert train_steps(tmp_path, 2, *"--run-name other --mask-ratio 0.5".split()) == 0
    capsys.readouterr()
    _damage(tmp_path / "a2mim_resnet18_fake", how, tmp_path / "other" / "checkpoint.pt")
    refused(tmp_path, ["--max-steps", "3"], expect)


def test_a_lock_file_that_cannot_be_opened_is_one_sentence_and_nothing_changes(
    finished, monkeypatch, refused
):
    """A read-only .lock left by another user (root may open it anyway: os.open is made to refuse)."""
    real_open = os.open

    def read_only_lock(path, *args, **kw):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "open", read_only_lock)
    lock = finished / "a2mim_resnet18_fake" / ".lock"
    refused(finished, ["--max-steps", "3"], f"cannot lock {lock} (Permission denied); remove it")


def test_resume_of_a_folder_names_the_checkpoint_inside_it(finished, refused):
    run_dir = finished / "a2mim_resnet18_fake"
    refused(
        finished,
        ["--resume", str(run_dir), "--run-name", "b"],
        f"--resume {run_dir} is a folder; name the checkpoint in it ({run_dir / 'checkpoint.pt'})",
    )


# ---------------------------------------------------------------------------------------------
# Schedulers and torchrun (end-to-end: real processes, real signals)
# ---------------------------------------------------------------------------------------------


def test_a_repeated_sigterm_does_not_end_the_run_before_its_checkpoint():
    """A scheduler signals every process and torchrun forwards its own SIGTERM: the trainer may get two."""
    code = (
        "import os, signal, train\n"
        "with train.Stop() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('still running, stopping after this step:', signal.Signals(stop.signum).name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300
    )
    assert (
        out.returncode == 0 and out.stdout == "still running, stopping after this step: SIGTERM\n"
    ), out.stderr


def test_an_in_process_run_puts_back_the_signal_handlers_it_found(tmp_path, monkeypatch, capsys):
    """train.main called from Python (a notebook, these tests) catches the stop signals only while it trains:
    after a run that ends, one stopped by a signal and one that fails in its loop, the caller's are back."""

    def callers_handler(signum, frame):
        raise AssertionError("train.py called its caller's handler")

    def signalled_at_the_first_forward(self, *args, **kw):
        if not signalled:
            signalled.append(True)
            os.kill(os.getpid(), signal.SIGUSR1)
        return forward(self, *args, **kw)

    argv = [*RUN, "--out-dir", str(tmp_path)]
    forward, signalled = A2MIM.forward, []
    found = {s: signal.signal(s, callers_handler) for s in train.STOP_SIGNALS}
    try:
        assert train.main([*argv, "--max-steps", "1"]) == 0
        assert all(signal.getsignal(s) is callers_handler for s in train.STOP_SIGNALS)
        with monkeypatch.context() as m:
            m.setattr(A2MIM, "forward", signalled_at_the_first_forward)
            assert train.main([*argv, "--max-steps", "3"]) == 128 + signal.SIGUSR1
        assert "stopped by SIGUSR1 after step 2" in capsys.readouterr().err
        assert all(signal.getsignal(s) is callers_handler for s in train.STOP_SIGNALS)
        _nan_at_call(monkeypatch, 0)  # a NaN loss ends the run inside its loop
        assert train.main([*argv, "--max-steps", "4"]) == 2
        assert all(signal.getsignal(s) is callers_handler for s in train.STOP_SIGNALS)
    finally:
        for s, handler in found.items():
            signal.signal(s, handler)


TORCHRUN = [
    sys.executable,
    *"-m torch.distributed.run --standalone --nproc_per_node=2 train.py".split(),
    *RUN,
    *"--workers 1 --device-data off --epochs 50 --log-every 1".split(),
]


@pytest.fixture(scope="module")
def sigterm_to_torchrun(tmp_path_factory):
    """End-to-end: a 2-process torchrun run, each rank with a DataLoader worker, and SIGTERM to torchrun
    itself (what a scheduler sends): torchrun forwards it to each rank's process group, workers included.
    → (out folder, torchrun's exit code, its stderr)."""
    out = tmp_path_factory.mktemp("torchrun")
    proc = subprocess.Popen(
        [*TORCHRUN, "--out-dir", str(out)],
        cwd=HERE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_first_log_line(proc, out / "a2mim_resnet18_fake")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    return out, proc.returncode, err


@pytest.mark.slow
def test_end_to_end_sigterm_to_torchrun_checkpoints_every_rank_and_the_same_command_resumes(
    sigterm_to_torchrun, tmp_path
):
    stopped, code, err = sigterm_to_torchrun
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    state = runtime.load_checkpoint(out / CKPT)
    step = state.step
    # Both ranks, no crash; torchrun's own exit: it re-raises the signal it forwarded.
    assert err.count(f"stopped by SIGTERM after step {step}: checkpoint") == 2, err[-3000:]
    assert code == 1 and "SignalException" in err
    rerun = subprocess.run(
        [*TORCHRUN, "--out-dir", str(out), "--max-steps", str(step + 1)],
        cwd=HERE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming at epoch {state.epoch}, step {step}" in rerun.stdout
    assert runtime.load_checkpoint(out / CKPT).step == step + 1


@pytest.mark.slow
def test_a_run_of_2_processes_resumed_on_1_names_2_and_the_torchrun_command_not_overwrite(
    sigterm_to_torchrun, tmp_path, capsys, refused
):
    out = tmp_path / "out"
    shutil.copytree(sigterm_to_torchrun[0], out)
    refused(
        out,
        "--workers 1 --device-data off --epochs 50 --log-every 1 --max-steps 50".split(),
        f"{out / 'a2mim_resnet18_fake'} was written by 2 process(es) and resumes only on 2 (the global batch, the "
        "lr and each rank's data shard depend on it), not on 1: continue it with `torchrun --nproc_per_node=2 "
        "train.py …",
    )
    state = runtime.load_checkpoint(out / CKPT)
    # Without config.json the checkpoint says the same.
    (out / "a2mim_resnet18_fake" / "config.json").unlink()
    code = train_steps(out, 50, *"--workers 1 --device-data off --epochs 50 --log-every 1".split())
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"{out / CKPT} was written by 2 process(es) and resumes only on 2" in err
    assert "--overwrite" not in err and runtime.load_checkpoint(out / CKPT).step == state.step


def test_a_run_started_before_newer_settings_resumes_with_the_same_command(tmp_path, capsys):
    """Its config.json and checkpoint lack the settings added since (warmup_ratio, init_from), hold its model
    options unresolved (null = the arch's default) and its provenance as "source" (now "origin"): the same
    command resumes it; a changed option is still refused."""
    assert train_steps(tmp_path, 2) == 0
    run = tmp_path / "a2mim_resnet18_fake"

    def as_older_code_wrote_it(config):
        for k in ("warmup_ratio", "init_from", "init_parts", "recipe"):
            config.pop(k, None)
        config["source"] = config.pop("origin")
        return config | dict.fromkeys(train.MODEL_OPTIONS[1:], None)

    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(as_older_code_wrote_it(config)))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["config"] = as_older_code_wrote_it(state["config"])
    torch.save(state, run / "checkpoint.pt")
    capsys.readouterr()
    assert train_steps(tmp_path, 4) == 0
    assert "resuming at epoch 0, step 2" in capsys.readouterr().out
    assert train.main([*RUN, "--max-steps", "6", "--fill", "zero", "--out-dir", str(tmp_path)]) == 2
    assert "differs in fill" in capsys.readouterr().err
