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
from models import ARCHS, SMALL_INPUT, arch_family, arch_kind, build_encoder
from runtime import AT_LEAST_0, AT_LEAST_1, ConfigError, Setting

VARIANTS = ("supervised", "a2mim")
BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass"  # it ends if bench is killed

# fmt: off
# bench's settings, in train.py's words where the two share one. Each number is checked against its range
# before anything runs.
SETTINGS = (
    Setting(name="arch", default="resnet18", help="encoder", choices=ARCHS),
    Setting(name="img_size", default=32, help="input resolution", range=AT_LEAST_1),
    Setting(name="width", help="ResNet base width / ConvNeXt first-stage width", range=AT_LEAST_1, type=int,
            unset="16 up to 64 px, else the standard one"),
    Setting(name="batch_size", default=32, help="images per step", range=AT_LEAST_1),
    Setting(name="precision", default="auto", help="auto = bf16 on GPU, fp32 on CPU", choices=runtime.PRECISIONS),
    Setting(name="device", default="auto", help="auto = a CUDA GPU if torch sees one", choices=("auto", "cpu", "cuda")),
    Setting(name="warmup", default=3, help="untimed steps of each kind first", range=AT_LEAST_0),
    Setting(name="repeats", default=10, help="timed steps of each kind (the median is reported)",
            range=AT_LEAST_1),
    Setting(name="threads", help="torch CPU threads", range=AT_LEAST_1, type=int,
            unset="torch's own choice"),
    Setting(name="busy", default=0, help="busy-looping processes competing for the CPU while the steps are timed",
            range=AT_LEAST_0),
    Setting(name="clock", default="wall", help="cpu = this process's CPU time (steadier with --threads 1)",
            choices=("wall", "cpu")),
    Setting(name="compile", default=False, help="torch.compile both models"),
    Setting(name="memory", default=True, help="measure each step's peak memory (--no-memory: skip it)"),
    Setting(name="profile", default=False, help="also show which operators the A²MIM step spends its extra time in"),
    Setting(name="loader", help="also time this dataset's pre-training loaders (--repeats batches)",
            choices=data.DATASETS,
            unset="none"),
    Setting(name="data_dir", help="where --loader finds its data (see data.py)", type=str,
            unset="data.py's"),
    Setting(name="download", default=False, help="let torchvision download the --loader dataset"),
    Setting(name="workers", help="DataLoader workers for --loader", range=AT_LEAST_0, type=int,
            unset="data.build_loader's"),
)
# fmt: on


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    runtime.add_settings(p, SETTINGS)
    p.add_argument(
        "--print-config", action="store_true", help="print each resolved setting and exit"
    )
    return p


def resolve_config(args):
    """(cfg, origin): the defaults < the command line, checked, and what they decide: the device, the
    precision, the width (None = standard) and the mask block. Every value plain (JSON), for --print-config."""
    cfg = {s.name: s.default for s in SETTINGS}
    origin = dict.fromkeys(cfg, "default")
    given = runtime.command_line(args, SETTINGS)
    cfg |= given
    origin |= dict.fromkeys(given, "command line")
    runtime.check_settings(SETTINGS, cfg)  # first: nothing runs with a number out of its range

    # train.py's default block (§2) for the encoder's token site; before any setting takes effect, as the
    # encoder's own sentence refuses an image size it does not take.
    cfg["mask_patch_size"] = mask_patch_size_for(cfg["arch"], cfg["img_size"])
    origin["mask_patch_size"] = "train.py's default block (§2)"
    cuda = torch.cuda.is_available()
    if cfg["device"] == "cuda" and not cuda:
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU")
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if cuda else "cpu"
        origin["device"] += " (auto)"
    if cfg["clock"] == "cpu" and cfg["device"] == "cuda":
        raise ConfigError(
            "--clock cpu counts host CPU time, which does not measure a GPU step; use --clock wall"
        )
    if cfg["precision"] == "auto":
        cfg["precision"] = runtime.resolve_precision("auto", torch.device(cfg["device"]))
        origin["precision"] += " (auto)"
    if cfg["width"] is None and cfg["img_size"] <= SMALL_INPUT:
        cfg["width"] = 16
        origin["width"] += f" (up to {SMALL_INPUT} px)"
    return cfg, origin


def resolve(args):
    """The resolved settings as attributes (c.batch_size, ...), with the device a torch.device and the
    encoder's family."""
    cfg, _ = resolve_config(args)
    cfg |= dict(device=torch.device(cfg["device"]), family=arch_family(cfg["arch"]))
    return argparse.Namespace(**cfg)


def make_step(variant, c):
    """(step, model): one full training step of `variant`, and the model it trains."""
    torch.manual_seed(0)  # the same batch, labels (< 10) and encoder weights for both variants
    img = torch.randn(c.batch_size, 3, c.img_size, c.img_size)
    labels = torch.randint(0, 10, (c.batch_size,))
    width = {} if c.family == "vit" else dict(width=c.width)
    encoder = build_encoder(c.arch, c.img_size, **width)
    if variant == "a2mim":
        # every other option: the per-arch default
        model = A2MIM(encoder, mask_patch_size=c.mask_patch_size)
    else:
        # Not eval_linear's Classifier (bench imports no training script); its LayerNorm for ViTs is
        # negligible. 10 classes (CIFAR-10-like) at small inputs, else ImageNet's 1000.
        classes = 10 if c.img_size <= SMALL_INPUT else 1000
        head = nn.Linear(encoder.out_channels, classes)
        model = nn.Sequential(encoder, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    model = runtime.channels_last(model.to(c.device), c.family, c.device)
    # train.py's weight-decay rule for this arch (the supervised head's weights are decayed too)
    groups = runtime.param_groups(model, weight_decay=0.05, kind=arch_kind(c.arch))
    optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=c.device.type == "cuda")
    forward = torch.compile(model) if c.compile else model
    scaler = torch.amp.GradScaler(c.device.type, enabled=c.precision == "fp16")
    masks = torch.Generator(device=c.device).manual_seed(0)  # it advances: a fresh mask every step
    img = runtime.channels_last(img.to(c.device), c.family, c.device)
    labels = labels.to(c.device)

    def step():
        with runtime.autocast(c.device, c.precision):
            out = forward(img, generator=masks) if variant == "a2mim" else forward(img)
        if variant == "a2mim":
            loss = out["loss"]
        else:  # cross-entropy of the logits in fp32
            loss = nn.functional.cross_entropy(out.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def time_steps(steps, device, warmup, repeats, clock=time.perf_counter):
    """{name: step fn} → {name: [seconds of each timed step]}; the order alternates every round."""
    times = {name: [] for name in steps}
    for r in range(warmup + repeats):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for name in order:
            sync(device)
            t0 = clock()
            steps[name]()
            sync(device)
            if r >= warmup:
                times[name].append(clock() - t0)
    return times


def sync(device):
    """Wait for the work queued on a GPU (CUDA runs asynchronously); on the CPU there is none."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps_beside_busy_processes(n, *args, **kwargs):
    """time_steps while n processes spin on the CPU: another job on the same cores, started from another
    terminal (its own session: Linux's autogroups then share the CPU between the two sessions, not between
    threads)."""
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
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    # +alloc −free, in order: the running sum is the bytes alive at each event
    alive = torch.tensor([0] + [e.nbytes() for e in events]).cumsum(0)
    return weights + alive.max().item()


def next_batch_on(loader, device):
    """A step for time_steps: the loader's next batch of images, moved to the device."""
    batches = iter(loader)

    def step():
        return next(batches)[0].to(device, non_blocking=True)

    return step


def time_loaders(c):
    """'loader …: N img/s' of the DataLoader (and data.device_loader): batches moved to the device."""
    kw = dict(img_size=c.img_size, crop=c.family, data_dir=c.data_dir)
    ds = data.build_dataset(c.loader, "train", download=c.download, **kw)
    workers = "default" if c.workers is None else c.workers
    loaders = {
        f"DataLoader, {workers} workers": data.build_loader(ds, c.batch_size, workers=c.workers)
    }
    if c.loader in data.IN_MEMORY:
        on_device = data.device_loader(c.loader, "train", c.batch_size, c.device, **kw)
        loaders[f"device_loader on {c.device.type}"] = on_device
    # the first batch is the untimed warm-up
    k = min(c.repeats, *(len(loader) - 1 for loader in loaders.values()))
    batches = {what: next_batch_on(loader, c.device) for what, loader in loaders.items()}
    lines = []
    for what, t in time_steps(batches, c.device, 1, k).items():
        rate = k * c.batch_size / sum(t) if k > 0 else float("nan")
        lines.append(f"loader {c.loader} ({what}): {rate:.0f} img/s over {k} batches")
    return lines


def profile_steps(steps, device, n):
    """Lines: torch.profiler's self time per operator and step of each variant, largest A²MIM excess first."""
    cuda, ms = device.type == "cuda", {}
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    for name, step in steps.items():
        with profile(activities=activities) as prof:
            time_steps({name: step}, device, 0, n)
        ms[name] = collections.Counter()
        for e in prof.key_averages():
            self_us = e.self_device_time_total if cuda else e.self_cpu_time_total
            ms[name][e.key] = self_us / 1e3 / n  # µs → ms per step
    sup, ours = ms["supervised"], ms["a2mim"]
    ops = [op for op, _ in (ours - sup).most_common(15)] + ["all operators"]
    sup["all operators"], ours["all operators"] = sum(sup.values()), sum(ours.values())
    where = "device" if cuda else "CPU"
    lines = [
        f"profile: self {where} time per step (mean of {n}), largest A²MIM excess first",
        f"{'operator':58}{'supervised':>12}{'a2mim':>10}{'excess':>10}",
    ]
    for op in ops:
        excess = ours[op] - sup[op]
        lines.append(f"{op[:57]:58}{sup[op]:10.2f}ms{ours[op]:8.2f}ms{excess:+8.2f}ms")
    return lines


def report(c, times, memory):
    """The table of both variants, their ratios against the targets, and the README's markdown row."""
    B = c.batch_size
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'':12}{'median ms':>11}{'min ms':>9}{'img/s':>9}{'peak memory':>14}")
    for k in VARIANTS:
        peak = "n/a" if memory[k] is None else f"{memory[k] / 2**20:.1f} MiB"
        print(f"{k:12}{med[k] * 1e3:11.1f}{min(times[k]) * 1e3:9.1f}{B / med[k]:9.1f}{peak:>14}")

    ratio = med["a2mim"] / med["supervised"]
    best = min(times["a2mim"]) / min(times["supervised"])
    target = 1.10 if c.img_size > SMALL_INPUT else 1.15
    if memory["a2mim"] is None:
        mem, mem_target = "n/a", ""
    else:
        mem = f"{memory['a2mim'] / memory['supervised']:.3f}"
        how = "torch.cuda.max_memory_allocated"
        if c.device.type != "cuda":
            how = "torch.profiler's CPU allocator events"
        mem_target = f" (target ≤ 1.15; {how})"
    print(
        f"ratio a2mim / supervised: step time {ratio:.3f} (target ≤ {target:.2f}; "
        f"{best:.3f} for the fastest steps), peak memory {mem}{mem_target}"
    )

    arch = c.arch
    if c.width and c.family == "cnn":
        arch += f" w{c.width}"
    row = [arch, c.img_size, B, c.precision, c.device.type]
    row += [f"{B / med['supervised']:.1f}", f"{B / med['a2mim']:.1f}", f"{ratio:.3f}", mem]
    print("markdown:")
    print(
        "| arch | px | batch | precision | device | sup img/s | A²MIM img/s | time ratio | memory ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {' | '.join(map(str, row))} |")


def header(c):
    """The two lines that say what is timed, and on what machine."""
    gpu = "no GPU used"
    if c.device.type == "cuda":
        gpu = torch.cuda.get_device_name(c.device)
    width = f", width {c.width or 'standard'}" if c.family == "cnn" else ""
    compiled = ", torch.compile" if c.compile else ""
    chosen = [
        f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ
    ]
    waiting = " ".join(chosen) or "default"
    busy = f"; busy-looping processes beside the timed steps: {c.busy}" if c.busy else ""
    return (
        f"bench: {c.arch}{width} at {c.img_size} px, batch {c.batch_size}, {c.precision} on "
        f"{c.device.type}{compiled}; {c.warmup} warm-up + {c.repeats} timed steps of each, "
        f"interleaved, {c.clock} clock; mask {c.mask_patch_size}-px blocks\n"
        f"machine: {runtime.cpu_name()} ({os.cpu_count()} cores), {gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, OpenMP wait {waiting}{busy}"
    )


@runtime.entry_point
def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.print_config:
        print("\n".join(runtime.config_table(*resolve_config(args))))
        return 0
    c = resolve(args)
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    print(header(c))
    loaded = time_loaders(c) if c.loader else []  # first: a missing dataset fails before any timing
    steps, memory = {}, {}
    # One after the other: each one's memory counts from before its first step.
    for v in VARIANTS:
        steps[v], model = make_step(v, c)
        memory[v] = peak_memory(steps[v], model, c.device) if c.memory else None
    clock = time.process_time if c.clock == "cpu" else time.perf_counter
    times = time_steps_beside_busy_processes(c.busy, steps, c.device, c.warmup, c.repeats, clock)
    report(c, times, memory)
    if c.profile:
        print("\n".join(profile_steps(steps, c.device, c.repeats)))
    for line in loaded:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
