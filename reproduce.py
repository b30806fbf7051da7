"""Reproduce the Results tables on Fashion-MNIST with one command.

    python reproduce.py                                # smoke budget: a few steps of everything, ~5 min
    python reproduce.py --budget full --jobs 2         # the main table; --only ablations / sweep / all
    python reproduce.py --budget full --only all --table --plot   # the tables, results/loss_curves.png
    python reproduce.py --budget full --only interactions   # §9's J^(m); add --table --plot: results/interactions.png

Jobs are data (script + args, run as `python3 SCRIPT ARGS`): train.py pre-trains A²MIM and SimMIM alike (the ResNet
rows once per pre-training seed); eval_linear.py probes each checkpoint and a random init, and fine-tunes on 100 labels
per class, seeds 1-3. A row: mean ± std over pre-training × fine-tuning seeds; then paired differences (minus random
init, A²MIM minus SimMIM). runs.jsonl: each job's part, seconds, machine. Rerun a stopped run to continue it: finished
jobs (same encoder, mode, labels, seed and recipe) are skipped, train.py resumes a half-done pre-training.
"""

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

import runtime

EXPERIMENTS = [  # the main table, pre-trained on Fashion-MNIST at 32 px
    dict(name="a2mim_resnet18", arch="resnet18", args=["--method", "a2mim", "--width", "16"]),
    dict(name="simmim_resnet18", arch="resnet18", args=["--method", "simmim", "--width", "16"]),
    dict(name="a2mim_vit_tiny", arch="vit_tiny", args=["--method", "a2mim"]),
    dict(name="simmim_vit_tiny", arch="vit_tiny", args=["--method", "simmim"]),
]
# fmt: off
RANDOM_INIT = {a: ["--init", "random", "--arch", a, *w] for a, w in (("resnet18", ["--width", "16"]), ("vit_tiny", []))}
# Ablations (METHOD.md §5, ResNet-18/16), one change each against the A²MIM default (mask block 4 px = img/8,
# ratio 0.6, Fourier loss on, mean fill, token at layer4's input, γ gate).
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
# Pre-training lr, both methods and encoders: blr 4e-3 (lr 1e-3 at batch 128); the paper's 3e-4 leaves these few
# thousand steps far from converged. A stated lr adds "_blr<value>" to the folder: other lrs never pass for it.
PRETRAIN_LR = ["--blr", "4e-3"]
# Every evaluation states its recipe (epochs, batch, blr), part of what identifies a result. The probe: 30 epochs of
# SGD on cached features. Fine-tuning: picked on RANDOM INIT alone (fair to both methods) by `--only sweep`.
PROBE = ["--epochs", "30", "--batch-size", "256", "--blr", "0.1"]
SWEPT_FINETUNE = ["--epochs", "20", "--batch-size", "32", "--blr", "3.2e-2"]
SMOKE = ["--epochs", "1", "--max-steps", "5", "--vis-every", "0"]
SMOKE_EVAL = ["--epochs", "1", "--batch-size", "50", "--blr", "1e-3"]
BUDGETS = {
    "smoke": dict(pretrain={"resnet18": SMOKE, "vit_tiny": SMOKE}, pretrain_seeds={"resnet18": [0, 1]},
                  ablation_pretrain=SMOKE, probe=[*SMOKE_EVAL, "--labels-per-class", "10"], finetune=SMOKE_EVAL,
                  ablation_finetune=SMOKE_EVAL, seeds=[1], labels_per_class=10,
                  sweep=dict(pretrain=SMOKE, epochs=1, batch_sizes=[50], blrs=[1e-3, 4e-3], seeds=[1]),
                  interactions=dict(per_class=1, pairs=2, contexts=2),
                  results_dir="results/smoke", runs_dir="out/repro_smoke"),
    # 2-core CPU, 2 jobs (results/runs.jsonl): ResNet-18/16 pre-training ~27 min, ViT-tiny ~62; an evaluation 2-11 min.
    "full": dict(pretrain={"resnet18": ["--epochs", "5", *PRETRAIN_LR], "vit_tiny": ["--epochs", "3", *PRETRAIN_LR]},
                 pretrain_seeds={"resnet18": [0, 1, 2]}, ablation_pretrain=["--epochs", "2", *PRETRAIN_LR], probe=PROBE,
                 finetune=SWEPT_FINETUNE, ablation_finetune=SWEPT_FINETUNE, labels_per_class=100, seeds=[1, 2, 3],
                 sweep=dict(pretrain=["--epochs", "2", "--vis-every", "0"], epochs=20, batch_sizes=[32, 128],
                            blrs=[1e-3, 4e-3, 1.6e-2, 3.2e-2, 6.4e-2], seeds=[1, 2]),
                 # §9 on 30 val images: the released protocol's orders, pair sampling and grid, 16 × 16 of its 50 × 50
                 # pairs × contexts (~13k forward passes an image, ~15 min a model on one 2-core CPU thread).
                 interactions=dict(per_class=3, pairs=16, contexts=16), results_dir="results", runs_dir="out/repro"),
}
BUDGETS["long"] = BUDGETS["full"] | dict(  # does the ordering hold with more pre-training?
    pretrain={"resnet18": ["--epochs", "30", *PRETRAIN_LR], "vit_tiny": ["--epochs", "30", *PRETRAIN_LR]},
    ablation_pretrain=["--epochs", "10", *PRETRAIN_LR], results_dir="results/long", runs_dir="out/repro_long")
RESULTS = dict(main="fashion_mnist.jsonl", ablations="ablations.jsonl", sweep="ft_sweep.jsonl",
               interactions="interactions.jsonl")
# fmt: on
PARTS = ("pre-training", "probe", "fine-tune")
INTERACTION_FLAGS = ("--interactions", "--interaction-pairs", "--interaction-contexts")
HERE = os.path.dirname(os.path.abspath(__file__))  # where the jobs' scripts run


def flag(args, name):
    """The value after flag `name` in a list of command-line words, None when absent."""
    if name not in args:
        return None
    return args[args.index(name) + 1]


# --- The jobs. A job is a dict: name, script, part, args (and checkpoint for a pre-training, results and the
# table row for an evaluation); the commands they run are the documentation of each number.
class Row(NamedTuple):
    """A table row of a pre-trained encoder: a train.py job per pre-training seed, each followed by the
    evaluations of its checkpoint."""

    name: str  # seed 0's run folder, e.g. a2mim_resnet18
    arch: str
    label: str  # the table's second column: the method (and lr), or the ablation's change
    train_args: list  # train.py flags of the method or ablation
    budget_args: list  # train.py flags of the budget (epochs, lr)
    seeds: list  # pre-training seeds
    finetune: list  # eval_linear.py flags of the fine-tune (the probe's are the budget's)
    results: str  # the JSONL file its evaluations append to


class Evaluation(NamedTuple):
    """One eval_linear.py run of an encoder: its flags and seed."""

    flags: list
    seed: int


def pretrain(name, arch, args, budget_args, c, seed=0):
    """A train.py job; pre-training seed 0 keeps the plain name (the first runs had no seed flag)."""
    blr = flag(budget_args, "--blr")
    if blr:
        name += f"_blr{blr}"
    if seed:
        name += f"_seed{seed}"
    seed_args = ["--seed", str(seed)] if seed else []
    return dict(
        name=name,
        script="train.py",
        part="pre-training",
        checkpoint=os.path.join(c.runs_dir, name, "checkpoint.pt"),
        args=[
            *["--arch", arch, *args, "--data", c.data, *budget_args, *seed_args],
            *["--out-dir", c.runs_dir, "--run-name", name],
        ],
    )


def evaluate(name, source, runs, results, c, **row):
    """eval_linear.py jobs of encoder `source` (flags), one per Evaluation of `runs`, in table `row`."""
    jobs = []
    for run in runs:
        finetune = "--finetune" in run.flags
        # a fine-tune's labelled subset follows its seed: seeds differ in images too
        subset = ["--subset-seed", str(run.seed)] if finetune else []
        args = [*source, "--data", c.data, *run.flags, "--seed", str(run.seed), *subset]
        jobs.append(
            dict(
                name=name,
                script="eval_linear.py",
                part="fine-tune" if finetune else "probe",
                results=results,
                args=[*args, "--results", results],
                **row,
            )
        )
    return jobs


def evaluations(b, finetune):
    """A probe, and a fine-tune on --labels-per-class of the budget per fine-tuning seed."""
    labels = ["--labels-per-class", str(b["labels_per_class"])]
    tunes = [Evaluation(["--finetune", *labels, *finetune], s) for s in b["seeds"]]
    return [Evaluation(b["probe"], 1), *tunes]


def build_jobs(c):
    """Every job of --only, in the order they run: the random-init references first, then the table rows
    seed by seed; or §9's fine-tunes; or the sweep."""
    b = BUDGETS[c.budget]
    out = {k: os.path.join(c.results_dir, v) for k, v in RESULTS.items()}
    jobs = []
    if c.only in ("main", "all"):  # first: every row's reference
        jobs += random_init_jobs(b, out, c)
    jobs += row_jobs(table_rows(b, out, c), b, c)
    if c.only == "interactions" and "resnet18" in c.archs:
        jobs += interaction_jobs(b, out, c)
    if c.only == "sweep":
        jobs += sweep_jobs(b, out, c)
    return jobs


def random_init_jobs(b, out, c):
    jobs = []
    for arch in RANDOM_INIT:
        if arch in c.archs:
            row = dict(row=f"random_{arch}", arch=arch, label="random init")
            runs = evaluations(b, b["finetune"])
            jobs += evaluate(f"random_{arch}", RANDOM_INIT[arch], runs, out["main"], c, **row)
    return jobs


def table_rows(b, out, c):
    """The main table's rows (--only main / all), then the ablations' (--only ablations / all)."""
    rows = []
    if c.only in ("main", "all"):
        rows += [main_row(e, b, out) for e in EXPERIMENTS if e["arch"] in c.archs]
    if c.only in ("ablations", "all") and "resnet18" in c.archs:
        rows += [ablation_row(a, b, out) for a in ABLATIONS]
    return rows


def main_row(e, b, out):
    """An encoder of EXPERIMENTS: pre-trained with its method at the budget's settings of its arch."""
    budget_args = b["pretrain"][e["arch"]]
    label = flag(e["args"], "--method")
    if "--blr" in budget_args:
        label += f", blr {flag(budget_args, '--blr')}"
    return Row(
        name=e["name"],
        arch=e["arch"],
        label=label,
        train_args=e["args"],
        budget_args=budget_args,
        seeds=b["pretrain_seeds"].get(e["arch"], [0]),
        finetune=b["finetune"],
        results=out["main"],
    )


def ablation_row(a, b, out):
    """A²MIM on the ResNet-18/16 with one change of ABLATIONS."""
    return Row(
        name=f"ablation_{a['name']}",
        arch="resnet18",
        label=a["change"],
        train_args=["--method", "a2mim", "--width", "16", *a["args"]],
        budget_args=b["ablation_pretrain"],
        seeds=[0],
        finetune=b["ablation_finetune"],
        results=out["ablations"],
    )


def row_jobs(rows, b, c):
    """Seed by seed, so that a stopped run has every row's first seed: each row's pre-training of that seed,
    then its checkpoint's evaluations, all in the row named by seed 0's run."""
    jobs = []
    for k in range(max((len(r.seeds) for r in rows), default=0)):
        for r in rows:
            if k >= len(r.seeds):
                continue
            first = pretrain(r.name, r.arch, r.train_args, r.budget_args, c)
            pre = pretrain(r.name, r.arch, r.train_args, r.budget_args, c, r.seeds[k])
            row = dict(row=first["name"], arch=r.arch, label=r.label)
            source = ["--checkpoint", pre["checkpoint"]]
            runs = evaluations(b, r.finetune)
            jobs += [pre, *evaluate(pre["name"], source, runs, r.results, c, **row)]
    return jobs


def interaction_jobs(b, out, c):
    """§9: the ResNet fine-tuned from A²MIM, SimMIM (the main table's seed-0 pre-trainings), or scratch, with
    J^(m) measured after the fine-tune."""
    ij = b["interactions"]
    measured = [
        *["--finetune", "--labels-per-class", str(b["labels_per_class"]), *b["finetune"]],
        *["--interactions", str(ij["per_class"]), "--interaction-pairs", str(ij["pairs"])],
        *["--interaction-contexts", str(ij["contexts"])],
    ]
    runs = [Evaluation(measured, 1)]
    jobs = []
    for e in EXPERIMENTS[:2]:  # the ResNet rows
        p = pretrain(e["name"], "resnet18", e["args"], b["pretrain"]["resnet18"], c)
        row = dict(row=p["name"], arch="resnet18", label=flag(e["args"], "--method"))
        source = ["--checkpoint", p["checkpoint"]]
        jobs += [p, *evaluate(p["name"], source, runs, out["interactions"], c, **row)]
    row = dict(row="random_resnet18", arch="resnet18", label="from scratch")
    random = RANDOM_INIT["resnet18"]
    return jobs + evaluate("random_resnet18", random, runs, out["interactions"], c, **row)


def sweep_jobs(b, out, c):
    """Every (batch, blr) of the grid, fine-tuning random init and short pre-trainings of the ResNet."""
    sw = b["sweep"]
    pres = []
    if "resnet18" in c.archs:
        for method in ("a2mim", "simmim"):
            args = ["--method", method, "--width", "16"]
            pres.append(pretrain(f"sweep_{method}_resnet18", "resnet18", args, sw["pretrain"], c))
    sources = [(p["name"], ["--checkpoint", p["checkpoint"]]) for p in pres]
    sources += [(f"sweep_random_{a}", RANDOM_INIT[a]) for a in RANDOM_INIT if a in c.archs]
    fixed = ["--labels-per-class", str(b["labels_per_class"]), "--epochs", str(sw["epochs"])]
    jobs = list(pres)
    for seed in sw["seeds"]:
        for batch in sw["batch_sizes"]:
            for blr in sw["blrs"]:
                recipe = ["--batch-size", str(batch), "--blr", f"{blr:g}"]
                run = Evaluation(["--finetune", *fixed, *recipe], seed)
                for name, source in sources:
                    jobs += evaluate(name, source, [run], out["sweep"], c)
    return jobs


def command(job):
    return f"python3 {job['script']} {shlex.join(job['args'])}"


# --- What is done: a result line's key equals the key of the job that wrote it.
RESULT_FIELDS = ("mode", "checkpoint", "init", "arch", "labels_per_class", "top1", "config")
CONFIG_FIELDS = ("seed", "epochs", "batch_size", "blr")  # of a result's config: its result_key
RUN_FIELDS = ("name", "part", "command", "seconds", "machine")  # of a runs.jsonl line


class Recipe(NamedTuple):
    epochs: int
    batch_size: int
    blr: float


class ResultKey(NamedTuple):
    """One evaluation, as a result line and the job that writes it both say it."""

    encoder: str  # the checkpoint, or 'random <arch>'
    mode: str  # probe / finetune
    labels_per_class: int | None
    seed: int
    recipe: Recipe
    interactions: tuple | None  # §9's (images per class, pairs, contexts); None: not measured


def read_records(path, runs=False):
    """The eval_linear.py results of a JSONL file (runs=True: runs.jsonl's job records). A damaged line, or one
    that is JSON but not such a record, is a runtime.JsonlError naming the file and the line."""
    records = runtime.read_jsonl(path)
    for r in records:
        holds = all(k in r for k in (RUN_FIELDS if runs else RESULT_FIELDS))
        if holds and not runs:
            holds = isinstance(r["config"], dict) and all(k in r["config"] for k in CONFIG_FIELDS)
        if not holds:
            what = "job record of reproduce.py" if runs else "result of eval_linear.py"
            raise runtime.JsonlError(
                f"{path} holds a line that is not a {what} ({json.dumps(r)[:60]!r}); "
                "fix or remove that line"
            )
    return records


def result_key(r):
    c = r["config"]
    interactions = None
    if c.get("interactions"):
        interactions = (c["interactions"], c["interaction_pairs"], c["interaction_contexts"])
    return ResultKey(
        encoder=r["checkpoint"] or f"random {r['arch']}",
        mode=r["mode"],
        labels_per_class=r["labels_per_class"],
        seed=c["seed"],
        recipe=Recipe(c["epochs"], c["batch_size"], c["blr"]),
        interactions=interactions,
    )


def job_key(job):
    """The result_key that an eval job's line will have, from its flags."""
    a = job["args"]
    labels = flag(a, "--labels-per-class")
    interactions = None
    if flag(a, "--interactions"):
        interactions = tuple(int(flag(a, f)) for f in INTERACTION_FLAGS)
    return ResultKey(
        encoder=flag(a, "--checkpoint") or f"random {flag(a, '--arch')}",
        mode="finetune" if job["part"] == "fine-tune" else "probe",
        labels_per_class=int(labels) if labels else None,
        seed=int(flag(a, "--seed")),
        recipe=Recipe(
            int(flag(a, "--epochs")), int(flag(a, "--batch-size")), float(flag(a, "--blr"))
        ),
        interactions=interactions,
    )


def is_done(job, jobs):
    """An evaluation: its result is in the JSONL. A pre-training: no evaluation of `jobs` still needs its checkpoint
    (a fresh clone holds the results, not the checkpoints), or the checkpoint has every epoch / --max-steps step."""
    if job["script"] == "eval_linear.py":
        return job_key(job) in {result_key(r) for r in read_records(job["results"])}
    needed = any(
        flag(j["args"], "--checkpoint") == job["checkpoint"] and not is_done(j, jobs) for j in jobs
    )
    if not needed:
        return True
    if not os.path.exists(job["checkpoint"]):
        return False
    ckpt = runtime.load_checkpoint(job["checkpoint"])  # weights_only=True
    max_steps = flag(job["args"], "--max-steps")
    if max_steps is not None and ckpt.step >= int(max_steps):
        return True
    return ckpt.epoch >= int(flag(job["args"], "--epochs"))


# --- Running them: chains side by side, each job a subprocess, each finished job a runs.jsonl line.
def machine():
    """'<CPU model>, N cores; GPU <the first one nvidia-smi sees>': where the seconds were measured."""
    gpu = ""
    # no NVIDIA driver: a CPU machine
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        listed = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout
        gpu = listed.split("\n")[0].strip()
    where = f"{runtime.cpu_name()}, {os.cpu_count()} cores"
    if gpu:
        where += f"; GPU {gpu}"
    return where


def chains(jobs):
    """[(index, job), ...] lists that run in order: a pre-training, then its checkpoint's evaluations; any
    other job alone."""
    by_checkpoint = {}
    for i, j in enumerate(jobs):
        if j["part"] == "pre-training":
            key = j["checkpoint"]
        else:
            key = flag(j["args"], "--checkpoint") or i
        by_checkpoint.setdefault(key, []).append((i, j))
    return list(by_checkpoint.values())


def run_job(i, job, jobs, c, where):
    """Job `i`, unless it is done: its command as a subprocess (under --jobs N, its output in RUNS_DIR/logs/),
    then its record appended to runs.jsonl. Returns that record, or None for a skipped job."""
    shown = command(job)
    # Each print is one write ending in a newline: lines of jobs running side by side do not interleave.
    if is_done(job, jobs):
        print(f"skip (done): {shown}\n", end="", flush=True)
        return None
    log = None
    if c.jobs > 1:
        log = os.path.join(c.runs_dir, "logs", f"{i:03d}_{job['name']}_{job['part']}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        print(f"\n>>> {shown}   (output: {log})\n", end="", flush=True)
    else:
        print(f"\n>>> {shown}\n", end="", flush=True)
    start = time.time()
    argv = [sys.executable, job["script"], *job["args"]]
    if log is None:
        rc = subprocess.run(argv, cwd=HERE).returncode
    else:
        with open(log, "a") as out:
            rc = subprocess.run(argv, cwd=HERE, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        output = f"see {log}" if log else "its output is above"
        raise runtime.RunError(
            f"`{shown}` exited with status {rc} ({output}); fix it and rerun, finished jobs are kept"
        )
    record = dict(
        name=job["name"],
        part=job["part"],
        command=shown,
        seconds=round(time.time() - start, 1),
        budget=c.budget,
        machine=where,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    # flock: threads wait
    runtime.append_line(os.path.join(c.results_dir, "runs.jsonl"), json.dumps(record))
    if log:
        print(f"done in {record['seconds']:.0f} s: {shown}\n", end="", flush=True)
    return record


def run_all(jobs, c):
    """Run the jobs not done yet in chains, in order, --jobs N chains side by side. A stopped run keeps whole
    chains: checkpoints are not committed, results are. Returns the records of the jobs that ran."""
    ran, failed = [], threading.Event()
    where = machine()
    if c.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # N processes share the CPU cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // c.jobs))

    def run_chain(chain):
        for i, job in chain:
            if failed.is_set():  # another chain failed: start no new job (the running ones finish)
                return
            try:
                record = run_job(i, job, jobs, c, where)
            except BaseException:
                failed.set()
                raise
            if record is not None:
                ran.append(record)

    with ThreadPoolExecutor(max_workers=c.jobs) as pool:
        for future in [pool.submit(run_chain, chain) for chain in chains(jobs)]:
            future.result()  # the first failure is re-raised here (running jobs finish first)
    return ran


# --- The tables: mean ± std over seeds, paired differences, the sweep's grid, §9, the wall clock.
def mean_std(values, fmt=".2f", unit="run"):
    """'m ± s (n runs)' (unit=None: no count); one value: 'm (1 run)'; none: '—'."""
    count = ""
    if unit:
        plural = "s" if len(values) > 1 else ""
        count = f" ({len(values)} {unit}{plural})"
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:{fmt}}{count}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):.{fmt[-2]}f}{count}"


def finished(jobs, c):
    """[(job, its top-1)] of the table rows' evaluation jobs whose result is in the main or ablations JSONL."""
    results = {}
    for table in ("main", "ablations"):
        for r in read_records(os.path.join(c.results_dir, RESULTS[table])):
            results[result_key(r)] = r
    return [(j, results[job_key(j)]["top1"]) for j in jobs if "row" in j and job_key(j) in results]


def top1s(done, row, part, seed=None):
    """The top-1 of each finished job of `row` and `part` (of fine-tuning `seed`: a string), in job order:
    every pre-training seed's."""
    found = []
    for j, top1 in done:
        if j["row"] != row or j["part"] != part:
            continue
        if seed is None or flag(j["args"], "--seed") == seed:
            found.append(top1)
    return found


def print_tables(jobs, c):
    """The main table (then its paired differences) and the ablations', from the JSONL results; the sweep's
    grid; the wall clock of these jobs."""
    b = BUDGETS[c.budget]
    done = finished(jobs, c)
    rows = {j["row"]: j for j in jobs if "row" in j}  # a job of each row: its arch and label
    main = {row: j for row, j in rows.items() if not row.startswith("ablation_")}
    ablations = {row: j for row, j in rows.items() if row.startswith("ablation_")}
    if main:
        title = (
            f"Fashion-MNIST, budget {c.budget}: mean ± std over pre-training × fine-tuning seeds"
        )
        print_accuracies(title, "pre-training", main, done, jobs, b)
        print_differences(main, done, b)
    if ablations:
        title = f"Ablations (ResNet-18/16, A²MIM), budget {c.budget}"
        print_accuracies(title, "change", ablations, done, jobs, b)
    if c.only in ("sweep", "all"):
        sweep = read_records(os.path.join(c.results_dir, RESULTS["sweep"]))
        print_sweep(sweep, b["sweep"], b["labels_per_class"])
    mine = set(map(command, jobs))
    runs = read_records(os.path.join(c.results_dir, "runs.jsonl"), runs=True)
    print_wall_clock([r for r in runs if r["command"] in mine])


def print_accuracies(title, column, rows, done, jobs, b):
    """A row per encoder: probe and fine-tune top-1, mean ± std over its seeds."""
    recipe = next(
        job_key(j).recipe for j in jobs if j["part"] == "fine-tune" and j.get("row") in rows
    )
    finetune = (
        f"{10 * b['labels_per_class']}-label fine-tune top-1 (epochs {recipe.epochs}, "
        f"batch {recipe.batch_size}, blr {recipe.blr:g})"
    )
    print(
        f"\n## {title}\n\n| arch | {column} | linear probe top-1 | {finetune} |\n|---|---|---|---|"
    )
    for row, j in rows.items():
        probe = mean_std(top1s(done, row, "probe"))
        tuned = mean_std(top1s(done, row, "fine-tune"))
        print(f"| {j['arch']} | {j['label']} | {probe} | {tuned} |")


def print_differences(rows, done, b):
    """Paired differences of the fine-tunes: minus random init on the same fine-tuning seed (the same
    labelled subset), and A²MIM minus SimMIM on the same seeds (the twin command)."""
    print(
        "\n| arch | pre-training | fine-tune minus random init, paired by fine-tuning seed "
        "| A²MIM minus SimMIM, same seeds |\n|---|---|---|---|"
    )
    by_command = {command(j): top1 for j, top1 in done}
    for row, j in rows.items():
        if row.startswith("random_"):
            continue
        minus_random = []
        for seed in map(str, b["seeds"]):
            base = top1s(done, f"random_{j['arch']}", "fine-tune", seed)[:1]
            if base:
                minus_random += [top1 - base[0] for top1 in top1s(done, row, "fine-tune", seed)]
        minus_simmim = []
        if row.startswith("a2mim_"):
            for k, top1 in done:
                twin = command(k).replace("a2mim_", "simmim_")
                if k["row"] == row and k["part"] == "fine-tune" and twin in by_command:
                    minus_simmim.append(top1 - by_command[twin])
        random_pairs = mean_std(minus_random, "+.2f", "pair")
        simmim_pairs = mean_std(minus_simmim, "+.2f", "pair")
        print(f"| {j['arch']} | {j['label']} | {random_pairs} | {simmim_pairs} |")


def print_sweep(records, sw, labels_per_class):
    """Fine-tune top-1 over the (batch, blr) grid, a column per encoder (by arch, random init first)."""
    cells = {}
    for r in records:
        if r["init"] == "random":
            who = f"random init {r['arch']}"
        else:
            who = f"{r['config']['pretrain_method']} {r['arch']}"
        grid_point = (r["config"]["batch_size"], r["config"]["blr"])
        cells.setdefault(who, {}).setdefault(grid_point, []).append(r["top1"])
    order = sorted(cells, key=lambda who: (who.split()[-1], not who.startswith("random"), who))
    seeds = ", ".join(map(str, sw["seeds"]))
    print(
        f"\n## Fine-tuning recipe sweep ({10 * labels_per_class} labels, {sw['epochs']} epochs; top-1, "
        f"mean ± std over seeds {seeds})\n\n| batch | blr | {' | '.join(order)} |\n"
        f"|---|---|{'---|' * len(order)}"
    )
    for batch in sw["batch_sizes"]:
        for blr in sw["blrs"]:
            top1 = [mean_std(cells[who].get((batch, blr), []), ".1f", None) for who in order]
            print(f"| {batch} | {blr:g} | {' | '.join(top1)} |")


def print_wall_clock(runs):
    """Per machine: each command's seconds, then each part's and the total."""
    for where in dict.fromkeys(r["machine"] for r in runs):  # one table per machine, in order
        mine = [r for r in runs if r["machine"] == where]
        print(f"\n## Commands and wall-clock ({where})\n\n| seconds | command |\n|---|---|")
        print("\n".join(f"| {r['seconds']:.0f} | `{r['command']}` |" for r in mine))
        for part in PARTS:
            of_part = [r for r in mine if r["part"] == part]
            if of_part:
                seconds = sum(r["seconds"] for r in of_part)
                print(f"| {seconds:.0f} | {part}: {len(of_part)} jobs |")
        total = sum(r["seconds"] for r in mine)
        print(f"| {total:.0f} | total (jobs that ran side by side overlap) |")


def bootstrap(per_image, n=2000, seed=0):
    """J^(m) [M] from I^(m) per image [B, M], and J of n resamples of the images (with replacement) [n, M]."""
    I_bm = torch.tensor(per_image)
    gen = torch.Generator().manual_seed(seed)
    boot_nm = I_bm[torch.randint(len(I_bm), (n, len(I_bm)), generator=gen)].mean(1)
    return I_bm.mean(0) / I_bm.mean(), boot_nm / boot_nm.mean(1, keepdim=True)


def model_name(r):
    """An interactions record's model: its pre-training method, or 'from scratch'."""
    if r["checkpoint"] and r["config"]["pretrain_method"]:
        return r["config"]["pretrain_method"]
    return "from scratch"


def report_interactions(path, png):
    """§9 table (J per order, 95 % bootstrap interval over images) and plot; the middle orders (0.3 ≤ r ≤ 0.7)
    of each pre-trained model minus the model from scratch, resampling the same images for both."""
    records = {model_name(r): r for r in read_records(path)}
    if not records:
        print(f"no interaction results in {path} yet")
        return
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="tight")
    orders = next(iter(records.values()))["interactions"]["orders"]
    middle = torch.tensor([0.3 <= o <= 0.7 for o in orders])
    print(
        f"\n## Multi-order interactions J^(m) (§9)\n\n| model (fine-tune top-1) | s (J^(m) part) | images | "
        f"{' | '.join(f'{o:g}' for o in orders)} | middle orders |\n"
        f"|---|---|---|{'---|' * (len(orders) + 1)}"
    )
    boots = {}
    for who, r in records.items():
        j = r["interactions"]
        J, boots[who] = bootstrap(j["I_abs_per_image"])
        lo, hi = boots[who].quantile(0.025, 0), boots[who].quantile(0.975, 0)
        label = f"{who} ({r['top1']:.1f} %)"
        ax.errorbar(orders, J, yerr=[J - lo, hi - J], marker="o", ms=3, capsize=2, label=label)
        mid = boots[who][:, middle].mean(1)
        per_order = " | ".join(f"{v:.2f}" for v in J.tolist())
        interval = f"{J[middle].mean():.2f} [{mid.quantile(0.025):.2f}, {mid.quantile(0.975):.2f}]"
        print(
            f"| {label} | {r['wall_time_s']:.0f} ({j['seconds']:.0f}) | {len(j['images'])} | "
            f"{per_order} | {interval} |"
        )
    for who in boots:
        if who == "from scratch" or "from scratch" not in boots:
            continue
        # same seed: the same images, resampled alike
        d = (boots[who] - boots["from scratch"])[:, middle].mean(1)
        print(
            f"\n{who} minus from scratch, middle-order J: {d.mean():+.3f}, 95 % interval "
            f"[{d.quantile(0.025):+.3f}, {d.quantile(0.975):+.3f}] "
            f"({(d > 0).float().mean():.0%} of resamples above 0)"
        )
    ax.axvspan(0.3, 0.7, color="gold", alpha=0.15)
    ax.set(
        xlabel="order m / (n − 2)",
        ylabel="J^(m) (normalised)",
        title="ResNet-18/16, Fashion-MNIST val",
    )
    ax.legend(fontsize=7)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    print(f"wrote {png} ({os.path.getsize(png) // 1024} KB)")


def plot_losses(jobs, path):
    """One panel per pre-training run: the loss and its spatial / Fourier parts."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    # A run stopped by a kill may have torn its last log line: dropped, with a note; any other damage is named.
    runs = []
    for j in jobs:
        if j["part"] == "pre-training":
            log = os.path.join(os.path.dirname(j["checkpoint"]), "log.jsonl")
            runs.append((j["name"], runtime.read_jsonl(log, drop_torn_last=True)))
    runs = [(name, log) for name, log in runs if log]
    if not runs:
        print("no pre-training logs yet: nothing to plot")
        return
    cols, rows = min(4, len(runs)), -(-len(runs) // 4)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, layout="tight"
    )
    # strict=False: the last row of panels may have more panels than runs left
    for ax, (name, log) in zip(axes.flat, runs, strict=False):
        for key in ("loss", "loss_spatial", "loss_freq"):
            if not all(key in r for r in log):
                continue
            marker = "o" if len(log) < 20 else None
            steps, values = [r["step"] for r in log], [r[key] for r in log]
            ax.plot(steps, values, label=key, lw=1, marker=marker, ms=2)
        ax.set_title(f"{name} (x: step)", fontsize=8)
        ax.legend(fontsize=6)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"wrote {path} ({len(runs)} runs, {os.path.getsize(path) // 1024} KB)")


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a(
        "--budget",
        choices=tuple(BUDGETS),
        default="smoke",
        help="smoke: a few steps of each; full: the tables; long: for a GPU",
    )
    a(
        "--only",
        choices=("main", "ablations", "all", "sweep", "interactions"),
        default="main",
        help="all = main + ablations; interactions: §9's J^(m) of the ResNet from A²MIM, SimMIM, scratch",
    )
    a(
        "--archs",
        nargs="+",
        choices=tuple(RANDOM_INIT),
        default=list(RANDOM_INIT),
        help="restrict to these encoders",
    )
    a("--data", default="fashion-mnist", help="dataset of every job (tests use 'fake')")
    a(
        "--results-dir",
        help="JSONL results, runs.jsonl, plot (default: the budget's, results/ or results/smoke/)",
    )
    a(
        "--runs-dir",
        help="pre-training run folders (default: the budget's; with --results-dir: RESULTS_DIR/runs)",
    )
    a("--table", action="store_true", help="print the markdown tables and exit (no training)")
    a(
        "--plot",
        action="store_true",
        help="write RESULTS_DIR/loss_curves.png and exit (no training)",
    )
    a("--dry-run", action="store_true", help="print each command, todo or done, and exit")
    a(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="N jobs side by side (a GPU: these tiny models leave it mostly idle)",
    )
    return p


@runtime.entry_point
def main(argv=None):
    c = get_parser().parse_args(argv)
    if c.runs_dir is None and c.results_dir:
        c.runs_dir = os.path.join(c.results_dir, "runs")
    if c.runs_dir is None:
        c.runs_dir = BUDGETS[c.budget]["runs_dir"]
    if c.results_dir is None:
        c.results_dir = BUDGETS[c.budget]["results_dir"]
    return run(c)


def run(c):
    """Check every file the run reads (one sentence for a damaged one, before any job); then the tables, the
    plots or the dry run if asked, else the jobs."""
    if c.jobs < 1:
        raise runtime.ConfigError(
            f"--jobs must be a positive number of parallel jobs, got {c.jobs}"
        )
    if os.path.exists(c.results_dir) and not os.path.isdir(c.results_dir):
        raise runtime.ConfigError(
            f"--results-dir {c.results_dir} is a file; name a folder for the results"
        )
    jobs = build_jobs(c)
    for path in dict.fromkeys(j["results"] for j in jobs if "results" in j):
        read_records(path)  # damage is named before any job runs
    read_records(os.path.join(c.results_dir, "runs.jsonl"), runs=True)
    if c.only == "interactions" and (c.table or c.plot):
        report_interactions(
            os.path.join(c.results_dir, RESULTS["interactions"]),
            os.path.join(c.results_dir, "interactions.png"),
        )
    elif c.only != "interactions":
        if c.table:
            print_tables(jobs, c)
        if c.plot:
            plot_losses(jobs, os.path.join(c.results_dir, "loss_curves.png"))
    if c.dry_run:
        for j in jobs:
            print(f"{'done' if is_done(j, jobs) else 'todo'}  {command(j)}")
    if c.table or c.plot or c.dry_run:
        return 0
    os.makedirs(c.results_dir, exist_ok=True)
    start = time.time()
    ran = run_all(jobs, c)
    seconds = [f"{p} {sum(r['seconds'] for r in ran if r['part'] == p):.0f} s" for p in PARTS]
    overlapping = ", overlapping" if c.jobs > 1 else ""
    print(
        f"\n{c.budget} budget: ran {len(ran)} of {len(jobs)} jobs in {time.time() - start:.0f} s "
        f"({', '.join(seconds)}{overlapping}); results in {c.results_dir}; tables: add --table to the command"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
