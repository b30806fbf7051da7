"""A²MIM pre-training, from a laptop CPU to multi-node torchrun (METHOD.md §6).

    python train.py                                        # default job: Fashion-MNIST, ResNet-18/16, CPU
    torchrun --nproc_per_node=8 train.py --arch resnet50 --data imagenet --data-dir /data/imagenet

--data imagenet (or --preset official) gets the paper's recipe for --arch (§6); every other dataset, an
image folder included, the small-data recipe (SETTINGS' defaults) at its image size; flags win over both;
the start line names the recipe, --print-config shows each value and its source. --init-from FILE starts
a new run from FILE's weights. SIGTERM / SIGUSR1 / Ctrl-C finish the step, checkpoint, exit 128 + signal;
rerun resumes.
"""

import argparse
import collections
import contextlib
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
from a2mim import A2MIM, mask_patch_size_for, method_defaults
from models import (
    ARCHS,
    CONVNEXT_DEPTHS,
    SMALL_INPUT,
    ConfigError,
    arch_family,
    build_encoder,
    token_site,
)
from reconstruct import RECON_COLUMNS, save_reconstructions
from runtime import (
    PRECISIONS,
    CheckpointError,
    RunError,
    append_line,
    atomic_save,
    autocast,
    broadcast_buffers,
    channels_last,
    cleanup_distributed,
    load_checkpoint,
    one_line,
    param_groups,
    read_jsonl,
    resolve_precision,
    rng_state,
    save_checkpoint,
    set_rng_state,
    set_scheduled_lr,
    setup_distributed,
    unwrap,
    user_errors,
)

# fmt: off
# Settings, written once: name (flag --name-with-dashes), small-data default, help, valid range ("[1,"
# at least 1, "(0,1)" strictly between; checked before anything runs) or choices, argparse extras.
S = collections.namedtuple("S", "name default help valid kw", defaults=("", {}))
SETTINGS = (
    S("arch", "resnet18", "encoder", ARCHS),
    S("data", "fashion-mnist", f"dataset: {', '.join(data.DATASETS)}"),
    S("data_dir", None, "where the dataset lives (see data.py for each layout)", kw=dict(type=str)),
    S("download", False, "let torchvision download fashion-mnist / cifar / stl10"),
    S("img_size", None, "training resolution (default: the dataset's, 224 for ImageNet)", "[1,", dict(type=int)),
    S("width", 16, "ResNet base width / ConvNeXt first-stage width", "[1,"),
    S("method", "a2mim", "a2mim, or simmim as released (§2, §3)", ("a2mim", "simmim")),
    S("mask_patch_size", None, "mask block in px (default: the one nearest img_size / 8, 32 px from 192 px, "
      "that fits the token site; §2)", "[1,", dict(type=int)),
    S("mask_ratio", 0.6, "fraction of the mask blocks masked (§2)", "(0,1)"),
    S("crop", None, "pre-training crop: cnn (0.8, 1), vit or simmim (0.67, 1); default: the family's (§6)",
      tuple(data.CROP_SCALE)),
    # §3–§5, the model's options; None = the arch's default in the released configs (a2mim.method_defaults).
    S("loss_recipe", "released", "released: per-arch Fourier term; paper: one for every arch (§5)",
      kw=dict(choices=("released", "paper"))),
    S("fill", None, "ablation: masked input filled with mean / zero, or none", ("mean", "zero", "none")),
    S("token_at", None, "ablation: token site, e.g. 'stem', 'layer3'", kw=dict(type=str)),
    S("token_mode", None, "ablation: how the token is written", ("gate", "add", "replace")),
    S("spatial", None, "ablation: pixel loss", ("focal_l1", "l1")),
    S("fft_weight", None, "ablation: λ of the Fourier loss (0 = off)", "[0,", dict(type=float)),
    S("fft_loss", None, "ablation: the Fourier loss", ("focal_frequency", "spectral_focal_l1")),
    S("fft_unmask_weight", None, "ablation: w of the 'mixed' image", "[0,1]", dict(type=float)),
    S("init_from", None, "a new run's encoder (mask token, decoder where they fit) from this file: a train.py "
      "checkpoint or a released OpenMixup one", kw=dict(type=str)),
    # §6, optimisation: lr = blr × global batch / 512.
    S("epochs", 2, "epochs of the lr schedule", "[1,"),
    S("batch_size", 128, "per process (per GPU); global = this × processes × accum", "[1,"),
    S("accum_steps", 1, "gradient accumulation micro-steps per optimiser step", "[1,"),
    S("blr", 4e-3, "base lr per 512 images (small data: a short-run lr)", "(0,"),
    S("min_lr", 1e-5, "absolute lr that every parameter group anneals to", "[0,"),
    S("warmup_epochs", 0.2, "linear warm-up", "[0,"),
    S("warmup_ratio", 0.0, "the warm-up starts at this fraction of the lr (released: 0 CNN, 2e-6 ViT)", "[0,1]"),
    S("schedule", "cosine", "cosine, or ×0.1 at --step-epoch", ("cosine", "step")),
    S("step_epoch", None, "epoch of the ×0.1 step (schedule 'step')", "[1,", dict(type=int)),
    S("weight_decay", 0.05, "AdamW decay (none on norms, biases, tokens: runtime.NO_DECAY)", "[0,"),
    S("token_lr_scale", 0.1, "lr multiplier of the mask token T", "[0,"),
    S("gamma_lr_scale", 0.1, "lr multiplier of the token's gate γ", "[0,"),
    S("gamma_weight_decay", 0.0, "weight decay of the token's gate γ", "[0,"),
    S("clip_grad", None, "max gradient norm (off in the CNN recipes)", "(0,", dict(type=float)),
    S("drop_path", None, "stochastic depth (default: the encoder's)", "[0,1)", dict(type=float)),
    S("sync_bn", True, "SyncBatchNorm for CNNs on several CUDA processes (§4)"),
    # How it runs.
    S("precision", "auto", "auto = bf16 on GPU, fp32 on CPU", PRECISIONS),
    S("compile", False, "torch.compile the model"),
    S("device_data", "auto", "small data held and augmented on the GPU (auto: on CUDA)", ("auto", "on", "off")),
    S("workers", None, "data loader workers per process", "[0,", dict(type=int)),
    S("threads", None, "torch CPU threads (2 cores shared with another job: use 1)", "[1,", dict(type=int)),
    S("seed", 0, "initial weights, masks, augmentation", "[0,4294967295]"),
    S("out_dir", "out", "folder of the run folders"),
    S("run_name", None, "sub-folder of --out-dir (default: method_arch_data)", kw=dict(type=str)),
    S("save_every", 1, "checkpoint every N epochs (and at the end)", "[1,"),
    S("save_every_steps", 0, "also every N optimiser steps (0 = off)", "[0,"),
    S("save_every_minutes", 0.0, "also every M minutes (0 = off)", "[0,"),
    S("vis_every", 200, "reconstruction PNG every N steps (0 = off)", "[0,"),
    S("log_every", 20, "log.jsonl line every N steps", "[1,"),
    S("max_steps", None, "stop after this many optimiser steps", "[1,", dict(type=int)),
    S("on_nonfinite", "stop", "non-finite loss: stop, or skip the step (and one with non-finite gradients)",
      kw=dict(choices=("stop", "skip"))),
)
# fmt: on

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
RECIPE_OF = {a: "ViT-S" if a in ("vit_tiny", "vit_small") else "ViT-B/L" if a.startswith("vit") else  # resnet18/34,
             "ConvNeXt" if a.startswith("convnext") else "ResNet" for a in ARCHS}  # vit_tiny: their family's
# fmt: on


def flag(name):
    return "--" + name.replace("_", "-")


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="(recipe): the (arch, data) recipe may set another value, see --print-config",
    )
    for s in SETTINGS:
        kw = (
            dict(s.kw, action=argparse.BooleanOptionalAction)
            if isinstance(s.default, bool)
            else dict(s.kw)
        )
        if isinstance(s.valid, tuple):
            kw["choices"] = s.valid
        elif s.default is not None and not isinstance(s.default, bool):
            kw["type"] = type(s.default)
        note = " (recipe)" if s.name in RECIPE_KEYS else ""
        p.add_argument(
            flag(s.name), default=None, help=f"{s.help}; default {s.default}{note}", **kw
        )
    p.add_argument(
        "--preset",
        choices=("auto", "official", "small", "none"),
        default="auto",
        help="auto: from (arch, data); official: the paper's recipe on any data; small (none): small-data",
    )
    p.add_argument("--resume", help="checkpoint to resume from (a run folder resumes itself)")
    p.add_argument(
        "--overwrite", action="store_true", help="start afresh in a folder that holds another run"
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print every resolved setting and its source, exit",
    )
    p.add_argument("--assume-world-size", type=int, help="resolve as if run on N processes")
    return p


def resolve_config(args, world_size=1):
    """Defaults < the (arch, data) recipe < the command line; then the derived batch and lr.
    cfg["source"] names where each value came from."""
    cli = {
        s.name: getattr(args, s.name) for s in SETTINGS if getattr(args, s.name, None) is not None
    }
    cfg = {s.name: s.default for s in SETTINGS}
    source = dict.fromkeys(cfg, "default")

    def layer(values, why):
        cfg.update(values)
        source.update(dict.fromkeys(values, why))

    preset = {"none": "small"}.get(args.preset, args.preset)
    if preset == "official" and "data" not in cli:
        layer(dict(data="imagenet"), "--preset official")
    name, arch = cli.get("data", cfg["data"]), cli.get("arch", cfg["arch"])
    size = cli.get(
        "img_size", data.dataset_info(name)["img_size"]
    )  # DataError for an unknown dataset
    # Only ImageNet takes the paper's recipe by itself: a folder of one's own images, at any size, is small data
    # (300 epochs at batch 256 per process would be a surprise); the start line says how to get the other one.
    recipe = (
        "paper"
        if preset == "official" or (preset == "auto" and name == "imagenet")
        else "small-data"
    )
    if recipe == "paper":
        layer(RECIPES[RECIPE_OF[arch]], f"arch recipe ({RECIPE_OF[arch]}, §6)")
        if arch == "resnet50" and cli.get("epochs") == 100:
            layer(R50_100_EPOCHS, "arch recipe (ResNet-50, 100 epochs, §6)")
        if (
            cli.get("method") == "simmim" and arch_family(arch) == "cnn"
        ):  # SimMIM's ResNet baseline as released
            layer(dict(blr=2e-4, token_lr_scale=1.0, crop="simmim"), "arch recipe (SimMIM, §3)")
    else:
        layer({k: cfg[k] for k in RECIPE_KEYS}, "small-data recipe")
        layer(SMALL_VIT if arch_family(arch) == "vit" else {}, "small-data recipe (ViT)")
        layer(dict(img_size=size), f"dataset recipe ({name})")
    layer(cli, "command line")
    for s in SETTINGS:  # every value against its range
        if isinstance(s.valid, str) and s.valid and cfg[s.name] is not None:
            check_range(s, cfg[s.name])
    if (
        cfg["mask_patch_size"] is None
    ):  # the dataset recipe's block: the preferred one that fits the token site (§2)
        layer(
            dict(
                mask_patch_size=mask_patch_size_for(
                    cfg["arch"],
                    cfg["img_size"],
                    method=cfg["method"],
                    token_at=cfg["token_at"],
                    mask_ratio=cfg["mask_ratio"],
                )
            ),
            f"dataset recipe ({name})",
        )
    resolve_model_options(cfg, source)
    check_run_name(cfg["run_name"])
    check_out_dir(cfg)
    if cfg["schedule"] == "step" and not cfg["step_epoch"]:
        raise ConfigError("--schedule step needs --step-epoch (the epoch of the ×0.1 step)")
    check_epochs(cfg, source)
    cfg["world_size"], cfg["global_batch"] = (
        world_size,
        cfg["batch_size"] * world_size * cfg["accum_steps"],
    )
    cfg["lr"] = cfg["blr"] * cfg["global_batch"] / 512
    if (
        source["min_lr"] == "command line" and cfg["min_lr"] > cfg["lr"]
    ):  # the cosine would climb to --min-lr
        raise ConfigError(
            f"--min-lr must be at most the peak lr {cfg['lr']:.3g} (--blr × global batch / 512), got "
            f"{cfg['min_lr']:g}; lower --min-lr or raise --blr"
        )
    source.update(
        world_size="processes",
        global_batch="batch_size × processes × accum_steps",
        lr="blr × global_batch / 512",
    )
    cfg["preset"], cfg["recipe"], cfg["source"] = preset, recipe, source
    return cfg


def resolve_model_options(cfg, source):
    """§3–§5: the options the model will take where the command line leaves them out, each with its source
    (a2mim.method_defaults: the arch's released config, SimMIM's, or --loss-recipe paper's Fourier term)."""
    defaults = method_defaults(cfg["arch"], cfg["method"], cfg["loss_recipe"])
    released = method_defaults(cfg["arch"], cfg["method"])
    for k, value in defaults.items():
        if source[k] == "command line":
            continue
        cfg[k] = value
        if (
            k == "token_at" and value is None
        ):  # the encoder's own A²MIM site, read off its class (no weights made)
            with torch.device("meta"):
                cfg[k] = token_site(build_encoder(**encoder_kwargs(cfg)))[0]
        if cfg["method"] == "simmim":
            source[k] = "method default (SimMIM as released, §3)"
        elif value != released[k]:
            source[k] = "--loss-recipe paper (§5)"
        else:
            source[k] = "arch default (released config)"


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


def recipe_line(cfg):
    """The recipe this run took, in one line, and the flag that gives the other one."""
    arch, family = cfg["arch"], RECIPE_OF[cfg["arch"]]
    given = [flag(k) for k in RECIPE_KEYS if cfg["source"][k] == "command line"]
    on_top = f"; from the command line: {', '.join(given)}" if given else ""
    if cfg["recipe"] == "paper":
        r = RECIPES[family]
        return (
            f"recipe: the paper's ImageNet recipe for {arch} ({family}, §6: {r['epochs']} epochs at "
            f"{r['img_size']} px, batch {r['batch_size']} × {r['accum_steps']} per process, blr {r['blr']:g}"
            f"{on_top}); --preset small for the small-data one"
        )
    small = {s.name: s.default for s in SETTINGS}
    width = f", width {small['width']}" if arch_family(arch) == "cnn" else ""
    return (
        f"recipe: small-data ({small['epochs']} epochs at {cfg['img_size']} px{width}, batch "
        f"{small['batch_size']} per process, blr {small['blr']:g}{on_top}); --preset official for the paper's "
        f"ImageNet recipe for {arch}"
    )


def check_range(s, value):
    """ConfigError unless value lies in s.valid ("[1," at least 1, "(0,1)" strictly between); NaN and ±inf never do
    (argparse's float() takes "inf" and "nan")."""
    lo, hi = s.valid[1:].rstrip(")]").split(",")
    above = value >= float(lo) if s.valid[0] == "[" else value > float(lo)  # False for nan
    below = not hi or (value <= float(hi) if s.valid[-1] == "]" else value < float(hi))
    bound = ("at least " if s.valid[0] == "[" else "greater than ") + lo
    want = f"in {s.valid[0]}{lo}, {hi}{s.valid[-1]}" if hi else bound
    if not math.isfinite(value):
        raise ConfigError(f"{flag(s.name)} must be a finite number {want}, got {value}")
    if not (above and below):
        raise ConfigError(f"{flag(s.name)} must be {want}, got {value}")


def check_run_name(name):
    """A run name is one folder under --out-dir: never a path that leads elsewhere."""
    if name is None:
        return
    if (
        name in ("", ".", "..")
        or "/" in name
        or os.sep in name
        or "\0" in name
        or len(name.encode()) > 255
    ):
        raise ConfigError(
            f"--run-name must be a plain folder name under --out-dir (no path separator, not '.', "
            f"'..' or empty, at most 255 bytes), got {name!r}"
        )


def check_epochs(cfg, source):
    """A warm-up longer than the run never ends, an lr step after it never happens: refused when the
    command line asks for it (a recipe's, under a shorter --epochs, is a note: schedule_note)."""
    for name in ("warmup_epochs", "step_epoch"):
        if source[name] == "command line" and cfg[name] is not None and cfg[name] > cfg["epochs"]:
            raise ConfigError(
                f"{flag(name)} must be at most --epochs ({cfg['epochs']}), got {cfg[name]:g}"
            )
    if source["step_epoch"] == "command line" and cfg["schedule"] != "step":
        raise ConfigError(
            f"--step-epoch is the epoch of the ×0.1 step of --schedule step; this run's schedule is "
            f"{cfg['schedule']}"
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
    if cfg["source"]["batch_size"].startswith("arch recipe") and paper != cfg["global_batch"]:
        return (
            f"note: the paper's {cfg['arch']} recipe is global batch {paper}, lr {recipe['blr'] * paper / 512:.3g} "
            f"(8 processes); this run: {cfg['world_size']} process(es), global batch {cfg['global_batch']}, "
            f"lr {cfg['lr']:.3g} (the same blr {cfg['blr']:g} per 512 images)"
        )
    return None


# --- Model, data and optimiser.
MODEL_OPTIONS = (
    "loss_recipe",
    "fill",
    "token_at",
    "token_mode",
    "spatial",
    "fft_weight",
    "fft_loss",
    "fft_unmask_weight",
)


def encoder_kwargs(cfg):
    """What build_encoder needs; stored in every checkpoint so eval_linear.py can rebuild it."""
    kw = dict(arch=cfg["arch"], img_size=cfg["img_size"], drop_path=cfg["drop_path"])
    return kw if arch_family(cfg["arch"]) == "vit" else kw | dict(width=cfg["width"])


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
    if (
        model.encoder.family == "cnn"
        and env.device.type == "cuda"
        and env.enabled
        and cfg["sync_bn"]
    ):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # §4: SyncBN across GPUs
    return model


def build_optimizer(model, cfg, env):
    groups = param_groups(
        model,
        weight_decay=cfg["weight_decay"],
        arch=cfg["arch"],
        token_lr_scale=cfg["token_lr_scale"],
        gamma_lr_scale=cfg["gamma_lr_scale"],
        gamma_weight_decay=cfg["gamma_weight_decay"],
    )
    return torch.optim.AdamW(
        groups, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, fused=env.device.type == "cuda"
    )


def mask_generator(cfg, env, step):
    """Masks are a pure function of (seed, step, rank): a resumed run draws the same masks."""
    return torch.Generator(device=env.device).manual_seed(
        cfg["seed"] * 1_000_003 + step * env.world_size + env.rank
    )


def build_train_loader(cfg, env):
    """(batches, number of images, folder read from, note or None). Small datasets on a GPU live on the device
    and are augmented there (data.device_loader); everything else goes through a DataLoader, whose recipe batch
    is lowered to the images of each process where it is larger (cfg changed, the note says so): a few images
    of one's own must pre-train. A --batch-size too large for the data is refused."""
    c, family = cfg, cfg["crop"] or arch_family(cfg["arch"])  # `family` picks data.CROP_SCALE
    on_device = c["device_data"] == "on" or (
        c["device_data"] == "auto" and env.device.type == "cuda" and c["data"] in data.IN_MEMORY
    )
    if on_device:
        loader = data.device_loader(
            c["data"],
            "train",
            c["batch_size"],
            env.device,
            img_size=c["img_size"],
            family=family,
            seed=c["seed"],
            data_dir=c["data_dir"],
            world_size=env.world_size,
            rank=env.rank,
            download=c["download"],
        )
        n, where, note = len(loader.images_nchw), loader.source, None
    else:
        dataset = data.build_dataset(
            c["data"],
            "train",
            data_dir=c["data_dir"],
            img_size=c["img_size"],
            transform="pretrain",
            family=family,
            download=c["download"],
        )
        n, where = len(dataset), dataset.source
        note = fit_batch(cfg, n)  # before the loader takes the batch size
    data.check_enough(n, c["batch_size"], c["accum_steps"], env.world_size, c["data"])
    if not on_device:
        # On a CPU the in-memory datasets load faster in the main process than in workers that
        # fight the training threads for the same cores.
        cpu = c["workers"] is None and env.device.type == "cpu" and c["data"] in data.IN_MEMORY
        loader = data.build_loader(
            dataset,
            c["batch_size"],
            train=True,
            distributed=env.enabled,
            workers=0 if cpu else c["workers"],
            seed=c["seed"],
        )
        loader.worker_init_fn = leave_stop_signals_to_the_trainer
    return loader, n, where, note


def fit_batch(cfg, n_images):
    """Lower a recipe's batch to the images each process gets (batch × accum of them) → the note that says so."""
    per_step = n_images // cfg["world_size"] // cfg["accum_steps"]
    if cfg["source"]["batch_size"] == "command line" or not 1 <= per_step < cfg["batch_size"]:
        return None
    recipe_batch, cfg["batch_size"] = cfg["batch_size"], per_step
    cfg["global_batch"] = per_step * cfg["world_size"] * cfg["accum_steps"]
    cfg["lr"] = cfg["blr"] * cfg["global_batch"] / 512
    cfg["source"]["batch_size"] = (
        f"the dataset's size (the recipe's {recipe_batch} is more than it holds)"
    )
    return (
        f"note: {cfg['data']} has {n_images} training images, fewer than the recipe's batch of {recipe_batch} "
        f"per process: batch {per_step} per process, global batch {cfg['global_batch']}, lr {cfg['lr']:.3g} "
        "(--batch-size sets another)"
    )


# --- The run folder: out/<run-name>/{config.json, checkpoint.pt, log.jsonl, recon_*.png, .lock}
# Settings that may change between the runs of one folder without making it "another run".
NOT_IDENTITY = {
    "epochs",
    "workers",
    "threads",
    "log_every",
    "save_every",
    "save_every_steps",
    "save_every_minutes",
    "vis_every",
    "compile",
    "max_steps",
    "on_nonfinite",
    "run_name",
    "out_dir",
    "data_dir",
    "precision",
    "preset",
    "download",
    "device_data",
    "source",
    "recipe",
    "init_parts",
}  # derived: the values the recipe set, the parts --init-from copied
Run = collections.namedtuple("Run", "dir ckpt log config")


def differs(previous, cfg):
    """The settings in which a stored config (config.json, a checkpoint's) and cfg make two different runs. A
    setting the stored run predates, or a model option it stored unresolved (null: the arch's default), is
    the same unless this command line sets it: a run started on older code resumes with the same command."""

    def same(k):
        if k not in previous or (previous[k] is None and k in MODEL_OPTIONS):
            return cfg["source"].get(k) != "command line"
        return previous[k] == cfg[k]

    return sorted(k for k in cfg if k not in NOT_IDENTITY and not same(k))


def check_processes(previous, cfg, what):
    """A run resumes only on the number of processes that wrote it: its global batch, its lr and each
    rank's data shard and random streams depend on that number."""
    n = previous.get("world_size", cfg["world_size"])
    if n != cfg["world_size"]:
        how = (
            "python train.py …"
            if n == 1
            else f"torchrun --nproc_per_node={n} train.py … (nodes × processes = {n})"
        )
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
    d = os.path.join(
        cfg["out_dir"], cfg["run_name"] or f"{cfg['method']}_{cfg['arch']}_{cfg['data']}"
    )
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
    return (
        f"the last good checkpoint {ckpt} is kept"
        if os.path.exists(ckpt)
        else "no checkpoint was written"
    )


def first_nonfinite(*state_dicts):
    """The first key whose tensor holds a NaN/inf in these (nested) state dicts, or None."""
    for k, v in (item for sd in state_dicts for item in sd.items()):
        if (
            first_nonfinite(v)
            if isinstance(v, dict)
            else v.is_floating_point() and not v.isfinite().all()
        ):
            return first_nonfinite(v) if isinstance(v, dict) else str(k)
    return None


def save(run, model, optimizer, scaler, cfg, env, pos):
    """Checkpoint at pos (step, epoch, batch): every rank takes part (BatchNorm buffers, its RNG
    state), rank 0 writes. A non-finite tensor is never written: the run stops instead."""
    broadcast_buffers(model, env)
    rngs = [rng_state()] * env.world_size
    if env.enabled:
        dist.all_gather_object(
            rngs, rng_state(), group=env.cpu_group
        )  # each rank resumes its own streams
    state = dict(
        model=unwrap(model).state_dict(),
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        config=cfg,
        encoder_kwargs=encoder_kwargs(cfg),
        method=cfg["method"],
        rng=rngs,
        **pos,
    )
    bad = first_nonfinite(state["model"], state["optimizer"]["state"])
    if bad:
        raise RunError(
            f"the weights became non-finite ({bad}) by step {pos['step']}: stopped; {kept(run.ckpt)}"
        )
    if env.is_main:
        save_checkpoint(run.ckpt, state)


def restore(path, model, optimizer, scaler, cfg, env, images):
    """Model, optimiser, scaler from a checkpoint of this run → (position, this rank's RNG), its settings."""
    state = load_checkpoint(path, arch=cfg["arch"])
    check_processes(state["config"], cfg, path)
    if diff := differs(state["config"], cfg):
        raise CheckpointError(
            f"{path} was trained with other settings ({', '.join(diff)}); "
            "resume it with the same ones"
        )
    if (
        state.get("images", images) != images
    ):  # the epoch's order and the position in it are over N images
        raise RunError(
            f"the dataset changed since {path} was written ({state['images']} images then, {images} now); "
            "resume it on the same images, or pass --run-name to start a new run"
        )
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    pos = dict(
        step=state["step"],
        epoch=state["epoch"],
        batch=state["batch"],
        images=images,
        rng=state["rng"][env.rank],
    )
    return pos, state["config"]


def check_not_older(run, path, step):
    """--resume of an older checkpoint into this run's folder would replace the later one there."""
    if not os.path.exists(run.ckpt) or os.path.samefile(path, run.ckpt):
        return
    later = load_checkpoint(run.ckpt)["step"]
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
        self.run, self.is_main, self.window, self.t0, self.images = run, is_main, [], time.time(), 0

    def add(self, step, out, images):
        self.window.append(
            (
                step,
                torch.stack([out["loss"], out["loss_spatial"], out["loss_freq"]]).detach().float(),
            )
        )
        self.images += images

    def check(self):
        """The window's (steps, losses [n, 3] on the CPU); RunError at the first step whose loss is not finite."""
        if not self.window:
            return (), torch.zeros(0, 3)
        steps, parts = zip(*self.window)
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
        rec = dict(
            step=steps[-1],
            epoch=epoch,
            lr=lr,
            img_per_s=round(self.images / elapsed, 1),
            **dict(zip(("loss", "loss_spatial", "loss_freq"), parts.mean(0).tolist())),
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
    SIGTERM / SIGUSR1 does not (a scheduler signals every process and torchrun forwards its own copy)."""

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
        self.loader, self.batches = loader, None

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


def forward_backward(
    model, img, env, precision, scaler, *, accum=1, last=True, mask=None, generator=None
):
    """One micro-step: forward under autocast, backward of loss / accum. DDP all-reduces the
    gradients only when `last` (the final micro-step of an accumulation group), via no_sync."""
    img = channels_last(
        img.to(env.device, non_blocking=True), unwrap(model).encoder.family, env.device
    )
    with model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext():
        with autocast(env.device, precision):
            out = model(img, mask, generator=generator)
        scaler.scale(out["loss"] / accum).backward()
    return out


def train(model, optimizer, scaler, loader, cfg, env, run, pos):
    """The pre-training loop (§2–§6) from pos (step, epoch, batch, images, rng) on → (pos, signal or 0)."""
    accum, steps_per_epoch = cfg["accum_steps"], len(loader) // cfg["accum_steps"]
    sched = dict(
        lr=cfg["lr"],
        total_steps=cfg["epochs"] * steps_per_epoch,
        schedule=cfg["schedule"],
        min_lr=cfg["min_lr"],
        warmup_steps=round(cfg["warmup_epochs"] * steps_per_epoch),
        warmup_ratio=cfg["warmup_ratio"],
        step_at=[cfg["step_epoch"] * steps_per_epoch] if cfg["step_epoch"] else [],
    )
    precision = resolve_precision(cfg["precision"], env.device)
    max_steps = min(cfg["max_steps"] or math.inf, cfg["epochs"] * steps_per_epoch)
    step, epoch, log, saved_at = (
        pos["step"],
        pos["epoch"],
        LossLog(run, env.is_main),
        time.monotonic(),
    )
    bar = tqdm(total=max_steps, initial=step, disable=not env.is_main, dynamic_ncols=True)
    with Stop() as stop, Batches(loader) as batches, bar:
        while True:
            # The epoch's order and augmentation are functions of (seed, epoch): resumed mid-epoch,
            # the loader starts at the next batch without reading the earlier ones, and this rank's
            # random streams continue where the checkpoint left them.
            torch.manual_seed(cfg["seed"] + 1000 * (epoch + 1) + env.rank)
            data.set_epoch(loader, epoch, start_batch=pos["batch"])
            rng = pos.pop("rng", None)
            if rng is not None and pos["batch"]:
                set_rng_state(rng)
            optimizer.zero_grad(set_to_none=True)
            for i, (img, _) in enumerate(batches.epoch(), start=pos["batch"]):
                if i >= steps_per_epoch * accum:
                    break  # an incomplete accumulation group at the end of the epoch is dropped
                micro = i % accum

                # 1. This step's lr: warm-up, then cosine (or ×0.1 steps); each parameter group from
                #    its own peak (lr × lr_scale) to the same absolute min lr (§6).
                lr = set_scheduled_lr(optimizer, step, **sched)

                # 2. Mask (§2; from seed, step and rank), fill, token (§3), encoder, decoder (§4) and
                #    loss (§5) are the model's forward; backward of loss / accum.
                out = forward_backward(
                    model,
                    img,
                    env,
                    precision,
                    scaler,
                    accum=accum,
                    last=micro == accum - 1,
                    generator=mask_generator(cfg, env, step * accum + micro),
                )
                log.add(step, out, img.shape[0] * env.world_size)
                if micro < accum - 1:
                    continue

                # 3. Optimiser step: clip (ViT recipe), AdamW. --on-nonfinite skip drops a step whose
                #    loss or gradients are not finite (one host sync per step).
                skip = cfg["on_nonfinite"] == "skip"
                if cfg["clip_grad"] or skip:
                    scaler.unscale_(optimizer)
                    norm = nn.utils.clip_grad_norm_(
                        model.parameters(), cfg["clip_grad"] or math.inf
                    )
                if (
                    skip
                    and all_max(env, not (torch.isfinite(norm) and torch.isfinite(out["loss"])))[0]
                ):
                    print(
                        f"step {step}: non-finite loss or gradients, step skipped", file=sys.stderr
                    )
                    log.window.pop()
                else:
                    scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update()

                # 4. Reconstruction PNG, checkpoint, log; stop on a signal (all ranks at this same step:
                #    the flags are all-reduced), at --max-steps or at the end.
                end = i + 1 == steps_per_epoch * accum
                here = dict(
                    step=step, epoch=epoch + end, batch=0 if end else i + 1, images=pos["images"]
                )
                if env.is_main and cfg["vis_every"] and step % cfg["vis_every"] == 0:
                    save_reconstructions(
                        os.path.join(run.dir, f"recon_step{step:06d}_{COLUMNS}.png"), img, out
                    )
                minutes = (
                    cfg["save_every_minutes"]
                    and time.monotonic() - saved_at >= 60 * cfg["save_every_minutes"]
                )
                signum, minutes = all_max(env, stop.signum, minutes)
                every = cfg["save_every_steps"] and step % cfg["save_every_steps"] == 0
                checkpoint = bool(
                    signum
                    or minutes
                    or step >= max_steps
                    or every
                    or (end and here["epoch"] % cfg["save_every"] == 0)
                )
                if checkpoint:
                    log.check()  # a NaN loss stops the run at its step, before any checkpoint of it
                    save(run, model, optimizer, scaler, cfg, env, here)
                    saved_at = time.monotonic()
                if checkpoint or step % cfg["log_every"] == 0:
                    rec = log.flush(
                        epoch, lr, checkpoint
                    )  # after the save: a marked record has its checkpoint
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
                if signum or step >= max_steps:
                    return here, signum
            epoch, pos["batch"] = epoch + 1, 0


def run(cfg, args, env):
    """Every check first (nothing written), then lock the folder and train. → (model, exit code)."""
    loader, n_images, where, batch_note = build_train_loader(
        cfg, env
    )  # first: it may lower the recipe's batch
    run_dir, resume_from, records = prepare_run_dir(cfg, args)
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    model = build_model(cfg, env)  # ConfigError when mask grid, token site and decoder do not fit
    optimizer = build_optimizer(model, cfg, env)
    scaler = torch.amp.GradScaler(
        env.device.type, enabled=resolve_precision(cfg["precision"], env.device) == "fp16"
    )
    pos, before = dict(step=0, epoch=0, batch=0, images=n_images), cfg
    if resume_from:  # the same run, exactly: --init-from's file is not read again (its parts are in the checkpoint)
        pos, before = restore(resume_from, model, optimizer, scaler, cfg, env, n_images)
        cfg["init_parts"] = before.get("init_parts")
    else:
        cfg["init_parts"] = init_from(model, cfg)
    if resume_from and not args.overwrite:
        check_not_older(run_dir, resume_from, pos["step"])
    if pos["step"] >= min(
        cfg["max_steps"] or math.inf, cfg["epochs"] * (len(loader) // cfg["accum_steps"])
    ):
        print(
            f"nothing to do: {run_dir.dir} has finished {pos['step']} steps ({pos['epoch']} epochs); raise --epochs "
            "or --max-steps to train on, or pass --overwrite to start afresh"
        )
        return unwrap(model), 0
    with locked(run_dir, env):
        if env.is_main:
            atomic_save(
                run_dir.config, json.dumps(cfg, indent=2)
            )  # first: a folder with our log has our config
            trim_log(
                run_dir.log, records, pos["step"]
            )  # fresh start: empty; resume: drop steps after the checkpoint
            what = (
                f"resuming at epoch {pos['epoch']}, step {pos['step']}"
                if resume_from
                else "starting"
            )
            if cfg["init_parts"] and not resume_from:
                what += f" from {cfg['init_from']} ({', '.join(p.replace('_', ' ') for p in cfg['init_parts'])})"
            print(
                f"{cfg['method']} {cfg['arch']} on {cfg['data']} ({n_images} images from {where}, {cfg['img_size']} px), "
                f"{env.world_size} process(es) on {env.device.type}, global batch {cfg['global_batch']}, "
                f"lr {cfg['lr']:.3g}: {what} in {run_dir.dir}"
            )
            notes = [
                recipe_line(cfg),
                batch_note,
                paper_note(cfg),
                schedule_note(cfg),
                before["epochs"] != cfg["epochs"]
                and f"note: --epochs is {cfg['epochs']}, the checkpoint's run planned {before['epochs']}: "
                f"the lr schedule from step {pos['step']} on is the {cfg['epochs']}-epoch one",
            ]
            print("".join(f"{note}\n" for note in notes if note), end="")
        if env.enabled:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
            )
        model = torch.compile(model) if cfg["compile"] else model
        pos, signum = train(model, optimizer, scaler, loader, cfg, env, run_dir, pos)
    if signum:
        print(
            f"stopped by {signal.Signals(signum).name} after step {pos['step']}: checkpoint {run_dir.ckpt} written; "
            "run the same command again to resume",
            file=sys.stderr,
        )
    elif env.is_main:
        data_dir = f" --data-dir {cfg['data_dir']}" if cfg["data_dir"] else ""
        print(
            f"done: {pos['step']} steps, checkpoint {run_dir.ckpt}\n"
            f"evaluate it with:  python eval_linear.py --checkpoint {run_dir.ckpt} --data {cfg['data']}{data_dir}"
        )
    return unwrap(model), 128 + signum if signum else 0


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
    if arch_family(arch) == "vit":
        return f"it holds a {arch} for {kw['img_size']}-px images: pass --img-size {kw['img_size']}"
    standard = CONVNEXT_DEPTHS[arch][1] if arch in CONVNEXT_DEPTHS else 64
    width = kw.get("width") or standard
    small = kw.get("small_stem", kw["img_size"] <= SMALL_INPUT)
    stem = (
        f"at most {SMALL_INPUT} (the small stem)"
        if small
        else f"above {SMALL_INPUT} (the standard stem)"
    )
    return f"it holds a {arch} of width {width}: pass --width {width} and an --img-size {stem}"


def assumed_world_size(args):
    """torchrun's process count, or --assume-world-size's, which only --print-config may take: a run computes
    its batch and lr from the processes that really run it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.assume_world_size is None:
        return world
    if args.assume_world_size < 1:
        raise ConfigError(f"--assume-world-size must be at least 1, got {args.assume_world_size}")
    if not args.print_config and args.assume_world_size != world:
        raise ConfigError(
            f"--assume-world-size only goes with --print-config; this run has {world} process(es) "
            f"(start {args.assume_world_size} with `torchrun --nproc_per_node={args.assume_world_size}`)"
        )
    return args.assume_world_size


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        cfg = resolve_config(args, assumed_world_size(args))
        if args.print_config:
            rows = [
                f"{k:<20} {json.dumps(v):<16} {cfg['source'].get(k, '')}"
                for k, v in cfg.items()
                if k != "source"
            ]
            notes = (recipe_line(cfg), paper_note(cfg), schedule_note(cfg))
            print("\n".join([*rows, *(note for note in notes if note)]))
            return 0
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        return run(cfg, args, setup_distributed())[1]
    except user_errors() as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
