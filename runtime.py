"""What every script shares around the model: the project's errors, the settings mechanism, processes,
precision, files and checkpoints, optimiser groups, lr schedules. train.py, eval_linear.py, bench.py,
reproduce.py and reconstruct.py import it; it imports no other file of the project (no import cycle)."""

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import math
import os
import pickle
import random
import re
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


# --- The project's errors, all here. A UserError is a user's mistake or a run that cannot go on: a
# script's main() prints its one sentence and exits 2 (`entry_point`). Any other exception is a bug
# and keeps its traceback.
class UserError(Exception):
    """One sentence saying what was expected; nothing on disk was overwritten or lost."""


class ConfigError(UserError, ValueError):
    """A setting out of its range, settings that cannot work together, an encoder that cannot be built."""


class DataError(UserError, ValueError):
    """A missing or malformed dataset, or too little of it: names what and where."""


class CheckpointError(UserError):
    """A file that is not one of our checkpoints (or a released one), or one for another model."""


class RunError(UserError):
    """A run that must not start or cannot go on (a locked folder, a full disk, a diverged loss)."""


class JsonlError(UserError, ValueError):
    """A line of a JSONL file (results, log.jsonl, runs.jsonl) that is not one JSON record."""


def one_line(err):
    """The error's own sentence (from a DataLoader worker: the last line of its traceback, unprefixed)."""
    last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
    return re.sub(r"^[\w.]+(Error|Loss): ", "", last)


def entry_point(main):
    """Wraps a script's main(argv): a UserError becomes `error: <its sentence>` on stderr and exit code 2;
    the process group (torchrun) is closed however main ends."""

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        finally:
            cleanup_distributed()

    return wrapped


# --- Settings: one mechanism for every script. A script lists its Settings once; the parser, --help,
# the range checks and --print-config come from that list. Values are resolved in layers (defaults <
# recipe < command line, each script names its own), and `origin[name]` records the layer that won.
@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers from `lo` to `hi`, ends included unless `lo_open` / `hi_open`: Range(0, 1, hi_open=True)
    is [0, 1). NaN and ±inf are never in a range (argparse's float() takes "nan" and "inf")."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self):
        lo, hi = _number(self.lo), _number(self.hi)
        if self.hi == math.inf:
            return f"greater than {lo}" if self.lo_open else f"at least {lo}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{lo}, {hi}{right}"

    def __contains__(self, value):
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return math.isfinite(value) and above and below

    def check(self, flag, value):
        """ConfigError, one sentence naming the flag and the range, unless `value` lies in it."""
        if not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number {self}, got {value}")
        if value not in self:
            raise ConfigError(f"{flag} must be {self}, got {_number(value)}")


def _number(x):
    """4294967295, not 4.29497e+09; 0.1, not 0.10000000000000001."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, lo_open=True)
FRACTION = Range(0, 1, hi_open=True)  # [0, 1): a probability, a drop rate, an EMA decay
UNIT = Range(0, 1)  # [0, 1]: a weight of a mix
# (0, 1): the mask ratio (none masked / all masked fail)
OPEN_UNIT = Range(0, 1, lo_open=True, hi_open=True)
SEED = Range(0, 2**32 - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """One command-line setting: `--name-with-dashes`, its default, what it means, and what it accepts
    (a Range, or choices). `type` defaults to the default's type; a bool is a --flag / --no-flag pair;
    nargs="+" takes a list, each element checked against the range."""

    name: str
    default: object = None
    help: str
    range: Range | None = None
    choices: tuple | None = None
    type: object = None  # a callable such as int; None: the type of the default
    nargs: str | None = None
    unset: str | None = None  # what leaving it unset (a default of None) means, for --help

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    def default_text(self):
        """--help's default: the value, what leaving it unset means, or each mode's ({"probe": 30, ...})."""
        if self.default is None and self.unset is not None:
            return self.unset
        if isinstance(self.default, dict):
            return ", ".join(f"{mode} {value}" for mode, value in self.default.items())
        return str(self.default)

    def parser_options(self):
        if self.type is bool or isinstance(self.default, bool):
            return dict(action=argparse.BooleanOptionalAction)
        if self.choices is not None:
            return dict(choices=self.choices)
        return dict(type=self.type or type(self.default), nargs=self.nargs)

    def check(self, value):
        """ConfigError unless `value` (each element of a list) lies in the range; None is "not set"."""
        if self.range is None or value is None:
            return
        for v in value if isinstance(value, list) else [value]:
            self.range.check(self.flag, v)


def add_settings(parser, settings, describe_default=None):
    """One argument per Setting. Each defaults to None, so that a script knows which values the command
    line gave (they win over every other layer); --help shows the default (Setting.default_text, or
    `describe_default(s)`) and the range."""
    for s in settings:
        shown = describe_default(s) if describe_default else s.default_text()
        valid = f"; valid: {s.range}" if s.range is not None else ""
        text = f"{s.help} (default: {shown}{valid})"
        parser.add_argument(s.flag, default=None, help=text, **s.parser_options())


def command_line(args, settings):
    """{name: value} of the settings the command line gave."""
    return {
        s.name: getattr(args, s.name) for s in settings if getattr(args, s.name, None) is not None
    }


def check_settings(settings, cfg):
    """Every setting's value against its range, in the list's order: the first one out is the error."""
    for s in settings:
        s.check(cfg.get(s.name))


def config_table(cfg, origin):
    """--print-config's lines: each resolved setting, its value (JSON) and the layer it came from."""
    return [
        f"{name:<22} {json.dumps(value):<18} {origin.get(name, '')}" for name, value in cfg.items()
    ]


# Which recipe a run takes: "auto" = the paper's on ImageNet (--data imagenet) and the small-data one on
# everything else, an image folder of any size included; "official" = the paper's on any data; "small" =
# the small-data one. train.py (§6) and eval_linear.py (§7) decide it here, the same way.
PRESETS = ("auto", "official", "small")


def takes_paper_recipe(preset, data_name):
    return preset == "official" or (preset == "auto" and data_name == "imagenet")


# --- Distributed set-up: one code path for 1 CPU process, 8 GPUs, or many nodes (torchrun env vars).
@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    cpu_group: object = None  # gloo group for small host-side all-reduces (stop flags, RNG states)

    is_main = property(lambda self: self.rank == 0)
    enabled = property(lambda self: self.world_size > 1)  # several processes


def setup_distributed(device=None):
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPU, gloo on CPU. No-op if absent."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    # None: the default (gloo)
    cpu_group = dist.new_group(backend="gloo") if world > 1 and use_cuda else None
    return Dist(rank, local_rank, world, dev, cpu_group)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


# --- Precision: bf16 autocast on GPU by default, fp16 + GradScaler on request, fp32 on CPU.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision, device):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device, precision):
    """Context manager for the forward pass (the loss itself runs in fp32, see a2mim.py)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- Checkpoints: atomic writes, safe loads (weights_only=True), one clear sentence on a bad file.
CHECKPOINT_FORMAT = "a2mim-checkpoint-v1"


def atomic_save(path, obj):
    """torch.save (str or bytes: written as they are) to `path.tmp`, fsync, rename: never a half-written
    `path`. A failed write or rename (full disk, read-only or immutable file, a folder in the way)
    removes the `.tmp` and leaves the previous `path` intact: RunError, one sentence."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # a folder, a device: never replaced by a file
    if os.path.exists(path) and not os.path.isfile(path):
        raise RunError(f"cannot write {path}: it is not a regular file")
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            if isinstance(obj, (str, bytes)):
                f.write(obj.encode() if isinstance(obj, str) else obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException as e:  # a Ctrl-C half-way too: no .tmp is left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # torch reports a short write as RuntimeError("... unexpected pos ..." / "... write ...")
        failed_write = isinstance(e, RuntimeError) and (
            "unexpected pos" in str(e) or "write" in str(e)
        )
        if not isinstance(e, OSError) and not failed_write:
            raise  # not a failed write: a bug keeps its traceback
        kept = (
            f"the previous {os.path.basename(path)} is intact"
            if os.path.exists(path)
            else "nothing was written"
        )
        if failed_write or getattr(e, "errno", None) == errno.ENOSPC:
            why = "no space left on the device"
        else:
            why = e.strerror or str(e)
        raise RunError(f"{why} while writing {path}; {kept}") from None


def append_line(path, text):
    """Append one line to a text file (results, logs) so that a failed append leaves the file exactly as
    it was: under an flock of the folder, the old bytes plus the new line go to `path.tmp`, fsync, rename.
    Concurrent appenders (two evaluations sharing a results file) wait for each other."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(path) and not os.path.isfile(path):
        raise RunError(f"cannot append to {path}: it is not a regular file")
    line = text.rstrip("\n") + "\n"
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)  # released when dir_fd is closed
        old = b""
        if os.path.exists(path):
            with open(path, "rb") as f:
                old = f.read()
        # a last line cut by a kill: the new record starts a line of its own
        if old and not old.endswith(b"\n"):
            old += b"\n"
        atomic_save(path, old + line.encode())
    finally:
        os.close(dir_fd)


def read_jsonl(path, *, drop_torn_last=False):
    """The records of a JSONL file ([] when it does not exist). A line that is not a JSON object is a
    JsonlError naming the file and line; with drop_torn_last, a damaged *last* line (a write cut by a
    kill) is dropped instead, and said on stderr."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
            continue
        if drop_torn_last and not any(rest.strip() for rest in lines[n:]):
            print(
                f"note: dropped the damaged last line {n} of {path} ({line[:40]!r}...)",
                file=sys.stderr,
            )
            break
        raise JsonlError(
            f"{path}, line {n}, is not a JSON record ({line[:40]!r}); fix or remove that line"
        )
    return records


def load_tensors(path, what="checkpoint"):
    """torch.load(weights_only=True) to CPU, with one sentence for a missing, truncated or
    refused file. weights_only refuses pickles holding arbitrary Python objects, because loading
    them would run code from the file; we never turn that off."""
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # A refused Python object is a pickle GLOBAL; torch's wording changes between releases
        # ("Unsupported global: GLOBAL x", "unsupported GLOBAL x whose module is blocked"), garbage
        # bytes say "invalid load key" / "Unsupported operand": match the opcode's name only.
        if "global" not in str(e).lower():
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint (not a torch.save archive)"
            ) from None
        raise CheckpointError(
            f"{path} was refused: it holds Python objects, not only tensors, and loading it could run code "
            "from the file; if you trust it, look inside with `python -m pickletools` or re-save its tensors "
            "with torch.save(state_dict)"
        ) from None
    except (
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        KeyError,
    ) as e:  # truncated, not a zip, unreadable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({first[:120]})"
        ) from None


@dataclasses.dataclass(kw_only=True)
class Checkpoint:
    """The one layout of a train.py checkpoint. train.py writes it; eval_linear.py, reproduce.py,
    weights.py, reconstruct.py and the tests read it, all through save_checkpoint / load_checkpoint.
    On disk: a dict of these fields and "format": CHECKPOINT_FORMAT (tensors and plain types only)."""

    model: dict  # A2MIM's state dict: encoder.*, mask_token.*, decoder.*
    config: dict  # train.py's resolved settings (as in the run's config.json)
    encoder_kwargs: dict  # what models.build_encoder needs to rebuild the encoder
    method: str = "a2mim"  # or "simmim" (§3)
    # Where the run stands: optimiser steps done, epoch, batch within it, images in an epoch (None: unknown).
    step: int = 0
    epoch: int = 0
    batch: int = 0
    images: int | None = None
    optimizer: dict = dataclasses.field(default_factory=dict)  # AdamW's state_dict()
    scaler: dict = dataclasses.field(default_factory=dict)  # GradScaler's state_dict()
    rng: list = dataclasses.field(default_factory=list)  # each rank's random streams (rng_state())

    @property
    def arch(self):
        return self.encoder_kwargs["arch"]


def save_checkpoint(path, ckpt):
    """Write a Checkpoint atomically, with the marker that load_checkpoint looks for."""
    fields = {f.name: getattr(ckpt, f.name) for f in dataclasses.fields(ckpt)}
    atomic_save(path, {"format": CHECKPOINT_FORMAT, **fields})


def is_checkpoint(state):
    """Whether a loaded file is one of ours (weights.py tells ours from released files by this)."""
    return isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT


def not_our_checkpoint(path):
    return CheckpointError(
        f"{path} is not an A²MIM checkpoint written by train.py (no '{CHECKPOINT_FORMAT}' marker)"
    )


def checkpoint_from(state, path, arch=None):
    """A loaded file as a Checkpoint if it is one of ours, of `arch` when given; else CheckpointError.
    Keys that a later version added are left out, so that an older train.py reads a newer file too."""
    names = {f.name for f in dataclasses.fields(Checkpoint)}
    if not is_checkpoint(state) or not {"model", "config", "encoder_kwargs"} <= state.keys():
        raise not_our_checkpoint(path)
    ckpt = Checkpoint(**{k: v for k, v in state.items() if k in names})
    if arch is not None and ckpt.arch != arch:
        raise CheckpointError(f"{path} holds a {ckpt.arch} model, but --arch is {arch}")
    return ckpt


def load_checkpoint(path, *, arch=None):
    """One of our checkpoints, loaded to CPU (weights_only=True); CheckpointError for anything else."""
    return checkpoint_from(load_tensors(path), path, arch)


def rng_state():
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"torch": torch.get_rng_state(), "python": random.getstate(), **cuda}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- Optimiser parameter groups and learning-rate schedules (§6).
# §6, the released `paramwise_options`: no weight decay where the name matches (re.search). Our
# names are the released ones where it matters: ResNet bn1..3 match, `downsample.1` does not (that
# BN IS decayed, as released); ConvNeXt's LayerNorms match nothing (decayed, as released), its
# LayerScale is `layer_scale` here (`gamma` there); the ViT configs add norm, pos_embed, cls_token,
# `gamma` (`bias` also catches the rel-pos tables, as released). γ is `mask_token.gamma` here,
# `mask_gamma` there: it gets its own settings (gamma_*) rather than the token's.
RELEASED = r"(bn|ln|gn)(\d+)?.(weight|bias)|bias|mask_token"
NO_DECAY = {
    "resnet": RELEASED,
    "convnext": RELEASED + "|layer_scale",
    "vit": RELEASED + "|norm|pos_embed|cls_token|gamma",
}


def no_weight_decay(name, param, kind=None):
    """`kind` (models.arch_kind: "resnet", "convnext", "vit") given: the released rule above; None
    (eval_linear.py): no decay on what is not a weight matrix or kernel."""
    if kind is not None:
        return re.search(NO_DECAY[kind], name) is not None
    keys = ("mask_token", "pos_embed", "cls_token", "rel_pos_bias", "gamma_1", "gamma_2")
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in keys)


def param_groups(
    model,
    *,
    weight_decay,
    token_lr_scale=1.0,
    lr_scale_fn=None,
    kind=None,
    gamma_lr_scale=None,
    gamma_weight_decay=None,
):
    """AdamW groups with `lr_scale` (× the scheduled lr): `token_lr_scale` for the mask token T, gamma_* for
    its gate γ (None: as T), `lr_scale_fn(name)` for the rest (eval_linear.py: layer-wise lr decay); weight
    decay as no_weight_decay(name, p, kind)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if no_weight_decay(name, p, kind) else weight_decay
        if "mask_token" in name:
            scale = token_lr_scale
        elif lr_scale_fn is not None:
            scale = lr_scale_fn(name)
        else:
            scale = 1.0
        if name.endswith("mask_token.gamma"):
            wd = wd if gamma_weight_decay is None else gamma_weight_decay
            scale = scale if gamma_lr_scale is None else gamma_lr_scale
        groups.setdefault((wd, scale), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": s} for (wd, s), ps in groups.items()]


def lr_at(
    step,
    *,
    lr,
    total_steps,
    warmup_steps,
    schedule="cosine",
    min_lr=0.0,
    step_at=(),
    warmup_ratio=0.0,
):
    """Per-step lr, as the released mmcv hooks (§6): the schedule's own value at `step`, cosine down to
    `min_lr` after the warm-up or ×0.1 at each step in `step_at`; during the warm-up that value is
    scaled by 1 − (1 − step / warmup_steps)·(1 − warmup_ratio), which rises linearly from warmup_ratio.
    warmup_ratio 0 = OpenMixup's StepFixCosineAnnealing (its linear warm-up drops the ratio: lr 0 at
    step 0; every CNN config); the ViT configs' mmcv step hook uses 5e-7 · 2048 / 512 = 2e-6."""
    if schedule == "step":
        regular = lr * 0.1 ** sum(step >= s for s in step_at)
    else:
        # Progress counted from the end of the warm-up, as StepFixCosineAnnealing. During the warm-up it is
        # negative; cos is even, so the warm-up scales the mirror image of the cosine's start, as released.
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        regular = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if step < warmup_steps:
        return regular * (1 - (1 - step / warmup_steps) * (1 - warmup_ratio))
    return regular


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def set_scheduled_lr(optimizer, step, **schedule):
    """§6, as mmcv's lr hooks: each group from its own peak (lr × lr_scale) to the same absolute
    min_lr. Returns the lr of scale 1 (for the log)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, **{**schedule, "lr": schedule["lr"] * group.get("lr_scale", 1.0)})
    return lr_at(step, **schedule)


def broadcast_buffers(model, env):
    """Rank 0's buffers (BatchNorm statistics) to every rank: on CPU (gloo, no SyncBN) they drift
    apart between DDP's broadcasts at the start of every forward; aligned before saving."""
    if env.enabled:
        for buf in unwrap(model).buffers():
            dist.broadcast(buf, src=0)


def unwrap(model):
    # the plain module under DDP / torch.compile
    model = model.module if isinstance(model, DDP) else model
    return getattr(model, "_orig_mod", model)


def cpu_name():
    """The CPU's model name (Linux /proc/cpuinfo), else the machine type: for bench and results records."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        return next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
            os.uname().machine,
        )
    return os.uname().machine


def channels_last(x, family, device):
    """CNN weights / batches in channels_last on CUDA (faster convs under bf16); the one place that decides it."""
    if family != "cnn" or device.type != "cuda":
        return x
    if isinstance(x, torch.Tensor):
        return x.contiguous(memory_format=torch.channels_last)
    return x.to(memory_format=torch.channels_last)
