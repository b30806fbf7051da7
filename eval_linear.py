"""Evaluate a pre-trained encoder the ways the field does (PAPER.md §7).

    python eval_linear.py                                    # probe train.py's default run, if it exists
    python eval_linear.py --init random --arch resnet18      # the baseline: same probe, random encoder
    python eval_linear.py --checkpoint CKPT --finetune       # fine-tune every weight
    python eval_linear.py --checkpoint CKPT --labels-per-class 10   # low-label probe (10 images a class)
    python eval_linear.py --checkpoint CKPT --export r50.pth # torchvision state dict, then exit
    torchrun --nproc_per_node=8 eval_linear.py --checkpoint CKPT --data imagenet --data-dir /data/imagenet --preset official

Modes
* Linear probe (default). The encoder is frozen: eval mode, no gradients, run under no_grad, so
  its weights and BatchNorm statistics stay bit-identical. Feature = global average of the last
  feature map (for a ViT: the mean patch token). Head = BatchNorm1d without affine + Linear (MAE),
  which makes the probe insensitive to the feature scale of each encoder. Without augmentation
  (the default) the features are computed once, cached in memory, and the head trains on the
  cache in seconds; `--augment` recomputes them for every augmented batch instead.
* Fine-tuning (`--finetune`). Everything trains (encoder in train mode) with AdamW, warm-up +
  cosine, label smoothing, Mixup/CutMix, drop path and, for ViTs, layer-wise lr decay.
* Low-label (`--labels-per-class K`): either mode on a fixed, seeded, class-balanced subset.

Settings: laptop defaults < the checkpoint (arch, data, image size) < `--preset official`
(PAPER §7, recipes assume 8 processes as in train.py) < command-line flags; `--print-config`
shows the result. lr = blr × global batch / 256 (the MAE / MoCo-v3 convention for evaluation;
train.py's pre-training blr is per 512). Every result is printed and appended as one JSON line,
with the full configuration, to `--results`. Reported accuracy is the last epoch's (MAE reports
the best epoch's, which peeks at the val set).

Under torchrun: each rank extracts features / logits for its DistributedSampler shard and the
shards are all-gathered in dataset order with the sampler's padding cut off, so every val image
counts exactly once. The cached probe then trains the same head on every rank (cheap, no DDP);
the augmented probe and fine-tuning use DDP (plus SyncBatchNorm on GPUs).

Where the official recipe cannot be followed exactly (each is a comment at its place below):
LAMB → AdamW, no RandAugment / random erasing (data.py's "finetune" transform has none), RSB A3
trains and tests at one size (not 160 / 224), MoCo-style lr 30 was tuned for a head without BN.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Subset
from torchvision.transforms import v2
from tqdm import tqdm

import data
from models import ARCHS, ResNet, arch_family, build_encoder, torchvision_state_dict
from runtime import (PRECISIONS, CheckpointError, atomic_save, autocast, cleanup_distributed, load_checkpoint, lr_at,
                     one_line, param_groups, resolve_precision, set_lr, setup_distributed)

DEFAULT_CHECKPOINT = os.path.join("out", "a2mim_resnet18_fashion-mnist", "checkpoint.pt")  # train.py's default run


class EvalError(Exception):
    """A run that must not start (conflicting settings, a diverged head): one sentence, exit 2."""


# ---------------------------------------------------------------------------------------------
# Configuration: laptop defaults < checkpoint < official recipe (--preset official) < flags.
# ---------------------------------------------------------------------------------------------

# Both modes. None = filled in by resolve_config from the checkpoint or the family.
COMMON = dict(
    data=None, data_dir=None, img_size=None, labels_per_class=None, subset_seed=0, momentum=0.9,
    min_lr=0.0, milestones=None, loss="ce", label_smoothing=0.0, mixup=0.0, cutmix=0.0,
    layer_decay=None, drop_path=None, precision="auto", workers=None, seed=0,
    results=os.path.join("out", "results.jsonl"),
)
DEFAULTS = {
    # Cached features make an epoch of the head cost ~0.2 s on a CPU, so epochs are cheap. On
    # Fashion-MNIST features of a random ResNet-18/16, SGD + cosine for 30 epochs gives val top-1
    # 65.9 / 67.2 / 67.9 % at lr 0.01 / 0.1 / 1 (10 epochs: 66.4, 60: 67.5); the official lr 30
    # with steps gives 62.2: it overshoots once the BN in the head has whitened the features.
    "probe": COMMON | dict(epochs=30, batch_size=256, optimizer="sgd", blr=0.1, weight_decay=0.0,
                           schedule="cosine", warmup_epochs=0, augment=False),
    # A few epochs on a CPU. Mixup/CutMix (None) are resolved per image size: on for ImageNet-size
    # data, off for 28-32 px data, where mixing two tiny images mostly destroys both.
    "finetune": COMMON | dict(epochs=5, batch_size=128, optimizer="adamw", blr=1e-3, weight_decay=0.05,
                              schedule="cosine", warmup_epochs=1, min_lr=1e-6, augment=True,
                              label_smoothing=0.1, mixup=None, cutmix=None),
}

# PAPER §7. batch_size is per process for 8 processes, like train.py's OFFICIAL recipes.
OFFICIAL = {
    # ResNet-50: SGD lr 30, momentum 0.9, no wd, 100 epochs, ×0.1 at 60 and 80, batch 256.
    # ConvNeXt uses the same (the paper gives no separate probe recipe).
    ("probe", "cnn"): dict(epochs=100, batch_size=32, optimizer="sgd", blr=30.0, momentum=0.9,
                           weight_decay=0.0, schedule="step", milestones=[60, 80], warmup_epochs=0),
    # ViT (MoCo v3 style): SGD lr 12, cosine, 90 epochs, batch 1024.
    ("probe", "vit"): dict(epochs=90, batch_size=128, optimizer="sgd", blr=3.0, momentum=0.9,
                           weight_decay=0.0, schedule="cosine", warmup_epochs=0),
    # "RSB A3"-like: LAMB lr 8e-3 at batch 2048 is not in torch, so AdamW at the same lr; BCE as
    # RSB (without timm's 0.2 target threshold); Mixup 0.1 / CutMix 1.0; 5 warm-up epochs.
    # Deviations: no RandAugment, one image size for train and test (RSB: 160 / 224).
    ("finetune", "cnn"): dict(epochs=100, batch_size=256, optimizer="adamw", blr=1e-3, weight_decay=0.02,
                              schedule="cosine", warmup_epochs=5, min_lr=1e-6, loss="bce",
                              label_smoothing=0.0, mixup=0.1, cutmix=1.0),
    # BEiT/MAE style: AdamW, batch 1024, layer decay 0.65, 20 warm-up epochs, drop path 0.1,
    # Mixup 0.8 / CutMix 1.0, smoothing 0.1. The paper states no lr: MAE's blr 5e-4 (lr 2e-3).
    # Deviations: no RandAugment m9, no random erasing 0.25.
    ("finetune", "vit"): dict(epochs=100, batch_size=128, optimizer="adamw", blr=5e-4, weight_decay=0.05,
                              schedule="cosine", warmup_epochs=20, min_lr=1e-6, layer_decay=0.65,
                              drop_path=0.1, label_smoothing=0.1, mixup=0.8, cutmix=1.0),
}
# Fine-tuning defaults that depend on the family, used where nothing above set them.
FAMILY_FINETUNE = {
    "vit": dict(drop_path=0.1, layer_decay=0.65, mixup=0.8, cutmix=1.0),
    "convnext": dict(drop_path=0.1, layer_decay=None, mixup=0.1, cutmix=1.0),
    "resnet": dict(drop_path=None, layer_decay=None, mixup=0.1, cutmix=1.0),  # torchvision ResNet: no drop path
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", help=f"train.py checkpoint or torchvision state dict (default {DEFAULT_CHECKPOINT})")
    a("--init", choices=("checkpoint", "random"), default="checkpoint", help="'random' = the untrained baseline")
    a("--arch", choices=ARCHS, help="encoder for --init random or a torchvision state dict; checked against a checkpoint")
    a("--width", type=int, help="ResNet/ConvNeXt width for --init random (default 16, as train.py)")
    a("--finetune", action="store_true", help="fine-tune all weights instead of a linear probe")
    a("--augment", action=argparse.BooleanOptionalAction, help="augment training images (probe default: off, cached)")
    a("--labels-per-class", type=int, help="train on K images per class (seeded, class-balanced)")
    a("--subset-seed", type=int, help="seed of the --labels-per-class subset")
    a("--data", help=f"dataset: {', '.join(data.DATASETS)} (default: the checkpoint's, else fashion-mnist)")
    a("--data-dir", help="where the dataset lives (see data.py)")
    a("--img-size", type=int, help="evaluation resolution (default: the encoder's)")
    a("--epochs", type=int)
    a("--batch-size", type=int, help="per process; global = this × world size")
    a("--optimizer", choices=("sgd", "adamw"))
    a("--blr", type=float, help="base lr per 256 images of global batch")
    a("--momentum", type=float, help="SGD momentum")
    a("--weight-decay", type=float)
    a("--schedule", choices=("cosine", "step"))
    a("--milestones", type=int, nargs="+", help="epochs of the ×0.1 steps (schedule 'step')")
    a("--warmup-epochs", type=float)
    a("--min-lr", type=float, help="end of the cosine")
    a("--layer-decay", type=float, help="layer-wise lr decay (ViT fine-tuning; default 0.65)")
    a("--drop-path", type=float, help="stochastic depth when fine-tuning (ViT/ConvNeXt default 0.1)")
    a("--label-smoothing", type=float)
    a("--loss", choices=("ce", "bce"), help="cross-entropy, or RSB's binary cross-entropy")
    a("--mixup", type=float, help="Mixup alpha (0 = off; fine-tuning only)")
    a("--cutmix", type=float, help="CutMix alpha (0 = off; fine-tuning only)")
    a("--precision", choices=PRECISIONS, help="auto = bf16 on GPU, fp32 on CPU")
    a("--workers", type=int, help="data loader workers per process")
    a("--seed", type=int)
    a("--results", help="JSONL file the result line is appended to (default out/results.jsonl)")
    a("--export", metavar="OUT.pth", help="write the checkpoint's encoder as a torchvision state dict and exit")
    a("--preset", choices=("none", "official"), default="none", help="'official' = PAPER §7's recipe")
    a("--print-config", action="store_true", help="print the resolved settings and exit")
    return p


def encoder_family(arch):
    return "vit" if arch.startswith("vit") else "convnext" if arch.startswith("convnext") else "resnet"


def resolve_config(args, source, world_size):
    """Merge the layers, fill family defaults, derive global batch and lr, check combinations."""
    mode = "finetune" if args.finetune else "probe"
    arch = source["encoder_kwargs"]["arch"]
    family = arch_family(arch)
    cli = {k: v for k, v in vars(args).items() if v is not None and k in DEFAULTS[mode]}
    if cli.get("data", source["data"]) != source["data"]:
        source = source | dict(data_dir=None)  # the checkpoint's data dir belongs to its own dataset
    preset = OFFICIAL[(mode, family)] if args.preset == "official" else {}
    from_source = dict(data=source["data"], data_dir=source["data_dir"], img_size=source["encoder_kwargs"]["img_size"])
    cfg = {**DEFAULTS[mode], **from_source, **preset, **cli}
    if mode == "finetune":
        large = cfg["img_size"] >= data.LARGE_IMAGE_PX
        for k, v in FAMILY_FINETUNE[encoder_family(arch)].items():
            if cfg[k] is None:
                cfg[k] = v if large or k not in ("mixup", "cutmix") else 0.0
    cfg.update(mode=mode, arch=arch, family=family, preset=args.preset, init=source["kind"], checkpoint=source["path"],
               pretrain_method=source["method"], encoder_kwargs=source["encoder_kwargs"], world_size=world_size)
    cfg["global_batch"] = cfg["batch_size"] * world_size
    cfg["lr"] = cfg["blr"] * cfg["global_batch"] / 256
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Combinations that cannot work, each as one sentence."""
    if cfg["schedule"] == "step" and not cfg["milestones"]:
        raise EvalError("schedule 'step' needs --milestones (epochs of the ×0.1 steps, e.g. 60 80)")
    if cfg["layer_decay"] is not None and cfg["family"] != "vit":
        raise EvalError(f"layer-wise lr decay is defined for ViT blocks, not for {cfg['arch']}; drop --layer-decay")
    if cfg["drop_path"] and cfg["arch"].startswith("resnet"):
        raise EvalError("torchvision's ResNet has no drop path; drop --drop-path")
    if cfg["mode"] == "probe" and (cfg["mixup"] or cfg["cutmix"]):
        raise EvalError("Mixup/CutMix are fine-tuning options; add --finetune or drop them")
    if cfg["family"] == "vit" and cfg["img_size"] != cfg["encoder_kwargs"]["img_size"]:
        raise EvalError(f"this ViT was built for {cfg['encoder_kwargs']['img_size']} px (its position "
                        f"embedding fixes the grid); drop --img-size {cfg['img_size']}")


# ---------------------------------------------------------------------------------------------
# The encoder: from a train.py checkpoint, a torchvision state dict, or random init; and export.
# ---------------------------------------------------------------------------------------------


def load_source(args):
    """Where the weights come from: {kind, path, weights, encoder_kwargs, method, data, data_dir}.

    kind: "checkpoint" (train.py's, pre-trained with `method`), "torchvision" or "random"."""
    if args.init == "random":
        if args.checkpoint:
            raise EvalError("pass either --checkpoint or --init random, not both")
        return dict(kind="random", path=None, weights=None, method=None, **_plain_kwargs(args, random=True))
    path = args.checkpoint or DEFAULT_CHECKPOINT
    if args.checkpoint is None and not os.path.isfile(path):
        raise EvalError(f"no --checkpoint given and {path} does not exist; run `python3 train.py` first, "
                        "or pass --init random for the random-encoder baseline")
    try:
        state = load_checkpoint(path, arch=args.arch)
    except CheckpointError as not_ours:
        weights = _plain_state_dict(path)
        if weights is None:
            raise not_ours from None
        if args.arch is None:
            raise EvalError(f"{path} is a plain state dict; pass --arch to say which torchvision model it holds") from None
        return dict(kind="torchvision", path=path, weights=weights, method=None, **_plain_kwargs(args, random=False))
    kw = state["encoder_kwargs"]
    if args.width is not None and kw.get("width") != args.width:
        raise CheckpointError(f"{path} holds a {kw['arch']} of width {kw.get('width')}, but --width is {args.width}")
    weights = {k.removeprefix("encoder."): v for k, v in state["model"].items() if k.startswith("encoder.")}
    config = state.get("config", {})
    return dict(kind="checkpoint", path=path, weights=weights, encoder_kwargs=kw, method=config.get("method"),
                data=config.get("data", "fashion-mnist"), data_dir=config.get("data_dir"))


def _plain_kwargs(args, *, random):
    """Encoder and data for weights without a config: --arch, --data, the dataset's size.

    A random encoder gets train.py's laptop width (16) unless --preset official; a torchvision
    state dict is always the standard width and stem (export writes nothing else).
    """
    official = args.preset == "official"
    name = args.data or ("imagenet" if official else "fashion-mnist")
    kw = dict(arch=args.arch or "resnet18", img_size=args.img_size or data.dataset_info(name)["img_size"])
    if random and not kw["arch"].startswith("vit"):
        kw["width"] = args.width or (None if official else 16)
    elif not random:
        kw["small_stem"] = False
    return dict(encoder_kwargs=kw, data=name, data_dir=None)


def _plain_state_dict(path):
    """A flat {name: tensor} dict (torchvision format), or None for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    ok = isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())
    return state if ok else None


def state_dict_mismatch(expected, got):
    """None if both dicts have the same keys and shapes; else a short description of the first difference."""
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = [k for k in expected if k in got and expected[k].shape != got[k].shape]
    if wrong:
        k = wrong[0]
        return f"{k} is {list(got[k].shape)}, expected {list(expected[k].shape)}"
    if missing or unexpected:
        return f"{len(missing)} tensors missing (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
    return None


def build_loaded_encoder(source, cfg):
    """build_encoder from the source's kwargs, then its weights (strict: same keys and shapes)."""
    kw = dict(source["encoder_kwargs"])
    if cfg["mode"] == "finetune" and not cfg["arch"].startswith("resnet"):
        kw["drop_path"] = cfg["drop_path"]  # changes no shape, so the weights still load
    encoder = build_encoder(**kw)
    weights = source["weights"]
    if weights is not None:
        if source["kind"] == "torchvision":  # torchvision's classifier: the encoder has none
            weights = {k: v for k, v in weights.items() if not k.startswith(("fc.", "classifier."))}
        diff = state_dict_mismatch(encoder.state_dict(), weights)
        if diff:
            raise CheckpointError(f"{source['path']} does not fit a {kw['arch']} encoder ({diff})")
        encoder.load_state_dict(weights)
    return encoder


def export_torchvision(encoder, path):
    """Write `encoder` so that `torchvision.models.<arch>().load_state_dict(torch.load(path, weights_only=True))` works.

    Only encoders that *are* torchvision's model fit: standard width and the standard stem (a
    ResNet's 7×7 conv + max-pool), i.e. pre-trained at img_size > 64 at the standard width.
    """
    state = torchvision_state_dict(encoder)  # ValueError for a ViT
    if not hasattr(torchvision.models, encoder.arch):
        raise EvalError(f"torchvision has no {encoder.arch}, so there is nothing to export it to")
    with torch.device("meta"):  # shapes only: no memory, no init cost
        reference = getattr(torchvision.models, encoder.arch)().state_dict()
    diff = state_dict_mismatch(reference, state)
    if diff:
        raise EvalError(f"this {encoder.arch} is not torchvision's ({diff}); export needs the standard width and "
                        "stem, i.e. pre-training at img_size > 64 with --width 64 (or --preset official)")
    atomic_save(path, state)


# ---------------------------------------------------------------------------------------------
# Data: datasets, the low-label subset, and distributed inference that counts every sample once.
# ---------------------------------------------------------------------------------------------


def class_balanced_subset(labels, k, seed, num_classes=None):
    """Sorted indices of exactly `k` images of every class, the same for the same (labels, k, seed).

    The low-label setting, where pre-training matters most on small data. Every rank draws the
    same subset (a seeded CPU generator, no global RNG).
    """
    labels = torch.as_tensor(labels)
    if k <= 0:
        raise ValueError(f"--labels-per-class must be positive, got {k}")
    num_classes = num_classes or int(labels.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < k:
            raise ValueError(f"class {c} has only {len(idx)} training images, fewer than --labels-per-class {k}")
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.cat(picks).sort().values


def dataset_labels(dataset):
    """All labels of a dataset, without decoding images where the dataset keeps them aside."""
    for attr in ("labels_n", "targets"):  # data.py's in-memory sets / ImageFolder
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr))
    return torch.tensor([dataset[i][1] for i in range(len(dataset))])  # e.g. "fake": generated


def build_data(cfg):
    """(train set, maybe a class-balanced subset; val set; class count)."""
    if cfg["data_dir"] and not os.path.isdir(cfg["data_dir"]):
        # data.py would fall back to ./data or the system copy; a typo should not go unnoticed.
        raise data.DataError(f"data directory {cfg['data_dir']} does not exist")
    kw = dict(data_dir=cfg["data_dir"], img_size=cfg["img_size"], family=cfg["family"])
    train_set = data.build_dataset(cfg["data"], "train", transform="finetune" if cfg["augment"] else "eval", **kw)
    val_set = data.build_dataset(cfg["data"], "val", transform="eval", **kw)
    num_classes = data.dataset_info(cfg["data"])["num_classes"] or train_set.num_classes
    if val_set.num_classes != num_classes:
        raise data.DataError(f"{cfg['data']} has {num_classes} training classes but {val_set.num_classes} in val")
    if cfg["labels_per_class"]:
        labels = dataset_labels(train_set)
        idx = class_balanced_subset(labels, cfg["labels_per_class"], cfg["subset_seed"], num_classes)
        train_set = Subset(train_set, idx.tolist())  # plain ints: datasets may not take tensor indices
    return train_set, val_set, num_classes


def interleave_shards(parts, n):
    """Per-rank rows [m, ...] × W → [n, ...] in dataset order.

    DistributedSampler without shuffling gives rank r the samples r, r + W, r + 2W, ... of the
    index list padded at its end by repeating its start, so interleaving the shards restores the
    order and cutting at n drops the padding: every sample is counted exactly once.
    """
    return torch.stack(parts, dim=1).flatten(0, 1)[:n]


def gather_in_order(rows, n, env):
    if not env.enabled:
        return rows
    parts = [torch.empty_like(rows) for _ in range(env.world_size)]
    dist.all_gather(parts, rows.contiguous())
    return interleave_shards(parts, n)


def to_device(x, env, cfg):
    x = x.to(env.device, non_blocking=True)
    if x.ndim == 4 and cfg["family"] == "cnn" and env.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)  # faster convs under bf16, as train.py
    return x


@torch.no_grad()
def run_over(dataset, fn, cfg, env, desc):
    """`fn(images)` for every image of `dataset`, each rank on its shard; all rows in dataset order,
    on the CPU, with their labels. Used for feature caching and for validation logits."""
    loader = data.build_loader(dataset, cfg["batch_size"], train=False, distributed=env.enabled,
                               workers=cfg["workers"])
    prec = resolve_precision(cfg["precision"], env.device)
    outs, labels = [], []
    for img, y in tqdm(loader, desc=desc, disable=not env.is_main, dynamic_ncols=True, leave=False):
        with autocast(env.device, prec):
            outs.append(fn(to_device(img, env, cfg)).float())
        labels.append(y.to(env.device))
    n = len(dataset)
    return gather_in_order(torch.cat(outs), n, env).cpu(), gather_in_order(torch.cat(labels), n, env).cpu()


# ---------------------------------------------------------------------------------------------
# Heads, optimiser, schedule, loss.
# ---------------------------------------------------------------------------------------------


def pool(feat_bchw):
    """[B, C, h, w] → [B, C]: global average pool; for a ViT exactly the mean patch token."""
    return feat_bchw.mean(dim=(2, 3))


def linear_head(channels, num_classes):
    head = nn.Linear(channels, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.01)  # MAE's probe init: near-uniform start
    nn.init.zeros_(head.bias)
    return head


def probe_head(channels, num_classes):
    """MAE's probe: BatchNorm1d without affine (a per-feature whitening) + Linear. [B, C] → [B, K]"""
    return nn.Sequential(nn.BatchNorm1d(channels, affine=False, eps=1e-6), linear_head(channels, num_classes))


class Classifier(nn.Module):
    """Encoder + global average pool + head, all trained when fine-tuning. [B, 3, H, W] → [B, K]

    ResNet: a plain Linear, as torchvision's `fc`. ViT: LayerNorm on the pooled tokens first
    (BEiT's `fc_norm`; the encoder's own final norm acts per token, not on their mean).
    ConvNeXt: LayerNorm too, as torchvision's ConvNeXt classifier.
    """

    def __init__(self, encoder, num_classes):
        super().__init__()
        c = encoder.out_channels
        self.encoder = encoder
        self.norm = nn.Identity() if isinstance(encoder, ResNet) else nn.LayerNorm(c, eps=1e-6)
        self.head = linear_head(c, num_classes)

    def forward(self, x_bchw):
        return self.head(self.norm(pool(self.encoder(x_bchw))))


def layer_decay_fn(depth, decay):
    """BEiT's layer-wise lr decay for a Classifier around a ViT of `depth` blocks, as
    param_groups' lr_scale_fn: block k gets decay^(depth − k), patch/position embedding and cls
    token decay^(depth + 1), everything after the blocks (final norms, head) 1."""
    def scale(name):
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("encoder.patch_embed", "encoder.pos_embed", "encoder.cls_token")):
            layer = 0
        else:
            layer = depth + 1
        return decay ** (depth + 1 - layer)
    return scale


def build_optimizer(module, cfg, lr_scale_fn=None):
    # param_groups: no weight decay on norms, biases, embeddings; lr_scale for layer decay.
    groups = param_groups(module, weight_decay=cfg["weight_decay"], lr_scale_fn=lr_scale_fn)
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.999))


def lr_for_step(step, cfg, steps_per_epoch):
    """Warm-up, then cosine, or ×0.1 at each milestone epoch (the 60/80 probe protocol)."""
    return lr_at(step, lr=cfg["lr"], total_steps=cfg["epochs"] * steps_per_epoch,
                 warmup_steps=round(cfg["warmup_epochs"] * steps_per_epoch), min_lr=cfg["min_lr"],
                 schedule=cfg["schedule"], step_at=[m * steps_per_epoch for m in cfg["milestones"] or ()])


def batch_mixer(cfg, num_classes):
    """Mixup or CutMix on a whole batch (one of the two at random per batch, as timm), or None."""
    mixers = []
    if cfg["mixup"]:
        mixers.append(v2.MixUp(alpha=cfg["mixup"], num_classes=num_classes))
    if cfg["cutmix"]:
        mixers.append(v2.CutMix(alpha=cfg["cutmix"], num_classes=num_classes))
    return v2.RandomChoice(mixers) if mixers else None


def classification_loss(logits_bk, target, cfg, num_classes):
    """Cross-entropy with label smoothing (takes Mixup's soft targets too), or RSB's BCE on
    (mixed, smoothed) one-hot targets."""
    if cfg["loss"] == "bce":
        target_bk = target if target.ndim == 2 else F.one_hot(target, num_classes).float()
        s = cfg["label_smoothing"]
        return F.binary_cross_entropy_with_logits(logits_bk, target_bk * (1 - s) + s / num_classes)
    return F.cross_entropy(logits_bk, target, label_smoothing=cfg["label_smoothing"])


# ---------------------------------------------------------------------------------------------
# The training loop shared by the three ways of evaluating, and the three ways.
# ---------------------------------------------------------------------------------------------


def fit(forward, trainable, optimizer, batches, steps_per_epoch, cfg, env, num_classes):
    """Train what `trainable` holds (the probe head, or the whole classifier).

    `batches(epoch)` yields (input, label): cached features, or images from a loader;
    `forward(input) -> logits`.
    """
    prec = resolve_precision(cfg["precision"], env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=prec == "fp16")
    mix = batch_mixer(cfg, num_classes)
    bar = tqdm(total=cfg["epochs"] * steps_per_epoch, desc=cfg["mode"], disable=not env.is_main, dynamic_ncols=True)
    step = 0
    for epoch in range(cfg["epochs"]):
        trainable.train()  # for a probe: the head only; the encoder stays in eval mode
        loss_sum = torch.zeros((), device=env.device)
        for x, y in batches(epoch):
            set_lr(optimizer, lr_for_step(step, cfg, steps_per_epoch))
            x, y = to_device(x, env, cfg), y.to(env.device)
            if mix is not None:
                x, y = mix(x, y)
            with autocast(env.device, prec):
                logits = forward(x)
            loss = classification_loss(logits.float(), y, cfg, num_classes)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
            step += 1
            bar.update(1)
        mean = loss_sum.item() / steps_per_epoch  # one host sync per epoch
        if not math.isfinite(mean):
            raise EvalError(f"the training loss became non-finite in epoch {epoch + 1}; lower --blr")
        bar.set_postfix(epoch=epoch + 1, loss=f"{mean:.4f}")
    bar.close()


def loader_batches(dataset, cfg, env):
    """(batches(epoch), steps per epoch) over a shuffled, augmented loader; a shard per rank."""
    loader = data.build_loader(dataset, cfg["batch_size"], train=True, distributed=env.enabled,
                               workers=cfg["workers"], seed=cfg["seed"])

    def batches(epoch):
        data.set_epoch(loader, epoch)
        return iter(loader)
    return batches, len(loader)


def for_ranks(module, env):
    """(module, what to train): under torchrun, BatchNorm synchronised across GPUs (as in
    pre-training, §6) and DDP around it; otherwise the module twice."""
    if not env.enabled:
        return module, module
    if env.device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module, DDP(module, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def frozen_features(encoder):
    """[B, 3, H, W] → pooled features [B, C] of a frozen encoder; autograd never sees it."""
    encoder.eval().requires_grad_(False)  # eval: BatchNorm uses, and never updates, its statistics
    return torch.no_grad()(lambda img: pool(encoder(img)))


@contextlib.contextmanager
def single_threaded_on_cpu(env):
    """A hack for CPU runs: a [256, C] × [C, K] step gains nothing from threads, and OpenMP's
    waiting made it 70× slower (46 ms vs 0.6 ms) with 2 threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    if env.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def probe_cached(encoder, train_set, val_set, cfg, env, num_classes):
    """Linear probe on features computed once. Each rank extracts its shard, all ranks gather all
    features and train the same head on them (identical seeds: no DDP needed, and a head is cheap)."""
    features = frozen_features(encoder)
    x_train, y_train = run_over(train_set, features, cfg, env, "train features")
    x_val, y_val = run_over(val_set, features, cfg, env, "val features")
    head = probe_head(encoder.out_channels, num_classes).to(env.device)
    batch = min(cfg["global_batch"], len(x_train))
    steps = len(x_train) // batch  # the last partial batch is dropped (BatchNorm dislikes size 1)

    def batches(epoch):
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg["seed"] + epoch))
        return ((x_train[idx], y_train[idx]) for idx in perm[: steps * batch].split(batch))
    with single_threaded_on_cpu(env):
        fit(head, head, build_optimizer(head, cfg), batches, steps, cfg, env, num_classes)
    with torch.no_grad():
        logits = torch.cat([head.eval()(x.to(env.device)).cpu() for x in x_val.split(4096)])
    return logits, y_val


def probe_streamed(encoder, train_set, val_set, cfg, env, num_classes):
    """Linear probe with augmentation: features recomputed (frozen) for every batch."""
    features = frozen_features(encoder)
    head, trainable = for_ranks(probe_head(encoder.out_channels, num_classes).to(env.device), env)
    optimizer = build_optimizer(head, cfg)
    batches, steps = loader_batches(train_set, cfg, env)
    fit(lambda img: trainable(features(img).float()), trainable, optimizer, batches, steps, cfg, env, num_classes)
    head.eval()
    return run_over(val_set, lambda img: head(features(img).float()), cfg, env, "val")


def finetune(encoder, train_set, val_set, cfg, env, num_classes):
    """All weights train (encoder in train mode: BatchNorm statistics update, drop path is on)."""
    model = Classifier(encoder, num_classes).to(env.device)
    if cfg["family"] == "cnn" and env.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # faster convs under bf16, as train.py
    model, trainable = for_ranks(model, env)
    scale_fn = layer_decay_fn(len(encoder.blocks), cfg["layer_decay"]) if cfg["layer_decay"] else None
    optimizer = build_optimizer(model, cfg, scale_fn)  # names without DDP's "module." prefix
    batches, steps = loader_batches(train_set, cfg, env)
    fit(trainable, trainable, optimizer, batches, steps, cfg, env, num_classes)
    model.eval()
    return run_over(val_set, model, cfg, env, "val")


def topk_accuracy(logits_nk, labels_n, ks=(1, 5)):
    """Percent of samples whose label is among the k largest logits, per k (k capped at the class count)."""
    top_nk = logits_nk.topk(min(max(ks), logits_nk.shape[1]), dim=1).indices
    hit_nk = top_nk == labels_n[:, None]
    return [100.0 * hit_nk[:, :k].any(dim=1).float().mean().item() for k in ks]


# ---------------------------------------------------------------------------------------------
# Reporting and main.
# ---------------------------------------------------------------------------------------------


def describe(cfg, n_train, n_val, num_classes, env):
    """One line saying what is about to run."""
    what = {"probe": "linear probe (augmented)" if cfg["augment"] else "linear probe (cached features)",
            "finetune": "fine-tuning"}[cfg["mode"]]
    origin = "random init" if cfg["init"] == "random" else cfg["checkpoint"]
    subset = f", {cfg['labels_per_class']} labels per class" if cfg["labels_per_class"] else ""
    return (f"{what} of {cfg['arch']} ({origin}) on {cfg['data']}{subset}: {n_train} train / {n_val} val images "
            f"at {cfg['img_size']} px, {num_classes} classes; {env.world_size} process(es) on {env.device.type}; "
            f"{cfg['optimizer']} lr {cfg['lr']:.3g}, global batch {cfg['global_batch']}, {cfg['epochs']} epochs")


def evaluate(encoder, cfg, env):
    """Train the chosen way, then top-1/top-5 over the whole val split."""
    train_set, val_set, num_classes = build_data(cfg)
    if env.is_main:
        print(describe(cfg, len(train_set), len(val_set), num_classes, env), flush=True)
    way = finetune if cfg["mode"] == "finetune" else probe_streamed if cfg["augment"] else probe_cached
    logits_nk, labels_n = way(encoder, train_set, val_set, cfg, env, num_classes)
    top1, top5 = topk_accuracy(logits_nk, labels_n)
    return dict(top1=round(top1, 3), top5=round(top5, 3), num_train=len(train_set), num_val=len(labels_n),
                num_classes=num_classes)


def report(cfg, result, seconds):
    """Print the result and append it, with the whole configuration, as one JSON line."""
    record = dict(mode=cfg["mode"], **result, checkpoint=cfg["checkpoint"], init=cfg["init"], arch=cfg["arch"],
                  data=cfg["data"], labels_per_class=cfg["labels_per_class"], wall_time_s=round(seconds, 1),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S"), config=cfg)
    os.makedirs(os.path.dirname(cfg["results"]) or ".", exist_ok=True)
    with open(cfg["results"], "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{cfg['mode']}: top-1 {result['top1']:.2f} %, top-5 {result['top5']:.2f} % on {result['num_val']} "
          f"val images ({seconds:.0f} s); appended to {cfg['results']}")


def main(argv=None):
    args = get_parser().parse_args(argv)
    start = time.time()
    try:
        env = setup_distributed()
        source = load_source(args)
        cfg = resolve_config(args, source, env.world_size)
        if args.print_config:
            print(json.dumps(cfg, indent=2))
            return 0
        torch.manual_seed(cfg["seed"])  # a random encoder and the head start the same on every rank
        encoder = build_loaded_encoder(source, cfg)
        if args.export:
            if args.init == "random":
                raise EvalError("--export writes a checkpoint's encoder; pass --checkpoint, not --init random")
            if env.is_main:
                export_torchvision(encoder, args.export)
                print(f"wrote {cfg['arch']} from {cfg['checkpoint']} as a torchvision state dict to {args.export}")
            return 0
        result = evaluate(encoder.to(env.device), cfg, env)
        if env.is_main:
            report(cfg, result, time.time() - start)
    except (data.DataError, CheckpointError, EvalError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
