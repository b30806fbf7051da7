"""reproduce.py drives train.py and eval_linear.py; these tests run its smoke budget on fake data."""

import json
import os
import re
import statistics
import types

import pytest

import reproduce

ARGS = ["--budget", "smoke", "--only", "main", "--archs", "resnet18", "--data", "fake"]


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# A²MIM and SimMIM pre-trained; a probe and a fine-tune of those and of random init
SMOKE_JOBS = 2 + 3 + 3


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of the ResNet rows, one pre-training seed: 2 pre-trainings, 3 probes, 3 fine-tunes
    (~1 min). The last test adds a second pre-training seed to it."""
    out = tmp_path_factory.mktemp("repro")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(reproduce.BUDGETS["smoke"], "pretrain_seeds", {})
        # 2 at a time: faster tests
        assert reproduce.main([*ARGS, "--results-dir", str(out), "--jobs", "2"]) == 0
    return out


@pytest.fixture(autouse=True)
def one_pretraining_seed(monkeypatch):
    monkeypatch.setitem(reproduce.BUDGETS["smoke"], "pretrain_seeds", {})


@pytest.mark.slow
def test_probe_and_finetune_line_for_a2mim_simmim_and_random_init(smoke):
    records = lines(smoke / "fashion_mnist.jsonl")
    probes = {(r["init"], r["config"]["pretrain_method"]) for r in records if r["mode"] == "probe"}
    assert probes == {("checkpoint", "a2mim"), ("checkpoint", "simmim"), ("random", None)}
    finetunes = [r for r in records if r["mode"] == "finetune"]
    assert len(finetunes) == 3 and all(
        r["config"]["seed"] == r["config"]["subset_seed"] == 1 for r in finetunes
    )


@pytest.mark.slow
def test_rerun_skips_every_finished_step(smoke, capsys):
    before = [len(lines(smoke / name)) for name in ("fashion_mnist.jsonl", "runs.jsonl")]
    assert before[1] == SMOKE_JOBS  # every job ran once and was timed
    assert reproduce.main([*ARGS, "--results-dir", str(smoke)]) == 0
    assert [len(lines(smoke / name)) for name in ("fashion_mnist.jsonl", "runs.jsonl")] == before
    assert capsys.readouterr().out.count("skip (done)") == SMOKE_JOBS


@pytest.mark.slow
def test_table_has_one_row_per_arch_and_method(smoke, capsys):
    assert reproduce.main([*ARGS, "--results-dir", str(smoke), "--table"]) == 0
    out = capsys.readouterr().out
    for method in ("a2mim", "simmim", "random init"):
        rows = [line for line in out.splitlines() if line.startswith(f"| resnet18 | {method} |")]
        assert len(rows) == (1 if method == "random init" else 2) and "—" not in rows[0], out
        if method == "simmim":  # SimMIM has no twin to subtract
            assert rows[1].endswith("(1 pair) | — |"), out
    # The paired row: pre-trained minus random init on the same fine-tuning seed, from the JSON lines.
    top1 = {
        (r["init"], r["config"]["pretrain_method"]): r["top1"]
        for r in lines(smoke / "fashion_mnist.jsonl")
        if r["mode"] == "finetune"
    }
    # ...and minus SimMIM
    paired = [line for line in out.splitlines() if line.startswith("| resnet18 | a2mim |")][1]
    assert paired == (
        f"| resnet18 | a2mim | {top1['checkpoint', 'a2mim'] - top1['random', None]:+.2f} (1 pair) | "
        f"{top1['checkpoint', 'a2mim'] - top1['checkpoint', 'simmim']:+.2f} (1 pair) |"
    ), out
    assert "python3 train.py --arch resnet18 --method a2mim" in out  # the exact commands, timed
    # and the seconds of each part
    for part, n in (("pre-training", 2), ("probe", 3), ("fine-tune", 3)):
        assert re.search(rf"^\| \d+ \| {part}: {n} jobs \|$", out, re.M), out


@pytest.mark.slow
def test_plot_writes_a_small_png_of_the_loss_parts(smoke):
    assert reproduce.main([*ARGS, "--results-dir", str(smoke), "--plot"]) == 0
    png = smoke / "loss_curves.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size <= 150 * 1024


@pytest.mark.slow
def test_failing_step_stops_with_exit_2_naming_the_command(tmp_path, capsys):
    assert reproduce.main([*ARGS[:-1], "no-such-data", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    # The first job (the random-init reference) fails; the sentence names its command.
    assert (
        "`python3 eval_linear.py --init random" in err
        and "no-such-data" in err
        and "exited with status 2" in err
    )
    assert not os.path.exists(tmp_path / "runs.jsonl")


def test_smoke_budget_never_writes_into_the_full_results():
    smoke, full = reproduce.BUDGETS["smoke"], reproduce.BUDGETS["full"]
    assert smoke["results_dir"] != full["results_dir"] and smoke["runs_dir"] != full["runs_dir"]
    assert full["seeds"] == [1, 2, 3] and full["labels_per_class"] == 100
    assert (
        full["pretrain_seeds"]["resnet18"] == [0, 1, 2]
        and reproduce.BUDGETS["long"]["pretrain_seeds"] == full["pretrain_seeds"]
    )


@pytest.mark.slow
def test_sweep_runs_steps_side_by_side_and_tables_the_grid(tmp_path, capsys):
    """--only sweep --jobs 2: both pre-trainings, then every (batch, blr) fine-tune of the grid."""
    args = [
        *"--budget smoke --only sweep --archs resnet18 --data fake".split(),
        "--results-dir",
        str(tmp_path),
    ]
    assert reproduce.main([*args, "--jobs", "2"]) == 0
    sweep = reproduce.BUDGETS["smoke"]["sweep"]
    got = sorted(
        (
            r["init"],
            r["config"]["pretrain_method"] or "",
            r["config"]["batch_size"],
            r["config"]["blr"],
        )
        for r in lines(tmp_path / "ft_sweep.jsonl")
    )
    want = sorted(
        (init, method, bs, blr)
        for init, method in [("random", ""), ("checkpoint", "a2mim"), ("checkpoint", "simmim")]
        for bs in sweep["batch_sizes"]
        for blr in sweep["blrs"]
    )
    assert got == want
    # one output file per step
    assert len(list((tmp_path / "runs" / "logs").glob("*.log"))) == 2 + len(want)
    capsys.readouterr()
    assert reproduce.main([*args, "--jobs", "2"]) == 0  # everything is done: nothing reruns
    assert capsys.readouterr().out.count("skip (done)") == 2 + len(want)
    assert reproduce.main([*args, "--table"]) == 0
    out = capsys.readouterr().out
    assert "| batch | blr | random init resnet18 | a2mim resnet18 | simmim resnet18 |" in out
    # the wall-clock table below may hold a "| 50 |" row too
    sweep_table = out.split("## Commands")[0]
    rows = [line for line in sweep_table.splitlines() if line.startswith("| 50 |")]
    assert len(rows) == len(sweep["blrs"]) and not any("—" in row for row in rows), out


def test_jobs_must_be_positive(tmp_path, capsys):
    assert reproduce.main([*ARGS, "--results-dir", str(tmp_path), "--jobs", "0"]) == 2
    assert "--jobs must be a positive number" in capsys.readouterr().err


@pytest.mark.slow
def test_a_changed_fine_tune_recipe_is_not_taken_for_done(smoke, capsys, monkeypatch):
    monkeypatch.setitem(
        reproduce.BUDGETS["smoke"],
        "finetune",
        ["--epochs", "1", "--batch-size", "25", "--blr", "1e-3"],
    )
    assert reproduce.main([*ARGS, "--results-dir", str(smoke), "--dry-run"]) == 0
    todo = [line for line in capsys.readouterr().out.splitlines() if line.startswith("todo")]
    assert len(todo) == 3 and all(
        "--finetune" in line and "--batch-size 25" in line for line in todo
    )


@pytest.mark.slow
def test_a_fresh_clone_with_the_results_but_no_checkpoints_redoes_no_pre_training_whose_evaluations_are_done(
    smoke, capsys, monkeypatch
):
    """Checkpoints are not committed, the JSONL results are: a pre-training is redone only for an evaluation
    still to run."""
    checkpoints = sorted(smoke.glob("runs/*/checkpoint.pt"))
    assert len(checkpoints) == 2
    for ckpt in checkpoints:
        ckpt.rename(ckpt.with_suffix(".away"))
    try:
        assert reproduce.main([*ARGS, "--results-dir", str(smoke), "--dry-run"]) == 0
        assert not [
            line for line in capsys.readouterr().out.splitlines() if not line.startswith("done")
        ]
        monkeypatch.setitem(
            reproduce.BUDGETS["smoke"],
            "finetune",
            ["--epochs", "1", "--batch-size", "25", "--blr", "1e-3"],
        )
        assert reproduce.main([*ARGS, "--results-dir", str(smoke), "--dry-run"]) == 0
        todo = [line for line in capsys.readouterr().out.splitlines() if line.startswith("todo")]
        # both rows' pre-trainings, and the fine-tunes of the changed recipe
        assert sum("train.py" in line for line in todo) == 2 and len(todo) == 2 + 3
    finally:
        for ckpt in checkpoints:
            ckpt.with_suffix(".away").rename(ckpt)


@pytest.mark.slow
def test_a_budget_pre_training_lr_gets_its_own_run_folder_and_table_label(
    smoke, capsys, monkeypatch
):
    """A budget that sets --blr pre-trains into '<name>_blr<value>' (never taking the default-lr run
    for done), passes the lr to train.py, and labels the table row with it."""
    pre = reproduce.BUDGETS["smoke"]["pretrain"]
    monkeypatch.setitem(
        reproduce.BUDGETS["smoke"],
        "pretrain",
        {a: [*flags, "--blr", "4e-3"] for a, flags in pre.items()},
    )
    assert reproduce.main([*ARGS, "--results-dir", str(smoke), "--dry-run"]) == 0
    todo = [line for line in capsys.readouterr().out.splitlines() if line.startswith("todo")]
    trains = [line for line in todo if "train.py" in line]
    assert len(trains) == 2 and all("--blr 4e-3" in t and "_resnet18_blr4e-3" in t for t in trains)
    # both pre-trainings and their probe + fine-tune; random init stays done
    assert len(todo) == 2 + 2 * 2
    assert reproduce.main([*ARGS, "--results-dir", str(smoke), "--table"]) == 0
    assert "| resnet18 | a2mim, blr 4e-3 | — | — |" in capsys.readouterr().out


def test_the_full_budgets_pre_train_at_their_stated_lr_and_state_every_evaluation_recipe():
    for budget in ("full", "long"):  # not train.py's default, whatever it is: the lr is stated
        b = reproduce.BUDGETS[budget]
        assert all(
            reproduce.flag(flags, "--blr") == "4e-3"
            for flags in [*b["pretrain"].values(), b["ablation_pretrain"]]
        )
        # the ablations: the main table's fine-tuning recipe
        assert b["ablation_finetune"] == b["finetune"]
    # epochs, batch and blr identify a result: never left to a default
    for b in reproduce.BUDGETS.values():
        assert all(
            reproduce.flag(flags, f)
            for flags in (b["probe"], b["finetune"], b["ablation_finetune"])
            for f in ("--epochs", "--batch-size", "--blr")
        )


def test_ablations_at_a_budget_lr_get_their_own_folders(tmp_path, capsys, monkeypatch):
    """The ablation pre-trainings follow the same rule: --blr in the budget → ablation_<name>_blr<value>,
    in the commands and in the table's lookup (one row per ablation, none found yet)."""
    abl = reproduce.BUDGETS["smoke"]["ablation_pretrain"]
    monkeypatch.setitem(reproduce.BUDGETS["smoke"], "ablation_pretrain", [*abl, "--blr", "4e-3"])
    args = [*"--budget smoke --only ablations --data fake".split(), "--results-dir", str(tmp_path)]
    assert reproduce.main([*args, "--dry-run"]) == 0
    trains = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("todo") and "train.py" in line
    ]
    assert [t.split("--run-name ")[1] for t in trains] == [
        f"ablation_{a['name']}_blr4e-3" for a in reproduce.ABLATIONS
    ]
    assert reproduce.main([*args, "--table"]) == 0
    assert capsys.readouterr().out.count("| — | — |") == len(reproduce.ABLATIONS)


def test_the_resnet_rows_pre_train_once_per_seed_of_the_budget_into_their_own_folders(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(reproduce.BUDGETS["smoke"], "pretrain_seeds", {"resnet18": [0, 1, 2]})
    assert (
        reproduce.main(
            ["--budget", "smoke", "--data", "fake", "--results-dir", str(tmp_path), "--dry-run"]
        )
        == 0
    )
    trains = [
        line.split("--run-name ")[1]
        for line in capsys.readouterr().out.splitlines()
        if "train.py" in line
    ]
    # Seed by seed (a stopped run has every row's first seed); seed 0 keeps the first runs' folder name; one ViT seed.
    assert trains == ["a2mim_resnet18", "simmim_resnet18", "a2mim_vit_tiny", "simmim_vit_tiny"] + [
        f"{m}_resnet18_seed{s}" for s in (1, 2) for m in ("a2mim", "simmim")
    ]


@pytest.mark.slow
def test_interactions_fine_tune_the_three_resnets_on_the_same_images_and_table_j_with_bootstrap_intervals(
    smoke, capsys
):
    args = [*"--budget smoke --only interactions --data fake".split(), "--results-dir", str(smoke)]
    assert reproduce.main(args) == 0
    out = capsys.readouterr().out
    ran = [line for line in out.splitlines() if line.startswith(">>> python3")]
    # the pre-trainings are done
    assert len(ran) == 3 and all("eval_linear.py" in line for line in ran), out
    records = lines(smoke / "interactions.jsonl")
    assert {r["config"]["pretrain_method"] for r in records} == {"a2mim", "simmim", None}
    # the same val images for all three
    assert len({tuple(r["interactions"]["images"]) for r in records}) == 1
    assert reproduce.main([*args, "--table", "--plot"]) == 0
    out = capsys.readouterr().out
    rows = [
        line
        for line in out.splitlines()
        if line.startswith(("| a2mim (", "| simmim (", "| from scratch ("))
    ]
    assert len(rows) == 3 and all(line.count("|") == 13 + 5 and "[" in line for line in rows), out
    assert out.count("minus from scratch, middle-order J") == 2
    assert 0 < (smoke / "interactions.png").stat().st_size < 200_000


@pytest.mark.slow
def test_a_second_pre_training_seed_continues_the_run_and_the_row_averages_over_both(
    smoke, capsys, monkeypatch
):
    """The finished run's JSONL is kept: only the new seed's pre-training, probe and fine-tune run; the
    row becomes mean ± std over pre-training × fine-tuning seeds, and the paired row too. (Last test:
    it adds to the shared run.)"""
    monkeypatch.setitem(reproduce.BUDGETS["smoke"], "pretrain_seeds", {"resnet18": [0, 1]})
    # A²MIM on the ResNet: 3 new jobs
    monkeypatch.setattr(reproduce, "EXPERIMENTS", reproduce.EXPERIMENTS[:1])
    capsys.readouterr()
    assert reproduce.main([*ARGS, "--results-dir", str(smoke)]) == 0
    out = capsys.readouterr().out
    assert out.count("skip (done)") == 5 and out.count("\n>>> python3") == 3, out
    assert "--seed 1 --out-dir" in out and "--run-name a2mim_resnet18_seed1" in out
    assert "ran 3 of 8 jobs" in out, out
    assert re.search(r"\(pre-training \d+ s, probe \d+ s, fine-tune \d+ s\)", out), out
    assert reproduce.main([*ARGS, "--results-dir", str(smoke), "--table"]) == 0
    out = capsys.readouterr().out
    records = [r for r in lines(smoke / "fashion_mnist.jsonl") if r["mode"] == "finetune"]
    a2mim = [r["top1"] for r in records if r["config"]["pretrain_method"] == "a2mim"]
    base = next(r["top1"] for r in records if r["init"] == "random")
    main, paired = [line for line in out.splitlines() if line.startswith("| resnet18 | a2mim |")]
    assert len(a2mim) == 2
    assert main.endswith(
        f"| {statistics.mean(a2mim):.2f} ± {statistics.stdev(a2mim):.2f} (2 runs) |"
    )
    diffs = [t - base for t in a2mim]
    # No SimMIM row in this table: nothing to pair A²MIM with.
    mean_pm_std = f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f}"
    assert paired == f"| resnet18 | a2mim | {mean_pm_std} (2 pairs) | — |", out


# ------------------------------------------------------------------------------------------
# A results file damaged between two runs, a full disk: one sentence, exit 2, nothing changed or lost.


# the fields the tables read
RESULT = dict(
    mode="probe",
    checkpoint=None,
    init="random",
    arch="resnet18",
    labels_per_class=10,
    top1=50.0,
    config=dict(seed=1, epochs=1, batch_size=50, blr=1e-3),
)


@pytest.fixture
def no_jobs_run(monkeypatch):
    """reproduce.py's subprocess calls (jobs, nvidia-smi): a refusal must come before the first."""
    calls = []

    def run(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"ran {args}")

    monkeypatch.setattr(reproduce.subprocess, "run", run)
    return calls


@pytest.mark.parametrize(
    "name,text,message",
    [
        (
            "fashion_mnist.jsonl",
            json.dumps(RESULT) + json.dumps(RESULT) + "\n",
            "fashion_mnist.jsonl, line 1, is not a JSON record",
        ),
        (
            "fashion_mnist.jsonl",
            json.dumps(RESULT) + '\n{"mode": "pro\x00be\n' + json.dumps(RESULT) + "\n",
            "fashion_mnist.jsonl, line 2, is not a JSON record",
        ),
        (
            "fashion_mnist.jsonl",
            json.dumps(RESULT) + "\n" + json.dumps({"top1": 3.0}) + "\n",
            "fashion_mnist.jsonl holds a line that is not a result of eval_linear.py",
        ),
        (
            "runs.jsonl",
            '{"name": "random_resnet18", "part\n',
            "runs.jsonl, line 1, is not a JSON record",
        ),
    ],
    ids=["glued-lines", "garbled-line", "not-a-result", "torn-runs-line"],
)
@pytest.mark.parametrize("mode", [[], ["--dry-run"], ["--table"]], ids=["run", "dry-run", "table"])
def test_a_damaged_results_file_is_named_in_one_sentence_before_any_job_and_nothing_changes(
    tmp_path, capsys, no_jobs_run, name, text, message, mode, folder_state
):
    (tmp_path / name).write_text(text)
    before = folder_state(tmp_path)
    assert reproduce.main([*ARGS, "--results-dir", str(tmp_path), *mode]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / name}") and message in err and "\n" not in err
    assert "fix or remove that line" in err
    assert no_jobs_run == [] and folder_state(tmp_path) == before


def test_a_runs_jsonl_append_that_fails_half_way_leaves_it_byte_identical(
    tmp_path, capsys, monkeypatch, fill_disk, folder_state
):
    finished = dict(
        name="x", part="probe", command="python3 eval_linear.py", seconds=1.0, machine="cpu"
    )
    (tmp_path / "runs.jsonl").write_text(json.dumps(finished) + "\n")
    before = folder_state(tmp_path)
    done = types.SimpleNamespace(returncode=0, stdout="")

    def run(*args, **kwargs):  # every job "succeeds" at once, writing nothing
        return done

    monkeypatch.setattr(reproduce.subprocess, "run", run)
    fill_disk()
    assert reproduce.main([*ARGS, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    runs = tmp_path / "runs.jsonl"
    assert err == (
        f"error: no space left on the device while writing {runs}; the previous runs.jsonl is intact"
    )
    assert folder_state(tmp_path) == before  # not half a line, no runs.jsonl.tmp


def test_a_results_dir_that_is_a_file_is_one_sentence(tmp_path, capsys, no_jobs_run, folder_state):
    (tmp_path / "results").write_text("not a folder")
    before = folder_state(tmp_path)
    assert reproduce.main([*ARGS, "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"error: --results-dir {tmp_path / 'results'} is a file; name a folder for the results"
    )
    assert no_jobs_run == [] and folder_state(tmp_path) == before


def test_plot_drops_a_torn_last_log_line_with_a_note_and_names_any_other_damaged_line(
    tmp_path, capsys, folder_state
):
    log = tmp_path / "runs" / "a2mim_resnet18" / "log.jsonl"
    log.parent.mkdir(parents=True)
    records = "".join(json.dumps(dict(step=s, loss=1 / s)) + "\n" for s in (1, 2, 3))
    log.write_text(records + '{"step": 4, "lo')  # a training killed in the middle of a log write
    assert reproduce.main([*ARGS, "--results-dir", str(tmp_path), "--plot"]) == 0
    out, err = capsys.readouterr()
    assert f"note: dropped the damaged last line 4 of {log}" in err and "(1 runs" in out
    log.write_text('{"step": 1, "lo\n' + records)
    before = folder_state(tmp_path)
    assert reproduce.main([*ARGS, "--results-dir", str(tmp_path), "--plot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {log}, line 1, is not a JSON record") and "\n" not in err
    assert folder_state(tmp_path) == before


def test_a_damaged_checkpoint_in_the_runs_folder_is_one_sentence_naming_it(
    tmp_path, capsys, no_jobs_run, folder_state
):
    ckpt = tmp_path / "runs" / "a2mim_resnet18" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 cut short")
    before = folder_state(tmp_path)
    assert reproduce.main([*ARGS, "--results-dir", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {ckpt} is not a readable PyTorch checkpoint") and "\n" not in err
    assert no_jobs_run == [] and folder_state(tmp_path) == before
