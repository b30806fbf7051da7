"""A²MIM pre-training, from a laptop CPU to multi-node torchrun (METHOD.md §6).

    python train.py                                        # default job: Fashion-MNIST, ResNet-18/16, CPU
    torchrun --nproc_per_node=8 train.py --arch resnet50 --data imagenet --data-dir /data/imagenet

--data imagenet (or --preset official) gets the paper's recipe for --arch (§6); every other dataset, an
image folder included, the small-data recipe (SETTINGS' defaults) at its image size; flags win over both;
the start line names the recipe, --print-config shows each value and its origin. --init-from FILE starts
a new run from FILE's weights. SIGTERM / SIGUSR1 / Ctrl-C finish the step, checkpoint, exit 128 + signal;
rerun resumes.
"""

import argparse
import collections
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import signal
import sys
import tempfile
import time

# Set before torch loads libgomp: a short OpenMP spin, as bench.py explains; the user's own choice is kept.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
    os.environ["GOMP_SPINCOUNT"] = "3000"

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
import weights
from a2mim import A2MIM, LOSS_RECIPES, mask_patch_size_for, method_defaults
from models import (
    ARCHS,
    CONVNEXT_DEPTHS,
    SMALL_INPUT,
    arch_family,
    arch_kind,
    build_encoder,
    token_site,
)
from reconstruct import RECON_COLUMNS, save_reconstructions
from runtime import (
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION,
    POSITIVE,
    PRECISIONS,
    PRESETS,
    SEED,
    Checkpoint,
    CheckpointError,
    ConfigError,
    OPEN_UNIT,
    UNIT,
    RunError,
    Setting,
    add_settings,
    append_line,
    atomic_save,
    autocast,
    broadcast_buffers,
    channels_last,
    check_settings,
    command_line,
    config_table,
    entry_point,
    load_checkpoint,
    param_groups,
    read_jsonl,
    resolve_precision,
    rng_state,
    save_checkpoint,
    set_rng_state,
    set_scheduled_lr,
    setup_distributed,
    takes_paper_recipe,
    unwrap,
)


# fmt: off
# Every setting, once: --name-with-dashes, its small-data default, what it means, and what it takes (a Range,
# checked before anything runs, or choices). A default of None is decided later: by the recipe, the arch's
# released config or the dataset.
SETTINGS = (
    Setting(name="arch", default="resnet18", help="encoder", choices=ARCHS),
    Setting(name="data", default="fashion-mnist", help=f"dataset: {', '.join(data.DATASETS)}"),
    Setting(name="data_dir", type=str, help="where the dataset lives (see data.py for each layout)"),
    Setting(name="download", default=False, help="let torchvision download fashion-mnist / cifar / stl10"),
    Setting(name="img_size", type=int, range=AT_LEAST_1,
            help="training resolution (default: the dataset's, 224 for ImageNet)"),
    Setting(name="width", default=16, range=AT_LEAST_1, help="ResNet base width / ConvNeXt first-stage width"),
    Setting(name="method", default="a2mim", choices=("a2mim", "simmim"), help="a2mim, or simmim as released (§2, §3)"),
    Setting(name="mask_patch_size", type=int, range=AT_LEAST_1,
            help="mask block in px (default: the one nearest img_size / 8, 32 px from 192 px, that fits the token "
                 "site; §2)"),
    Setting(name="mask_ratio", default=0.6, range=OPEN_UNIT, help="fraction of the mask blocks masked (§2)"),
    Setting(name="crop", choices=tuple(data.CROP_SCALE),
            help="pre-training crop: cnn (0.8, 1), vit or simmim (0.67, 1); default: the family's (§6)"),
    # §3–§5, the model's options; None = the arch's default in the released configs (a2mim.method_defaults).
    Setting(name="loss_recipe", default="released", choices=LOSS_RECIPES,
            help="released: per-arch Fourier term; paper: one for every arch (§5)"),
    Setting(name="fill", choices=("mean", "zero", "none"),
            help="ablation: masked input filled with mean / zero, or none"),
    Setting(name="token_at", type=str, help="ablation: token site, e.g. 'stem', 'layer3'"),
    Setting(name="token_mode", choices=("gate", "add", "replace"), help="ablation: how the token is written"),
    Setting(name="spatial", choices=("focal_l1", "l1"), help="ablation: pixel loss"),
    Setting(name="fft_weight", type=float, range=AT_LEAST_0, help="ablation: λ of the Fourier loss (0 = off)"),
    Setting(name="fft_loss", choices=("focal_frequency", "spectral_focal_l1"), help="ablation: the Fourier loss"),
    Setting(name="fft_unmask_weight", type=float, range=UNIT, help="ablation: w of the 'mixed' image"),
    Setting(name="init_from", type=str,
            help="a new run's encoder (mask token, decoder where they fit) from this file: a train.py checkpoint "
                 "or a released OpenMixup one"),
    # §6, optimisation: lr = blr × global batch / 512.
    Setting(name="epochs", default=2, range=AT_LEAST_1, help="epochs of the lr schedule"),
    Setting(name="batch_size", default=128, range=AT_LEAST_1,
            help="per process (per GPU); global = this × processes × accum"),
    Setting(name="accum_steps", default=1, range=AT_LEAST_1,
            help="gradient accumulation micro-steps per optimiser step"),
    Setting(name="blr", default=4e-3, range=POSITIVE, help="base lr per 512 images (small data: a short-run lr)"),
    Setting(name="min_lr", default=1e-5, range=AT_LEAST_0, help="absolute lr that every parameter group anneals to"),
    Setting(name="warmup_epochs", default=0.2, range=AT_LEAST_0, help="linear warm-up"),
    Setting(name="warmup_ratio", default=0.0, range=UNIT,
            help="the warm-up starts at this fraction of the lr (released: 0 CNN, 2e-6 ViT)"),
    Setting(name="schedule", default="cosine", choices=("cosine", "step"), help="cosine, or ×0.1 at --step-epoch"),
    Setting(name="step_epoch", type=int, range=AT_LEAST_1, help="epoch of the ×0.1 step (schedule 'step')"),
    Setting(name="weight_decay", default=0.05, range=AT_LEAST_0,
            help="AdamW decay (none on norms, biases, tokens: runtime.NO_DECAY)"),
    Setting(name="token_lr_scale", default=0.1, range=AT_LEAST_0, help="lr multiplier of the mask token T"),
    Setting(name="gamma_lr_scale", default=0.1, range=AT_LEAST_0, help="lr multiplier of the token's gate γ"),
    Setting(name="gamma_weight_decay", default=0.0, range=AT_LEAST_0, help="weight decay of the token's gate γ"),
    Setting(name="clip_grad", type=float, range=POSITIVE, help="max gradient norm (off in the CNN recipes)"),
    Setting(name="drop_path", type=float, range=FRACTION, help="stochastic depth (default: the encoder's)"),
    Setting(name="sync_bn", default=True, help="SyncBatchNorm for CNNs on several CUDA processes (§4)"),
    # How it runs.
    Setting(name="precision", default="auto", choices=PRECISIONS, help="auto = bf16 on GPU, fp32 on CPU"),
    Setting(name="compile", default=False, help="torch.compile the model"),
    Setting(name="device_data", default="auto", choices=("auto", "on", "off"),
            help="small data held and augmented on the GPU (auto: on CUDA)"),
    Setting(name="workers", type=int, range=AT_LEAST_0, help="data loader workers per process"),
    Setting(name="threads", type=int, range=AT_LEAST_1,
            help="torch CPU threads (2 cores shared with another job: use 1)"),
    Setting(name="seed", default=0, range=SEED, help="initial weights, masks, augmentation"),
    Setting(name="out_dir", default="out", help="folder of the run folders"),
    Setting(name="run_name", type=str, help="sub-folder of --out-dir (default: method_arch_data)"),
    Setting(name="save_every", default=1, range=AT_LEAST_1, help="checkpoint every N epochs (and at the end)"),
    Setting(name="save_every_steps", default=0, range=AT_LEAST_0, help="also every N optimiser steps (0 = off)"),
    Setting(name="save_every_minutes", default=0.0, range=AT_LEAST_0, help="also every M minutes (0 = off)"),
    Setting(name="vis_every", default=200, range=AT_LEAST_0, help="reconstruction PNG every N steps (0 = off)"),
    Setting(name="log_every", default=20, range=AT_LEAST_1, help="log.jsonl line every N steps"),
    Setting(name="max_steps", type=int, range=AT_LEAST_1, help="stop after this many optimiser steps"),
    Setting(name="on_nonfinite", default="stop", choices=("stop", "skip"),
            help="non-finite loss: stop, or skip the step (and one with non-finite gradients)"),
)
# fmt: on
SETTING = {s.name: s for s in SETTINGS}
DEFAULTS = {s.name: s.default for s in SETTINGS}

# fmt: off
# §6, the released ImageNet configs: 8 processes, global batch 2048.
RESNET = dict(img_size=224, width=64, epochs=300, batch_size=256, accum_steps=1, blr=3e-4,
              min_lr=1e-5, warmup_epochs=10, schedule="cosine", weight_decay=0.05, clip_grad=None, sync_bn=True,
              token_lr_scale=0.1, gamma_lr_scale=1.0, gamma_weight_decay=0.05)  # γ as in the 300-epoch configs
R50_100_EPOCHS = dict(gamma_lr_scale=0.1, gamma_weight_decay=0.0)  # r50_l3_sz224_init_8xb256_cos_ep100
VIT = dict(img_size=224, warmup_ratio=2e-6, epochs=800, batch_size=128, accum_steps=2, blr=1e-4, warmup_epochs=10,
           schedule="step", step_epoch=700, weight_decay=0.05, clip_grad=5.0, drop_path=0.1, token_lr_scale=1.0)
RECIPES = {"ResNet": RESNET, "ConvNeXt": RESNET | dict(width=None) | R50_100_EPOCHS,
           "ViT-S": VIT | dict(batch_size=256, accum_steps=1), "ViT-B/L": VIT}
RECIPE_KEYS = sorted(set().union(*RECIPES.values()))
SMALL_VIT = dict(token_lr_scale=1.0)  # the small-data recipe, where a ViT's released configs differ
# Each arch takes its kind's recipe; the small ViTs (vit_tiny is ours) the ViT-S one, resnet18/34 ResNet-50's.
KIND_RECIPE = {"resnet": "ResNet", "convnext": "ConvNeXt", "vit": "ViT-B/L"}
RECIPE_OF = {a: KIND_RECIPE[arch_kind(a)] for a in ARCHS} | {"vit_tiny": "ViT-S", "vit_small": "ViT-S"}
# fmt: on


def shown_default(s):
    """--help's default of a setting; the (arch, data) recipe may set another (--print-config shows it)."""
    if s.name in RECIPE_KEYS:
        return f"{s.default_text()}, or the recipe's"
    return s.default_text()


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="or the recipe's: the (arch, data) recipe may set another value, see --print-config",
    )
    add_settings(p, SETTINGS, describe_default=shown_default)
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="auto",
        help="auto: the paper's recipe on --data imagenet, the small-data one elsewhere; official: the "
        "paper's on any data; small: the small-data one",
    )
    p.add_argument("--resume", help="checkpoint to resume from (a run folder resumes itself)")
    p.add_argument(
        "--overwrite", action="store_true", help="start afresh in a folder that holds another run"
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print every resolved setting and its origin, exit",
    )
    p.add_argument("--assume-world-size", type=int, help="resolve as if run on N processes")
    return p


# --- Settings: defaults < the (arch, data) recipe < the command line.
def resolve_config(args, world_size=1):
    """Defaults < the (arch, data) recipe < the command line; then the derived batch and lr.
    cfg["origin"] names the layer each value came from."""
    cli = command_line(args, SETTINGS)
    cfg = dict(DEFAULTS)
    origin = dict.fromkeys(cfg, "default")

    def layer(values, why):
        cfg.update(values)
        origin.update(dict.fromkeys(values, why))

    if args.preset == "official" and "data" not in cli:
        layer(dict(data="imagenet"), "--preset official")
    name, arch = cli.get("data", cfg["data"]), cli.get("arch", cfg["arch"])
    info = data.dataset_info(name)  # DataError for an unknown dataset
    size = cli.get("img_size", info["img_size"])
    # Only ImageNet takes the paper's recipe by itself: a folder of one's own images, at any size, is small
    # data (300 epochs at batch 256 per process would be a surprise); the start line says how to get the other.
    recipe = "paper" if takes_paper_recipe(args.preset, name) else "small-data"
    for values, why in recipe_layers(recipe, arch, name, size, cli):
        layer(values, why)
    layer(cli, "command line")
    check_settings(SETTINGS, cfg)
    if cfg["mask_patch_size"] is None:
        # The dataset recipe's block: the preferred one that fits the token site (§2).
        block = mask_patch_size_for(
            cfg["arch"],
            cfg["img_size"],
            method=cfg["method"],
            token_at=cfg["token_at"],
            mask_ratio=cfg["mask_ratio"],
        )
        layer(dict(mask_patch_size=block), f"dataset recipe ({name})")
    resolve_model_options(cfg, origin)
    check_run_name(cfg["run_name"])
    check_out_dir(cfg)
    cfg["world_size"] = world_size
    cfg["global_batch"] = cfg["batch_size"] * world_size * cfg["accum_steps"]
    cfg["lr"] = cfg["blr"] * cfg["global_batch"] / 512
    check_schedule(cfg, origin)
    origin.update(
        world_size="processes",
        global_batch="batch_size × processes × accum_steps",
        lr="blr × global_batch / 512",
    )
    cfg["preset"], cfg["recipe"], cfg["origin"] = args.preset, recipe, origin
    return cfg


def recipe_layers(recipe, arch, name, size, cli):
    """The recipe's (values, origin) layers, laid in order over the defaults: the paper's for the arch (§6),
    or the small-data one at the dataset's image size."""
    if recipe == "small-data":
        layers = [({k: DEFAULTS[k] for k in RECIPE_KEYS}, "small-data recipe")]
        if arch_kind(arch) == "vit":
            layers.append((SMALL_VIT, "small-data recipe (ViT)"))
        layers.append((dict(img_size=size), f"dataset recipe ({name})"))
        return layers
    paper = RECIPE_OF[arch]
    layers = [(RECIPES[paper], f"arch recipe ({paper}, §6)")]
    if arch == "resnet50" and cli.get("epochs") == 100:
        layers.append((R50_100_EPOCHS, "arch recipe (ResNet-50, 100 epochs, §6)"))
    if cli.get("method") == "simmim" and arch_family(arch) == "cnn":
        # SimMIM's ResNet baseline as released.
        simmim = dict(blr=2e-4, token_lr_scale=1.0, crop="simmim")
        layers.append((simmim, "arch recipe (SimMIM, §3)"))
    return layers


def resolve_model_options(cfg, origin):
    """§3–§5: the options the model will take where the command line leaves them out, each with its origin
    (a2mim.method_defaults: the arch's released config, SimMIM's, or --loss-recipe paper's Fourier term)."""
    defaults = method_defaults(cfg["arch"], cfg["method"], cfg["loss_recipe"])
    released = method_defaults(cfg["arch"], cfg["method"])
    for k, value in defaults.items():
        if origin[k] == "command line":
            continue
        cfg[k] = value
        if k == "token_at" and value is None:
            # The encoder's own A²MIM site, read off its class (no weights made).
            with torch.device("meta"):
                cfg[k] = token_site(build_encoder(**encoder_kwargs(cfg)))[0]
        if cfg["method"] == "simmim":
            origin[k] = "method default (SimMIM as released, §3)"
        elif value != released[k]:
            origin[k] = "--loss-recipe paper (§5)"
        else:
            origin[k] = "arch default (released config)"


def check_out_dir(cfg):
    """A run folder inside the image folder would be walked as training images (its recon_*.png) by the next run."""
    if cfg["data"] != "folder" or cfg["data_dir"] is None:
        return
    out, images = os.path.realpath(cfg["out_dir"]), os.path.realpath(cfg["data_dir"])
    if os.path.commonpath([out, images]) == images:
        raise ConfigError(
            f"--out-dir {cfg['out_dir']} lies inside --data-dir {cfg['data_dir']}, where the next "
            "run would read this run's reconstruction PNGs as training images; choose an --out-dir "
            "outside it"
        )


def check_run_name(name):
    """A run name is one folder under --out-dir: never a path that leads elsewhere."""
    if name is None:
        return
    special = name in ("", ".", "..")
    a_path = "/" in name or os.sep in name or "\0" in name
    if special or a_path or len(name.encode()) > 255:
        raise ConfigError(
            f"--run-name must be a plain folder name under --out-dir (no path separator, not '.', "
            f"'..' or empty, at most 255 bytes), got {name!r}"
        )


def check_schedule(cfg, origin):
    """The lr schedule the command line asks for must happen: a step schedule needs its epoch, a warm-up or
    an lr step after the run never comes, a min lr above the peak would be climbed to. The recipe's own,
    under a shorter --epochs or a smaller batch, is a note instead (schedule_note)."""
    if cfg["schedule"] == "step" and not cfg["step_epoch"]:
        raise ConfigError("--schedule step needs --step-epoch (the epoch of the ×0.1 step)")
    for name in ("warmup_epochs", "step_epoch"):
        given = origin[name] == "command line" and cfg[name] is not None
        if given and cfg[name] > cfg["epochs"]:
            raise ConfigError(
                f"{SETTING[name].flag} must be at most --epochs ({cfg['epochs']}), got {cfg[name]:g}"
            )
    if origin["step_epoch"] == "command line" and cfg["schedule"] != "step":
        raise ConfigError(
            f"--step-epoch is the epoch of the ×0.1 step of --schedule step; this run's schedule is "
            f"{cfg['schedule']}"
        )
    if origin["min_lr"] == "command line" and cfg["min_lr"] > cfg["lr"]:
        raise ConfigError(
            f"--min-lr must be at most the peak lr {cfg['lr']:.3g} (--blr × global batch / 512), got "
            f"{cfg['min_lr']:g}; lower --min-lr or raise --blr"
        )


def recipe_line(cfg):
    """The recipe this run took, in one line, and the flag that gives the other one."""
    arch, family = cfg["arch"], RECIPE_OF[cfg["arch"]]
    given = [SETTING[k].flag for k in RECIPE_KEYS if cfg["origin"][k] == "command line"]
    on_top = f"; from the command line: {', '.join(given)}" if given else ""
    if cfg["recipe"] == "paper":
        r = RECIPES[family]
        return (
            f"recipe: the paper's ImageNet recipe for {arch} ({family}, §6: {r['epochs']} epochs at "
            f"{r['img_size']} px, batch {r['batch_size']} × {r['accum_steps']} per process, "
            f"blr {r['blr']:g}{on_top}); --preset small for the small-data one"
        )
    small = DEFAULTS
    width = f", width {small['width']}" if arch_family(arch) == "cnn" else ""
    return (
        f"recipe: small-data ({small['epochs']} epochs at {cfg['img_size']} px{width}, batch "
        f"{small['batch_size']} per process, blr {small['blr']:g}{on_top}); --preset official for "
        f"the paper's ImageNet recipe for {arch}"
    )


def schedule_note(cfg):
    """One line when the recipe's schedule does not fit this run: a warm-up or lr step beyond a shorter
    --epochs, a min lr above the peak lr of a smaller global batch."""
    misfits = []
    if cfg["warmup_epochs"] > cfg["epochs"]:
        misfits.append(
            f"its {cfg['warmup_epochs']:g} warm-up epochs outlast --epochs {cfg['epochs']} (the lr rises "
            "all along)"
        )
    if (cfg["step_epoch"] or 0) > cfg["epochs"]:
        misfits.append(f"its ×0.1 lr step at epoch {cfg['step_epoch']} never comes")
    if cfg["min_lr"] > cfg["lr"]:
        misfits.append(
            f"its min lr {cfg['min_lr']:g} is above the peak lr {cfg['lr']:.3g} (the lr climbs to it)"
        )
    if misfits:
        return f"note: the recipe's schedule does not fit this run: {'; '.join(misfits)}"
    return None


def paper_note(cfg):
    """One line when the paper's recipe runs at another global batch than on the paper's 8 processes."""
    recipe = RECIPES[RECIPE_OF[cfg["arch"]]]
    paper = recipe["batch_size"] * recipe["accum_steps"] * 8
    if not cfg["origin"]["batch_size"].startswith("arch recipe") or paper == cfg["global_batch"]:
        return None
    return (
        f"note: the paper's {cfg['arch']} recipe is global batch {paper}, "
        f"lr {recipe['blr'] * paper / 512:.3g} (8 processes); this run: {cfg['world_size']} process(es), "
        f"global batch {cfg['global_batch']}, lr {cfg['lr']:.3g} (the same blr {cfg['blr']:g} per 512 images)"
    )


def epochs_note(before, cfg, step):
    """One line when a resumed run's --epochs is not its checkpoint's: the lr schedule changes from `step` on."""
    if before["epochs"] == cfg["epochs"]:
        return None
    return (
        f"note: --epochs is {cfg['epochs']}, the checkpoint's run planned {before['epochs']}: "
        f"the lr schedule from step {step} on is the {cfg['epochs']}-epoch one"
    )


def print_config(cfg):
    """--print-config: each setting, its value and origin, then the recipe line and any note."""
    settings = {k: v for k, v in cfg.items() if k != "origin"}
    notes = [recipe_line(cfg), paper_note(cfg), schedule_note(cfg)]
    print("\n".join(config_table(settings, cfg["origin"]) + [n for n in notes if n]))


def assumed_world_size(args):
    """torchrun's process count, or --assume-world-size's, which only --print-config may take: a run computes
    its batch and lr from the processes that really run it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.assume_world_size is None:
        return world
    AT_LEAST_1.check("--assume-world-size", args.assume_world_size)
    if not args.print_config and args.assume_world_size != world:
        raise ConfigError(
            f"--assume-world-size only goes with --print-config; this run has {world} process(es) "
            f"(start {args.assume_world_size} with `torchrun --nproc_per_node={args.assume_world_size}`)"
        )
    return args.assume_world_size


# --- Model, data and optimiser.
# fmt: off
MODEL_OPTIONS = ("loss_recipe", "fill", "token_at", "token_mode", "spatial", "fft_weight", "fft_loss",
                 "fft_unmask_weight")  # §3–§5: the A2MIM constructor's options
# fmt: on


def encoder_kwargs(cfg):
    """What build_encoder needs; stored in every checkpoint so eval_linear.py can rebuild it."""
    kw = dict(arch=cfg["arch"], img_size=cfg["img_size"], drop_path=cfg["drop_path"])
    if arch_family(cfg["arch"]) == "vit":
        return kw
    return kw | dict(width=cfg["width"])


def build_model(cfg, env):
    """A2MIM around the encoder; ConfigError when mask grid, token site and decoder do not fit."""
    model = A2MIM(
        build_encoder(**encoder_kwargs(cfg)),
        method=cfg["method"],
        mask_patch_size=cfg["mask_patch_size"],
        mask_ratio=cfg["mask_ratio"],
        **{k: cfg[k] for k in MODEL_OPTIONS},
    ).to(env.device)
    model = channels_last(model, model.encoder.family, env.device)
    several_gpus = env.device.type == "cuda" and env.enabled
    if model.encoder.family == "cnn" and several_gpus and cfg["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # §4: SyncBN across GPUs
    return model


def build_optimizer(model, cfg, env):
    groups = param_groups(
        model,
        weight_decay=cfg["weight_decay"],
        kind=arch_kind(cfg["arch"]),
        token_lr_scale=cfg["token_lr_scale"],
        gamma_lr_scale=cfg["gamma_lr_scale"],
        gamma_weight_decay=cfg["gamma_weight_decay"],
    )
    return torch.optim.AdamW(
        groups, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, fused=env.device.type == "cuda"
    )


def init_from(model, cfg):
    """--init-from FILE: its encoder into the new run's model (strictly), its mask token and decoder where they
    fit (weights.load_into) → the parts copied, or None without --init-from. CheckpointError, one sentence
    naming the flags that build FILE's encoder, when it does not fit this one."""
    if cfg["init_from"] is None:
        return None
    found = weights.load_pretrained(cfg["init_from"], arch=cfg["arch"])
    try:
        return weights.load_into(unwrap(model), found)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {encoder_flags(found['encoder_kwargs'])}") from None


def encoder_flags(kw):
    """What builds the encoder of these encoder_kwargs (a train.py checkpoint's, or a released file's: standard
    width and stem), in flags: a CNN's width and stem (set by the image size), a ViT's image size."""
    arch = kw["arch"]
    if arch_kind(arch) == "vit":
        return f"it holds a {arch} for {kw['img_size']}-px images: pass --img-size {kw['img_size']}"
    standard = CONVNEXT_DEPTHS[arch][1] if arch_kind(arch) == "convnext" else 64
    width = kw.get("width") or standard
    if kw.get("small_stem", kw["img_size"] <= SMALL_INPUT):
        stem = f"at most {SMALL_INPUT} (the small stem)"
    else:
        stem = f"above {SMALL_INPUT} (the standard stem)"
    return f"it holds a {arch} of width {width}: pass --width {width} and an --img-size {stem}"


def mask_generator(cfg, env, index):
    """Masks are a pure function of (seed, micro-step index, rank): a resumed run draws the same masks."""
    seed = cfg["seed"] * 1_000_003 + index * env.world_size + env.rank
    return torch.Generator(device=env.device).manual_seed(seed)


def build_train_loader(cfg, env):
    """(batches, number of images, folder read from, note or None). Small datasets on a GPU live on the device
    and are augmented there (data.device_loader); everything else goes through a DataLoader, whose recipe batch
    is lowered to the images of each process where it is larger (cfg changed, the note says so): a few images
    of one's own must pre-train. A --batch-size too large for the data is refused."""
    crop = cfg["crop"] or arch_family(cfg["arch"])  # by default, the encoder family's crop (§6)
    small_on_gpu = env.device.type == "cuda" and cfg["data"] in data.IN_MEMORY
    if cfg["device_data"] == "on" or (cfg["device_data"] == "auto" and small_on_gpu):
        loader = data.device_loader(
            cfg["data"],
            "train",
            cfg["batch_size"],
            env.device,
            img_size=cfg["img_size"],
            crop=crop,
            seed=cfg["seed"],
            data_dir=cfg["data_dir"],
            world_size=env.world_size,
            rank=env.rank,
            download=cfg["download"],
        )
        n = len(loader.images_nchw)
        data.check_enough(n, cfg["batch_size"], cfg["accum_steps"], env.world_size, cfg["data"])
        return loader, n, loader.source, None
    dataset = data.build_dataset(
        cfg["data"],
        "train",
        data_dir=cfg["data_dir"],
        img_size=cfg["img_size"],
        transform="pretrain",
        crop=crop,
        download=cfg["download"],
    )
    n = len(dataset)
    note = fit_batch(cfg, n)  # before the loader takes the batch size
    data.check_enough(n, cfg["batch_size"], cfg["accum_steps"], env.world_size, cfg["data"])
    # On a CPU the in-memory datasets load faster in the main process than in workers that
    # fight the training threads for the same cores.
    in_process = (
        cfg["workers"] is None and env.device.type == "cpu" and cfg["data"] in data.IN_MEMORY
    )
    loader = data.build_loader(
        dataset,
        cfg["batch_size"],
        train=True,
        distributed=env.enabled,
        workers=0 if in_process else cfg["workers"],
        seed=cfg["seed"],
    )
    loader.worker_init_fn = leave_stop_signals_to_the_trainer
    return loader, n, dataset.source, note


def fit_batch(cfg, n_images):
    """Lower a recipe's batch to the images each process gets (batch × accum of them) → the note that says so."""
    per_step = n_images // cfg["world_size"] // cfg["accum_steps"]
    if cfg["origin"]["batch_size"] == "command line" or not 1 <= per_step < cfg["batch_size"]:
        return None
    recipe_batch = cfg["batch_size"]
    cfg["batch_size"] = per_step
    cfg["global_batch"] = per_step * cfg["world_size"] * cfg["accum_steps"]
    cfg["lr"] = cfg["blr"] * cfg["global_batch"] / 512
    cfg["origin"]["batch_size"] = (
        f"the dataset's size (the recipe's {recipe_batch} is more than it holds)"
    )
    return (
        f"note: {cfg['data']} has {n_images} training images, fewer than the recipe's batch of "
        f"{recipe_batch} per process: batch {per_step} per process, global batch {cfg['global_batch']}, "
        f"lr {cfg['lr']:.3g} (--batch-size sets another)"
    )


def lr_schedule(cfg, steps_per_epoch):
    """set_scheduled_lr's keywords (§6): the peak lr, the warm-up and the decay, in optimiser steps."""
    step_at = [cfg["step_epoch"] * steps_per_epoch] if cfg["step_epoch"] else []
    return dict(
        lr=cfg["lr"],
        total_steps=cfg["epochs"] * steps_per_epoch,
        schedule=cfg["schedule"],
        min_lr=cfg["min_lr"],
        warmup_steps=round(cfg["warmup_epochs"] * steps_per_epoch),
        warmup_ratio=cfg["warmup_ratio"],
        step_at=step_at,
    )


def final_step(cfg, loader):
    """The optimiser step the run ends at: --max-steps, or the end of its last epoch."""
    steps_per_epoch = len(loader) // cfg["accum_steps"]
    return min(cfg["max_steps"] or math.inf, cfg["epochs"] * steps_per_epoch)


# --- The run folder: out/<run-name>/{config.json, checkpoint.pt, log.jsonl, recon_*.png, .lock}
# Settings that may change between the runs of one folder without making it "another run". A config.json
# of older code holds its provenance as "source": a key that cfg lacks is never compared.
# fmt: off
NOT_IDENTITY = {"epochs", "workers", "threads", "log_every", "save_every", "save_every_steps", "save_every_minutes",
                "vis_every", "compile", "max_steps", "on_nonfinite", "run_name", "out_dir", "data_dir", "precision",
                "preset", "download", "device_data",
                # derived: each value's origin, the recipe taken, the parts --init-from copied
                "origin", "recipe", "init_parts"}
# fmt: on
Run = collections.namedtuple("Run", "dir ckpt log config")


def differs(previous, cfg):
    """The settings in which a stored config (config.json, a checkpoint's) and cfg make two different runs. A
    setting the stored run predates, or a model option it stored unresolved (null: the arch's default), is
    the same unless this command line sets it: a run started on older code resumes with the same command."""

    def same(k):
        if k not in previous or (previous[k] is None and k in MODEL_OPTIONS):
            return cfg["origin"].get(k) != "command line"
        return previous[k] == cfg[k]

    return sorted(k for k in cfg if k not in NOT_IDENTITY and not same(k))


def check_processes(previous, cfg, what):
    """A run resumes only on the number of processes that wrote it: its global batch, its lr and each
    rank's data shard and random streams depend on that number."""
    n = previous.get("world_size", cfg["world_size"])
    if n == cfg["world_size"]:
        return
    if n == 1:
        how = "python train.py …"
    else:
        how = f"torchrun --nproc_per_node={n} train.py … (nodes × processes = {n})"
    raise RunError(
        f"{what} was written by {n} process(es) and resumes only on {n} (the global batch, the lr and "
        f"each rank's data shard depend on it), not on {cfg['world_size']}: continue it with `{how}`"
    )


def read_config(run):
    try:
        with open(run.config) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict):
        raise RunError(
            f"{run.config} is unreadable or not a train.py config; pass --overwrite to start afresh in "
            f"{run.dir}"
        )
    return previous


def read_log(run):
    """log.jsonl's records; a torn last line (a kill in mid-write) is dropped and said, other damage refused."""
    records = read_jsonl(run.log, drop_torn_last=True)
    for r in records:
        if not isinstance(r.get("step"), int):
            raise RunError(
                f"{run.log} holds a record without a step ({json.dumps(r)[:60]}); fix or remove that line"
            )
    return records


def check_writable(d):
    parent = d
    while not os.path.exists(parent):
        parent = os.path.dirname(parent) or "."
    if not os.path.isdir(parent):
        raise RunError(f"cannot create the output folder {d}: {parent} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=parent).close()  # can we write there? (gone again at once)
    except OSError as e:
        raise RunError(
            f"cannot write the output folder {d}: {parent} is not writable ({e.strerror})"
        ) from None


def check_files(run, args):
    """Our names in the folder are our files, and --resume names a file."""
    for path in (run.ckpt, run.log, run.config, os.path.join(run.dir, ".lock")):
        if os.path.lexists(path) and not os.path.isfile(path):
            raise RunError(
                f"{path} is not a file (a folder, or a link to nothing), where train.py keeps its "
                f"{os.path.basename(path)}; move it away"
            )
    if args.resume and os.path.isdir(args.resume):
        raise RunError(
            f"--resume {args.resume} is a folder; name the checkpoint in it "
            f"({os.path.join(args.resume, 'checkpoint.pt')})"
        )


def prepare_run_dir(cfg, args):
    """(Run, checkpoint to resume or None, log.jsonl's records), writing nothing. The same command resumes;
    a folder of another run or of someone else's files is refused (--resume of another run's checkpoint
    into it too), and so is one whose checkpoint went missing, unless --overwrite: afresh."""
    name = cfg["run_name"] or f"{cfg['method']}_{cfg['arch']}_{cfg['data']}"
    d = os.path.join(cfg["out_dir"], name)
    run = Run(d, *(os.path.join(d, f) for f in ("checkpoint.pt", "log.jsonl", "config.json")))
    check_writable(d)
    check_files(run, args)
    if args.overwrite:
        return run, args.resume, []
    if os.path.exists(run.config):
        previous = read_config(run)
        check_processes(previous, cfg, d)
        if diff := differs(previous, cfg):
            raise RunError(
                f"{d} holds a different run (differs in {', '.join(diff)}); pass --run-name for a new "
                "folder, or --overwrite to start afresh there"
            )
    elif os.path.isdir(d) and set(os.listdir(d)) - {".lock"} and not os.path.exists(run.ckpt):
        # Someone else's files (a checkpoint.pt without its config.json: restore checks that it is this run's).
        raise RunError(
            f"{d} holds files but no config.json: not a train.py run folder (or its config.json was "
            "removed); pass --run-name for a new folder, or --overwrite to use this one anyway"
        )
    records = read_log(run)
    resume = args.resume or (run.ckpt if os.path.exists(run.ckpt) else None)
    saved = [r["step"] for r in records if r.get("checkpoint")]
    if resume is None and saved:
        raise RunError(
            f"{d} has a log and a config but no checkpoint.pt (log.jsonl records one written after step "
            f"{saved[-1] + 1}): put it back to resume, or pass --overwrite to start afresh"
        )
    return run, resume, records


def all_max(env, *flags):
    """The element-wise max of integer flags over all ranks (a CPU all-reduce): every rank agrees."""
    t = torch.tensor([int(f) for f in flags])
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.cpu_group)
    return t.tolist()


def all_finite(env, *tensors):
    """Whether these tensors are finite on every rank (one host sync): the ranks skip a step together."""
    bad = not all(torch.isfinite(t).all() for t in tensors)
    return not all_max(env, bad)[0]


@contextlib.contextmanager
def locked(run, env):
    """An exclusive flock on <run>/.lock held by rank 0 (a kill -9 releases it too): a second
    train.py on the same folder is refused instead of mixing logs and checkpoints."""
    fd, problem = None, ""
    if env.is_main:
        os.makedirs(run.dir, exist_ok=True)
        lock = os.path.join(run.dir, ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            problem = f"another train.py is running in {run.dir}; wait for it to end, or use another --run-name"
        except OSError as e:  # e.g. a read-only .lock of another user
            problem = f"cannot lock {lock} ({e.strerror}); remove it (train.py makes a new one)"
    try:
        if all_max(env, bool(problem))[0]:
            raise RunError(problem or f"rank 0 could not lock {run.dir}")
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def kept(ckpt):
    if os.path.exists(ckpt):
        return f"the last good checkpoint {ckpt} is kept"
    return "no checkpoint was written"


def first_nonfinite(*state_dicts):
    """The first key whose tensor holds a NaN/inf in these (nested) state dicts, or None."""
    for state in state_dicts:
        for k, v in state.items():
            if isinstance(v, dict):
                inner = first_nonfinite(v)
                if inner is not None:
                    return inner
            elif v.is_floating_point() and not v.isfinite().all():
                return str(k)
    return None


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a run stands: `step` optimiser steps done, in `epoch`, whose loader batch `batch` comes next (a
    multiple of accum_steps), over an epoch of `images` images (its order is a function of that number)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    images: int | None = None

    def after_step(self, accum, steps_per_epoch):
        """The position after one more optimiser step (`accum` batches); after an epoch's last, the next epoch."""
        batch = self.batch + accum
        if batch == accum * steps_per_epoch:
            return dataclasses.replace(self, step=self.step + 1, epoch=self.epoch + 1, batch=0)
        return dataclasses.replace(self, step=self.step + 1, batch=batch)


def save(run, model, optimizer, scaler, cfg, env, pos):
    """Checkpoint at `pos`: every rank takes part (BatchNorm buffers, its RNG state), rank 0 writes.
    A non-finite tensor is never written: the run stops instead."""
    broadcast_buffers(model, env)
    rngs = [rng_state()] * env.world_size
    if env.enabled:
        # Each rank resumes its own streams.
        dist.all_gather_object(rngs, rng_state(), group=env.cpu_group)
    ckpt = Checkpoint(
        model=unwrap(model).state_dict(),
        config=cfg,
        encoder_kwargs=encoder_kwargs(cfg),
        method=cfg["method"],
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        rng=rngs,
        **dataclasses.asdict(pos),
    )
    bad = first_nonfinite(ckpt.model, ckpt.optimizer["state"])
    if bad:
        raise RunError(
            f"the weights became non-finite ({bad}) by step {pos.step}: stopped; {kept(run.ckpt)}"
        )
    if env.is_main:
        save_checkpoint(run.ckpt, ckpt)


def restore(path, model, optimizer, scaler, cfg, env, images):
    """Model, optimiser and scaler from a checkpoint of this run → (its Position, this rank's RNG state,
    its settings)."""
    ckpt = load_checkpoint(path, arch=cfg["arch"])
    check_processes(ckpt.config, cfg, path)
    if diff := differs(ckpt.config, cfg):
        raise CheckpointError(
            f"{path} was trained with other settings ({', '.join(diff)}); "
            "resume it with the same ones"
        )
    # The epoch's order and the position in it are over N images (a checkpoint of older code: unknown).
    if ckpt.images is not None and ckpt.images != images:
        raise RunError(
            f"the dataset changed since {path} was written ({ckpt.images} images then, {images} now); "
            "resume it on the same images, or pass --run-name to start a new run"
        )
    unwrap(model).load_state_dict(ckpt.model)
    optimizer.load_state_dict(ckpt.optimizer)
    scaler.load_state_dict(ckpt.scaler)
    pos = Position(step=ckpt.step, epoch=ckpt.epoch, batch=ckpt.batch, images=images)
    return pos, ckpt.rng[env.rank], ckpt.config


def check_not_older(run, path, step):
    """--resume of an older checkpoint into this run's folder would replace the later one there."""
    if not os.path.exists(run.ckpt) or os.path.samefile(path, run.ckpt):
        return
    later = load_checkpoint(run.ckpt).step
    if later > step:
        raise RunError(
            f"--resume {path} is at step {step}, but {run.ckpt} is at the later step {later}, which "
            f"resuming here would replace; to go on from step {step}, pass --run-name for a new folder, "
            "or --overwrite to replace it"
        )


def trim_log(path, records, step):
    """Keep the records of steps before `step`: a killed run logged steps the resumed one redoes."""
    if records or os.path.exists(path):
        atomic_save(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] < step))


COLUMNS = "-".join(RECON_COLUMNS)  # the PNG's columns, named in its file name


# --- The training loop.
class LossLog:
    """Losses stay on the device until a flush every log_every steps (one host sync): it traces a NaN
    to its step and appends the window's mean to log.jsonl, marked "checkpoint": true at a step whose
    checkpoint was written (so that a folder whose checkpoint.pt went missing is recognised)."""

    def __init__(self, run, is_main):
        self.run = run
        self.is_main = is_main
        self.window = []  # (step, [loss, loss_spatial, loss_freq] on the device), one per micro-step
        self.t0 = time.time()
        self.images = 0

    def add(self, step, out, images):
        parts = torch.stack([out["loss"], out["loss_spatial"], out["loss_freq"]])
        self.window.append((step, parts.detach().float()))
        self.images += images

    def skip_step(self, step):
        """A step skipped by --on-nonfinite skip: said, and its losses forgotten (its NaN does not stop the run)."""
        print(f"step {step}: non-finite loss or gradients, step skipped", file=sys.stderr)
        self.window = [(s, parts) for s, parts in self.window if s != step]

    def check(self):
        """The window's (steps, losses [n, 3] on the CPU); RunError at the first step whose loss is not finite."""
        if not self.window:
            return (), torch.zeros(0, 3)
        steps, parts = zip(*self.window, strict=True)
        parts = torch.stack(parts).cpu()
        bad = (~torch.isfinite(parts)).any(dim=1).nonzero()
        if len(bad):
            s, (loss, spa, freq) = steps[bad[0, 0]], parts[bad[0, 0]].tolist()
            raise RunError(
                f"non-finite loss at step {s} (loss={loss}, spatial={spa}, freq={freq}): stopped, "
                f"{kept(self.run.ckpt)} (--on-nonfinite skip skips such steps)"
            )
        return steps, parts

    def flush(self, epoch, lr, checkpoint=False):
        steps, parts = self.check()
        if not steps:
            return dict(loss=math.nan, img_per_s=0)  # every step of the window was skipped
        elapsed = max(time.time() - self.t0, 1e-9)
        loss, spatial, freq = parts.mean(0).tolist()
        rec = dict(
            step=steps[-1],
            epoch=epoch,
            lr=lr,
            img_per_s=round(self.images / elapsed, 1),
            loss=loss,
            loss_spatial=spatial,
            loss_freq=freq,
        )
        if checkpoint:
            rec["checkpoint"] = True
        if self.is_main:
            append_line(self.run.log, json.dumps(rec))
        self.window, self.t0, self.images = [], time.time(), 0
        return rec


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stop(contextlib.AbstractContextManager):
    """SIGTERM, SIGUSR1 (what schedulers send before a kill) and Ctrl-C only set `signum`: the loop
    finishes its step, checkpoints, exits 128 + signal. A second Ctrl-C ends it at once; a repeated
    SIGTERM / SIGUSR1 does not (a scheduler signals every process and torchrun forwards its own copy).
    Leaving it puts the previous handlers back."""

    def __enter__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.catch) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def catch(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if self.signum:
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step", file=sys.stderr)


class Batches(contextlib.AbstractContextManager):
    """The loader's batches, one pass per epoch(), whose DataLoader workers end when the loop is left however
    it is left. A worker ignores the stop signals (leave_stop_signals_to_the_trainer): one left running by an
    error, its pass kept alive by the traceback, would outlive train.py, whose exit (multiprocessing's) sends
    it a SIGTERM and waits for it for ever."""

    def __init__(self, loader):
        self.loader = loader
        self.batches = None

    def epoch(self):
        self.batches = iter(self.loader)
        return self.batches

    def __exit__(self, *exc):
        # torch's own ending of a pass's workers (what the pass runs when it is collected); none without workers
        shutdown = getattr(self.batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def leave_stop_signals_to_the_trainer(worker_id):
    """A DataLoader worker's init: torchrun, a scheduler or a terminal signal the whole process group, and
    a worker killed by that would fail the step that the training process finishes before it checkpoints
    (Stop); the training process ends its workers itself."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def checkpoint_due(cfg, pos, *, stopping, time_up):
    """Whether the step that reached `pos` ends with a checkpoint: the run stops there (a signal, --max-steps,
    the end), --save-every-minutes is up, every --save-every-steps steps, after every --save-every-th epoch."""
    if stopping or time_up:
        return True
    if cfg["save_every_steps"] and pos.step % cfg["save_every_steps"] == 0:
        return True
    epoch_ended = pos.batch == 0
    return epoch_ended and pos.epoch % cfg["save_every"] == 0


def train(model, optimizer, scaler, loader, cfg, env, run, pos, rng=None):
    """The pre-training loop (§2–§6) from `pos` on; `rng`: this rank's random streams at `pos`, where the
    run resumes. → (the position reached, the stop signal or 0)."""
    accum = cfg["accum_steps"]
    # An incomplete accumulation group at the end of an epoch is dropped.
    steps_per_epoch = len(loader) // accum
    schedule = lr_schedule(cfg, steps_per_epoch)
    last_step = final_step(cfg, loader)
    skip_nonfinite = cfg["on_nonfinite"] == "skip"
    max_norm = cfg["clip_grad"] or math.inf
    precision = resolve_precision(cfg["precision"], env.device)
    family = unwrap(model).encoder.family
    log = LossLog(run, env.is_main)
    saved_at = time.monotonic()
    bar = tqdm(total=last_step, initial=pos.step, disable=not env.is_main, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    with Stop() as stop, Batches(loader) as batches, bar:
        while True:
            # The epoch's order and augmentation are functions of (seed, epoch): resumed mid-epoch, the
            # loader starts at the next batch without reading the earlier ones, and this rank's random
            # streams continue where the checkpoint left them.
            epoch = pos.epoch
            torch.manual_seed(cfg["seed"] + 1000 * (epoch + 1) + env.rank)
            data.set_epoch(loader, epoch, start_batch=pos.batch)
            if rng is not None and pos.batch > 0:
                set_rng_state(rng)
            rng = None  # the resumed epoch's only
            epoch_batches = batches.epoch()
            for _ in range(pos.batch // accum, steps_per_epoch):  # the epoch's optimiser steps left
                # 1. This step's lr: warm-up, then cosine (or ×0.1 steps); each parameter group from
                #    its own peak (lr × lr_scale) to the same absolute min lr (§6).
                lr = set_scheduled_lr(optimizer, pos.step, **schedule)

                # 2. accum micro-steps. Mask (§2; from seed, micro-step and rank), fill, token (§3),
                #    encoder, decoder (§4) and loss (§5) are the model's forward; backward of loss / accum.
                #    DDP all-reduces the gradients in the last micro-step's backward only.
                for micro_step in range(accum):
                    img, _ = next(epoch_batches)
                    img = channels_last(img.to(env.device, non_blocking=True), family, env.device)
                    masks = mask_generator(cfg, env, pos.step * accum + micro_step)
                    last = micro_step == accum - 1
                    sync = model.no_sync() if env.enabled and not last else contextlib.nullcontext()
                    with sync:
                        with autocast(env.device, precision):
                            out = model(img, generator=masks)
                        scaler.scale(out["loss"] / accum).backward()
                    log.add(pos.step, out, img.shape[0] * env.world_size)

                # 3. Optimiser step: clip (ViT recipe), AdamW. --on-nonfinite skip drops a step whose
                #    loss or gradients are not finite (one host sync per step).
                if cfg["clip_grad"] or skip_nonfinite:
                    scaler.unscale_(optimizer)
                    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                if skip_nonfinite and not all_finite(env, norm, out["loss"]):
                    log.skip_step(pos.step)
                else:
                    scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                pos = pos.after_step(accum, steps_per_epoch)
                bar.update()

                # 4. Reconstruction PNG, checkpoint, log; stop on a signal (all ranks at this same step:
                #    the flags are all-reduced), at --max-steps or at the end.
                if env.is_main and cfg["vis_every"] and pos.step % cfg["vis_every"] == 0:
                    png = os.path.join(run.dir, f"recon_step{pos.step:06d}_{COLUMNS}.png")
                    save_reconstructions(png, img, out)
                minutes = cfg["save_every_minutes"]
                time_up = minutes > 0 and time.monotonic() - saved_at >= 60 * minutes
                signum, time_up = all_max(env, stop.signum, time_up)
                stopping = bool(signum) or pos.step >= last_step
                checkpoint = checkpoint_due(cfg, pos, stopping=stopping, time_up=time_up)
                if checkpoint:
                    log.check()  # a NaN loss stops the run at its step, before any checkpoint of it
                    save(run, model, optimizer, scaler, cfg, env, pos)
                    saved_at = time.monotonic()
                if checkpoint or pos.step % cfg["log_every"] == 0:
                    # After the save: a record marked "checkpoint" has its checkpoint.
                    rec = log.flush(epoch, lr, checkpoint)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
                if stopping:
                    return pos, signum


def say_start(cfg, env, run, pos, where, resumed, notes):
    """The start line (what trains on what, where, from where) and the notes."""
    if resumed:
        what = f"resuming at epoch {pos.epoch}, step {pos.step}"
    elif cfg["init_parts"]:
        parts = ", ".join(p.replace("_", " ") for p in cfg["init_parts"])
        what = f"starting from {cfg['init_from']} ({parts})"
    else:
        what = "starting"
    print(
        f"{cfg['method']} {cfg['arch']} on {cfg['data']} ({pos.images} images from {where}, "
        f"{cfg['img_size']} px), {env.world_size} process(es) on {env.device.type}, "
        f"global batch {cfg['global_batch']}, lr {cfg['lr']:.3g}: {what} in {run.dir}"
    )
    for note in notes:
        if note:
            print(note)


def run(cfg, args, env):
    """Every check first (nothing written), then lock the folder and train. → (model, exit code)."""
    # The loader first: it may lower the recipe's batch.
    loader, n_images, where, batch_note = build_train_loader(cfg, env)
    run_dir, resume_from, records = prepare_run_dir(cfg, args)
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    model = build_model(cfg, env)  # ConfigError when mask grid, token site and decoder do not fit
    optimizer = build_optimizer(model, cfg, env)
    fp16 = resolve_precision(cfg["precision"], env.device) == "fp16"
    scaler = torch.amp.GradScaler(env.device.type, enabled=fp16)
    pos, rng, before = Position(images=n_images), None, cfg
    if resume_from:
        # The same run, exactly: --init-from's file is not read again (its parts are in the checkpoint).
        pos, rng, before = restore(resume_from, model, optimizer, scaler, cfg, env, n_images)
        cfg["init_parts"] = before.get("init_parts")
        if not args.overwrite:
            check_not_older(run_dir, resume_from, pos.step)
    else:
        cfg["init_parts"] = init_from(model, cfg)
    if pos.step >= final_step(cfg, loader):
        print(
            f"nothing to do: {run_dir.dir} has finished {pos.step} steps ({pos.epoch} epochs); "
            "raise --epochs or --max-steps to train on, or pass --overwrite to start afresh"
        )
        return unwrap(model), 0
    with locked(run_dir, env):
        if env.is_main:
            # The config first: a folder with our log has our config.
            atomic_save(run_dir.config, json.dumps(cfg, indent=2))
            # A fresh start empties the log; a resume drops the steps after its checkpoint.
            trim_log(run_dir.log, records, pos.step)
            notes = [
                recipe_line(cfg),
                batch_note,
                paper_note(cfg),
                schedule_note(cfg),
                epochs_note(before, cfg, pos.step),
            ]
            say_start(cfg, env, run_dir, pos, where, bool(resume_from), notes)
        if env.enabled:
            device_ids = [env.local_rank] if env.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if cfg["compile"]:
            model = torch.compile(model)
        pos, signum = train(model, optimizer, scaler, loader, cfg, env, run_dir, pos, rng)
    if signum:
        print(
            f"stopped by {signal.Signals(signum).name} after step {pos.step}: checkpoint "
            f"{run_dir.ckpt} written; run the same command again to resume",
            file=sys.stderr,
        )
        return unwrap(model), 128 + signum
    if env.is_main:
        data_dir = f" --data-dir {cfg['data_dir']}" if cfg["data_dir"] else ""
        print(
            f"done: {pos.step} steps, checkpoint {run_dir.ckpt}\n"
            f"evaluate it with:  python eval_linear.py --checkpoint {run_dir.ckpt} "
            f"--data {cfg['data']}{data_dir}"
        )
    return unwrap(model), 0


@entry_point
def main(argv=None):
    args = get_parser().parse_args(argv)
    cfg = resolve_config(args, assumed_world_size(args))
    if args.print_config:
        print_config(cfg)
        return 0
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    return run(cfg, args, setup_distributed())[1]


if __name__ == "__main__":
    sys.exit(main())
