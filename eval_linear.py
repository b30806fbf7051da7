"""Evaluate a pre-trained encoder the ways the field does (METHOD.md §7).

    python eval_linear.py                                    # probe train.py's default run, if it exists
    python eval_linear.py --init random --arch resnet18      # the baseline: same probe, random encoder
    python eval_linear.py --checkpoint CKPT --finetune       # fine-tune every weight
    python eval_linear.py --checkpoint CKPT --labels-per-class 10   # low-label probe (10 images a class)
    python eval_linear.py --checkpoint CKPT --export r50.pth # torchvision state dict, then exit
    python eval_linear.py --checkpoint vit_base_full.pth --export vit_b.pth --export-to timm   # a released file
    torchrun --nproc_per_node=8 eval_linear.py --checkpoint CKPT --data imagenet --data-dir /data/imagenet --finetune

Settings: laptop default < checkpoint < §7's arch recipe (by itself on ImageNet or an image folder at
>= 192 px) < command line (`--print-config` shows each value's origin); lr = blr × global batch / 256.
"""

import argparse
import json
import math
import os
import sys
import time

# Set before torch loads libgomp: a short OpenMP spin, as bench.py explains; the user's own choice is kept.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
    os.environ["GOMP_SPINCOUNT"] = "3000"

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import v2
from tqdm import tqdm

import data
import models
import weights
from a2mim import default_grid, interaction_strength, sample_pairs
from runtime import (
    PRECISIONS,
    CheckpointError,
    RunError,
    append_line,
    autocast,
    channels_last,
    cleanup_distributed,
    lr_at,
    one_line,
    param_groups,
    read_jsonl,
    resolve_precision,
    set_lr,
    setup_distributed,
    user_errors,
)

DEFAULT_CHECKPOINT = os.path.join(
    "out", "a2mim_resnet18_fashion-mnist", "checkpoint.pt"
)  # train.py's default run


class EvalError(RunError):
    """A run that must not start (conflicting settings, a diverged head): one sentence, exit 2."""


# fmt: off
# Settings, written once: the parser, --help and --print-config come from this table.
SETTINGS = [  # name, type or choices, laptop default ({mode: value} where modes differ), valid range, meaning
    ("data", str, None, None, f"dataset: {', '.join(data.DATASETS)} (default: the checkpoint's, else fashion-mnist)"),
    ("data_dir", str, None, None, "where the dataset lives (see data.py)"),
    ("img_size", int, None, "> 0", "training resolution (default: the encoder's)"),
    ("test_size", int, None, "> 0", "evaluation centre crop (default: --img-size)"),
    ("test_resize", int, None, "> 0", "resize before that crop (arch recipes; default test size / 0.875)"),
    ("labels_per_class", int, None, "> 0", "train on K images per class (seeded, class-balanced)"),
    ("subset_seed", int, 0, None, "seed of the --labels-per-class subset"),
    ("epochs", int, dict(probe=30, finetune=5), "> 0", "training epochs"),
    ("batch_size", int, dict(probe=256, finetune=128), "> 0",
     "per process; global = this × world size (the cached probe: at most the train set)"),
    ("optimizer", ("sgd", "adamw"), dict(probe="sgd", finetune="adamw"), None, "AdamW stands in for RSB's LAMB too"),
    ("blr", float, dict(probe=0.1, finetune=1e-3), "> 0", "base lr per 256 images of global batch"),
    ("momentum", float, 0.9, "in [0, 1)", "SGD momentum"),
    ("weight_decay", float, dict(probe=0.0, finetune=0.05), ">= 0", "never on norms, biases, embeddings"),
    ("schedule", ("cosine", "step"), "cosine", None, "per-step cosine, or ×0.1 at each of --milestones"),
    ("milestones", "ints", None, "> 0", "epochs of the ×0.1 steps (schedule 'step')"),
    ("warmup_epochs", float, dict(probe=0, finetune=1), ">= 0", "linear lr warm-up"),
    ("min_lr", float, dict(probe=0.0, finetune=1e-6), ">= 0", "end of the cosine"),
    ("clip_grad", float, 0.0, ">= 0", "max gradient norm (0 = no clipping)"),
    ("layer_decay", float, None, "> 0", "layer-wise lr decay, ViT fine-tuning (laptop: 0.65 for a ViT)"),
    ("drop_path", float, None, "in [0, 1)", "stochastic depth when fine-tuning a ViT / ConvNeXt (laptop: 0.1)"),
    ("loss", ("ce", "bce"), "ce", None, "cross-entropy, or RSB's binary cross-entropy"),
    ("label_smoothing", float, dict(probe=0.0, finetune=0.1), "in [0, 1)", "label smoothing"),
    ("mixup", float, 0.0, ">= 0", "Mixup alpha, fine-tuning only (0 = off)"),
    ("cutmix", float, 0.0, ">= 0", "CutMix alpha, fine-tuning only (0 = off)"),
    ("rand_augment", int, 0, ">= 0", "RandAugment magnitude, 2 ops (0 = off; arch recipes)"),
    ("random_erasing", float, 0.0, "in [0, 1)", "random erasing probability (arch recipes)"),
    ("ema", float, 0.0, "in [0, 1)", "EMA decay of the fine-tuned weights, evaluated beside them (0 = off)"),
    ("augment", bool, dict(probe=False, finetune=True), None, "augment training images (probe off: cached features)"),
    ("head", ("bn", "fc"), "bn", None, "probe head: 'bn' = BatchNorm without affine + Linear (ours), 'fc' = §7's"),
    ("precision", PRECISIONS, "auto", None, "auto = bf16 on GPU, fp32 on CPU"),
    ("workers", int, None, ">= 0", "data loader workers per process (default: data.py's)"),
    ("threads", int, None, "> 0", "torch CPU threads (default: torch's, but 1 for the cached probe's head)"),
    ("interactions", int, 0, ">= 0", "after training, §9's J^(m) on this many val images per class (0 = off)"),
    ("interaction_pairs", int, 50, "> 0", "J^(m): pairs (i, j) per image (the released tool's 50)"),
    ("interaction_contexts", int, 50, "> 0", "J^(m): contexts S per pair and order (the released tool's 50)"),
    ("seed", int, 0, None, "seed of the head, a random encoder, the data order and the J^(m) samples"),
    ("results", str, os.path.join("out", "results.jsonl"), None, "JSONL file each result line is appended to"),
]
# fmt: on
RANGES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1}
DEFAULTS = {
    m: {n: d[m] if isinstance(d, dict) else d for n, _, d, _, _ in SETTINGS}
    for m in ("probe", "finetune")
}
# DEFAULTS (reproduce.py's budgets read them) and the laptop fine-tuning ones that depend on the encoder:
LAPTOP_FINETUNE = {
    "vit": dict(layer_decay=0.65, drop_path=0.1),
    "convnext": dict(drop_path=0.1),
    "resnet": {},
}

# fmt: off
# §7 as released (openmixup's configs/benchmarks/classification/imagenet/<name>.py); batch sizes per process of 8.
PROBE = dict(optimizer="sgd", momentum=0.9, weight_decay=0.0, warmup_epochs=0, min_lr=0.0, head="fc", augment=True)
FINETUNE = dict(optimizer="adamw", schedule="cosine", weight_decay=0.05, min_lr=1e-6, loss="ce", label_smoothing=0.1,
                mixup=0.8, cutmix=1.0, rand_augment=9, random_erasing=0.25, augment=True)
RECIPES = {
    # r50_linear_sz224_4b64_step_ep100: SGD lr 30 at batch 256, ×0.1 at 60 / 80. ConvNeXt: the same.
    "probe": dict(resnet=PROBE | dict(epochs=100, batch_size=32, blr=30.0, schedule="step", milestones=[60, 80]),
                  # vit_small_p16_linear_sz224_8xb128_cos_ep90 (MoCo v3 style): SGD lr 12 at batch 1024, cosine.
                  vit=PROBE | dict(epochs=90, batch_size=128, blr=3.0, schedule="cosine")),
    "finetune": dict(
        # r50_rsb_a3_ft_sz160_4xb512_cos_fp16_ep100: LAMB lr 8e-3 at batch 2048 → AdamW at that lr (torch has no
        # LAMB), BCE (without timm's 0.2 target threshold), train at 160 px, test 224 from 236.
        resnet=FINETUNE | dict(epochs=100, batch_size=256, blr=1e-3, weight_decay=0.02, warmup_epochs=5, loss="bce",
                               label_smoothing=0.0, mixup=0.1, rand_augment=6, random_erasing=0.0, img_size=160,
                               test_size=224, test_resize=236),
        # vit_{small,base,large}_p16_swin_ft_simmim_sz224_*: lr 2.5e-3 per 256 at batch 1024, layer decay
        # 0.65, 20 warm-up epochs, clip 5, drop path 0.1; mean patch token + fc_norm (see Classifier).
        vit=FINETUNE | dict(epochs=100, batch_size=128, blr=2.5e-3, warmup_epochs=20, layer_decay=0.65,
                            drop_path=0.1, clip_grad=5.0),
        # convnext_{s,b}_spark_ft_sz224_8xb256_cos_fp16_ep300: lr 4e-3 at batch 4096 (8×256 × 2
        # accumulation there, 8×512 here), 5 warm-up epochs, EMA 0.9999, no clipping.
        convnext=FINETUNE | dict(epochs=300, batch_size=512, blr=2.5e-4, warmup_epochs=5, drop_path=0.4, ema=0.9999)),
}
RECIPES["probe"]["convnext"] = RECIPES["probe"]["resnet"]
RECIPES["finetune"] |= dict(  # per arch, over its family's: ViT-S/B/L epochs, EMA for B/L, ConvNeXt drop path;
    # convnext_t_spark_ft_*_ep400 has drop path 0.1 (and 400 ep, lr 4e-4, wd 0.01, layer decay 0.7: not taken).
    vit_small=dict(epochs=200), vit_base=dict(ema=0.99996), vit_large=dict(epochs=150, ema=0.99996),
    convnext_tiny=dict(drop_path=0.1), convnext_base=dict(drop_path=0.5))
# fmt: on


def recipe_applies(preset, data_name, img_size):
    """ImageNet-size data gets the released recipe of its arch, the small datasets our laptop one."""
    return (
        preset == "official"
        if preset != "auto"
        else data_name in ("imagenet", "folder") and img_size >= 192
    )


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a(
        "--checkpoint",
        help="train.py checkpoint, a released OpenMixup A²MIM file (either layout) or a torchvision "
        f"state dict (default {DEFAULT_CHECKPOINT})",
    )
    a(
        "--init",
        choices=("checkpoint", "random"),
        default="checkpoint",
        help="'random' = the untrained baseline",
    )
    a(
        "--arch",
        choices=models.ARCHS,
        help="for --init random or a torchvision file; checked against any other file",
    )
    a(
        "--width",
        type=int,
        help="ResNet/ConvNeXt width for --init random (default 16; standard with an arch recipe)",
    )
    a("--finetune", action="store_true", help="fine-tune all weights instead of a linear probe")
    a(
        "--preset",
        choices=("auto", "official", "laptop"),
        default="auto",
        help="§7's arch recipe: auto = on ImageNet-size data (default), official = always, laptop = never",
    )
    a(
        "--export",
        metavar="OUT.pth",
        help="write the checkpoint's encoder as a plain state dict and exit",
    )
    a(
        "--export-to",
        choices=weights.EXPORTS,
        help="the library whose model loads --export strictly "
        "(default torchvision; a ViT: timm, as its BEiT)",
    )
    a("--overwrite", action="store_true", help="let --export replace an existing file")
    a(
        "--print-config",
        action="store_true",
        help="print each resolved setting and where it came from, then exit",
    )
    for name, kind, default, valid, text in SETTINGS:
        shown = (
            ", ".join(f"{m} {v}" for m, v in default.items())
            if isinstance(default, dict)
            else default,
            f"; valid: {valid}" if valid else "",
        )
        kw = (
            dict(choices=kind)
            if isinstance(kind, tuple)
            else dict(action=argparse.BooleanOptionalAction)
            if kind is bool
            else dict(type=int, nargs="+")
            if kind == "ints"
            else dict(type=kind)
        )
        a(
            "--" + name.replace("_", "-"),
            help=f"{text} [laptop default: {shown[0]}{shown[1]}]",
            **kw,
        )
    return p


def resolve_config(args, source, world_size):
    """All settings, later layers winning; cfg["origin"][name] says which layer (or "derived")."""
    mode, arch = "finetune" if args.finetune else "probe", source["encoder_kwargs"]["arch"]
    cli = {k: v for k, v in vars(args).items() if v is not None and k in DEFAULTS[mode]}
    same_data = (
        cli.get("data", source["data"]) == source["data"]
    )  # else the checkpoint's data dir is another's
    found = dict(
        data=source["data"],
        data_dir=source["data_dir"] if same_data else None,
        img_size=source["encoder_kwargs"]["img_size"],
    )
    kind = models.arch_kind(arch)
    layers = [
        ("laptop default", DEFAULTS[mode] | (LAPTOP_FINETUNE[kind] if mode == "finetune" else {})),
        ("checkpoint" if source["kind"] != "random" else "dataset", found),
        ("command line", cli),
    ]
    recipe = recipe_applies(args.preset, cli.get("data", found["data"]), found["img_size"])
    if recipe:
        layers.insert(2, ("arch recipe", RECIPES[mode][kind] | RECIPES[mode].get(arch, {})))
    cfg, origin = {}, {}
    for where, layer in layers:
        cfg.update(layer)
        origin.update(dict.fromkeys(layer, where))
    if cfg["test_size"] is None:
        cfg["test_size"], origin["test_size"] = cfg["img_size"], origin["img_size"]
    cfg.update(
        mode=mode,
        arch=arch,
        family=models.arch_family(arch),
        recipe=kind if recipe else None,
        preset=args.preset,
        init=source["kind"],
        checkpoint=source["path"],
        pretrain_method=source["method"],
        encoder_kwargs=source["encoder_kwargs"],
        world_size=world_size,
        global_batch=cfg["batch_size"] * world_size,
        lr=cfg["blr"] * cfg["batch_size"] * world_size / 256,
    )
    cfg["origin"] = {k: origin.get(k, "derived") for k in cfg}
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Values out of range and combinations that cannot work, each as one sentence."""
    for name, _, _, valid, _ in SETTINGS:
        values = [
            v for v in (cfg[name] if isinstance(cfg[name], list) else [cfg[name]]) if v is not None
        ]
        if any(
            isinstance(v, float) and not math.isfinite(v) for v in values
        ):  # argparse takes "inf" and "nan"
            raise EvalError(
                f"--{name.replace('_', '-')} must be a finite number {valid}, got {cfg[name]}"
            )
        if valid and not all(RANGES[valid](v) for v in values):
            raise EvalError(f"--{name.replace('_', '-')} must be {valid}, got {cfg[name]}")
    if cfg["min_lr"] > cfg["lr"]:  # the cosine would climb from the lr to --min-lr
        raise EvalError(
            f"--min-lr {cfg['min_lr']:g} is above the peak lr {cfg['lr']:.3g} (--blr × global batch / "
            "256); lower --min-lr or raise --blr"
        )
    if cfg["schedule"] == "step" and not cfg["milestones"]:
        raise EvalError("schedule 'step' needs --milestones (epochs of the ×0.1 steps, e.g. 60 80)")
    if cfg["layer_decay"] is not None and cfg["family"] != "vit":
        raise EvalError(
            f"layer-wise lr decay is defined for ViT blocks, not for {cfg['arch']}; drop --layer-decay"
        )
    if cfg["drop_path"] and cfg["arch"].startswith("resnet"):
        raise EvalError("torchvision's ResNet has no drop path; drop --drop-path")
    if cfg["mode"] == "probe" and cfg["head"] == "bn" and cfg["batch_size"] < 2:
        raise EvalError(
            "the probe's BatchNorm head needs --batch-size >= 2 (it normalises over the batch); "
            "or pass --head fc"
        )
    if cfg["mode"] == "probe" and (cfg["mixup"] or cfg["cutmix"]):
        raise EvalError("Mixup/CutMix are fine-tuning options; add --finetune or drop them")
    if not cfg["recipe"] and (cfg["rand_augment"] or cfg["random_erasing"] or cfg["test_resize"]):
        raise EvalError(
            "RandAugment, random erasing and --test-resize are §7's; add --preset official or drop them"
        )


def load_source(args):
    """{kind: "checkpoint" (train.py's) / "openmixup" (a released file) / "torchvision" / "random", path, weights,
    encoder_kwargs, method, data, data_dir}. Without a config: --arch, --data, its size (a released ViT: the size
    of its position embedding); a random CNN is 16 wide unless the arch recipe applies."""
    name = args.data or ("imagenet" if args.preset == "official" else "fashion-mnist")
    plain = dict(
        arch=args.arch or "resnet18", img_size=args.img_size or data.dataset_info(name)["img_size"]
    )
    if args.init == "random":
        if args.checkpoint:
            raise EvalError("pass either --checkpoint or --init random, not both")
        if models.arch_family(plain["arch"]) == "cnn":
            plain["width"] = args.width or (
                None if recipe_applies(args.preset, name, plain["img_size"]) else 16
            )
        return dict(
            kind="random",
            path=None,
            weights=None,
            method=None,
            encoder_kwargs=plain,
            data=name,
            data_dir=None,
        )
    path = args.checkpoint or DEFAULT_CHECKPOINT
    if os.path.isdir(path):
        raise EvalError(
            f"--checkpoint {path} is a folder; name the file in it (train.py writes "
            f"{os.path.join(path, 'checkpoint.pt')})"
        )
    if args.checkpoint is None and not os.path.isfile(path):
        raise EvalError(
            f"no --checkpoint given and {path} does not exist; run `python3 train.py` first, or pass "
            "--init random for the random-encoder baseline"
        )
    found = weights.load_pretrained(
        path, arch=args.arch
    )  # ours, a released OpenMixup file, or torchvision's
    if found["unused"]:
        print(
            f"note: {path}: {len(found['unused'])} tensors outside the encoder, mask token and decoder are not "
            f"used ({found['unused'][0]}, ...)",
            file=sys.stderr,
        )
    kw = dict(found["encoder_kwargs"])
    if found["kind"] == "checkpoint":
        if args.width is not None and kw.get("width") != args.width:
            raise CheckpointError(
                f"{path} holds a {kw['arch']} of width {kw.get('width')}, but --width is "
                f"{args.width}"
            )
        config = found["config"]
        return dict(
            kind="checkpoint",
            path=path,
            weights=found["encoder"],
            encoder_kwargs=kw,
            method=config.get("method"),
            data=config.get("data", "fashion-mnist"),
            data_dir=config.get("data_dir"),
        )
    if (
        models.arch_family(kw["arch"]) == "cnn"
    ):  # a CNN takes any size: the data's, as a random encoder
        kw["img_size"] = plain["img_size"]
    elif (
        args.img_size is not None and args.img_size != kw["img_size"]
    ):  # its position embedding fixes the size
        raise EvalError(
            f"{path} holds a {kw['arch']} for {kw['img_size']}-px images; pass --img-size "
            f"{kw['img_size']} or leave it out"
        )
    return dict(
        kind=found["kind"],
        path=path,
        weights=found["encoder"],
        method=None,
        encoder_kwargs=kw,
        data=name,
        data_dir=None,
    )


def build_loaded_encoder(source, cfg):
    """build_encoder from the source's kwargs, then its weights (strict: same keys and shapes)."""
    kw = dict(source["encoder_kwargs"])
    if cfg["mode"] == "finetune" and not cfg["arch"].startswith("resnet"):
        kw["drop_path"] = cfg["drop_path"]  # changes no shape, so the weights still load
    encoder = models.build_encoder(**kw)
    if source["weights"] is not None:  # in our names already (weights.load_pretrained)
        try:
            encoder.load_state_dict(source["weights"])
        except RuntimeError as e:  # torch lists every mismatch; the first says enough
            first = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:160]
            raise CheckpointError(
                f"{source['path']} does not fit a {kw['arch']} encoder ({first})"
            ) from None
    return encoder


def build_data(cfg):
    """(train set, maybe a class-balanced subset; val set; class count)."""
    kw = dict(data_dir=cfg["data_dir"], family=cfg["family"])
    train_set = data.build_dataset(
        cfg["data"],
        "train",
        img_size=cfg["img_size"],
        transform="finetune" if cfg["augment"] else "eval",
        **kw,
    )
    val_set = data.build_dataset(
        cfg["data"], "val", img_size=cfg["test_size"], transform="eval", **kw
    )
    if cfg[
        "recipe"
    ]:  # §7's transforms instead of data.py's (each dataset applies its `.transform`), bicubic
        bicubic = v2.InterpolationMode.BICUBIC  # as BEiT, timm and RSB
        first = [
            v2.ToImage(),
            v2.RGB(),
        ]  # any dataset's image (uint8 tensor or PIL, grey or colour) → [3, H, W]
        last = [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
        ]
        val_set.transform = v2.Compose(
            [
                *first,
                v2.Resize(
                    cfg["test_resize"] or round(cfg["test_size"] / 0.875), interpolation=bicubic
                ),
                v2.CenterCrop(cfg["test_size"]),
                *last,
            ]
        )
        train = [
            v2.RandomResizedCrop(cfg["img_size"], interpolation=bicubic),
            v2.RandomHorizontalFlip(),
        ]
        if cfg[
            "rand_augment"
        ]:  # 2 ops as timm's rand-m9-mstd0.5 (without its magnitude noise); bilinear on tensors
            train.append(
                v2.RandAugment(2, cfg["rand_augment"], interpolation=v2.InterpolationMode.BILINEAR)
            )
        if cfg["random_erasing"]:  # timm's "pixel" mode: per-pixel noise, on the normalised image
            last.append(v2.RandomErasing(cfg["random_erasing"], value="random"))
        train_set.transform = (
            v2.Compose(first + train + last) if cfg["augment"] else val_set.transform
        )
    num_classes = data.dataset_info(cfg["data"])["num_classes"] or train_set.num_classes
    if val_set.num_classes != num_classes:
        raise data.DataError(
            f"{cfg['data']} has {num_classes} training classes but {val_set.num_classes} in val"
        )
    if cfg["labels_per_class"]:
        idx = class_balanced_subset(
            labels_of(train_set), cfg["labels_per_class"], cfg["subset_seed"], num_classes
        )
        train_set = torch.utils.data.Subset(
            train_set, idx.tolist()
        )  # plain ints: datasets may not take tensor indices
    return train_set, val_set, num_classes


def labels_of(dataset):
    labels = getattr(
        dataset, "labels_n", getattr(dataset, "targets", None)
    )  # without decoding images
    return [dataset[i][1] for i in range(len(dataset))] if labels is None else labels  # e.g. "fake"


def class_balanced_subset(
    labels, k, seed, num_classes=None, *, split="training", flag="--labels-per-class"
):
    """Sorted indices of exactly `k` images per class, the same for (labels, k, seed) on every rank; too few
    images in a class is an EvalError naming the `split` and the `flag` that asked for `k`."""
    labels, gen, picks = torch.as_tensor(labels), torch.Generator().manual_seed(seed), []
    for c in range(num_classes or int(labels.max()) + 1):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < k:
            raise EvalError(f"class {c} has only {len(idx)} {split} images, fewer than {flag} {k}")
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.cat(picks).sort().values


def interleave_shards(parts, n):
    """W per-rank shards [m, ...] → [n, ...] in dataset order: rank r holds samples r, r + W, ... (padded at the
    end by repeating the start), so interleaving restores the order and cutting at n counts each sample once."""
    return rearrange(torch.stack(parts), "w m ... -> (m w) ...")[:n]


@torch.no_grad()
def run_over(dataset, fn, cfg, env, desc):
    """`fn(images)` for every image, each rank on its shard → all (rows, labels) in dataset order, on the CPU."""
    loader = data.build_loader(
        dataset, cfg["batch_size"], train=False, distributed=env.enabled, workers=cfg["workers"]
    )
    prec, outs, labels = resolve_precision(cfg["precision"], env.device), [], []
    for img, y in tqdm(
        loader, desc=desc, disable=not env.is_main or None, dynamic_ncols=True, leave=False
    ):
        with autocast(env.device, prec):
            outs.append(fn(img.to(env.device, non_blocking=True)).float())
        labels.append(y.to(env.device))
    rows = [torch.cat(outs), torch.cat(labels)]
    if env.enabled:
        for i, r in enumerate(rows):
            parts = [torch.empty_like(r) for _ in range(env.world_size)]
            torch.distributed.all_gather(parts, r.contiguous())
            rows[i] = interleave_shards(parts, len(dataset))
    return rows[0].cpu(), rows[1].cpu()


def pool(feat_bchw):
    """[B, C, h, w] → [B, C]: global average pool; for a ViT exactly the mean patch token."""
    return feat_bchw.mean(dim=(2, 3))


def linear_head(channels, num_classes, kind="fc"):
    """[B, C] → [B, K]. 'fc': a Linear (§7's probe, the classifier). 'bn' (our probe, MAE's): BatchNorm1d
    without affine first, a per-feature whitening that lets one lr fit every encoder's feature scale."""
    fc = nn.Linear(channels, num_classes)
    nn.init.trunc_normal_(fc.weight, std=0.01)  # MAE's / MoCo v3's probe init: near-uniform start
    nn.init.zeros_(fc.bias)
    return (
        fc if kind == "fc" else nn.Sequential(nn.BatchNorm1d(channels, affine=False, eps=1e-6), fc)
    )


class Classifier(nn.Module):
    """Encoder + global average pool + `fc_norm` + Linear, all trained: [B, 3, H, W] → [B, K]. As released:
    ResNet: no norm. ViT: the encoder's final norm off, a fresh LayerNorm on the mean patch token (BEiT's
    fc_norm). ConvNeXt: its final LayerNorm moves behind the pool (gap_before_final_norm=True)."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        c, final = encoder.out_channels, getattr(encoder, "norm", None)
        self.encoder, self.head = encoder, linear_head(c, num_classes)
        self.fc_norm = nn.Identity() if final is None else nn.LayerNorm(c, eps=1e-6)
        if final is not None and encoder.family == "cnn":
            self.fc_norm.load_state_dict(final.state_dict())  # ConvNeXt: the trained norm moves
        if final is not None:
            encoder.norm = nn.Identity()

    def forward(self, x_bchw):
        return self.head(self.fc_norm(pool(self.encoder(x_bchw))))


def layer_decay_fn(depth, decay):
    """BEiT's layer-wise lr decay around a ViT of `depth` blocks, as param_groups' lr_scale_fn: block
    k gets decay^(depth − k), patch/position embedding and cls token decay^(depth + 1), the rest 1."""

    def scale(name):
        if name.startswith("encoder.blocks."):
            return decay ** (depth - int(name.split(".")[2]))
        embedding = name.startswith(
            ("encoder.patch_embed", "encoder.pos_embed", "encoder.cls_token")
        )
        return decay ** (depth + 1) if embedding else 1.0

    return scale


def build_optimizer(module, cfg, lr_scale_fn=None):
    # param_groups: no weight decay on norms, biases, embeddings; lr_scale for layer decay.
    groups = param_groups(module, weight_decay=cfg["weight_decay"], lr_scale_fn=lr_scale_fn)
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])
    return torch.optim.AdamW(
        groups, lr=cfg["lr"], betas=(0.9, 0.999)
    )  # also for RSB's LAMB: not in torch


def lr_for_step(step, cfg, steps_per_epoch):
    """Warm-up, then cosine, or ×0.1 at each milestone epoch (the 60/80 probe protocol)."""
    return lr_at(
        step,
        lr=cfg["lr"],
        total_steps=cfg["epochs"] * steps_per_epoch,
        warmup_steps=round(cfg["warmup_epochs"] * steps_per_epoch),
        min_lr=cfg["min_lr"],
        schedule=cfg["schedule"],
        step_at=[m * steps_per_epoch for m in cfg["milestones"] or ()],
    )


def classification_loss(logits_bk, target, cfg, num_classes):
    """Cross-entropy with label smoothing (Mixup's soft targets too), or RSB's BCE on one-hot targets."""
    if cfg["loss"] == "bce":
        target_bk = target if target.ndim == 2 else F.one_hot(target, num_classes).float()
        s = cfg["label_smoothing"]
        return F.binary_cross_entropy_with_logits(logits_bk, target_bk * (1 - s) + s / num_classes)
    return F.cross_entropy(logits_bk, target, label_smoothing=cfg["label_smoothing"])


def fit(
    forward,
    trainable,
    optimizer,
    batches,
    steps_per_epoch,
    cfg,
    env,
    num_classes,
    after_step=lambda: None,
):
    """Train `trainable` (a probe head, or the classifier) on `batches(epoch)`: (features or images, labels)."""
    prec = resolve_precision(cfg["precision"], env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=prec == "fp16")
    mixers = [
        mix(alpha=cfg[k], num_classes=num_classes)
        for k, mix in (("mixup", v2.MixUp), ("cutmix", v2.CutMix))
        if cfg[k]
    ]  # one of the two at random per batch, as timm
    # Progress on rank 0, on a terminal only (None: tqdm's check), not as pages of text in a log file or a notebook.
    bar = tqdm(
        total=cfg["epochs"] * steps_per_epoch,
        desc=cfg["mode"],
        disable=not env.is_main or None,
        dynamic_ncols=True,
    )
    for epoch in range(cfg["epochs"]):
        trainable.train()  # for a probe: the head only; the encoder stays in eval mode
        loss_sum = torch.zeros((), device=env.device)
        for i, (x, y) in enumerate(batches(epoch)):
            set_lr(optimizer, lr_for_step(epoch * steps_per_epoch + i, cfg, steps_per_epoch))
            x, y = x.to(env.device, non_blocking=True), y.to(env.device)
            if mixers:
                x, y = v2.RandomChoice(mixers)(x, y)
            with autocast(env.device, prec):
                loss = classification_loss(forward(x).float(), y, cfg, num_classes)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg["clip_grad"]:
                scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
                nn.utils.clip_grad_norm_(trainable.parameters(), cfg["clip_grad"])
            scaler.step(optimizer)
            scaler.update()
            after_step()
            loss_sum += loss.detach()
            bar.update(1)
        if not loss_sum.isfinite():  # one host sync per epoch
            raise EvalError(
                f"the training loss became non-finite in epoch {epoch + 1}; lower --blr"
            )
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum.item() / steps_per_epoch:.4f}")
    bar.close()


def loader_epochs(dataset, cfg, env):
    """(batches(epoch), steps per epoch) of a shuffled, augmented loader; a shard per rank."""
    loader = data.build_loader(
        dataset,
        cfg["batch_size"],
        train=True,
        distributed=env.enabled,
        workers=cfg["workers"],
        seed=cfg["seed"],
    )
    return (lambda epoch: data.set_epoch(loader, epoch) or iter(loader)), len(loader)


def for_ranks(module, env):
    """(module, what to train): under torchrun SyncBatchNorm on GPUs (as §6) and DDP; else the module twice."""
    if not env.enabled:
        return module, module
    cuda = env.device.type == "cuda"
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module) if cuda else module
    return module, nn.parallel.DistributedDataParallel(
        module, device_ids=[env.local_rank] if cuda else None
    )


def probe(encoder, train_set, val_set, cfg, env, num_classes):
    """Linear probe: the encoder in eval mode without gradients (its weights and BN statistics stay put)."""
    encoder.eval().requires_grad_(False)
    features = torch.no_grad()(lambda img: pool(encoder(img)).float())
    head, threads = (
        linear_head(encoder.out_channels, num_classes, cfg["head"]).to(env.device),
        torch.get_num_threads(),
    )
    if cfg["augment"]:  # §7's: features of every augmented batch, the head under DDP
        head, trainable = for_ranks(head, env)
        forward, (batches, steps) = (
            (lambda img: trainable(features(img))),
            loader_epochs(train_set, cfg, env),
        )
    else:  # ours: features once, each rank its shard; all ranks train the same head on all of them
        x_nc, y_n = run_over(train_set, features, cfg, env, "train features")
        batch = cfg["global_batch"]  # at most len(x_nc): fit_batch_to_data
        trainable, forward, steps = (
            head,
            head,
            len(x_nc) // batch,
        )  # drop the last partial batch (BatchNorm)

        def batches(epoch):
            order = torch.randperm(
                len(x_nc), generator=torch.Generator().manual_seed(cfg["seed"] + epoch)
            )
            return ((x_nc[idx], y_n[idx]) for idx in order[: steps * batch].split(batch))

        if (
            env.device.type == "cpu" and cfg["threads"] is None
        ):  # a hack: with 2 threads a head step
            torch.set_num_threads(1)  # ran 70× slower (46 vs 0.6 ms) on a busy 2-core machine
    fit(forward, trainable, build_optimizer(head, cfg), batches, steps, cfg, env, num_classes)
    torch.set_num_threads(threads)
    classifier = lambda img: head.eval()(features(img))  # noqa: E731
    return {"": run_over(val_set, classifier, cfg, env, "val")}, classifier


def finetune(encoder, train_set, val_set, cfg, env, num_classes):
    """Every weight trains (BatchNorm statistics update, drop path on); with --ema their EMA is evaluated too."""
    model, trainable = for_ranks(Classifier(encoder, num_classes).to(env.device), env)
    scale_fn = (
        layer_decay_fn(len(encoder.blocks), cfg["layer_decay"]) if cfg["layer_decay"] else None
    )
    optimizer = build_optimizer(model, cfg, scale_fn)  # names without DDP's "module." prefix
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema"]), use_buffers=True)
        if cfg["ema"]
        else None
    )
    batches, steps = loader_epochs(train_set, cfg, env)
    fit(
        trainable,
        trainable,
        optimizer,
        batches,
        steps,
        cfg,
        env,
        num_classes,
        after_step=(lambda: ema.update_parameters(model)) if ema else (lambda: None),
    )
    out = {"": run_over(val_set, model.eval(), cfg, env, "val")}
    if ema is not None:
        out["ema_"] = run_over(val_set, ema.module.eval(), cfg, env, "val (EMA)")
    return out, model


def fit_batch_to_data(cfg, num_train):
    """The cached probe steps through all train features, on every rank, in batches of the global batch: with
    fewer features than that, one step takes them all. cfg then states that batch, and the lr follows it."""
    if cfg["mode"] == "probe" and not cfg["augment"] and num_train < cfg["global_batch"]:
        cfg.update(global_batch=num_train, lr=cfg["blr"] * num_train / 256)
        cfg["origin"].update(
            global_batch="derived (all train images)", lr="derived (all train images)"
        )
        check_config(cfg)  # --min-lr against the lower lr


def evaluate(encoder, cfg, env):
    """Train the chosen way, then top-1/top-5 over the whole val split (also of the EMA weights)."""
    train_set, val_set, num_classes = build_data(cfg)
    fit_batch_to_data(cfg, len(train_set))
    picked = None  # §9's val images, picked before training: too few in a class, or too many pairs, is said now
    if cfg["interactions"]:
        picked = class_balanced_subset(
            labels_of(val_set),
            cfg["interactions"],
            cfg["seed"],
            num_classes,
            split="val",
            flag="--interactions",
        )
        try:
            sample_pairs(default_grid(cfg["test_size"]), cfg["interaction_pairs"])
        except models.ConfigError as e:  # more pairs than the grid of this image size has
            raise EvalError(
                f"--interaction-pairs {cfg['interaction_pairs']} is too many at {cfg['test_size']} px: "
                f"{e}"
            ) from None
    if env.is_main:
        recipe = f"the {cfg['recipe']} recipe of §7" if cfg["recipe"] else "laptop settings"
        batch = f"global batch {cfg['global_batch']}"
        if cfg["origin"]["global_batch"].endswith("train images)"):
            batch += " (every train image: fewer than the batch asked for)"
        print(
            f"{cfg['mode']} of {cfg['arch']} ({cfg['checkpoint'] or 'random init'}) on {cfg['data']}, {recipe}: "
            f"{len(train_set)} train / {len(val_set)} val images, {env.world_size} process(es) on {env.device.type}, "
            f"{cfg['optimizer']} lr {cfg['lr']:.3g}, {batch}, {cfg['epochs']} epochs"
        )
    way = finetune if cfg["mode"] == "finetune" else probe
    result = dict(num_train=len(train_set), num_val=len(val_set), num_classes=num_classes)
    outputs, classifier = way(encoder, train_set, val_set, cfg, env, num_classes)
    for prefix, (logits_nk, labels_n) in outputs.items():
        hit_nk = (
            logits_nk.topk(min(5, num_classes), dim=1).indices == labels_n[:, None]
        )  # top-5 of ≥ 5 classes
        for k in (1, 5):
            result[f"{prefix}top{k}"] = round(
                100.0 * hit_nk[:, :k].any(dim=1).float().mean().item(), 3
            )
    if picked is not None and env.is_main:
        result["interactions"] = interactions(classifier, val_set, picked, cfg, env.device)
    return result


def interactions(classifier, val_set, idx, cfg, device):
    """§9's J^(m) of the trained classifier on the val images `idx` (K per class: seeded, class-balanced), by the
    released protocol (a2mim.interaction_strength) at --interaction-pairs × --interaction-contexts; the baseline is
    the mean colour of those images (the dataset mean of §9). I^(m) is kept per image, for a bootstrap over images."""
    start = time.time()
    images, labels = zip(*[val_set[i] for i in idx.tolist()])
    img_bchw, labels_b = torch.stack(images).to(device), torch.tensor(labels, device=device)
    baseline_c11 = img_bchw.mean(dim=(0, 2, 3))[:, None, None]
    out = interaction_strength(
        classifier,
        img_bchw,
        labels_b,
        pairs=cfg["interaction_pairs"],
        baseline=baseline_c11,
        contexts=cfg["interaction_contexts"],
        generator=torch.Generator().manual_seed(cfg["seed"]),
    )
    return dict(
        orders=out["orders"].tolist(),
        J=out["J"].tolist(),
        I_abs_per_image=out["I_abs_bm"].tolist(),
        images=idx.tolist(),
        grid=default_grid(img_bchw.shape[-1]),
        seconds=round(time.time() - start, 1),
    )


def report(cfg, result, seconds):
    """Print the result, then append it as one JSON line with its configuration (never losing the accuracy)."""
    ema = f"; EMA weights top-1 {result['ema_top1']:.2f} %" if "ema_top1" in result else ""
    print(
        f"{cfg['mode']}: top-1 {result['top1']:.2f} %, top-5 {result['top5']:.2f} % on {result['num_val']} "
        f"val images{ema} ({seconds:.0f} s); appending it to {cfg['results']}",
        flush=True,
    )
    record = dict(
        mode=cfg["mode"],
        **result,
        checkpoint=cfg["checkpoint"],
        init=cfg["init"],
        arch=cfg["arch"],
        data=cfg["data"],
        labels_per_class=cfg["labels_per_class"],
        wall_time_s=round(seconds, 1),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        config=cfg,
    )
    try:
        append_line(cfg["results"], json.dumps(record))  # a failed append leaves the file as it was
    except (OSError, RunError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise EvalError(
            f"cannot append the result to {cfg['results']} ({why}); "
            "the accuracy above is not recorded"
        ) from None


def check_results_file(path):
    """Before any training: --results must name a file, and one that holds only JSON lines (a damaged file would
    take the new line with it, and reproduce.py refuses to read it)."""
    if os.path.isdir(path) or not os.path.basename(path):
        raise EvalError(
            f"--results must name a JSONL file, not a folder (got {path!r}; e.g. "
            f"{os.path.join(path, 'results.jsonl')})"
        )
    if os.path.exists(path) and not os.path.isfile(
        path
    ):  # append_line replaces the file: never a device's node
        raise EvalError(f"--results must name a regular JSONL file, got {path}")
    read_jsonl(path)  # JsonlError naming the bad line


def main(argv=None):
    args = get_parser().parse_args(argv)
    start = time.time()
    try:
        env = setup_distributed()
        if args.export_to and not args.export:
            raise EvalError(
                "--export-to names the library of --export; add --export OUT.pth or drop it"
            )
        if (
            args.export
        ):  # before anything is read or written: never the checkpoint being read, nor another file
            read = args.checkpoint or DEFAULT_CHECKPOINT  # that exists, unless --overwrite
            if args.init == "random":
                raise EvalError(
                    "--export writes a checkpoint's encoder; pass --checkpoint, not --init random"
                )
            if (
                args.finetune or args.interactions
            ):  # export writes the checkpoint's weights as they are, then exits
                raise EvalError(
                    "--export writes the checkpoint's encoder as it is and exits; run --finetune / "
                    "--interactions without --export"
                )
            if os.path.isdir(args.export) or not os.path.basename(args.export):
                raise EvalError(
                    f"--export {args.export} is a folder; name the file to write in it, e.g. "
                    f"{os.path.join(args.export, 'encoder.pth')}"
                )
            if os.path.exists(args.export) and not os.path.isfile(
                args.export
            ):  # atomic_save would replace it
                raise EvalError(f"--export must name a regular file to write, got {args.export}")
            if (
                os.path.exists(args.export)
                and os.path.exists(read)
                and os.path.samefile(args.export, read)
            ):
                raise EvalError(
                    f"--export {args.export} is the checkpoint being read; export to another file"
                )
            if os.path.exists(args.export) and not args.overwrite:
                raise EvalError(f"{args.export} already exists; pass --overwrite to replace it")
        else:
            check_results_file(args.results or DEFAULTS["probe"]["results"])
        source = load_source(args)
        if args.export:  # before the encoder is built: a ViT has no torchvision model
            weights.check_export(source["encoder_kwargs"]["arch"], args.export_to or "torchvision")
        cfg = resolve_config(args, source, env.world_size)
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        if args.print_config:
            print(
                "\n".join(
                    f"{k:16} {json.dumps(v):24} {cfg['origin'][k]}"
                    for k, v in cfg.items()
                    if k != "origin"
                )
            )
            return 0
        torch.manual_seed(cfg["seed"])  # a random encoder and the head start the same on every rank
        encoder = build_loaded_encoder(source, cfg)
        if args.export:
            if env.is_main:
                to = args.export_to or "torchvision"
                how = weights.export(encoder, args.export, to)
                print(
                    f"wrote {cfg['arch']} from {cfg['checkpoint']} as a {to} state dict to {args.export}; "
                    f"it loads with strict=True into {how}"
                )
            return 0
        # channels_last weights make every conv's output channels_last too (faster under bf16)
        result = evaluate(
            channels_last(encoder.to(env.device), cfg["family"], env.device), cfg, env
        )
        if env.is_main:
            report(cfg, result, time.time() - start)
    except user_errors() as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
