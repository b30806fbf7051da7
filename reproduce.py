"""Reproduce the README "Results" tables on Fashion-MNIST with one command (issue 8).

    python reproduce.py --budget full                  # the main table, ≤ 2.5 h on a 2-core CPU
    python reproduce.py --budget full_paper_lr         # the first main table: train.py's default pre-training lr
    python reproduce.py --budget full --only ablations # the ResNet ablations (1 h 20 min on the CPU with --jobs 2)
    python reproduce.py --budget full --only sweep     # the fine-tuning recipe search (ran on a GPU)
    python reproduce.py --budget full --only all --table --plot   # print the tables, write results/loss_curves.png
    python reproduce.py                                # smoke budget: a few steps of everything, ~5 min
    python reproduce.py --budget long --only all --jobs 8         # longer pre-training, for one GPU (not run yet)

On a GPU add `--jobs N`: these small models leave it mostly idle, so N steps run side by side
(all pre-trainings first, then all evaluations; each step's output in RUNS_DIR/logs/).

What runs: train.py pre-trains each encoder of EXPERIMENTS (A²MIM and SimMIM, same budget and
settings for both), then eval_linear.py evaluates every checkpoint and a random-init baseline per
arch: a linear probe on the full training set, and fine-tuning on 100 labels per class (1,000
images) for seeds 1, 2, 3 (`--seed S --subset-seed S`: the subset and the run change together).
Results are eval_linear.py's own JSON lines (`--results`); this script only adds results/runs.jsonl
(command, seconds, machine) and reads everything back for `--table` and `--plot`.

Every step is a subprocess (`python3 train.py ...`), so threads and memory start clean each time.
Finished work is skipped: a checkpoint that reached its epochs (or --max-steps), a result line
with the same checkpoint, mode, label count, seed and recipe (epochs, batch, blr). So after an
interruption, run the same command again; train.py resumes a half-finished run from its folder
by itself. (Other fine-tuning flags are not compared: after changing one of those, move the old
result lines out of the file first.)

The smoke budget writes to results/smoke and out/repro_smoke, never into the real results.
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

# ---------------------------------------------------------------------------------------------
# What to run. Same pre-training settings for both methods: the comparison is not tuned for one.
# ---------------------------------------------------------------------------------------------

# Main table: (arch, method) pairs pre-trained on Fashion-MNIST at 32 px.
EXPERIMENTS = [
    dict(name="a2mim_resnet18", arch="resnet18", method="a2mim", args=["--width", "16"]),
    dict(name="simmim_resnet18", arch="resnet18", method="simmim", args=["--width", "16"]),
    dict(name="a2mim_vit_tiny", arch="vit_tiny", method="a2mim", args=[]),
    dict(name="simmim_vit_tiny", arch="vit_tiny", method="simmim", args=[]),
]
RANDOM_INIT = {"resnet18": ["--width", "16"], "vit_tiny": []}  # the baseline encoder per arch

# Ablations (§5 of the paper, ResNet only): one change each against the A²MIM default
# (mask block 4 px = img/8, ratio 0.6, Fourier loss on, mean fill, token at layer4's input, γ gate).
ABLATIONS = [
    dict(name="default", change="none (A²MIM defaults)", args=[]),
    dict(name="mask2", change="mask block 2 px", args=["--mask-patch-size", "2"]),
    dict(name="mask8", change="mask block 8 px", args=["--mask-patch-size", "8"]),
    dict(name="ratio0.4", change="mask ratio 0.4", args=["--mask-ratio", "0.4"]),
    dict(name="ratio0.8", change="mask ratio 0.8", args=["--mask-ratio", "0.8"]),
    dict(name="no_fft", change="Fourier loss off", args=["--fft-weight", "0"]),
    dict(name="zero_fill", change="zero fill", args=["--fill", "zero"]),
    dict(name="token_stem", change="token at the stem", args=["--token-at", "stem"]),
    dict(name="no_gamma", change="γ gate off (add)", args=["--token-mode", "add"]),
]

# Budgets. `full`, measured on the 2-core development CPU (results/runs.jsonl): main table
# ~2 h 10 min (7,533 s one at a time in the first run; 7,766 s with --jobs 2); ResNet-18/16
# pre-training ~11-12 min for 5 epochs, ViT-tiny ~21-25 min for 3; a ResNet probe or fine-tune
# ~1 min, a ViT one 3-4½ min. The ablations: 4,803 s with --jobs 2 on that CPU (their first run,
# full_paper_lr, took 153 s on one H100 with --jobs 9).
#
# Pre-training lr of the full and long budgets: blr 4e-3 (lr 1e-3 at batch 128) for both methods
# and both encoders, not train.py's paper-scaled default 3e-4 (lr 7.5e-5), which leaves these few
# thousand steps far from converged (budget "full_paper_lr" below keeps the first run; README).
PRETRAIN_LR = ["--blr", "4e-3"]
# Fine-tuning recipe: picked on RANDOM INIT alone (so it cannot favour either method) from a grid
# of batch {32, 128} x blr {1e-3, 4e-3, 1.6e-2, 3.2e-2, 6.4e-2}, 20 epochs, 2 seeds, on an H100
# (results/ft_sweep.jsonl; README "Results"): the best mean of ResNet-18/16 and ViT-tiny.
# eval_linear's default (batch 128, blr 1e-3) left random init ~35 points short.
SWEPT_FINETUNE = ["--epochs", "20", "--batch-size", "32", "--blr", "3.2e-2"]
BUDGETS = {
    "smoke": dict(
        pretrain={"resnet18": ["--epochs", "1", "--max-steps", "5", "--vis-every", "0"],
                  "vit_tiny": ["--epochs", "1", "--max-steps", "5", "--vis-every", "0"]},
        ablation_pretrain=["--epochs", "1", "--max-steps", "5", "--vis-every", "0"],
        probe=["--epochs", "1", "--labels-per-class", "10"],
        finetune=["--epochs", "1", "--batch-size", "50"], ablation_finetune=["--epochs", "1", "--batch-size", "50"],
        labels_per_class=10, seeds=[1],
        sweep=dict(pretrain=["--epochs", "1", "--max-steps", "5", "--vis-every", "0"], epochs=1,
                   batch_sizes=[50], blrs=[1e-3, 4e-3], seeds=[1]),
        results_dir=os.path.join("results", "smoke"), runs_dir=os.path.join("out", "repro_smoke")),
    "full": dict(
        pretrain={"resnet18": ["--epochs", "5", *PRETRAIN_LR], "vit_tiny": ["--epochs", "3", *PRETRAIN_LR]},
        # The ablations use the main table's pre-training lr and fine-tuning recipe too (their first
        # run, before the sweep and the lr change, is budget "full_paper_lr").
        ablation_pretrain=["--epochs", "2", *PRETRAIN_LR],
        probe=[],  # eval_linear's default: 30 epochs of SGD on cached features of all 60k images
        finetune=SWEPT_FINETUNE, labels_per_class=100, seeds=[1, 2, 3], ablation_finetune=SWEPT_FINETUNE,
        sweep=dict(pretrain=["--epochs", "2", "--vis-every", "0"], epochs=20,
                   batch_sizes=[32, 128], blrs=[1e-3, 4e-3, 1.6e-2, 3.2e-2, 6.4e-2], seeds=[1, 2]),
        results_dir="results", runs_dir=os.path.join("out", "repro")),
}
# The first run of the main table and the ablations (README "Results"): train.py's default
# pre-training lr; the ablations also with eval_linear's default fine-tuning recipe (batch 128,
# blr 1e-3), as they ran before the recipe sweep.
BUDGETS["full_paper_lr"] = BUDGETS["full"] | dict(
    pretrain={"resnet18": ["--epochs", "5"], "vit_tiny": ["--epochs", "3"]},
    ablation_pretrain=["--epochs", "2"], ablation_finetune=["--epochs", "20"])
# The same tables with 6-10x longer pre-training, for one GPU (`--budget long --only all --jobs 8`):
# do the fine-tuning gains over random init grow with a longer schedule (README "Results")?
# Not run yet. From the H100 timings of the ablations (2 epochs of ResNet-18/16 in ~36 s with 9
# runs side by side) a guess of 15-20 min for --only all: run --only main and --only ablations as
# separate calls where one command may only run 10 min. Fine-tuning everywhere with the swept recipe.
BUDGETS["long"] = BUDGETS["full"] | dict(
    pretrain={"resnet18": ["--epochs", "30", *PRETRAIN_LR], "vit_tiny": ["--epochs", "30", *PRETRAIN_LR]},
    ablation_pretrain=["--epochs", "10", *PRETRAIN_LR],
    results_dir=os.path.join("results", "long"), runs_dir=os.path.join("out", "repro_long"))
MAIN_RESULTS, ABLATION_RESULTS, SWEEP_RESULTS = "fashion_mnist.jsonl", "ablations.jsonl", "ft_sweep.jsonl"


class StepFailed(Exception):
    """A sub-command exited non-zero: one sentence, exit 2."""


# ---------------------------------------------------------------------------------------------
# The job list: every command of a budget, in order, with what marks it as done.
# ---------------------------------------------------------------------------------------------


def pretrain_job(name, arch, args, budget_args, runs_dir, data):
    cmd = ["train.py", "--arch", arch, *args, "--data", data, *budget_args,
           "--out-dir", runs_dir, "--run-name", name]
    return dict(kind="pretrain", name=name, cmd=cmd, checkpoint=os.path.join(runs_dir, name, "checkpoint.pt"),
                epochs=int(_flag(cmd, "--epochs")), max_steps=int(_flag(cmd, "--max-steps") or 0))


def eval_jobs(name, source, b, results, data, seeds, finetune_args):
    """One probe and one fine-tune per seed for an encoder; `source` = eval_linear's encoder flags."""
    jobs = [dict(kind="eval", name=name, mode="probe", seed=1, labels=_labels(b["probe"]), results=results,
                 cmd=["eval_linear.py", *source, "--data", data, *b["probe"], "--seed", "1", "--results", results])]
    return jobs + [finetune_job(name, source, b, results, data, s, finetune_args) for s in seeds]


def finetune_job(name, source, b, results, data, seed, recipe_args):
    """Fine-tuning on the budget's labels per class; the subset is drawn with the run's own seed."""
    cmd = ["eval_linear.py", *source, "--data", data, "--finetune", "--labels-per-class", str(b["labels_per_class"]),
           *recipe_args, "--seed", str(seed), "--subset-seed", str(seed), "--results", results]
    return dict(kind="eval", name=name, mode="finetune", seed=seed, labels=b["labels_per_class"], results=results, cmd=cmd)


def _blr_suffix(pretrain_args):
    """"_blr<value>" when a budget's pre-training sets --blr, else "": runs at another pre-training
    lr get their own folder, so they never pass for each other when a result is looked up."""
    blr = _flag(pretrain_args, "--blr")
    return f"_blr{blr}" if blr else ""


def run_name(e, b):
    """A main-table pre-training's folder: its EXPERIMENTS name plus the budget's lr suffix."""
    return e["name"] + _blr_suffix(b["pretrain"][e["arch"]])


def ablation_name(a, b):
    """An ablation's pre-training folder: ablation_<ABLATIONS name> plus the budget's lr suffix."""
    return f"ablation_{a['name']}" + _blr_suffix(b["ablation_pretrain"])


def build_jobs(args):
    b = BUDGETS[args.budget]
    jobs = []
    if args.only in ("main", "all"):
        results = os.path.join(args.results_dir, MAIN_RESULTS)
        for e in (e for e in EXPERIMENTS if e["arch"] in args.archs):
            pre = pretrain_job(run_name(e, b), e["arch"], ["--method", e["method"], *e["args"]],
                               b["pretrain"][e["arch"]], args.runs_dir, args.data)
            jobs += [pre, *eval_jobs(pre["name"], ["--checkpoint", pre["checkpoint"]], b, results, args.data, b["seeds"], b["finetune"])]
        for arch in (a for a in RANDOM_INIT if a in args.archs):
            source = ["--init", "random", "--arch", arch, *RANDOM_INIT[arch]]
            jobs += eval_jobs(f"random_{arch}", source, b, results, args.data, b["seeds"], b["finetune"])
    if args.only in ("ablations", "all") and "resnet18" in args.archs:
        results = os.path.join(args.results_dir, ABLATION_RESULTS)
        for a in ABLATIONS:
            pre = pretrain_job(ablation_name(a, b), "resnet18", ["--method", "a2mim", "--width", "16", *a["args"]],
                               b["ablation_pretrain"], args.runs_dir, args.data)
            jobs += [pre, *eval_jobs(pre["name"], ["--checkpoint", pre["checkpoint"]], b, results, args.data, b["seeds"],
                                         b["ablation_finetune"])]
    if args.only == "sweep":
        jobs += sweep_jobs(args, b)
    return jobs


def sweep_jobs(args, b):
    """The fine-tuning recipe search: every (batch, blr) of the grid for random init and for short
    A²MIM / SimMIM pre-trainings of the ResNet. The main table's recipe is the grid point with the
    best random-init mean (so the choice cannot favour either method); the rest is reported too."""
    sw, results = b["sweep"], os.path.join(args.results_dir, SWEEP_RESULTS)
    jobs, sources = [], []
    if "resnet18" in args.archs:
        for method in ("a2mim", "simmim"):
            pre = pretrain_job(f"sweep_{method}_resnet18", "resnet18", ["--method", method, "--width", "16"],
                               sw["pretrain"], args.runs_dir, args.data)
            jobs.append(pre)
            sources.append((pre["name"], ["--checkpoint", pre["checkpoint"]]))
    sources += [(f"sweep_random_{a}", ["--init", "random", "--arch", a, *RANDOM_INIT[a]]) for a in RANDOM_INIT if a in args.archs]
    for seed in sw["seeds"]:
        for batch in sw["batch_sizes"]:
            for blr in sw["blrs"]:
                recipe_args = ["--epochs", str(sw["epochs"]), "--batch-size", str(batch), "--blr", f"{blr:g}"]
                jobs += [finetune_job(name, source, b, results, args.data, seed, recipe_args) for name, source in sources]
    return jobs


def _flag(cmd, flag):
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def _labels(flags):
    value = _flag(flags, "--labels-per-class")
    return int(value) if value else None


# ---------------------------------------------------------------------------------------------
# Skipping finished work, running the rest.
# ---------------------------------------------------------------------------------------------


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def result_key(record):
    """What identifies one evaluation: encoder (checkpoint path, or 'random <arch>'), mode, labels,
    seed, and the recipe (epochs, batch, blr), so a changed recipe is never taken for done."""
    c = record["config"]
    encoder = record["checkpoint"] or f"random {record['arch']}"
    return encoder, record["mode"], record["labels_per_class"], c["seed"], (c["epochs"], c["batch_size"], c["blr"])


def job_recipe(job):
    """(epochs, batch, blr) an eval command will run with: its flags, else eval_linear's defaults."""
    from eval_linear import DEFAULTS as EVAL_DEFAULTS  # no preset in these budgets

    cmd, d = job["cmd"], EVAL_DEFAULTS[job["mode"]]
    return (int(_flag(cmd, "--epochs") or d["epochs"]), int(_flag(cmd, "--batch-size") or d["batch_size"]),
            float(_flag(cmd, "--blr") or d["blr"]))


def job_key(job):
    cmd = job["cmd"]
    encoder = _flag(cmd, "--checkpoint") or f"random {_flag(cmd, '--arch')}"
    return encoder, job["mode"], job["labels"], job["seed"], job_recipe(job)


def is_done(job):
    if job["kind"] == "eval":
        return job_key(job) in {result_key(r) for r in read_jsonl(job["results"])}
    if not os.path.exists(job["checkpoint"]):
        return False
    from train import load_checkpoint  # only here: the rest of this script needs no torch

    state = load_checkpoint(job["checkpoint"])  # weights_only=True, our format checked
    return state["epoch"] >= job["epochs"] or bool(job["max_steps"]) and state["step"] >= job["max_steps"]


@lru_cache(maxsize=None)
def machine():
    """'<CPU model>, N cores', plus the GPU's name where nvidia-smi sees one (the steps then run on it)."""
    name = ""
    if os.path.exists("/proc/cpuinfo"):  # platform.processor() is empty or just "x86_64" on Linux
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    name = name or platform.processor()
    gpu = ""
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        names = query.stdout.splitlines() if query.returncode == 0 else []
        gpu = names[0].strip() if names else ""  # the first GPU: the one a single process uses
    except (OSError, subprocess.SubprocessError):
        pass  # no NVIDIA driver: a CPU machine
    return f"{name or platform.machine()}, {os.cpu_count()} cores" + (f"; GPU {gpu}" if gpu else "")


_runs_log_lock = threading.Lock()  # --jobs N: several threads append to runs.jsonl


def run_job(job, runs_log, budget, log_path=None):
    """Run one command in this folder; record its wall-clock in runs.jsonl, or raise StepFailed.

    log_path=None: the command's output goes to this terminal. With --jobs N > 1 it goes to a
    file per step (interleaved progress bars would be unreadable), named in any error."""
    cmd = [sys.executable, *job["cmd"]]
    shown = "python3 " + shlex.join(job["cmd"])
    print(f"\n>>> {shown}" + (f"   (output: {log_path})" if log_path else ""), flush=True)
    start = time.time()
    cwd = os.path.dirname(os.path.abspath(__file__))
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        with open(log_path, "a") as log:
            rc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT).returncode
    else:
        rc = subprocess.run(cmd, cwd=cwd).returncode
    seconds = time.time() - start
    if rc != 0:
        where = f"see {log_path}" if log_path else "its output is above"
        raise StepFailed(f"`{shown}` exited with status {rc} ({where}); fix it and rerun, finished steps are kept")
    with _runs_log_lock:
        os.makedirs(os.path.dirname(runs_log) or ".", exist_ok=True)
        with open(runs_log, "a") as f:
            f.write(json.dumps(dict(name=job["name"], kind=job["kind"], command=shown, seconds=round(seconds, 1),
                                    budget=budget, machine=machine(), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))) + "\n")
    if log_path:
        print(f"done in {seconds:.0f} s: {shown}", flush=True)


def log_path(job, runs_dir):
    """Where a step's output goes when several run at once: one file per step, in RUNS_DIR."""
    parts = [job["name"]] + ([] if job["kind"] == "pretrain" else [job["mode"], f"seed{job['seed']}"])
    if job["kind"] == "eval":
        parts.append("e{}_b{}_blr{:g}".format(*job_recipe(job)))
    return os.path.join(runs_dir, "logs", "_".join(parts) + ".log")


# ---------------------------------------------------------------------------------------------
# Reading back: markdown tables and loss curves.
# ---------------------------------------------------------------------------------------------


def lookup(jobs, results_by_key, name, mode):
    """top-1 of the named encoder's results in one mode, in seed order (missing ones left out)."""
    return list(lookup_by_seed(jobs, results_by_key, name, mode).values())


def lookup_by_seed(jobs, results_by_key, name, mode):
    """{seed: top-1} of the named encoder's finished results in one mode."""
    return {j["seed"]: results_by_key[job_key(j)]["top1"] for j in jobs
            if j["kind"] == "eval" and j["name"] == name and j["mode"] == mode and job_key(j) in results_by_key}


def mean_std(values, digits=2, count=True):
    """'m ± s (n seeds)' of top-1 values; count=False leaves out the seed count."""
    if not values:
        return "—"
    seeds = f" ({len(values)} seed{'s' if len(values) > 1 else ''})" if count else ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{seeds}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}{seeds}"


def print_tables(jobs, args):
    b = BUDGETS[args.budget]
    results = {}
    for name in (MAIN_RESULTS, ABLATION_RESULTS):
        results |= {result_key(r): r for r in read_jsonl(os.path.join(args.results_dir, name))}
    ft = f"{10 * b['labels_per_class']}-label fine-tune top-1"

    def recipe(prefix):  # the fine-tuning recipe of these rows, for the header
        found = [job_recipe(j) for j in jobs
                 if j["kind"] == "eval" and j["mode"] == "finetune" and j["name"].startswith(prefix)]
        return " (epochs {}, batch {}, blr {:g})".format(*found[0]) if found else ""

    def method(e):  # "a2mim", or "a2mim, blr 4e-3" where the budget sets the pre-training lr
        blr = _flag(b["pretrain"][e["arch"]], "--blr")
        return e["method"] + (f", blr {blr}" if blr else "")

    rows = [(e["arch"], method(e), run_name(e, b)) for e in EXPERIMENTS] + [(a, "random init", f"random_{a}") for a in RANDOM_INIT]
    rows = [r for r in rows if any(j["name"] == r[2] for j in jobs)]
    if rows:
        print(f"\n## Fashion-MNIST, budget {args.budget}\n\n| arch | pre-training | linear probe top-1 | "
              f"{ft}{recipe(rows[0][2])} |\n|---|---|---|---|")
        for arch, method, name in rows:
            print(f"| {arch} | {method} | {mean_std(lookup(jobs, results, name, 'probe'))} | "
                  f"{mean_std(lookup(jobs, results, name, 'finetune'))} |")
        # Paired by seed (same labelled subset, same fine-tuning seed): pre-trained minus random init.
        print(f"\n| arch | pre-training | fine-tune minus random init, per seed (same subset) |\n|---|---|---|")
        for arch, method, name in (r for r in rows if r[1] != "random init"):
            mine, base = (lookup_by_seed(jobs, results, n, "finetune") for n in (name, f"random_{arch}"))
            print(f"| {arch} | {method} | " + (", ".join(f"{mine[s] - base[s]:+.2f} (seed {s})"
                                                       for s in sorted(mine) if s in base) or "—") + " |")
    names = {j["name"] for j in jobs}
    abl = [(a, ablation_name(a, b)) for a in ABLATIONS if ablation_name(a, b) in names]
    if abl:
        print(f"\n## Ablations (ResNet-18/16, A²MIM), budget {args.budget}\n\n| change | linear probe top-1 | "
              f"{ft}{recipe('ablation_')} |\n|---|---|---|")
        for a, name in abl:
            print(f"| {a['change']} | {mean_std(lookup(jobs, results, name, 'probe'))} | "
                  f"{mean_std(lookup(jobs, results, name, 'finetune'))} |")
    if args.only in ("sweep", "all"):
        print_sweep(read_jsonl(os.path.join(args.results_dir, SWEEP_RESULTS)), b)
    runs = [r for r in read_jsonl(os.path.join(args.results_dir, "runs.jsonl")) if r["name"] in names]
    for where in dict.fromkeys(r["machine"] for r in runs):  # one table per machine, in order
        mine = [r for r in runs if r["machine"] == where]
        print(f"\n## Commands and wall-clock ({where})\n\n| seconds | command |\n|---|---|")
        for r in mine:
            print(f"| {r['seconds']:.0f} | `{r['command']}` |")
        print(f"| {sum(r['seconds'] for r in mine):.0f} | total (steps that ran side by side overlap) |")


def print_sweep(records, b):
    """Fine-tune top-1 over the (batch, blr) grid: one row per encoder, mean ± std over seeds."""
    if not records:
        return
    grid = [(bs, blr) for bs in b["sweep"]["batch_sizes"] for blr in b["sweep"]["blrs"]]
    rows = {}
    for r in records:
        who = f"random init {r['arch']}" if r["init"] == "random" else f"{r['config']['pretrain_method']} {r['arch']}"
        rows.setdefault(who, {}).setdefault((r["config"]["batch_size"], r["config"]["blr"]), []).append(r["top1"])
    order = sorted(rows, key=lambda who: (who.split()[-1], not who.startswith("random"), who))  # by arch, baseline first
    print(f"\n## Fine-tuning recipe sweep ({10 * b['labels_per_class']} labels, {b['sweep']['epochs']} epochs; "
          f"top-1, mean ± std over seeds {', '.join(map(str, b['sweep']['seeds']))})\n")
    print("| batch | blr | " + " | ".join(order) + " |\n|---|---|" + "---|" * len(order))
    for bs, blr in grid:
        cells = [mean_std(rows[who].get((bs, blr), []), digits=1, count=False) for who in order]
        print(f"| {bs} | {blr:g} | " + " | ".join(cells) + " |")


def plot_losses(jobs, path):
    """One panel per pre-training run: total loss and its spatial / Fourier parts against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(j["name"], read_jsonl(os.path.join(os.path.dirname(j["checkpoint"]), "log.jsonl")))
            for j in jobs if j["kind"] == "pretrain"]
    runs = [(name, log) for name, log in runs if log]
    if not runs:
        print("no pre-training logs yet: nothing to plot")
        return
    cols = min(4, len(runs))
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (name, log) in zip(axes.flat, runs):
        steps = [r["step"] for r in log]
        for key in ("loss", "loss_spatial", "loss_freq"):
            if all(key in r for r in log):
                ax.plot(steps, [r[key] for r in log], label=key, lw=1, marker="o" if len(log) < 20 else None, ms=2)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"wrote {path} ({len(runs)} runs, {os.path.getsize(path) // 1024} KB)")


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--budget", choices=tuple(BUDGETS), default="smoke",
      help="smoke: a few steps of everything; full: the README tables; full_paper_lr: the first main table "
           "(default pre-training lr); long: longer pre-training, for a GPU")
    a("--only", choices=("main", "ablations", "all", "sweep"), default="main",
      help="which table to run (default main; all = main + ablations; sweep = the fine-tuning recipe search)")
    a("--archs", nargs="+", choices=tuple(RANDOM_INIT), default=list(RANDOM_INIT), help="restrict to these encoders")
    a("--data", default="fashion-mnist", help="dataset for every step (tests use 'fake')")
    a("--results-dir", help="JSONL results, runs.jsonl, plot (default: the budget's, results/ or results/smoke/)")
    a("--runs-dir", help="pre-training run folders (default: the budget's; with --results-dir: RESULTS_DIR/runs)")
    a("--table", action="store_true", help="print the markdown tables and exit (no training)")
    a("--plot", action="store_true", help="write RESULTS_DIR/loss_curves.png and exit (no training)")
    a("--dry-run", action="store_true", help="print the commands that would run, and exit")
    a("--jobs", type=int, default=1, metavar="N",
      help="run N steps at once (for a GPU, which these tiny models leave mostly idle; default 1): all "
           "pre-trainings first, then all evaluations. Output goes to RUNS_DIR/logs/; per-step seconds overlap")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    b = BUDGETS[args.budget]
    args.runs_dir = args.runs_dir or (os.path.join(args.results_dir, "runs") if args.results_dir else b["runs_dir"])
    args.results_dir = args.results_dir or b["results_dir"]
    jobs = build_jobs(args)
    if args.table or args.plot:
        if args.table:
            print_tables(jobs, args)
        if args.plot:
            plot_losses(jobs, os.path.join(args.results_dir, "loss_curves.png"))
        return 0
    if args.dry_run:
        print("\n".join(f"{'done ' if is_done(j) else 'todo '} python3 {shlex.join(j['cmd'])}" for j in jobs))
        return 0
    if args.jobs < 1:
        print(f"error: --jobs must be a positive number of parallel steps, got {args.jobs}", file=sys.stderr)
        return 2
    runs_log = os.path.join(args.results_dir, "runs.jsonl")
    start, ran, failed = time.time(), [], threading.Event()

    def run_one(job):
        if failed.is_set():  # a step failed: start nothing new
            return
        if is_done(job):
            print(f"skip (done): python3 {shlex.join(job['cmd'])}", flush=True)
            return
        try:
            run_job(job, runs_log, args.budget, log_path(job, args.runs_dir) if args.jobs > 1 else None)
        except StepFailed:
            failed.set()
            raise
        ran.append(job)

    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # N processes share the CPU cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    # One at a time: the list's order (each encoder's evaluations right after its pre-training).
    # N at a time: every pre-training first, then every evaluation (which needs its checkpoint).
    phases = [jobs] if args.jobs == 1 else [[j for j in jobs if j["kind"] == "pretrain"],
                                            [j for j in jobs if j["kind"] == "eval"]]
    try:
        for phase in phases:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                for future in [pool.submit(run_one, job) for job in phase]:
                    future.result()  # the first failure is re-raised here (running steps finish first)
    except StepFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{args.budget} budget: ran {len(ran)} of {len(jobs)} steps in {time.time() - start:.0f} s"
          f"{f' ({args.jobs} at a time)' if args.jobs > 1 else ''}; results in {args.results_dir}. "
          f"Tables: python3 reproduce.py --budget {args.budget} --only {args.only} --table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
