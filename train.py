"""A²MIM pre-training, from a laptop CPU to multi-node torchrun (PAPER.md §6).

    python train.py                                          # default job: Fashion-MNIST, small ResNet, CPU
    python train.py --arch vit_tiny --data cifar10 --data-dir data
    torchrun --nproc_per_node=8 train.py --arch resnet50 --data imagenet --data-dir /data/imagenet --preset official

Settings are resolved in three layers: the laptop defaults below, then the paper's official
recipe when `--preset official` is given, then any flag typed on the command line.
`--print-config` shows the result and exits.

The machinery that eval_linear.py and bench.py share (distributed set-up, precision,
checkpoints, parameter groups, schedules) lives in runtime.py.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from a2mim import A2MIM
from models import ARCHS, arch_family, build_encoder
from runtime import (PRECISIONS, CheckpointError, RunError, autocast, broadcast_buffers, cleanup_distributed, load_checkpoint,
                     lr_at, one_line, param_groups, resolve_precision, rng_state, save_checkpoint, set_lr,
                     set_rng_state, setup_distributed, unwrap)

# ---------------------------------------------------------------------------------------------
# Configuration: laptop defaults < official recipe (--preset official) < command-line flags.
# ---------------------------------------------------------------------------------------------

# The laptop default: A²MIM on Fashion-MNIST with a ResNet-18 of base width 16, on CPU in minutes.
DEFAULTS = dict(
    arch="resnet18", data="fashion-mnist", data_dir=None, img_size=None, width=16, method="a2mim",
    mask_patch_size=None, mask_ratio=0.6, epochs=2, batch_size=128, accum_steps=1, blr=3e-4,
    min_lr=1e-5, warmup_epochs=0.2, schedule="cosine", step_epoch=None, weight_decay=0.05,
    clip_grad=None, drop_path=None, token_lr_scale=0.1, precision="auto", workers=None, seed=0,
    out_dir="out", run_name=None, save_every=1, vis_every=200, log_every=20, compile=False,
    max_steps=None, on_nonfinite="stop", download=False, device_data="auto",
    # A2MIM options for ablations; None = the per-family default of a2mim.DEFAULTS (§3, §5).
    fill=None, token_at=None, token_mode=None, spatial=None, fft_weight=None, fft_unmask_weight=None,
)
ABLATION_KEYS = ("fill", "token_at", "token_mode", "spatial", "fft_weight", "fft_unmask_weight")

# PAPER.md §6. lr = blr × global_batch / 512, so 3e-4 → 1.2e-3 and 1e-4 → 4e-4 at batch 2048.
CNN_RECIPE = dict(
    img_size=224, width=64, mask_patch_size=32, mask_ratio=0.6, epochs=300, batch_size=256,
    accum_steps=1, blr=3e-4, min_lr=1e-5, warmup_epochs=10, schedule="cosine", weight_decay=0.05,
    clip_grad=None, token_lr_scale=0.1,
)
VIT_RECIPE = dict(
    img_size=224, mask_patch_size=32, mask_ratio=0.6, epochs=800, batch_size=128, accum_steps=2,
    blr=1e-4, min_lr=1e-5, warmup_epochs=10, schedule="step", step_epoch=700, weight_decay=0.05,
    clip_grad=5.0, drop_path=0.1, token_lr_scale=1.0,
)
OFFICIAL = {
    **{a: CNN_RECIPE for a in ("resnet50", "resnet101", "resnet152", "resnet200")},
    **{a: CNN_RECIPE | dict(width=None) for a in ("convnext_tiny", "convnext_small", "convnext_base")},
    "vit_small": VIT_RECIPE | dict(batch_size=256, accum_steps=1),
    "vit_base": VIT_RECIPE,
    "vit_large": VIT_RECIPE,
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--arch", choices=ARCHS, help="encoder (default resnet18 at width 16)")
    a("--data", help=f"dataset: {', '.join(data.DATASETS)} (default fashion-mnist)")
    a("--data-dir", help="where the dataset lives (see data.py for each layout)")
    a("--download", action="store_true", default=None, help="let torchvision download fashion-mnist/cifar/stl10")
    a("--img-size", type=int, help="training resolution (default: the dataset's, 224 for ImageNet)")
    a("--width", type=int, help="ResNet base width / ConvNeXt first-stage width")
    a("--method", choices=("a2mim", "simmim"))
    a("--mask-patch-size", type=int, help="mask block size in px (default img_size/8, 32 at 224)")
    a("--mask-ratio", type=float)
    a("--epochs", type=int)
    a("--batch-size", type=int, help="per process (per GPU); global = this × world × accum")
    a("--accum-steps", type=int, help="gradient accumulation micro-steps")
    a("--blr", type=float, help="base lr per 512 images of global batch")
    a("--min-lr", type=float)
    a("--warmup-epochs", type=float)
    a("--schedule", choices=("cosine", "step"))
    a("--step-epoch", type=int, help="epoch of the ×0.1 step (schedule 'step')")
    a("--weight-decay", type=float)
    a("--clip-grad", type=float, help="max grad norm (off by default for CNNs)")
    a("--drop-path", type=float)
    a("--token-lr-scale", type=float, help="lr multiplier of the mask token (0.1 in the CNN recipe)")
    a("--precision", choices=PRECISIONS, help="auto = bf16 on GPU, fp32 on CPU")
    a("--workers", type=int, help="data loader workers per process")
    a("--seed", type=int)
    a("--out-dir")
    a("--run-name", help="sub-folder of --out-dir (default: method_arch_data)")
    a("--save-every", type=int, help="checkpoint every N epochs (and at the end)")
    a("--vis-every", type=int, help="reconstruction PNG every N steps (0 = off)")
    a("--log-every", type=int)
    a("--compile", action="store_true", default=None)
    a("--max-steps", type=int, help="stop after this many optimiser steps (tests, benchmarks)")
    a("--on-nonfinite", choices=("stop", "skip"), help="a NaN/inf loss stops the run, or skips that step")
    a("--fill", choices=("mean", "zero"), help="ablation: fill of the masked input")
    a("--token-at", help="ablation: token site, e.g. 'stem', 'layer3' (default: the method's)")
    a("--token-mode", choices=("gate", "add", "replace"), help="ablation: how the token is written")
    a("--spatial", choices=("focal_l1", "l1"), help="ablation: pixel loss")
    a("--fft-weight", type=float, help="ablation: λ of the Fourier loss (0 = off)")
    a("--fft-unmask-weight", type=float, help="ablation: w of the 'mixed' image")
    a("--device-data", choices=("auto", "on", "off"),
      help="hold fashion-mnist/cifar/stl10 on the device and augment there (auto: on CUDA)")
    a("--preset", choices=("none", "official"), default="none", help="'official' = the paper's recipe for --arch")
    a("--resume", help="checkpoint to resume from (a run folder resumes itself automatically)")
    a("--overwrite", action="store_true", help="start afresh in an output folder that holds another run")
    a("--print-config", action="store_true", help="print the resolved settings and exit")
    a("--assume-world-size", type=int, help="with --print-config: resolve as if run on N processes")
    return p


def resolve_config(args, world_size=1):
    """Merge the three layers; derive img size, mask block, global batch and the absolute lr."""
    cli = {k: v for k, v in vars(args).items() if v is not None and k in DEFAULTS}
    arch = cli.get("arch", DEFAULTS["arch"])
    preset = OFFICIAL.get(arch) if args.preset == "official" else {}
    if preset is None:
        raise ValueError(f"no official recipe for {arch}; the paper gives one for {', '.join(OFFICIAL)}")
    cfg = {**DEFAULTS, **preset, **cli}
    if args.preset == "official" and "data" not in cli:
        cfg["data"] = "imagenet"
    cfg["img_size"] = cfg["img_size"] or data.dataset_info(cfg["data"])["img_size"]
    cfg["mask_patch_size"] = cfg["mask_patch_size"] or (32 if cfg["img_size"] >= 192 else cfg["img_size"] // 8)
    cfg["world_size"] = world_size
    cfg["global_batch"] = cfg["batch_size"] * world_size * cfg["accum_steps"]
    cfg["lr"] = cfg["blr"] * cfg["global_batch"] / 512
    cfg["preset"] = args.preset
    if cfg["img_size"] % cfg["mask_patch_size"]:
        raise ValueError(f"image size {cfg['img_size']} must be divisible by the mask block size {cfg['mask_patch_size']}")
    for key in ("epochs", "batch_size", "accum_steps", "save_every", "log_every"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {cfg[key]}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Model, data and optimiser for one run.
# ---------------------------------------------------------------------------------------------


def encoder_kwargs(cfg):
    """What build_encoder needs; stored in every checkpoint so eval_linear.py can rebuild it."""
    kw = dict(arch=cfg["arch"], img_size=cfg["img_size"])
    if not cfg["arch"].startswith("vit"):
        kw["width"] = cfg["width"]
    if cfg["drop_path"] is not None:
        kw["drop_path"] = cfg["drop_path"]
    return kw


def build_model(cfg, env):
    encoder = build_encoder(**encoder_kwargs(cfg))
    overrides = {k: cfg[k] for k in ABLATION_KEYS if cfg[k] is not None}
    model = A2MIM(encoder, method=cfg["method"], mask_patch_size=cfg["mask_patch_size"],
                  mask_ratio=cfg["mask_ratio"], **overrides)
    model.to(env.device)
    if encoder.family == "cnn" and env.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # faster convs under bf16
        if env.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # §6: SyncBN across GPUs
    return model


def build_optimizer(model, cfg, env):
    groups = param_groups(model, weight_decay=cfg["weight_decay"], token_lr_scale=cfg["token_lr_scale"])
    fused = env.device.type == "cuda"  # one kernel for all parameters
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, fused=fused)


def schedule_kwargs(cfg, steps_per_epoch):
    total = cfg["epochs"] * steps_per_epoch  # --max-steps stops early but keeps this schedule
    step_at = [cfg["step_epoch"] * steps_per_epoch] if cfg["step_epoch"] else []
    return dict(lr=cfg["lr"], total_steps=total, warmup_steps=round(cfg["warmup_epochs"] * steps_per_epoch),
                schedule=cfg["schedule"], min_lr=cfg["min_lr"], step_at=step_at)


def mask_generator(cfg, env, step):
    """Masks are a pure function of (seed, step, rank): a resumed run draws the same masks."""
    g = torch.Generator(device=env.device)
    g.manual_seed(cfg["seed"] * 1_000_003 + step * env.world_size + env.rank)
    return g


# ---------------------------------------------------------------------------------------------
# The run folder: out/<run-name>/{config.json, checkpoint.pt, log.jsonl, recon_*.png}
# ---------------------------------------------------------------------------------------------

# Settings that may change between the runs of one folder without making it "another run".
NOT_IDENTITY = {"epochs", "workers", "log_every", "save_every", "vis_every", "compile", "max_steps",
                "on_nonfinite", "run_name", "out_dir", "data_dir", "precision", "preset", "download", "device_data"}


def run_identity(cfg):
    return {k: v for k, v in cfg.items() if k not in NOT_IDENTITY}


def prepare_run_dir(cfg, args):
    """Decide between a fresh start and a resume; return (run_dir, checkpoint to resume or None).

    Re-running the same command resumes from the folder's checkpoint; a folder holding a
    different run is refused unless --overwrite (which then starts afresh) or --resume."""
    run_dir = os.path.join(cfg["out_dir"], cfg["run_name"] or f"{cfg['method']}_{cfg['arch']}_{cfg['data']}")
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    if args.resume:
        return run_dir, args.resume
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path) or args.overwrite:
        return run_dir, None
    try:
        with open(cfg_path) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        raise RunError(f"{cfg_path} is unreadable; pass --overwrite to start afresh in {run_dir}") from None
    if run_identity(previous) != run_identity(cfg):
        diff = sorted(k for k in run_identity(cfg) if previous.get(k) != cfg[k])
        raise RunError(f"{run_dir} holds a different run (differs in {', '.join(diff)}); "
                       "pass --run-name for a new folder, --resume to continue it, or --overwrite to start afresh")
    return run_dir, ckpt if os.path.exists(ckpt) else None


def restore(path, model, optimizer, scaler, cfg):
    """Load model/optimiser/scaler from a checkpoint of the same run; return its position and
    RNG state (restored only when resuming mid-epoch, after fast-forwarding the loader)."""
    state = load_checkpoint(path, arch=cfg["arch"])
    if run_identity(state["config"]) != run_identity(cfg):
        diff = sorted(k for k in run_identity(cfg) if state["config"].get(k) != cfg[k])
        raise CheckpointError(f"{path} was trained with other settings ({', '.join(diff)}); resume it with the same ones")
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["step"], state["epoch"], state["batch_in_epoch"], state["rng"]


def checkpoint_state(model, optimizer, scaler, cfg, step, epoch, batch_in_epoch):
    return dict(model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                config=cfg, encoder_kwargs=encoder_kwargs(cfg), method=cfg["method"], step=step, epoch=epoch,
                batch_in_epoch=batch_in_epoch, rng=rng_state())


def save_reconstructions(path, img_bchw, out, method, n=8):
    """One row per image: original | masked input | prediction | prediction pasted into the
    visible image (what the model had to invent, in context)."""
    from torchvision.utils import save_image
    from a2mim import mean_fill, resize_mask, zero_fill

    img, pred, mask = img_bchw[:n].float(), out["pred"][:n].detach().float(), out["mask"][:n]
    fill = mean_fill if method == "a2mim" else zero_fill
    m = resize_mask(mask, img.shape[-1]).float()
    rows = torch.stack([img, fill(img, mask), pred, img * (1 - m) + pred * m], dim=1)  # [n, 4, 3, H, W]
    mean = torch.tensor(data.IMAGENET_MEAN, device=img.device).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD, device=img.device).view(3, 1, 1)
    save_image((rows.flatten(0, 1) * std + mean).clamp(0, 1), path, nrow=4, padding=1)


# ---------------------------------------------------------------------------------------------
# The training loop.
# ---------------------------------------------------------------------------------------------


class NonFiniteLoss(Exception):
    pass


def trim_log(path, step):
    """Keep the log records of steps before `step`: a run killed after its last checkpoint
    logged steps that the resumed run will redo."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] < step]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(keep)
    os.replace(f"{path}.tmp", path)


class LossLog:
    """Keeps the step's loss tensors on the device and looks at them only every `log_every`
    steps, so a step never waits for the GPU; a NaN is still traced to the step it came from."""

    def __init__(self, path, is_main):
        self.path, self.is_main, self.window = path, is_main, []
        self.t0, self.images = time.time(), 0

    def add(self, step, out, images):
        parts = torch.stack([out["loss"], out["loss_spatial"], out["loss_freq"]]).detach().float()
        self.window.append((step, parts))
        self.images += images

    def flush(self, epoch, lr):
        """Check the window for NaN/inf, then append its mean to log.jsonl. Returns the record."""
        if not self.window:
            return None
        steps = [s for s, _ in self.window]
        parts = torch.stack([p for _, p in self.window]).cpu()  # the only host sync of the window
        bad = (~torch.isfinite(parts)).any(dim=1).nonzero()
        if len(bad):
            s, (loss, spa, freq) = steps[bad[0, 0]], parts[bad[0, 0]].tolist()
            raise NonFiniteLoss(f"non-finite loss at step {s} (loss={loss}, spatial={spa}, freq={freq})")
        elapsed = time.time() - self.t0
        rec = dict(step=steps[-1], epoch=epoch, lr=lr, img_per_s=round(self.images / max(elapsed, 1e-9), 1),
                   **dict(zip(("loss", "loss_spatial", "loss_freq"), parts.mean(0).tolist())))
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.window, self.t0, self.images = [], time.time(), 0
        return rec


def forward_backward(model, img, env, precision, scaler, *, accum=1, last=True, mask=None, generator=None):
    """One micro-step: forward under autocast, backward of loss/accum. DDP all-reduces the
    gradients only when `last` (the final micro-step of an accumulation group), via no_sync."""
    img = img.to(env.device, non_blocking=True)
    if unwrap(model).encoder.family == "cnn" and env.device.type == "cuda":
        img = img.contiguous(memory_format=torch.channels_last)
    sync = contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync()
    with sync:
        with autocast(env.device, precision):
            out = model(img, mask, generator=generator)
        scaler.scale(out["loss"] / accum).backward()
    return out


def train_epoch(model, loader, optimizer, scaler, cfg, env, pos, run_dir, log):
    """One epoch from batch `pos["batch"]` on (non-zero when resuming mid-epoch).
    `pos` = {"step", "epoch", "batch"} is updated in place."""
    accum, sched = cfg["accum_steps"], schedule_kwargs(cfg, len(loader) // cfg["accum_steps"])
    prec = resolve_precision(cfg["precision"], env.device)
    bar = tqdm(total=len(loader) // accum, initial=pos["batch"] // accum, disable=not env.is_main,
               desc=f"epoch {pos['epoch'] + 1}/{cfg['epochs']}", dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    lr = None
    for i, (img, _) in enumerate(loader):
        if i < pos["batch"]:  # resumed mid-epoch: fast-forward (same order: seeded sampler),
            if i == pos["batch"] - 1 and "rng" in pos:  # then continue the random streams
                set_rng_state(pos.pop("rng"))  # exactly where the checkpoint left them
            continue
        if i // accum >= len(loader) // accum:
            break  # an incomplete accumulation group at the end of the epoch is dropped
        micro = i % accum
        lr = lr_at(pos["step"], **sched)
        set_lr(optimizer, lr)
        gen = mask_generator(cfg, env, pos["step"] * accum + micro)
        out = forward_backward(model, img, env, prec, scaler, accum=accum, last=micro == accum - 1, generator=gen)
        log.add(pos["step"], out, img.shape[0] * env.world_size)
        if micro < accum - 1:
            continue

        # Optimiser step (optionally skipping a non-finite one, at the cost of a host sync).
        if cfg["on_nonfinite"] == "skip" and not torch.isfinite(out["loss"]).item():
            print(f"step {pos['step']}: non-finite loss, step skipped", file=sys.stderr)
            log.window.pop()
        else:
            if cfg["clip_grad"]:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        pos["step"] += 1
        pos["batch"] = i + 1
        bar.update(1)

        if pos["step"] % cfg["log_every"] == 0:
            rec = log.flush(pos["epoch"], lr)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
        if env.is_main and cfg["vis_every"] and pos["step"] % cfg["vis_every"] == 0:
            save_reconstructions(os.path.join(run_dir, f"recon_step{pos['step']:06d}.png"), img, out, cfg["method"])
        if cfg["max_steps"] and pos["step"] >= cfg["max_steps"]:
            break
    bar.close()
    log.flush(pos["epoch"], lr)


IN_MEMORY_DATASETS = ("fashion-mnist", "cifar10", "cifar100", "stl10", "fake")


def build_train_loader(cfg, env):
    """The pre-training batches and the number of images. Small datasets on a GPU live on the
    device as uint8 and are augmented there, batched (data.device_loader), so the GPU never
    waits for CPU workers; everything else goes through a DataLoader."""
    family = arch_family(cfg["arch"])
    on_device = cfg["device_data"] == "on" or (
        cfg["device_data"] == "auto" and env.device.type == "cuda" and cfg["data"] in data.DEVICE_DATASETS)
    if on_device:
        loader = data.device_loader(cfg["data"], "train", cfg["batch_size"], env.device, img_size=cfg["img_size"],
                                    family=family, seed=cfg["seed"], data_dir=cfg["data_dir"],
                                    world_size=env.world_size, rank=env.rank, download=cfg["download"])
        return loader, len(loader.images_nchw)
    train_set = data.build_dataset(cfg["data"], "train", data_dir=cfg["data_dir"], img_size=cfg["img_size"],
                                   transform="pretrain", family=family, download=cfg["download"])
    # On a CPU the in-memory datasets load faster in the main process than worker processes
    # fighting the training threads for the same cores; elsewhere data.py picks the workers.
    workers = cfg["workers"]
    if workers is None and env.device.type == "cpu" and cfg["data"] in IN_MEMORY_DATASETS:
        workers = 0
    loader = data.build_loader(train_set, cfg["batch_size"], train=True, distributed=env.enabled,
                               workers=workers, seed=cfg["seed"])
    return loader, len(train_set)


def run(cfg, args, env):
    """Build everything, restore if resuming, train epoch by epoch, checkpoint."""
    run_dir, resume_from = prepare_run_dir(cfg, args)
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    loader, n_images = build_train_loader(cfg, env)
    if len(loader) < cfg["accum_steps"]:
        raise RunError(f"{cfg['data']} has {n_images} training images: too few for one step of "
                       f"{cfg['batch_size']} × {cfg['accum_steps']} per process")
    model = build_model(cfg, env)
    optimizer = build_optimizer(model, cfg, env)
    scaler = torch.amp.GradScaler(env.device.type, enabled=resolve_precision(cfg["precision"], env.device) == "fp16")
    pos = dict(step=0, epoch=0, batch=0)
    if resume_from:
        pos["step"], pos["epoch"], pos["batch"], rng = restore(resume_from, model, optimizer, scaler, cfg)
        if pos["batch"]:
            pos["rng"] = rng
    if env.enabled:
        model = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if cfg["compile"]:
        model = torch.compile(model)

    ckpt_path, log_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "log.jsonl")
    if env.is_main:
        os.makedirs(run_dir, exist_ok=True)
        trim_log(log_path, pos["step"])  # fresh start: empty; resume: drop steps after the checkpoint
        cfg_path = os.path.join(run_dir, "config.json")
        with open(f"{cfg_path}.tmp", "w") as f:  # atomic, like the checkpoint
            json.dump(cfg, f, indent=2)
        os.replace(f"{cfg_path}.tmp", cfg_path)
        what = f"resuming at epoch {pos['epoch']}, step {pos['step']}" if resume_from else "starting"
        print(f"{cfg['method']} {cfg['arch']} on {cfg['data']} ({n_images} images, {cfg['img_size']} px), "
              f"{env.world_size} process(es) on {env.device.type}, global batch {cfg['global_batch']}, "
              f"lr {cfg['lr']:.3g}: {what} in {run_dir}")

    log = LossLog(log_path, env.is_main)
    steps_per_epoch = len(loader) // cfg["accum_steps"]
    while pos["epoch"] < cfg["epochs"]:
        data.set_epoch(loader, pos["epoch"])
        torch.manual_seed(cfg["seed"] + 1000 * (pos["epoch"] + 1) + env.rank)  # augmentation, drop path
        try:
            train_epoch(model, loader, optimizer, scaler, cfg, env, pos, run_dir, log)
        except NonFiniteLoss as e:
            kept = f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path) else "no checkpoint was written"
            raise NonFiniteLoss(f"{e}: stopped, {kept} (--on-nonfinite skip skips such steps)") from None
        if pos["batch"] >= steps_per_epoch * cfg["accum_steps"]:
            pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
        broadcast_buffers(model, env)
        stop = bool(cfg["max_steps"]) and pos["step"] >= cfg["max_steps"]
        due = pos["batch"] == 0 and (pos["epoch"] % cfg["save_every"] == 0 or pos["epoch"] == cfg["epochs"])
        if env.is_main and (due or stop):
            save_checkpoint(ckpt_path, checkpoint_state(model, optimizer, scaler, cfg, pos["step"], pos["epoch"], pos["batch"]))
        if stop:
            break
    if env.is_main:
        data_dir = f" --data-dir {cfg['data_dir']}" if cfg["data_dir"] else ""
        print(f"done: {pos['step']} steps, checkpoint {ckpt_path}\n"
              f"evaluate it with:  python eval_linear.py --checkpoint {ckpt_path} --data {cfg['data']}{data_dir}")
    return unwrap(model)


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        cfg = resolve_config(args, args.assume_world_size or int(os.environ.get("WORLD_SIZE", 1)))
        if args.print_config:
            print(json.dumps(cfg, indent=2))
            return 0
        run(cfg, args, setup_distributed())
    except (data.DataError, CheckpointError, RunError, NonFiniteLoss, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
