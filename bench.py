"""Is an A²MIM step as cheap as a supervised step of the same encoder? (issue 6)

    python bench.py                                             # ResNet-18 at width 16, 32 px, CPU: ~20 s
    python bench.py --arch vit_tiny                             # the ViT of the CPU runs
    python bench.py --arch resnet50 --img-size 224 --batch-size 8 --device cpu
    python bench.py --arch vit_base --img-size 224 --batch-size 128       # on a GPU: bf16 by default
    python bench.py --loader fashion-mnist --workers 2          # also: do the loaders keep up?
    python bench.py --profile                                   # where does each step spend its time?

Two training steps of the same encoder, on the same batch, in the same precision, with the same
optimiser (train.build_optimizer: AdamW over train.param_groups, fused on CUDA):
  (a) supervised: global average pool + linear head, cross-entropy;
  (b) A²MIM: a2mim.A2MIM with its defaults through train.forward_backward, so the mask is drawn
      inside the step on the device (seeded like train.py), channels_last for CNNs on CUDA.
Each step is forward + backward + optimizer.step + zero_grad, with no host sync inside. The two
are interleaved (a b b a a b …) so both see the same machine load; each step is timed alone
(synchronised on CUDA) and the median of `--repeats` steps after `--warmup` is reported.
Peak memory: each variant is built again alone and takes two steps while its peak is watched:
CUDA's max_memory_allocated, or on CPU malloc's bytes in use after every op (see peak_memory).
The issue's targets (reported, not enforced): time ratio ≤ 1.10 at 224 px, ≤ 1.15 at 32 px;
memory ratio ≤ 1.15.
"""
import argparse
import contextlib
import ctypes
import gc
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import data
import runtime
import train
from models import ARCHS, SMALL_INPUT, arch_family, build_encoder

VARIANTS = ("supervised", "a2mim")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--arch", choices=ARCHS, default="resnet18")
    a("--img-size", type=int, default=32)
    a("--width", type=int, help="ResNet/ConvNeXt width (default: 16 up to 64 px, else the standard one)")
    a("--batch-size", type=int, default=32, help="images per step")
    a("--precision", choices=runtime.PRECISIONS, default="auto", help="auto = bf16 on GPU, fp32 on CPU")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--warmup", type=int, default=3, help="untimed steps of each kind first")
    a("--repeats", type=int, default=10, help="timed steps of each kind (the median is reported)")
    a("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    a("--clock", choices=("wall", "cpu"), default="wall",
      help="cpu = this process's CPU time: steadier on a shared machine, meaningful with --threads 1 on CPU")
    a("--compile", action="store_true", help="torch.compile both models")
    a("--no-memory", action="store_true", help="skip the peak-memory measurement")
    a("--profile", action="store_true", help="also show which operators the A²MIM step spends its extra time in")
    a("--loader", choices=data.DATASETS, help="also time this dataset's pre-training loader")
    a("--data-dir", help="where --loader finds its data (see data.py)")
    a("--download", action="store_true", help="let torchvision download the --loader dataset")
    a("--workers", type=int, help="DataLoader workers for --loader (default: data.build_loader's)")
    a("--loader-batches", type=int, default=20, help="batches timed by --loader")
    a("--seed", type=int, default=0)
    return p


# ---------------------------------------------------------------------------------------------
# The two models and their steps
# ---------------------------------------------------------------------------------------------


class Supervised(nn.Module):
    """encoder → global average pool → linear: a plain classifier on the same encoder."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_channels, num_classes)

    def forward(self, img_bchw):
        return self.head(self.encoder(img_bchw).mean(dim=(2, 3)))


def resolve(args):
    """(train.py-style cfg, Dist, precision) for the benchmark's settings."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU")
    for what in ("img_size", "batch_size", "repeats"):
        if getattr(args, what) < 1:
            raise ValueError(f"--{what.replace('_', '-')} must be at least 1, got {getattr(args, what)}")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.clock == "cpu" and device.type == "cuda":
        raise ValueError("--clock cpu counts host CPU time, which does not measure a GPU step; use --clock wall")
    if args.threads:
        torch.set_num_threads(args.threads)
    # train.py's own resolution (mask block size, lr, weight decay, token lr scale, drop path).
    flags = ["--arch", args.arch, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size)]
    cfg = train.resolve_config(train.get_parser().parse_args(flags + ["--seed", str(args.seed)]))
    cfg["width"] = args.width or (16 if args.img_size <= SMALL_INPUT else None)  # None = the standard width
    return cfg, runtime.Dist(device=device), runtime.resolve_precision(args.precision, device)


def build(variant, cfg, env, compile_model=False):
    """(model, optimizer) of one variant, from the same seed; train.py's A2MIM, or our Supervised."""
    torch.manual_seed(cfg["seed"])
    if variant == "a2mim":
        model = train.build_model(cfg, env)  # A2MIM with its defaults, channels_last on CUDA
    else:
        num_classes = 10 if cfg["img_size"] <= SMALL_INPUT else 1000
        model = Supervised(build_encoder(**train.encoder_kwargs(cfg)), num_classes).to(env.device)
        if model.encoder.family == "cnn" and env.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)  # as train.build_model does
    optimizer = train.build_optimizer(model, cfg, env)
    if compile_model:
        model = torch.compile(model)
    return model, optimizer


def make_step(variant, model, optimizer, cfg, env, precision, img, labels):
    """A closure doing one full training step; no host sync inside."""
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
    count = [0]

    def step():
        if variant == "a2mim":
            gen = train.mask_generator(cfg, env, count[0])  # masks drawn in forward, on the device
            train.forward_backward(model, img, env, precision, scaler, generator=gen)
        else:
            with runtime.autocast(env.device, precision):
                logits = model(img)
            scaler.scale(F.cross_entropy(logits.float(), labels)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        count[0] += 1

    return step


def make_batch(cfg, env):
    """A normalised-looking random batch and labels, on the device (channels_last for CNNs on CUDA)."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    S = cfg["img_size"]
    img = torch.randn(cfg["batch_size"], 3, S, S, generator=gen).to(env.device)
    if not cfg["arch"].startswith("vit") and env.device.type == "cuda":
        img = img.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (cfg["batch_size"],), generator=gen).to(env.device)
    return img, labels


# ---------------------------------------------------------------------------------------------
# Measuring: interleaved step times, peak memory, the loaders
# ---------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps, device, warmup, repeats, clock=time.perf_counter):
    """{name: step fn} → {name: [seconds of each timed step]}; the order alternates every round."""
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            t0 = clock()
            steps[name]()
            sync(device)
            if r >= warmup:
                times[name].append(clock() - t0)
    return times


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use():
    """A function returning the bytes glibc's malloc has handed out and not taken back (all arenas,
    plus mmapped blocks), or None where there is no glibc ≥ 2.33. PyTorch's CPU tensors live there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def in_use():
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class _PeakAfterEveryOp(TorchDispatchMode):
    """Looks at `in_use()` after every aten op (forward, backward and optimiser) and keeps the max."""

    def __init__(self, in_use):
        super().__init__()
        self.in_use, self.peak = in_use, in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def peak_memory(variant, cfg, env, precision, img, labels, compile_model=False):
    """(peak bytes, how) of building `variant` and taking 2 steps, above what was allocated before.

    CUDA: the caching allocator's max_memory_allocated. CPU: PyTorch has no allocator statistics
    and the peak RSS depends on what malloc kept from earlier, so we sample malloc's bytes in use
    after every op (misses only transients inside one op, e.g. a conv's scratch space); not with
    torch.compile, and not off glibc, where the answer is None. Both include weights, gradients,
    the AdamW state, activations and temporaries, but not the batch (shared by both variants).
    """
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        base, how, watch = torch.cuda.memory_allocated(env.device), "CUDA max_memory_allocated", None
    else:
        in_use = None if compile_model else _malloc_in_use()
        if in_use is None:
            return None, "not measured on this CPU set-up"
        base, how, watch = in_use(), "malloc bytes in use, after every op", _PeakAfterEveryOp(in_use)
    model, optimizer = build(variant, cfg, env, compile_model)
    step = make_step(variant, model, optimizer, cfg, env, precision, img, labels)
    with watch or contextlib.nullcontext():
        for _ in range(2):  # the first step creates the optimiser state
            step()
    if watch is not None:
        return watch.peak - base, how
    torch.cuda.synchronize(env.device)
    return torch.cuda.max_memory_allocated(env.device) - base, how


def build_loaders(args, cfg, env):
    """{description: loader} for --loader: the CPU DataLoader, and data.device_loader if it applies."""
    family = arch_family(cfg["arch"])
    S, B = cfg["img_size"], cfg["batch_size"]
    ds = data.build_dataset(args.loader, "train", data_dir=args.data_dir, img_size=S, family=family,
                            download=args.download)
    workers = args.workers if args.workers is not None else "default"
    loaders = {f"DataLoader, {workers} workers": data.build_loader(ds, B, workers=args.workers, seed=args.seed)}
    if args.loader in data.DEVICE_DATASETS:
        loaders[f"device_loader on {env.device.type}"] = data.device_loader(
            args.loader, "train", B, env.device, img_size=S, family=family, seed=args.seed, data_dir=args.data_dir)
    return loaders


def time_loader(loader, device, batches):
    """(img/s, k) over k ≤ `batches` batches moved to the device, after the first (worker start-up)."""
    it = iter(loader)
    next(it)
    k = min(batches, len(loader) - 1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(k):
        img, _ = next(it)
        img.to(device, non_blocking=True)
    sync(device)
    return (k * loader.batch_size / (time.perf_counter() - t0) if k > 0 else float("nan")), k


def profile_steps(steps, device, n):
    """Where the extra time goes: torch.profiler's self time per operator in `n` steps of each
    variant (device time on CUDA), largest A²MIM excess first. Returns the lines to print."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    field = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ms = {}
    for name, step in steps.items():
        with profile(activities=acts) as prof:
            for _ in range(n):
                step()
            sync(device)
        ms[name] = {e.key: getattr(e, field) / 1e3 / n for e in prof.key_averages()}  # µs → ms per step
    sup, ours = ms["supervised"], ms["a2mim"]
    ops = sorted(set(sup) | set(ours), key=lambda op: ours.get(op, 0) - sup.get(op, 0), reverse=True)
    lines = [f"profile: self {'device' if device.type == 'cuda' else 'CPU'} time per step (mean of {n}), "
             f"largest A²MIM excess first", f"{'operator':58}{'supervised':>12}{'a2mim':>10}{'excess':>10}"]
    for op in ops[:15] + ["all operators"]:
        a, b = (sum(sup.values()), sum(ours.values())) if op == "all operators" else (sup.get(op, 0), ours.get(op, 0))
        lines.append(f"{op[:57]:58}{a:10.2f}ms{b:8.2f}ms{b - a:+8.2f}ms")
    return lines


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def machine_line(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU used"
    return (f"machine: {cpu} ({os.cpu_count()} cores), {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads")


def mib(n):
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def report(cfg, env, precision, times, memory):
    """Print the results table, the two ratios and a markdown row for README tables."""
    B = cfg["batch_size"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'':12}{'median ms':>11}{'min ms':>9}{'img/s':>9}{'peak memory':>14}")
    for k in VARIANTS:
        print(f"{k:12}{med[k] * 1e3:11.1f}{min(times[k]) * 1e3:9.1f}{B / med[k]:9.1f}{mib(memory[k][0]):>14}")
    ratio = med["a2mim"] / med["supervised"]
    (sup_bytes, how), a2mim_bytes = memory["supervised"], memory["a2mim"][0]
    mem_ratio = a2mim_bytes / sup_bytes if sup_bytes and a2mim_bytes is not None else None
    target = 1.10 if cfg["img_size"] > SMALL_INPUT else 1.15
    mem_text = "n/a" if mem_ratio is None else f"{mem_ratio:.3f} (target ≤ 1.15)"
    best = min(times["a2mim"]) / min(times["supervised"])  # the least disturbed steps, on a busy machine
    print(f"ratio a2mim / supervised: step time {ratio:.3f} (target ≤ {target:.2f}; {best:.3f} for the fastest "
          f"steps), peak memory {mem_text}")
    if mem_ratio is not None:
        print(f"peak memory = {how}, from before the model is built: weights, gradients, AdamW state, activations")
    width = f" w{cfg['width']}" if cfg["width"] and not cfg["arch"].startswith("vit") else ""
    print("markdown:\n| arch | px | batch | precision | device | sup img/s | A²MIM img/s | time ratio | memory ratio |\n"
          "|---|---|---|---|---|---|---|---|---|")
    print(f"| {cfg['arch']}{width} | {cfg['img_size']} | {B} | {precision} | {env.device.type} | "
          f"{B / med['supervised']:.1f} | {B / med['a2mim']:.1f} | {ratio:.3f} | "
          f"{'n/a' if mem_ratio is None else f'{mem_ratio:.3f}'} |")


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        cfg, env, precision = resolve(args)
        width = f", width {cfg['width'] or 'standard'}" if not args.arch.startswith("vit") else ""
        print(f"bench: a supervised and an A²MIM training step of {args.arch}{width} at {cfg['img_size']} px, "
              f"batch {cfg['batch_size']}, {precision} on {env.device.type}{', torch.compile' if args.compile else ''}: "
              f"{args.warmup} warm-up + {args.repeats} timed steps each ({args.clock} clock), interleaved; "
              f"mask {cfg['mask_patch_size']}-px blocks, ratio {cfg['mask_ratio']}")
        print(machine_line(env.device))
        loaders = build_loaders(args, cfg, env) if args.loader else {}  # a missing dataset fails early
        img, labels = make_batch(cfg, env)
        steps = {}
        for variant in VARIANTS:
            model, optimizer = build(variant, cfg, env, args.compile)
            steps[variant] = make_step(variant, model, optimizer, cfg, env, precision, img, labels)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        times = time_steps(steps, env.device, args.warmup, args.repeats, clock)
        profile = profile_steps(steps, env.device, args.repeats) if args.profile else []
        del steps, model, optimizer  # free both before measuring each alone
        memory = {v: (None, "not measured (--no-memory)") if args.no_memory else
                  peak_memory(v, cfg, env, precision, img, labels, args.compile) for v in VARIANTS}
        report(cfg, env, precision, times, memory)
        if profile:
            print("\n".join(profile))
        for name, loader in loaders.items():
            rate, k = time_loader(loader, env.device, args.loader_batches)
            print(f"loader {args.loader} ({name}): {rate:.0f} img/s over {k} batches")
    except (ValueError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
