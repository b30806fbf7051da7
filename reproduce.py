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
    "smoke": dict(pretrain={"resnet18": SMOKE, "vit_tiny": SMOKE}, pretrain_seeds={"resnet18": [0, 1]}, ablation_pretrain=SMOKE,
                  probe=[*SMOKE_EVAL, "--labels-per-class", "10"], finetune=SMOKE_EVAL, ablation_finetune=SMOKE_EVAL, seeds=[1],
                  labels_per_class=10, sweep=dict(pretrain=SMOKE, epochs=1, batch_sizes=[50], blrs=[1e-3, 4e-3], seeds=[1]),
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
RESULTS = dict(main="fashion_mnist.jsonl", ablations="ablations.jsonl", sweep="ft_sweep.jsonl", interactions="interactions.jsonl")
# fmt: on
PARTS = ("pre-training", "probe", "fine-tune")
INTERACTION_FLAGS = ("--interactions", "--interaction-pairs", "--interaction-contexts")


class StepFailed(runtime.RunError):
    """A job's command exited non-zero: one sentence, exit 2."""


def _flag(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def pretrain(name, arch, args, budget_args, c, seed=0):
    """A train.py job; pre-training seed 0 keeps the plain name (the first runs had no seed flag)."""
    blr = _flag(budget_args, "--blr")
    name += (f"_blr{blr}" if blr else "") + (f"_seed{seed}" if seed else "")
    return dict(
        name=name,
        script="train.py",
        part="pre-training",
        checkpoint=os.path.join(c.runs_dir, name, "checkpoint.pt"),
        args=[
            "--arch",
            arch,
            *args,
            "--data",
            c.data,
            *budget_args,
            *(["--seed", str(seed)] if seed else []),
            "--out-dir",
            c.runs_dir,
            "--run-name",
            name,
        ],
    )


def evaluate(name, source, extras, results, c, **row):
    """eval_linear.py jobs of encoder `source` (flags), one per (flags, seed) of `extras`, in table `row`."""
    return [
        dict(
            name=name,
            script="eval_linear.py",
            part="fine-tune" if "--finetune" in x else "probe",
            results=results,
            args=[
                *source,
                "--data",
                c.data,
                *x,
                "--seed",
                str(s),
                *(["--subset-seed", str(s)] if "--finetune" in x else []),
                "--results",
                results,
            ],
            **row,
        )
        for x, s in extras
    ]


def build_jobs(c):
    b, out, jobs = (
        BUDGETS[c.budget],
        {k: os.path.join(c.results_dir, v) for k, v in RESULTS.items()},
        [],
    )
    evals = lambda finetune: (
        [(b["probe"], 1)]
        + [  # noqa: E731 (a probe, and a fine-tune per seed)
            (["--finetune", "--labels-per-class", str(b["labels_per_class"]), *finetune], s)
            for s in b["seeds"]
        ]
    )
    # Rows of pre-trained encoders: (name, arch, label, train.py args, budget's args, pre-training seeds, fine-tuning, results)
    rows = [
        (
            e["name"],
            e["arch"],
            _flag(e["args"], "--method")
            + (f", blr {_flag(pre, '--blr')}" if "--blr" in pre else ""),
            e["args"],
            pre,
            b["pretrain_seeds"].get(e["arch"], [0]),
            b["finetune"],
            out["main"],
        )
        for e in EXPERIMENTS
        if e["arch"] in c.archs and c.only in ("main", "all")
        for pre in [b["pretrain"][e["arch"]]]
    ]
    rows += [
        (
            f"ablation_{a['name']}",
            "resnet18",
            a["change"],
            ["--method", "a2mim", "--width", "16", *a["args"]],
            b["ablation_pretrain"],
            [0],
            b["ablation_finetune"],
            out["ablations"],
        )
        for a in ABLATIONS
        if "resnet18" in c.archs and c.only in ("ablations", "all")
    ]
    for a in (
        a for a in RANDOM_INIT if a in c.archs and c.only in ("main", "all")
    ):  # first: every row's reference
        row = dict(row=f"random_{a}", arch=a, label="random init")
        jobs += evaluate(f"random_{a}", RANDOM_INIT[a], evals(b["finetune"]), out["main"], c, **row)
    for k in range(
        max((len(r[5]) for r in rows), default=0)
    ):  # seed by seed: every row gets its first seed first
        for name, arch, label, args, budget_args, seeds, finetune, results in (
            r for r in rows if k < len(r[5])
        ):
            row = dict(
                row=pretrain(name, arch, args, budget_args, c)["name"], arch=arch, label=label
            )
            pre = pretrain(
                name, arch, args, budget_args, c, seeds[k]
            )  # a row: every pre-training seed's evaluations
            jobs += [
                pre,
                *evaluate(
                    pre["name"],
                    ["--checkpoint", pre["checkpoint"]],
                    evals(finetune),
                    results,
                    c,
                    **row,
                ),
            ]
    if (
        c.only == "interactions" and "resnet18" in c.archs
    ):  # §9: the ResNet fine-tuned from A²MIM, SimMIM, or scratch
        ij = b["interactions"]
        x = [
            "--finetune",
            "--labels-per-class",
            str(b["labels_per_class"]),
            *b["finetune"],
            "--interactions",
            str(ij["per_class"]),
            "--interaction-pairs",
            str(ij["pairs"]),
            "--interaction-contexts",
            str(ij["contexts"]),
        ]
        for e in EXPERIMENTS[
            :2
        ]:  # the ResNet rows' seed-0 pre-training (the main table's), then the measured fine-tune
            p = pretrain(e["name"], "resnet18", e["args"], b["pretrain"]["resnet18"], c)
            jobs += [
                p,
                *evaluate(
                    p["name"],
                    ["--checkpoint", p["checkpoint"]],
                    [(x, 1)],
                    out["interactions"],
                    c,
                    row=p["name"],
                    arch="resnet18",
                    label=_flag(e["args"], "--method"),
                ),
            ]
        jobs += evaluate(
            "random_resnet18",
            RANDOM_INIT["resnet18"],
            [(x, 1)],
            out["interactions"],
            c,
            row="random_resnet18",
            arch="resnet18",
            label="from scratch",
        )
    if (
        c.only == "sweep"
    ):  # every (batch, blr) of the grid for random init and short pre-trainings of the ResNet
        sw = b["sweep"]
        pres = [
            pretrain(
                f"sweep_{m}_resnet18",
                "resnet18",
                ["--method", m, "--width", "16"],
                sw["pretrain"],
                c,
            )
            for m in ("a2mim", "simmim")
            if "resnet18" in c.archs
        ]
        sources = [(p["name"], ["--checkpoint", p["checkpoint"]]) for p in pres] + [
            (f"sweep_random_{a}", RANDOM_INIT[a]) for a in RANDOM_INIT if a in c.archs
        ]
        grid = [
            (
                [
                    "--finetune",
                    "--labels-per-class",
                    str(b["labels_per_class"]),
                    "--epochs",
                    str(sw["epochs"]),
                    "--batch-size",
                    str(bs),
                    "--blr",
                    f"{blr:g}",
                ],
                s,
            )
            for s in sw["seeds"]
            for bs in sw["batch_sizes"]
            for blr in sw["blrs"]
        ]
        jobs += pres + [
            j
            for x in grid
            for name, source in sources
            for j in evaluate(name, source, [x], out["sweep"], c)
        ]
    return jobs


def command(job):
    return f"python3 {job['script']} {shlex.join(job['args'])}"


RESULT_FIELDS = (
    "mode",
    "checkpoint",
    "init",
    "arch",
    "labels_per_class",
    "top1",
    "config",
)  # what the tables read
CONFIG_FIELDS = ("seed", "epochs", "batch_size", "blr")  # of a result's config: its result_key
RUN_FIELDS = ("name", "part", "command", "seconds", "machine")  # of a runs.jsonl line


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


def result_key(
    r,
):  # one evaluation: encoder (checkpoint or 'random <arch>'), mode, labels, seed, (epochs, batch, blr)
    c = r["config"]
    return (
        r["checkpoint"] or f"random {r['arch']}",
        r["mode"],
        r["labels_per_class"],
        c["seed"],
        (c["epochs"], c["batch_size"], c["blr"]),
        (c.get("interactions") or None)
        and (c["interactions"], c["interaction_pairs"], c["interaction_contexts"]),
    )


def job_key(job):  # the result_key that an eval job's line will have, from its flags
    a, labels = job["args"], _flag(job["args"], "--labels-per-class")
    return (
        _flag(a, "--checkpoint") or f"random {_flag(a, '--arch')}",
        "finetune" if job["part"] == "fine-tune" else "probe",
        labels and int(labels),
        int(_flag(a, "--seed")),
        (int(_flag(a, "--epochs")), int(_flag(a, "--batch-size")), float(_flag(a, "--blr"))),
        _flag(a, "--interactions") and tuple(int(_flag(a, f)) for f in INTERACTION_FLAGS),
    )


def is_done(job, jobs):
    """An evaluation: its result is in the JSONL. A pre-training: no evaluation of `jobs` still needs its checkpoint
    (a fresh clone holds the results, not the checkpoints), or the checkpoint has every epoch / --max-steps step."""
    if job["script"] == "eval_linear.py":
        return job_key(job) in {result_key(r) for r in read_records(job["results"])}
    if not any(
        _flag(j["args"], "--checkpoint") == job["checkpoint"] and not is_done(j, jobs) for j in jobs
    ):
        return True
    state = os.path.exists(job["checkpoint"]) and runtime.load_checkpoint(
        job["checkpoint"]
    )  # weights_only=True
    return bool(state) and (
        state["epoch"] >= int(_flag(job["args"], "--epochs"))
        or state["step"] >= int(_flag(job["args"], "--max-steps") or 1e18)
    )


def run_all(jobs, c):
    """Run the jobs not done yet in chains (a pre-training, then its checkpoint's evaluations; any other job alone), in
    order, --jobs N chains side by side (each job's output then in RUNS_DIR/logs/). A stopped run keeps whole chains:
    checkpoints are not committed, results are. Appends each job to runs.jsonl; returns those records."""
    ran, failed, cwd = [], threading.Event(), os.path.dirname(os.path.abspath(__file__))
    cpu, gpu = (
        runtime.cpu_name(),
        "",
    )  # the machine: '<CPU model>, N cores; GPU <the first one nvidia-smi sees>'
    with contextlib.suppress(
        OSError, subprocess.SubprocessError
    ):  # no NVIDIA driver: a CPU machine
        gpu = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            .stdout.split("\n")[0]
            .strip()
        )
    where = f"{cpu}, {os.cpu_count()} cores" + (f"; GPU {gpu}" if gpu else "")

    def one(i, job):
        shown = command(job)
        if is_done(job, jobs):
            print(f"skip (done): {shown}\n", end="", flush=True)
            return
        log = (
            os.path.join(c.runs_dir, "logs", f"{i:03d}_{job['name']}_{job['part']}.log")
            if c.jobs > 1
            else None
        )
        print(
            f"\n>>> {shown}" + (f"   (output: {log})" if log else "") + "\n", end="", flush=True
        )  # one write a line
        os.makedirs(os.path.dirname(log) if log else ".", exist_ok=True)
        start = time.time()
        with open(log, "a") if log else contextlib.nullcontext() as out:
            rc = subprocess.run(
                [sys.executable, job["script"], *job["args"]],
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT if log else None,
            ).returncode
        if rc != 0:
            raise StepFailed(
                f"`{shown}` exited with status {rc} ({f'see {log}' if log else 'its output is above'}); "
                "fix it and rerun, finished jobs are kept"
            )
        ran.append(
            dict(
                name=job["name"],
                part=job["part"],
                command=shown,
                seconds=round(time.time() - start, 1),
                budget=c.budget,
                machine=where,
                finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            )
        )
        runtime.append_line(
            os.path.join(c.results_dir, "runs.jsonl"), json.dumps(ran[-1])
        )  # flock: threads wait
        if log:
            print(f"done in {ran[-1]['seconds']:.0f} s: {shown}\n", end="", flush=True)

    if c.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # N processes share the CPU cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // c.jobs))

    def chain(jobs_of_chain):
        for i, job in jobs_of_chain:
            if failed.is_set():  # another chain failed: start no new job (the running ones finish)
                return
            try:
                one(i, job)
            except BaseException:
                failed.set()
                raise

    chains = {}
    for i, j in enumerate(jobs):
        chains.setdefault(
            j.get("checkpoint")
            if j["part"] == "pre-training"
            else _flag(j["args"], "--checkpoint") or i,
            [],
        ).append((i, j))
    with ThreadPoolExecutor(max_workers=c.jobs) as pool:
        for future in [pool.submit(chain, ch) for ch in chains.values()]:
            future.result()  # the first failure is re-raised here (running jobs finish first)
    return ran


def mean_std(values, fmt=".2f", unit="run"):  # 'm ± s (n runs)'; unit=None: no count
    n = f" ({len(values)} {unit}{'s' * (len(values) > 1)})" if unit else ""
    if len(values) < 2:
        return f"{values[0]:{fmt}}{n}" if values else "—"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):.{fmt[-2]}f}{n}"


def print_tables(jobs, c):
    b = BUDGETS[c.budget]
    results = {
        result_key(r): r
        for n in ("main", "ablations")
        for r in read_records(os.path.join(c.results_dir, RESULTS[n]))
    }
    done = [(j, results[job_key(j)]["top1"]) for j in jobs if "row" in j and job_key(j) in results]
    by_command = {command(j): t for j, t in done}

    def top1(row, part, seed=None):  # every pre-training seed's, in job order
        return [
            t
            for j, t in done
            if j["row"] == row and j["part"] == part and seed in (None, _flag(j["args"], "--seed"))
        ]

    rows = {
        j["row"]: j for j in jobs if "row" in j
    }  # the first job of each row: its arch and label
    for title, ablation in (
        (
            f"Fashion-MNIST, budget {c.budget}: mean ± std over pre-training × fine-tuning seeds",
            False,
        ),
        (f"Ablations (ResNet-18/16, A²MIM), budget {c.budget}", True),
    ):
        mine = {row: j for row, j in rows.items() if row.startswith("ablation_") == ablation}
        if mine:
            recipe = next(
                job_key(j)[4] for j in jobs if j["part"] == "fine-tune" and j["row"] in mine
            )
            print(
                f"\n## {title}\n\n| arch | {'change' if ablation else 'pre-training'} | linear probe top-1 | "
                f"{10 * b['labels_per_class']}-label fine-tune top-1 (epochs {recipe[0]}, batch {recipe[1]}, blr {recipe[2]:g}) |"
                "\n|---|---|---|---|"
            )
        for row, j in mine.items():
            print(
                f"| {j['arch']} | {j['label']} | {mean_std(top1(row, 'probe'))} | {mean_std(top1(row, 'fine-tune'))} |"
            )
        if (
            mine and not ablation
        ):  # pre-trained minus random init on the same fine-tuning seed (same labelled subset)
            print(
                "\n| arch | pre-training | fine-tune minus random init, paired by fine-tuning seed | A²MIM minus SimMIM, "
                "same seeds |\n|---|---|---|---|"
            )
        for row, j in (
            (row, j) for row, j in mine.items() if not ablation and not row.startswith("random_")
        ):
            diffs = [
                t - base
                for s in map(str, b["seeds"])
                for base in top1(f"random_{j['arch']}", "fine-tune", s)[:1]
                for t in top1(row, "fine-tune", s)
            ]
            vs = [
                t - by_command[twin]
                for k, t in done
                if k["row"] == row and k["part"] == "fine-tune" and row.startswith("a2mim_")
                for twin in [command(k).replace("a2mim_", "simmim_")]
                if twin in by_command
            ]
            print(
                f"| {j['arch']} | {j['label']} | {mean_std(diffs, '+.2f', 'pair')} | {mean_std(vs, '+.2f', 'pair')} |"
            )
    if c.only in ("sweep", "all"):
        print_sweep(
            read_records(os.path.join(c.results_dir, RESULTS["sweep"])),
            b["sweep"],
            b["labels_per_class"],
        )
    mine = set(map(command, jobs))
    print_wall_clock(
        [
            r
            for r in read_records(os.path.join(c.results_dir, "runs.jsonl"), runs=True)
            if r["command"] in mine
        ]
    )


def print_sweep(
    records, sw, labels_per_class
):  # fine-tune top-1 over the (batch, blr) grid, a column per encoder
    cells = {}
    for r in records:
        who = (
            f"random init {r['arch']}"
            if r["init"] == "random"
            else f"{r['config']['pretrain_method']} {r['arch']}"
        )
        cells.setdefault(who, {}).setdefault(
            (r["config"]["batch_size"], r["config"]["blr"]), []
        ).append(r["top1"])
    order = sorted(
        cells, key=lambda who: (who.split()[-1], not who.startswith("random"), who)
    )  # by arch, baseline first
    print(
        f"\n## Fine-tuning recipe sweep ({10 * labels_per_class} labels, {sw['epochs']} epochs; top-1, mean ± std over "
        f"seeds {', '.join(map(str, sw['seeds']))})\n\n| batch | blr | {' | '.join(order)} |\n|---|---|{'---|' * len(order)}"
    )
    for bs, blr in ((bs, blr) for bs in sw["batch_sizes"] for blr in sw["blrs"]):
        print(
            f"| {bs} | {blr:g} | "
            + " | ".join(mean_std(cells[w].get((bs, blr), []), ".1f", None) for w in order)
            + " |"
        )


def print_wall_clock(runs):  # per machine: each command's seconds, then each part's and the total
    for where in dict.fromkeys(r["machine"] for r in runs):  # one table per machine, in order
        mine = [r for r in runs if r["machine"] == where]
        print(f"\n## Commands and wall-clock ({where})\n\n| seconds | command |\n|---|---|")
        print("\n".join(f"| {r['seconds']:.0f} | `{r['command']}` |" for r in mine))
        print(
            "\n".join(
                f"| {sum(r['seconds'] for r in mine if r['part'] == p):.0f} | {p}: "
                f"{sum(r['part'] == p for r in mine)} jobs |"
                for p in PARTS
                if any(r["part"] == p for r in mine)
            )
        )
        print(
            f"| {sum(r['seconds'] for r in mine):.0f} | total (jobs that ran side by side overlap) |"
        )


def bootstrap(per_image, n=2000, seed=0):
    """J^(m) [M] from I^(m) per image [B, M], and J of n resamples of the images (with replacement) [n, M]."""
    I_bm = torch.tensor(per_image)
    boot_nm = I_bm[
        torch.randint(len(I_bm), (n, len(I_bm)), generator=torch.Generator().manual_seed(seed))
    ].mean(1)
    return I_bm.mean(0) / I_bm.mean(), boot_nm / boot_nm.mean(1, keepdim=True)


def report_interactions(path, png):
    """§9 table (J per order, 95 % bootstrap interval over images) and plot; the middle orders (0.3 ≤ r ≤ 0.7)
    of each pre-trained model minus the model from scratch, resampling the same images for both."""
    records = {
        r["checkpoint"] and r["config"]["pretrain_method"] or "from scratch": r
        for r in read_records(path)
    }
    if not records:
        return print(f"no interaction results in {path} yet")
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="tight")
    orders = next(iter(records.values()))["interactions"]["orders"]
    middle = torch.tensor([0.3 <= o <= 0.7 for o in orders])
    print(
        f"\n## Multi-order interactions J^(m) (§9)\n\n| model (fine-tune top-1) | s (J^(m) part) | images | "
        f"{' | '.join(f'{o:g}' for o in orders)} | middle orders |\n|---|---|---|{'---|' * (len(orders) + 1)}"
    )
    boots = {}
    for who, r in records.items():
        j = r["interactions"]
        J, boots[who] = bootstrap(j["I_abs_per_image"])
        lo, hi = boots[who].quantile(0.025, 0), boots[who].quantile(0.975, 0)
        ax.errorbar(
            orders,
            J,
            yerr=[J - lo, hi - J],
            marker="o",
            ms=3,
            capsize=2,
            label=f"{who} ({r['top1']:.1f} %)",
        )
        mid = boots[who][:, middle].mean(1)
        print(
            f"| {who} ({r['top1']:.1f} %) | {r['wall_time_s']:.0f} ({j['seconds']:.0f}) | {len(j['images'])} | "
            + " | ".join(f"{v:.2f}" for v in J.tolist())
            + f" | {J[middle].mean():.2f} [{mid.quantile(0.025):.2f}, {mid.quantile(0.975):.2f}] |"
        )
    for who in (w for w in boots if w != "from scratch" and "from scratch" in boots):
        d = (boots[who] - boots["from scratch"])[:, middle].mean(
            1
        )  # same seed: the same images, resampled alike
        print(
            f"\n{who} minus from scratch, middle-order J: {d.mean():+.3f}, 95 % interval [{d.quantile(0.025):+.3f}, "
            f"{d.quantile(0.975):+.3f}] ({(d > 0).float().mean():.0%} of resamples above 0)"
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


def plot_losses(
    jobs, path
):  # one panel per pre-training run: the loss and its spatial / Fourier parts
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    # A run stopped by a kill may have torn its last log line: dropped, with a note; any other damage is named.
    logs = [
        (j["name"], os.path.join(os.path.dirname(j["checkpoint"]), "log.jsonl"))
        for j in jobs
        if j["part"] == "pre-training"
    ]
    runs = [(name, runtime.read_jsonl(log, drop_torn_last=True)) for name, log in logs]
    runs = [(name, log) for name, log in runs if log]
    if not runs:
        return print("no pre-training logs yet: nothing to plot")
    cols, rows = min(4, len(runs)), -(-len(runs) // 4)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, layout="tight"
    )
    for ax, (name, log) in zip(axes.flat, runs):
        for key in (k for k in ("loss", "loss_spatial", "loss_freq") if all(k in r for r in log)):
            ax.plot(
                [r["step"] for r in log],
                [r[key] for r in log],
                label=key,
                lw=1,
                marker="o" if len(log) < 20 else None,
                ms=2,
            )
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


def main(argv=None):
    c = get_parser().parse_args(argv)
    c.runs_dir = c.runs_dir or (
        os.path.join(c.results_dir, "runs") if c.results_dir else BUDGETS[c.budget]["runs_dir"]
    )
    c.results_dir = c.results_dir or BUDGETS[c.budget]["results_dir"]
    try:
        return run(c)
    except runtime.user_errors() as e:  # a failed job, a damaged results file, a full disk
        print(f"error: {runtime.one_line(e)}", file=sys.stderr)
        return 2


def run(c):
    if c.jobs < 1:
        raise runtime.RunError(f"--jobs must be a positive number of parallel jobs, got {c.jobs}")
    if os.path.exists(c.results_dir) and not os.path.isdir(c.results_dir):
        raise runtime.RunError(
            f"--results-dir {c.results_dir} is a file; name a folder for the results"
        )
    jobs = build_jobs(c)
    for path in dict.fromkeys(
        j["results"] for j in jobs if "results" in j
    ):  # damage is named before any job runs
        read_records(path)
    read_records(os.path.join(c.results_dir, "runs.jsonl"), runs=True)
    if c.table and c.only != "interactions":
        print_tables(jobs, c)
    if c.plot and c.only != "interactions":
        plot_losses(jobs, os.path.join(c.results_dir, "loss_curves.png"))
    if c.only == "interactions" and (c.table or c.plot):
        report_interactions(
            os.path.join(c.results_dir, RESULTS["interactions"]),
            os.path.join(c.results_dir, "interactions.png"),
        )
    for j in jobs if c.dry_run else []:
        print(f"{'done' if is_done(j, jobs) else 'todo'}  {command(j)}")
    if c.table or c.plot or c.dry_run:
        return 0
    os.makedirs(c.results_dir, exist_ok=True)
    start = time.time()
    ran = run_all(jobs, c)
    parts = ", ".join(
        f"{p} {sum(r['seconds'] for r in ran if r['part'] == p):.0f} s" for p in PARTS
    )
    print(
        f"\n{c.budget} budget: ran {len(ran)} of {len(jobs)} jobs in {time.time() - start:.0f} s ({parts}"
        f"{', overlapping' * (c.jobs > 1)}); results in {c.results_dir}; tables: add --table to the command"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
