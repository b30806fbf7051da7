"""Evaluate a pre-trained encoder the ways the field does (METHOD.md §7).

    python eval_linear.py                                    # probe train.py's default run, if it exists
    python eval_linear.py --init random --arch resnet18      # the baseline: same probe, random encoder
    python eval_linear.py --checkpoint CKPT --finetune       # fine-tune every weight
    python eval_linear.py --checkpoint CKPT --labels-per-class 10   # low-label probe (10 images a class)
    python eval_linear.py --checkpoint CKPT --export r50.pth # torchvision state dict, then exit
    python eval_linear.py --checkpoint vit_base_full.pth --export vit_b.pth --export-to timm   # a released file
    torchrun --nproc_per_node=8 eval_linear.py --checkpoint CKPT --data imagenet --data-dir /data/imagenet --finetune

Settings: small-data default < checkpoint < §7's arch recipe (--data imagenet, or --preset official on any
data) < command line (`--print-config` shows each value's origin); lr = blr × global batch / 256.
"""

import argparse
import json
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
from interaction import default_grid, interaction_strength, sample_pairs
from runtime import (
    AT_LEAST_0,
    FRACTION,
    POSITIVE,
    PRECISIONS,
    PRESETS,
    SEED,
    CheckpointError,
    ConfigError,
    DataError,
    RunError,
    Setting,
    add_settings,
    append_line,
    autocast,
    channels_last,
    check_settings,
    command_line,
    config_table,
    entry_point,
    lr_at,
    param_groups,
    read_jsonl,
    resolve_precision,
    set_lr,
    setup_distributed,
    takes_paper_recipe,
)

# train.py's default run
DEFAULT_CHECKPOINT = os.path.join("out", "a2mim_resnet18_fashion-mnist", "checkpoint.pt")
MODES = ("probe", "finetune")

# fmt: off
# Settings, written once: the parser, --help, the range checks and --print-config come from this list. The
# defaults are the small-data ones ({mode: value} where probe and fine-tuning differ; None: see unset).
SETTINGS = (
    Setting(name="data", type=str, help=f"dataset: {', '.join(data.DATASETS)}",
            unset="the checkpoint's, else fashion-mnist"),
    Setting(name="data_dir", type=str, help="where the dataset lives (see data.py)",
            unset="data.py's place for the dataset"),
    Setting(name="img_size", type=int, range=POSITIVE, help="training resolution",
            unset="the encoder's"),
    Setting(name="test_size", type=int, range=POSITIVE, help="evaluation centre crop",
            unset="--img-size"),
    Setting(name="test_resize", type=int, range=POSITIVE, help="resize before that crop (arch recipes)",
            unset="--test-size / 0.875"),
    Setting(name="labels_per_class", type=int, range=POSITIVE, help="train on K images per class (seeded)",
            unset="every image"),
    Setting(name="subset_seed", default=0, range=SEED, help="seed of the --labels-per-class subset"),
    Setting(name="epochs", default=dict(probe=30, finetune=5), type=int, range=POSITIVE, help="training epochs"),
    Setting(name="batch_size", default=dict(probe=256, finetune=128), type=int, range=POSITIVE,
            help="per process; global = this × world size (the cached probe: at most the train set)"),
    Setting(name="optimizer", default=dict(probe="sgd", finetune="adamw"), choices=("sgd", "adamw"),
            help="AdamW stands in for RSB's LAMB too"),
    Setting(name="blr", default=dict(probe=0.1, finetune=1e-3), type=float, range=POSITIVE,
            help="base lr per 256 images of global batch"),
    Setting(name="momentum", default=0.9, range=FRACTION, help="SGD momentum"),
    Setting(name="weight_decay", default=dict(probe=0.0, finetune=0.05), type=float, range=AT_LEAST_0,
            help="never on norms, biases, embeddings"),
    Setting(name="schedule", default="cosine", choices=("cosine", "step"),
            help="per-step cosine, or ×0.1 at each of --milestones"),
    Setting(name="milestones", type=int, nargs="+", range=POSITIVE, help="epochs of the ×0.1 steps (schedule 'step')",
            unset="none"),
    Setting(name="warmup_epochs", default=dict(probe=0, finetune=1), type=float, range=AT_LEAST_0,
            help="linear lr warm-up"),
    Setting(name="min_lr", default=dict(probe=0.0, finetune=1e-6), type=float, range=AT_LEAST_0,
            help="end of the cosine"),
    Setting(name="clip_grad", default=0.0, range=AT_LEAST_0, help="max gradient norm (0 = no clipping)"),
    Setting(name="layer_decay", type=float, range=POSITIVE, help="layer-wise lr decay, ViT fine-tuning",
            unset="off; 0.65 when fine-tuning a ViT"),
    Setting(name="drop_path", type=float, range=FRACTION, help="stochastic depth when fine-tuning a ViT / ConvNeXt",
            unset="off; 0.1 when fine-tuning a ViT or ConvNeXt"),
    Setting(name="loss", default="ce", choices=("ce", "bce"), help="cross-entropy, or RSB's binary cross-entropy"),
    Setting(name="label_smoothing", default=dict(probe=0.0, finetune=0.1), type=float, range=FRACTION,
            help="label smoothing"),
    Setting(name="mixup", default=0.0, range=AT_LEAST_0, help="Mixup alpha, fine-tuning only (0 = off)"),
    Setting(name="cutmix", default=0.0, range=AT_LEAST_0, help="CutMix alpha, fine-tuning only (0 = off)"),
    Setting(name="rand_augment", default=0, range=AT_LEAST_0,
            help="RandAugment magnitude, 2 ops (0 = off; arch recipes)"),
    Setting(name="random_erasing", default=0.0, range=FRACTION, help="random erasing probability (arch recipes)"),
    Setting(name="ema", default=0.0, range=FRACTION,
            help="EMA decay of the fine-tuned weights, evaluated beside them (0 = off)"),
    Setting(name="augment", default=dict(probe=False, finetune=True), type=bool,
            help="augment training images (probe off: cached features)"),
    Setting(name="head", default="bn", choices=("bn", "fc"),
            help="probe head: 'bn' = BatchNorm without affine + Linear (ours), 'fc' = §7's"),
    Setting(name="precision", default="auto", choices=PRECISIONS, help="auto = bf16 on GPU, fp32 on CPU"),
    Setting(name="workers", type=int, range=AT_LEAST_0, help="data loader workers per process",
            unset="data.py's"),
    Setting(name="threads", type=int, range=POSITIVE, help="torch CPU threads",
            unset="torch's, but 1 for the cached probe's head"),
    Setting(name="interactions", default=0, range=AT_LEAST_0,
            help="after training, §9's J^(m) on this many val images per class (0 = off)"),
    Setting(name="interaction_pairs", default=50, range=POSITIVE,
            help="J^(m): pairs (i, j) per image (the released tool's 50)"),
    Setting(name="interaction_contexts", default=50, range=POSITIVE,
            help="J^(m): contexts S per pair and order (the released tool's 50)"),
    Setting(name="seed", default=0, range=SEED,
            help="seed of the head, a random encoder, the data order and the J^(m) samples"),
    Setting(name="results", default=os.path.join("out", "results.jsonl"),
            help="JSONL file each result line is appended to"),
)
# fmt: on
# The small-data fine-tuning defaults that depend on the encoder's kind (their settings' `unset` says them in --help).
SMALL_FINETUNE = {
    "vit": dict(layer_decay=0.65, drop_path=0.1),
    "convnext": dict(drop_path=0.1),
    "resnet": {},
}


def mode_default(setting, mode):
    """A setting's small-data default in `mode` ("probe" or "finetune")."""
    if isinstance(setting.default, dict):
        return setting.default[mode]
    return setting.default


# reproduce.py's budgets and the tests read these.
DEFAULTS = {mode: {s.name: mode_default(s, mode) for s in SETTINGS} for mode in MODES}

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


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults shown are the small-data ones; §7's arch recipe (--data imagenet or --preset "
        "official) and the checkpoint may set others: --print-config shows each value and its origin.",
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
        choices=PRESETS,
        default="auto",
        help="§7's arch recipe: auto = on --data imagenet (default), official = on any data, "
        "small = never (the small-data settings)",
    )
    a(
        "--export",
        metavar="OUT.pth",
        help="write the checkpoint's encoder as a plain state dict and exit",
    )
    a(
        "--export-to",
        choices=weights.EXPORTS,
        help="the library whose model loads --export strictly (default torchvision; a ViT: timm, as its BEiT)",
    )
    a("--overwrite", action="store_true", help="let --export replace an existing file")
    a(
        "--print-config",
        action="store_true",
        help="print each resolved setting and where it came from, then exit",
    )
    add_settings(p, SETTINGS)
    return p


def resolve_config(args, source, world_size):
    """All settings, later layers winning: small-data default < checkpoint (or the dataset's, for a random
    encoder) < §7's arch recipe < command line; cfg["origin"][name] says which layer (or "derived")."""
    mode = "finetune" if args.finetune else "probe"
    arch = source["encoder_kwargs"]["arch"]
    kind = models.arch_kind(arch)
    cli = command_line(args, SETTINGS)
    # the checkpoint's data folder belongs to its own dataset: not to another --data
    same_data = cli.get("data", source["data"]) == source["data"]
    found = dict(
        data=source["data"],
        data_dir=source["data_dir"] if same_data else None,
        img_size=source["encoder_kwargs"]["img_size"],
    )
    small = DEFAULTS[mode]
    if mode == "finetune":
        small = small | SMALL_FINETUNE[kind]
    layers = [
        ("small-data default", small),
        ("dataset" if source["kind"] == "random" else "checkpoint", found),
        ("command line", cli),
    ]
    recipe = takes_paper_recipe(args.preset, cli.get("data", found["data"]))
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


def the_other_recipe(cfg):
    """How to get the recipe this run did not take: for the start line."""
    if cfg["recipe"]:
        return "--preset small: the small-data settings"
    return f"--preset official: §7's {models.arch_kind(cfg['arch'])} recipe"


def check_config(cfg):
    """Values out of range and combinations that cannot work, each as one sentence (ConfigError)."""
    check_settings(SETTINGS, cfg)
    if cfg["min_lr"] > cfg["lr"]:  # the cosine would climb from the lr to --min-lr
        raise ConfigError(
            f"--min-lr {cfg['min_lr']:g} is above the peak lr {cfg['lr']:.3g} (--blr × global batch / "
            "256); lower --min-lr or raise --blr"
        )
    if cfg["schedule"] == "step" and not cfg["milestones"]:
        raise ConfigError(
            "schedule 'step' needs --milestones (epochs of the ×0.1 steps, e.g. 60 80)"
        )
    if cfg["layer_decay"] is not None and cfg["family"] != "vit":
        raise ConfigError(
            f"layer-wise lr decay is defined for ViT blocks, not for {cfg['arch']}; drop --layer-decay"
        )
    if cfg["drop_path"] and models.arch_kind(cfg["arch"]) == "resnet":
        raise ConfigError("torchvision's ResNet has no drop path; drop --drop-path")
    if cfg["mode"] == "probe" and cfg["head"] == "bn" and cfg["batch_size"] < 2:
        raise ConfigError(
            "the probe's BatchNorm head needs --batch-size >= 2 (it normalises over the batch); "
            "or pass --head fc"
        )
    if cfg["mode"] == "probe" and (cfg["mixup"] or cfg["cutmix"]):
        raise ConfigError("Mixup/CutMix are fine-tuning options; add --finetune or drop them")
    if not cfg["recipe"] and (cfg["rand_augment"] or cfg["random_erasing"] or cfg["test_resize"]):
        raise ConfigError(
            "RandAugment, random erasing and --test-resize are §7's; add --preset official or drop them"
        )


# --- Where the encoder comes from: load_source → {kind: "checkpoint" (train.py's) / "openmixup" (a
# released file) / "torchvision" / "random", path, weights, encoder_kwargs, method, data, data_dir}.
def default_data(args):
    """--data, else the paper's ImageNet under --preset official, else fashion-mnist."""
    if args.data:
        return args.data
    if args.preset == "official":
        return "imagenet"
    return "fashion-mnist"


def load_source(args):
    """The encoder to evaluate, without building it. Without a config: --arch, --data, its size (a released
    ViT: the size of its position embedding); a random CNN is 16 wide unless the arch recipe applies."""
    name = default_data(args)
    plain = dict(
        arch=args.arch or "resnet18", img_size=args.img_size or data.dataset_info(name)["img_size"]
    )
    if args.init == "random":
        return random_source(args, name, plain)
    path = checkpoint_path(args)
    # ours, a released OpenMixup file, or torchvision's
    found = weights.load_pretrained(path, arch=args.arch)
    if found["unused"]:
        print(
            f"note: {path}: {len(found['unused'])} tensors outside the encoder, mask token and decoder are "
            f"not used ({found['unused'][0]}, ...)",
            file=sys.stderr,
        )
    if found["kind"] == "checkpoint":
        return trained_source(args, path, found)
    return outside_source(args, path, found, name, plain)


def random_source(args, name, plain):
    """A random encoder of --arch for --data (a CNN: 16 wide in the small-data settings)."""
    if args.checkpoint:
        raise ConfigError("pass either --checkpoint or --init random, not both")
    if models.arch_family(plain["arch"]) == "cnn":
        plain["width"] = args.width
        if args.width is None and not takes_paper_recipe(args.preset, name):
            plain["width"] = 16
    return dict(
        kind="random",
        path=None,
        weights=None,
        method=None,
        encoder_kwargs=plain,
        data=name,
        data_dir=None,
    )


def checkpoint_path(args):
    """--checkpoint, or train.py's default run: a file that exists (else one sentence on what to do)."""
    path = args.checkpoint or DEFAULT_CHECKPOINT
    if os.path.isdir(path):
        raise CheckpointError(
            f"--checkpoint {path} is a folder; name the file in it (train.py writes "
            f"{os.path.join(path, 'checkpoint.pt')})"
        )
    if args.checkpoint is None and not os.path.isfile(path):
        raise CheckpointError(
            f"no --checkpoint given and {path} does not exist; run `python3 train.py` first, or pass "
            "--init random for the random-encoder baseline"
        )
    return path


def trained_source(args, path, found):
    """A train.py checkpoint: its encoder, pre-training method and dataset (the probe's default data)."""
    kw = dict(found["encoder_kwargs"])
    if args.width is not None and kw.get("width") != args.width:
        raise CheckpointError(
            f"{path} holds a {kw['arch']} of width {kw.get('width')}, but --width is {args.width}"
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


def outside_source(args, path, found, name, plain):
    """A released OpenMixup file or a torchvision state dict: a CNN takes the data's size, as a random
    encoder; a ViT's position embedding fixes its size."""
    kw = dict(found["encoder_kwargs"])
    if models.arch_family(kw["arch"]) == "cnn":
        kw["img_size"] = plain["img_size"]
    elif args.img_size is not None and args.img_size != kw["img_size"]:
        raise ConfigError(
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
    if cfg["mode"] == "finetune" and models.arch_kind(cfg["arch"]) != "resnet":
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


# --- Data: data.py's datasets, §7's transforms under an arch recipe, the low-label subset.
def build_data(cfg):
    """(train set, maybe a class-balanced subset; val set; class count)."""
    kw = dict(data_dir=cfg["data_dir"], crop=cfg["family"])
    train_transform = "finetune" if cfg["augment"] else "eval"
    train_set = data.build_dataset(
        cfg["data"], "train", img_size=cfg["img_size"], transform=train_transform, **kw
    )
    val_set = data.build_dataset(
        cfg["data"], "val", img_size=cfg["test_size"], transform="eval", **kw
    )
    if cfg["recipe"]:
        recipe_transforms(train_set, val_set, cfg)
    num_classes = data.dataset_info(cfg["data"])["num_classes"] or train_set.num_classes
    if val_set.num_classes != num_classes:
        raise DataError(
            f"{cfg['data']} has {num_classes} training classes but {val_set.num_classes} in val"
        )
    if cfg["labels_per_class"]:
        idx = class_balanced_subset(
            labels_of(train_set), cfg["labels_per_class"], cfg["subset_seed"], num_classes
        )
        # plain ints: datasets may not take tensor indices
        train_set = torch.utils.data.Subset(train_set, idx.tolist())
    return train_set, val_set, num_classes


def recipe_transforms(train_set, val_set, cfg):
    """§7's transforms instead of data.py's (each dataset applies its `.transform`): bicubic, as BEiT,
    timm and RSB; the val image resized to --test-resize, then centre-cropped."""
    bicubic = v2.InterpolationMode.BICUBIC
    # any dataset's image (uint8 tensor or PIL, grey or colour) → [3, H, W]
    first = [v2.ToImage(), v2.RGB()]
    last = [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
    ]
    resize = cfg["test_resize"] or round(cfg["test_size"] / 0.875)
    test = [v2.Resize(resize, interpolation=bicubic), v2.CenterCrop(cfg["test_size"])]
    val_set.transform = v2.Compose(first + test + last)
    train = [
        v2.RandomResizedCrop(cfg["img_size"], interpolation=bicubic),
        v2.RandomHorizontalFlip(),
    ]
    if cfg["rand_augment"]:
        # 2 ops as timm's rand-m9-mstd0.5 (without its magnitude noise); bilinear on tensors
        bilinear = v2.InterpolationMode.BILINEAR
        train.append(v2.RandAugment(2, cfg["rand_augment"], interpolation=bilinear))
    if cfg["random_erasing"]:  # timm's "pixel" mode: per-pixel noise, on the normalised image
        last.append(v2.RandomErasing(cfg["random_erasing"], value="random"))
    if cfg["augment"]:
        train_set.transform = v2.Compose(first + train + last)
    else:
        train_set.transform = val_set.transform


def labels_of(dataset):
    """Every image's label, without decoding the images where the dataset holds them ("fake" does not)."""
    labels = getattr(dataset, "labels_n", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = [dataset[i][1] for i in range(len(dataset))]
    return labels


def class_balanced_subset(
    labels, k, seed, num_classes=None, *, split="training", flag="--labels-per-class"
):
    """Sorted indices of exactly `k` images per class, the same for (labels, k, seed) on every rank; too few
    images in a class is a DataError naming the `split` and the `flag` that asked for `k`."""
    labels = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    picks = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < k:
            raise DataError(f"class {c} has only {len(idx)} {split} images, fewer than {flag} {k}")
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.cat(picks).sort().values


def interleave_shards(parts, n):
    """W per-rank shards [m, ...] → [n, ...] in dataset order: rank r holds samples r, r + W, ... (padded at the
    end by repeating the start), so interleaving restores the order and cutting at n counts each sample once."""
    return rearrange(torch.stack(parts), "w m ... -> (m w) ...")[:n]


def no_bar(env):
    """tqdm's `disable`: progress on rank 0 only, and there None: on a terminal only (tqdm's check), not as
    pages of text in a log file or a notebook."""
    if env.is_main:
        return None
    return True


@torch.no_grad()
def run_over(dataset, fn, cfg, env, desc):
    """`fn(images)` for every image, each rank on its shard → all (rows, labels) in dataset order, on the CPU."""
    loader = data.build_loader(
        dataset, cfg["batch_size"], train=False, distributed=env.enabled, workers=cfg["workers"]
    )
    prec = resolve_precision(cfg["precision"], env.device)
    outs, labels = [], []
    bar = tqdm(loader, desc=desc, disable=no_bar(env), dynamic_ncols=True, leave=False)
    for img, y in bar:
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


# --- The models: a linear head on pooled features (probe), or the whole classifier (fine-tuning).
def pool(feat_bchw):
    """[B, C, h, w] → [B, C]: global average pool; for a ViT exactly the mean patch token."""
    return feat_bchw.mean(dim=(2, 3))


def linear_head(channels, num_classes, kind="fc"):
    """[B, C] → [B, K]. 'fc': a Linear (§7's probe, the classifier). 'bn' (our probe, MAE's): BatchNorm1d
    without affine first, a per-feature whitening that lets one lr fit every encoder's feature scale."""
    fc = nn.Linear(channels, num_classes)
    nn.init.trunc_normal_(fc.weight, std=0.01)  # MAE's / MoCo v3's probe init: near-uniform start
    nn.init.zeros_(fc.bias)
    if kind == "fc":
        return fc
    return nn.Sequential(nn.BatchNorm1d(channels, affine=False, eps=1e-6), fc)


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


# --- Optimisation: groups, layer decay, the lr schedule, the loss, the training loop.
def layer_decay_fn(depth, decay):
    """BEiT's layer-wise lr decay around a ViT of `depth` blocks, as param_groups' lr_scale_fn: block
    k gets decay^(depth − k), patch/position embedding and cls token decay^(depth + 1), the rest 1."""

    def scale(name):
        if name.startswith("encoder.blocks."):
            return decay ** (depth - int(name.split(".")[2]))
        embedding = ("encoder.patch_embed", "encoder.pos_embed", "encoder.cls_token")
        if name.startswith(embedding):
            return decay ** (depth + 1)
        return 1.0

    return scale


def build_optimizer(module, cfg, lr_scale_fn=None):
    """SGD or AdamW over param_groups: no weight decay on norms, biases, embeddings; lr_scale for layer
    decay."""
    groups = param_groups(module, weight_decay=cfg["weight_decay"], lr_scale_fn=lr_scale_fn)
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])
    # also for RSB's LAMB: not in torch
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.999))


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
    after_step=None,
):
    """Train `trainable` (a probe head, or the classifier) on `batches(epoch)`: (features or images, labels);
    `after_step()` after each optimiser step (the EMA's update)."""
    prec = resolve_precision(cfg["precision"], env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=prec == "fp16")
    mixers = []  # one of the two at random per batch, as timm
    if cfg["mixup"]:
        mixers.append(v2.MixUp(alpha=cfg["mixup"], num_classes=num_classes))
    if cfg["cutmix"]:
        mixers.append(v2.CutMix(alpha=cfg["cutmix"], num_classes=num_classes))
    total = cfg["epochs"] * steps_per_epoch
    bar = tqdm(total=total, desc=cfg["mode"], disable=no_bar(env), dynamic_ncols=True)
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
            if after_step is not None:
                after_step()
            loss_sum += loss.detach()
            bar.update(1)
        if not loss_sum.isfinite():  # one host sync per epoch
            raise RunError(f"the training loss became non-finite in epoch {epoch + 1}; lower --blr")
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

    def batches(epoch):
        data.set_epoch(loader, epoch)
        return iter(loader)

    return batches, len(loader)


def feature_epochs(train_set, features, cfg, env):
    """(batches(epoch), steps per epoch) of the cached probe: features once, each rank its shard; every rank
    then steps through all of them in the same seeded order, in batches of the global batch (at most all of
    them: fit_batch_to_data), the last partial batch dropped (BatchNorm)."""
    x_nc, y_n = run_over(train_set, features, cfg, env, "train features")
    batch = cfg["global_batch"]
    steps = len(x_nc) // batch

    def batches(epoch):
        gen = torch.Generator().manual_seed(cfg["seed"] + epoch)
        order = torch.randperm(len(x_nc), generator=gen)
        return ((x_nc[idx], y_n[idx]) for idx in order[: steps * batch].split(batch))

    return batches, steps


def for_ranks(module, env):
    """(module, what to train): under torchrun SyncBatchNorm on GPUs (as §6) and DDP; else the module twice."""
    if not env.enabled:
        return module, module
    cuda = env.device.type == "cuda"
    if cuda:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    device_ids = [env.local_rank] if cuda else None
    return module, nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def probe(encoder, train_set, val_set, cfg, env, num_classes):
    """Linear probe: the encoder in eval mode without gradients (its weights and BN statistics stay put).
    Returns ({"": (val logits, labels)}, the classifier: images → logits)."""
    encoder.eval().requires_grad_(False)

    @torch.no_grad()
    def features(img):
        return pool(encoder(img)).float()

    head = linear_head(encoder.out_channels, num_classes, cfg["head"]).to(env.device)
    threads = torch.get_num_threads()
    if cfg["augment"]:  # §7's: features of every augmented batch, the head under DDP
        head, trainable = for_ranks(head, env)
        batches, steps = loader_epochs(train_set, cfg, env)

        def forward(img):
            return trainable(features(img))

    else:  # ours: features once; all ranks train the same head on all of them
        batches, steps = feature_epochs(train_set, features, cfg, env)
        trainable = forward = head
        if env.device.type == "cpu" and cfg["threads"] is None:
            # a hack: with 2 threads a head step ran 70× slower (46 vs 0.6 ms) on a busy 2-core machine
            torch.set_num_threads(1)
    fit(forward, trainable, build_optimizer(head, cfg), batches, steps, cfg, env, num_classes)
    torch.set_num_threads(threads)

    def classifier(img):
        return head.eval()(features(img))

    return {"": run_over(val_set, classifier, cfg, env, "val")}, classifier


def finetune(encoder, train_set, val_set, cfg, env, num_classes):
    """Every weight trains (BatchNorm statistics update, drop path on); with --ema their EMA is evaluated too.
    Returns ({"": (val logits, labels), maybe "ema_": ...}, the classifier)."""
    model, trainable = for_ranks(Classifier(encoder, num_classes).to(env.device), env)
    scale_fn = None
    if cfg["layer_decay"]:
        scale_fn = layer_decay_fn(len(encoder.blocks), cfg["layer_decay"])
    optimizer = build_optimizer(model, cfg, scale_fn)  # names without DDP's "module." prefix
    ema = None
    if cfg["ema"]:
        ema_fn = get_ema_multi_avg_fn(cfg["ema"])
        ema = AveragedModel(model, multi_avg_fn=ema_fn, use_buffers=True)

    def update_ema():
        ema.update_parameters(model)

    batches, steps = loader_epochs(train_set, cfg, env)
    after_step = update_ema if ema is not None else None
    fit(trainable, trainable, optimizer, batches, steps, cfg, env, num_classes, after_step)
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


# --- One evaluation: train the chosen way, then top-1 / top-5 (and §9's J^(m)) on the val split.
def evaluate(encoder, cfg, env):
    """Train the chosen way, then top-1/top-5 over the whole val split (also of the EMA weights)."""
    train_set, val_set, num_classes = build_data(cfg)
    fit_batch_to_data(cfg, len(train_set))
    # §9's val images, picked before training: too few in a class, or too many pairs, is said now
    picked = None
    if cfg["interactions"]:
        picked = pick_interaction_images(val_set, cfg, num_classes)
    if env.is_main:
        print_start(cfg, env, len(train_set), len(val_set))
    way = finetune if cfg["mode"] == "finetune" else probe
    result = dict(num_train=len(train_set), num_val=len(val_set), num_classes=num_classes)
    outputs, classifier = way(encoder, train_set, val_set, cfg, env, num_classes)
    for prefix, (logits_nk, labels_n) in outputs.items():
        for k, accuracy in top_k(logits_nk, labels_n).items():
            result[f"{prefix}top{k}"] = accuracy
    if picked is not None and env.is_main:
        result["interactions"] = interactions(classifier, val_set, picked, cfg, env.device)
    return result


def top_k(logits_nk, labels_n):
    """{1: top-1 %, 5: top-5 %} (top-5 of fewer than 5 classes: of all of them), rounded to 3 places."""
    k_max = min(5, logits_nk.shape[1])
    hit_nk = logits_nk.topk(k_max, dim=1).indices == labels_n[:, None]
    return {k: round(100.0 * hit_nk[:, :k].any(dim=1).float().mean().item(), 3) for k in (1, 5)}


def pick_interaction_images(val_set, cfg, num_classes):
    """--interactions val images per class (seeded, class-balanced), after checking that the grid of this
    size holds --interaction-pairs pairs."""
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
    except ConfigError as e:  # more pairs than the grid of this image size has
        raise ConfigError(
            f"--interaction-pairs {cfg['interaction_pairs']} is too many at {cfg['test_size']} px: {e}"
        ) from None
    return picked


def print_start(cfg, env, num_train, num_val):
    """One line: what is evaluated, on what, with which recipe (and how to get the other), lr and batch."""
    if cfg["recipe"]:
        recipe = f"the {cfg['recipe']} recipe of §7"
    else:
        recipe = "small-data settings"
    batch = f"global batch {cfg['global_batch']}"
    if cfg["origin"]["global_batch"].endswith("train images)"):
        batch += " (every train image: fewer than the batch asked for)"
    encoder = cfg["checkpoint"] or "random init"
    print(
        f"{cfg['mode']} of {cfg['arch']} ({encoder}) on {cfg['data']}, {recipe} ({the_other_recipe(cfg)}): "
        f"{num_train} train / {num_val} val images, {env.world_size} process(es) on {env.device.type}, "
        f"{cfg['optimizer']} lr {cfg['lr']:.3g}, {batch}, {cfg['epochs']} epochs"
    )


def interactions(classifier, val_set, idx, cfg, device):
    """§9's J^(m) of the trained classifier on the val images `idx` (K per class: seeded, class-balanced), by the
    released protocol (interaction.interaction_strength) at --interaction-pairs × --interaction-contexts; the
    baseline is the mean colour of those images (the dataset mean of §9). I^(m) is kept per image, for a
    bootstrap over images."""
    start = time.time()
    images, labels = zip(*[val_set[i] for i in idx.tolist()], strict=True)
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


# --- The result: printed, then appended to --results.
def report(cfg, result, seconds):
    """Print the result, then append it as one JSON line with its configuration (never losing the accuracy)."""
    ema = ""
    if "ema_top1" in result:
        ema = f"; EMA weights top-1 {result['ema_top1']:.2f} %"
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
        raise RunError(
            f"cannot append the result to {cfg['results']} ({why}); the accuracy above is not recorded"
        ) from None


def check_results_file(path):
    """Before any training: --results must name a file, and one that holds only JSON lines (a damaged file would
    take the new line with it, and reproduce.py refuses to read it)."""
    if os.path.isdir(path) or not os.path.basename(path):
        raise ConfigError(
            f"--results must name a JSONL file, not a folder (got {path!r}; e.g. "
            f"{os.path.join(path, 'results.jsonl')})"
        )
    # append_line replaces the file: never a device's node
    if os.path.exists(path) and not os.path.isfile(path):
        raise ConfigError(f"--results must name a regular JSONL file, got {path}")
    read_jsonl(path)  # JsonlError naming the bad line


def check_export(args):
    """Before anything is read or written: --export names a new regular file (or --overwrite), never the
    checkpoint being read, and comes without the flags of an evaluation."""
    read = args.checkpoint or DEFAULT_CHECKPOINT
    if args.init == "random":
        raise ConfigError(
            "--export writes a checkpoint's encoder; pass --checkpoint, not --init random"
        )
    # export writes the checkpoint's weights as they are, then exits
    if args.finetune or args.interactions:
        raise ConfigError(
            "--export writes the checkpoint's encoder as it is and exits; run --finetune / "
            "--interactions without --export"
        )
    if os.path.isdir(args.export) or not os.path.basename(args.export):
        raise ConfigError(
            f"--export {args.export} is a folder; name the file to write in it, e.g. "
            f"{os.path.join(args.export, 'encoder.pth')}"
        )
    if not os.path.exists(args.export):
        return
    if not os.path.isfile(args.export):  # atomic_save would replace it
        raise ConfigError(f"--export must name a regular file to write, got {args.export}")
    if os.path.exists(read) and os.path.samefile(args.export, read):
        raise ConfigError(
            f"--export {args.export} is the checkpoint being read; export to another file"
        )
    if not args.overwrite:
        raise ConfigError(f"{args.export} already exists; pass --overwrite to replace it")


def export(encoder, args, cfg, env):
    """--export: the encoder as a state dict that `--export-to`'s model loads with strict=True."""
    if not env.is_main:
        return
    to = args.export_to or "torchvision"
    how = weights.export(encoder, args.export, to)
    print(
        f"wrote {cfg['arch']} from {cfg['checkpoint']} as a {to} state dict to {args.export}; "
        f"it loads with strict=True into {how}"
    )


@entry_point
def main(argv=None):
    args = get_parser().parse_args(argv)
    start = time.time()
    env = setup_distributed()
    if args.export_to and not args.export:
        raise ConfigError(
            "--export-to names the library of --export; add --export OUT.pth or drop it"
        )
    if args.export:
        check_export(args)
    else:
        check_results_file(args.results or DEFAULTS["probe"]["results"])
    source = load_source(args)
    if args.export:  # before the encoder is built: a ViT has no torchvision model
        weights.check_export(source["encoder_kwargs"]["arch"], args.export_to or "torchvision")
    cfg = resolve_config(args, source, env.world_size)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if args.print_config:
        settings = {k: v for k, v in cfg.items() if k != "origin"}
        print("\n".join(config_table(settings, cfg["origin"])))
        return 0
    torch.manual_seed(cfg["seed"])  # a random encoder and the head start the same on every rank
    encoder = build_loaded_encoder(source, cfg)
    if args.export:
        export(encoder, args, cfg, env)
        return 0
    # channels_last weights make every conv's output channels_last too (faster under bf16)
    encoder = channels_last(encoder.to(env.device), cfg["family"], env.device)
    result = evaluate(encoder, cfg, env)
    if env.is_main:
        report(cfg, result, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
