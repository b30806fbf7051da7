"""Is an A²MIM step as cheap as a supervised step of the same encoder?
    python bench.py      # ResNet-18 w16, 32 px, CPU, ~20 s; on a GPU: --arch resnet50 --img-size 224 --batch-size 128
Two training steps of one encoder, same batch and precision, train.py's optimiser (AdamW over runtime.param_groups,
fused on CUDA), CNNs in channels_last on CUDA: (a) supervised: encoder → global average pool → linear head,
cross-entropy; (b) A²MIM with its per-arch defaults, the mask drawn in the step on the device. A step = forward +
backward + optimizer.step + zero_grad, no host sync. The two alternate (a b b a a b …) so both see the same load;
each step is timed alone, the median reported. Targets: time ratio ≤ 1.10 at 224 px, ≤ 1.15 at 32 px; memory ≤ 1.15.
--busy N runs N busy-looping processes while the steps are timed: another job on the same cores.
"""

import argparse
import collections
import os
import statistics
import subprocess
import sys
import time

# Set before torch loads libgomp, which reads it once: an OpenMP thread waiting for another spins 3,000 times
# (~0.1 ms) before it sleeps, not libgomp's 300,000 (~6 ms, on a core the other thread may need). Beside another
# job on a 2-core CPU the long spin made a step 13x slower, the short one 2x; idle, it costs ~4% (README, CPU
# notes). How the user chose to wait, if they did, is kept.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
    os.environ["GOMP_SPINCOUNT"] = "3000"

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import data
import runtime
from a2mim import A2MIM, mask_patch_size_for
from models import ARCHS, SMALL_INPUT, ConfigError, arch_family, build_encoder

VARIANTS = ("supervised", "a2mim")
BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass"  # it ends if bench is killed
# The numbers' valid ranges, written as train.py's SETTINGS write theirs; checked before anything runs.
# fmt: off
RANGES = {"img_size": "[1,", "width": "[1,", "batch_size": "[1,", "warmup": "[0,", "repeats": "[1,", "threads": "[1,",
          "workers": "[0,", "busy": "[0,"}
# fmt: on


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--arch", choices=ARCHS, default="resnet18")
    a("--img-size", type=int, default=32)
    a(
        "--width",
        type=int,
        help="ResNet/ConvNeXt width (default: 16 up to 64 px, else the standard one)",
    )
    a("--batch-size", type=int, default=32, help="images per step")
    a(
        "--precision",
        choices=runtime.PRECISIONS,
        default="auto",
        help="auto = bf16 on GPU, fp32 on CPU",
    )
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--warmup", type=int, default=3, help="untimed steps of each kind first")
    a("--repeats", type=int, default=10, help="timed steps of each kind (the median is reported)")
    a("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    a(
        "--busy",
        type=int,
        default=0,
        help="busy-looping processes competing for the CPU while the steps are timed",
    )
    a(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu = this process's CPU time (steadier with --threads 1)",
    )
    a("--compile", action="store_true", help="torch.compile both models")
    a("--no-memory", action="store_true", help="skip the peak-memory measurement")
    a(
        "--profile",
        action="store_true",
        help="also show which operators the A²MIM step spends its extra time in",
    )
    a(
        "--loader",
        choices=data.DATASETS,
        help="also time this dataset's pre-training loaders (--repeats batches)",
    )
    a("--data-dir", help="where --loader finds its data (see data.py)")
    a("--download", action="store_true", help="let torchvision download the --loader dataset")
    a("--workers", type=int, help="DataLoader workers for --loader (default: data.build_loader's)")
    return p


def check_range(flag, value, spec):
    """ConfigError unless value is None (unset) or in spec, in train.py's notation: "[1," at least 1, "[0,1)"."""
    if value is None:
        return
    lo, hi = spec[1:].rstrip(")]").split(",")
    above = value >= float(lo) if spec[0] == "[" else value > float(lo)  # False for nan
    below = not hi or (value <= float(hi) if spec[-1] == "]" else value < float(hi))
    if not (above and below):
        want = (
            f"in {spec[0]}{lo}, {hi}{spec[-1]}"
            if hi
            else ("at least " if spec[0] == "[" else "greater than ") + lo
        )
        raise ConfigError(f"{flag} must be {want}, got {value}")


def resolve(args):
    """The flags plus device, precision, family, width (None = standard) and mask block, checked."""
    for name, spec in RANGES.items():  # first: nothing runs with a number out of its range
        check_range("--" + name.replace("_", "-"), getattr(args, name), spec)
    # train.py's default block (§2) for the encoder's token site; before any setting takes effect, as the
    # encoder's own sentence refuses an image size it does not take
    args.mask_patch_size = mask_patch_size_for(args.arch, args.img_size)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU")
    args.device = torch.device(
        "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    )
    if args.clock == "cpu" and args.device.type == "cuda":
        raise ConfigError(
            "--clock cpu counts host CPU time, which does not measure a GPU step; use --clock wall"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.precision, args.family = (
        runtime.resolve_precision(args.precision, args.device),
        arch_family(args.arch),
    )
    if args.width is None and args.img_size <= SMALL_INPUT:
        args.width = 16
    return args


def make_step(variant, c):
    """(step, model): one full training step of `variant`, and the model it trains."""
    torch.manual_seed(0)  # the same batch, labels (< 10) and encoder weights for both variants
    img, labels = (
        torch.randn(c.batch_size, 3, c.img_size, c.img_size),
        torch.randint(0, 10, (c.batch_size,)),
    )
    encoder = build_encoder(
        c.arch, c.img_size, **({} if c.family == "vit" else dict(width=c.width))
    )
    if variant == "a2mim":
        model = A2MIM(
            encoder, mask_patch_size=c.mask_patch_size
        )  # every other option: the per-arch default
    else:  # not eval_linear's Classifier (bench imports no training script); its LayerNorm for ViTs is negligible
        head = nn.Linear(
            encoder.out_channels, 10 if c.img_size <= SMALL_INPUT else 1000
        )  # CIFAR-10-like, or ImageNet
        model = nn.Sequential(encoder, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    model = runtime.channels_last(model.to(c.device), c.family, c.device)
    optimizer = torch.optim.AdamW(
        runtime.param_groups(model, weight_decay=0.05), lr=1e-4, fused=c.device.type == "cuda"
    )
    forward = torch.compile(model) if c.compile else model
    scaler = torch.amp.GradScaler(c.device.type, enabled=c.precision == "fp16")
    masks = torch.Generator(device=c.device).manual_seed(0)  # it advances: a fresh mask every step
    img, labels = runtime.channels_last(img.to(c.device), c.family, c.device), labels.to(c.device)

    def step():
        with runtime.autocast(c.device, c.precision):
            out = forward(img, generator=masks) if variant == "a2mim" else forward(img)
        scaler.scale(
            out["loss"] if variant == "a2mim" else nn.functional.cross_entropy(out.float(), labels)
        ).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def time_steps(steps, device, warmup, repeats, clock=time.perf_counter):
    """{name: step fn} → {name: [seconds of each timed step]}; the order alternates every round."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in steps}
    for r in range(warmup + repeats):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            sync()
            t0 = clock()
            steps[name]()
            sync()
            times[name] += [clock() - t0] if r >= warmup else []
    return times


def time_steps_beside_busy_processes(n, *args, **kwargs):
    """time_steps while n processes spin on the CPU: another job on the same cores, started from another terminal
    (its own session: Linux's autogroups then share the CPU between the two sessions, not between threads)."""
    hogs = []
    try:
        for _ in range(n):
            hogs.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP], start_new_session=True))
        return time_steps(*args, **kwargs)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def peak_memory(step, model, device):
    """Bytes: weights and buffers + the peak of tensor bytes allocated in the model's first two steps
    (the first creates the AdamW state) above the level before them. CUDA: max_memory_allocated; CPU:
    the running sum of PyTorch's CPU-allocator events that torch.profiler(profile_memory=True) records."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # host-side allocator counters: no sync needed
        base = torch.cuda.memory_allocated(device)
        time_steps({"two steps": step}, device, 0, 2)
        return weights + torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        time_steps({"two steps": step}, device, 0, 2)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    return (
        weights + torch.tensor([0] + [e.nbytes() for e in events]).cumsum(0).max().item()
    )  # +alloc −free, in order


def time_loaders(c):
    """'loader …: N img/s' of the DataLoader (and data.device_loader): batches moved to the device."""
    kw = dict(img_size=c.img_size, family=c.family, data_dir=c.data_dir)
    ds = data.build_dataset(c.loader, "train", download=c.download, **kw)
    workers = "default" if c.workers is None else c.workers
    loaders = {
        f"DataLoader, {workers} workers": data.build_loader(ds, c.batch_size, workers=c.workers)
    }
    if c.loader in data.IN_MEMORY:
        loaders[f"device_loader on {c.device.type}"] = data.device_loader(
            c.loader, "train", c.batch_size, c.device, **kw
        )
    k = min(c.repeats, *(len(loader) - 1 for loader in loaders.values()))
    batches = {
        what: (lambda it=iter(loader): next(it)[0].to(c.device, non_blocking=True))
        for what, loader in loaders.items()
    }
    return [
        f"loader {c.loader} ({what}): {k * c.batch_size / sum(t) if k > 0 else float('nan'):.0f} img/s over {k} batches"
        for what, t in time_steps(batches, c.device, 1, k).items()
    ]


def profile_steps(steps, device, n):
    """Lines: torch.profiler's self time per operator and step of each variant, largest A²MIM excess first."""
    cuda, ms = device.type == "cuda", {}
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            time_steps({name: step}, device, 0, n)
        ms[name] = collections.Counter(
            {
                e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / n
                for e in prof.key_averages()
            }
        )  # µs → ms per step
    sup, ours = ms["supervised"], ms["a2mim"]
    ops = [op for op, _ in (ours - sup).most_common(15)] + ["all operators"]
    sup["all operators"], ours["all operators"] = sum(sup.values()), sum(ours.values())
    return [
        f"profile: self {'device' if cuda else 'CPU'} time per step (mean of {n}), largest A²MIM excess first",
        f"{'operator':58}{'supervised':>12}{'a2mim':>10}{'excess':>10}",
    ] + [
        f"{op[:57]:58}{sup[op]:10.2f}ms{ours[op]:8.2f}ms{ours[op] - sup[op]:+8.2f}ms" for op in ops
    ]


def report(c, times, memory):
    B, med = c.batch_size, {k: statistics.median(v) for k, v in times.items()}
    print(f"{'':12}{'median ms':>11}{'min ms':>9}{'img/s':>9}{'peak memory':>14}")
    for k in VARIANTS:
        peak = "n/a" if memory[k] is None else f"{memory[k] / 2**20:.1f} MiB"
        print(f"{k:12}{med[k] * 1e3:11.1f}{min(times[k]) * 1e3:9.1f}{B / med[k]:9.1f}{peak:>14}")
    ratio, best = med["a2mim"] / med["supervised"], min(times["a2mim"]) / min(times["supervised"])
    mem = "n/a" if memory["a2mim"] is None else f"{memory['a2mim'] / memory['supervised']:.3f}"
    how = (
        "torch.cuda.max_memory_allocated"
        if c.device.type == "cuda"
        else "torch.profiler's CPU allocator events"
    )
    print(
        f"ratio a2mim / supervised: step time {ratio:.3f} (target ≤ {1.10 if c.img_size > SMALL_INPUT else 1.15:.2f}; "
        f"{best:.3f} for the fastest steps), peak memory {mem}"
        + f" (target ≤ 1.15; {how})"
        * (mem != "n/a")
    )
    row = [
        c.arch + f" w{c.width}" * bool(c.width and c.family == "cnn"),
        c.img_size,
        B,
        c.precision,
        c.device.type,
        f"{B / med['supervised']:.1f}",
        f"{B / med['a2mim']:.1f}",
        f"{ratio:.3f}",
        mem,
    ]
    print(
        "markdown:\n| arch | px | batch | precision | device | sup img/s | A²MIM img/s | time ratio | memory ratio |\n"
        f"|---|---|---|---|---|---|---|---|---|\n| {' | '.join(map(str, row))} |"
    )


def main(argv=None):
    try:
        c = resolve(get_parser().parse_args(argv))
        cpu, gpu = (
            runtime.cpu_name(),
            torch.cuda.get_device_name(c.device) if c.device.type == "cuda" else "no GPU used",
        )
        width = f", width {c.width or 'standard'}" if c.family == "cnn" else ""
        waiting = " ".join(
            f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ
        )
        busy = f"; busy-looping processes beside the timed steps: {c.busy}" if c.busy else ""
        print(
            f"bench: {c.arch}{width} at {c.img_size} px, batch {c.batch_size}, {c.precision} on {c.device.type}"
            f"{', torch.compile' * c.compile}; {c.warmup} warm-up + {c.repeats} timed steps of each, interleaved, "
            f"{c.clock} clock; mask {c.mask_patch_size}-px blocks\nmachine: {cpu} ({os.cpu_count()} cores), {gpu}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
            f"OpenMP wait {waiting or 'default'}{busy}"
        )
        loaded = (
            time_loaders(c) if c.loader else []
        )  # first: a missing dataset fails before any timing
        steps, memory = {}, {}
        for (
            v
        ) in VARIANTS:  # one after the other: each one's memory counts from before its first step
            steps[v], model = make_step(v, c)
            memory[v] = None if c.no_memory else peak_memory(steps[v], model, c.device)
        clock = time.process_time if c.clock == "cpu" else time.perf_counter
        times = time_steps_beside_busy_processes(
            c.busy, steps, c.device, c.warmup, c.repeats, clock
        )
        report(c, times, memory)
        for line in (profile_steps(steps, c.device, c.repeats) if c.profile else []) + loaded:
            print(line)
    except runtime.user_errors() as e:
        print(f"error: {runtime.one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
