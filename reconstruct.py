"""A picture of any pre-trained model: the reconstruction PNG that training writes, for your images.

    python reconstruct.py --checkpoint out/a2mim_resnet18_fashion-mnist/checkpoint.pt photos/ cat.jpg
    python reconstruct.py --checkpoint a2mim_r50_l3_sz224_init_8xb256_cos_ep300_full.pth photos/ --out r50.png

Rows of original | model input | prediction | prediction pasted into the visible pixels (save_reconstructions,
also used by train.py), one per image: files in the order given, folders walked as data.py walks an image folder
(sorted, hidden files skipped). Each image is resized and centre-cropped to the model's size; the masks come from
--seed alone (the same on every machine), so the same command writes the same bytes. The model needs its decoder:
a train.py checkpoint or a released *_full.pth (weights.load_pretrained reads both), not a backbone-only or
torchvision file. Runs on the CPU, in eval mode.
"""

import argparse
import io
import math
import os
import sys

# Set before torch loads libgomp: a short OpenMP spin, as bench.py explains; the user's own choice is kept.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
    os.environ["GOMP_SPINCOUNT"] = "3000"

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

import data
import models
import runtime
import weights
from a2mim import A2MIM, mask_blocks, resize_mask
from runtime import (
    AT_LEAST_1,
    SEED,
    CheckpointError,
    ConfigError,
    DataError,
    RunError,
    Setting,
)

NO_DECODER = (
    "{} has no decoder: the picture needs a pre-trained A²MIM/SimMIM model (train.py checkpoint or a "
    "released *_full.pth)"
)
# Of a train.py run's settings, those that change the picture.
PICTURE_OPTIONS = ("fill", "token_at", "token_mode")


# --- The picture: the one that train.py writes during training, and this script for any model.
# Left to right; train.py names its files by them.
RECON_COLUMNS = ("original", "input", "prediction", "pasted")


def save_reconstructions(path, img_bchw, out, n=8):
    """Rows of original | model input | prediction | prediction pasted into the visible pixels, for the first
    `n` images, from what a2mim.A2MIM returned (`out`: pred, mask, and input, the pixels the encoder saw with
    the model's own fill), under a header naming the columns. Legible at any size: a tile is the image
    upscaled (nearest, whole pixels) to at least 96 px, so that a 4-px mask block shows, and shrunk
    (antialiased) to at most 256 px, so that a row of 4 stays about 1,000 px wide. Drawn on the CPU,
    encoded in memory and written whole (atomic_save): a kill or a full disk leaves no half PNG."""
    # 1. The four columns, denormalised: [n, 4, 3, H, W].
    pred, mask = out["pred"][:n].detach().float().cpu(), out["mask"][:n].cpu()
    seen = out.get("input", img_bchw)[:n].detach().float().cpu()
    m = resize_mask(mask, pred.shape[-1]).float()
    rows = torch.stack([img_bchw[:n].float().cpu(), seen, pred, seen * (1 - m) + pred * m], dim=1)
    std, mean = torch.tensor(data.IMAGENET_STD), torch.tensor(data.IMAGENET_MEAN)
    rows = rows * std.view(3, 1, 1) + mean.view(3, 1, 1)

    # 2. Tiles of 96 to 256 px, 2-px black lines between them, 4 to a row: uint8 [H, W, 3] as save_image rounds.
    size = pred.shape[-1]
    tiles = F.interpolate(rows.flatten(0, 1), scale_factor=math.ceil(96 / size), mode="nearest")
    if size > 256:
        tiles = F.interpolate(tiles, size=(256, 256), mode="bilinear", antialias=True)
    grid = make_grid(tiles.clamp(0, 1), nrow=4, padding=2)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()

    # 3. The header: each column's name centred over it, white on black, its font growing with the tile.
    tile = tiles.shape[-1]
    font = ImageFont.load_default(size=max(10, tile // 10))  # PIL's own font: no file to find
    header = font.getbbox("".join(RECON_COLUMNS))[3] + 4
    picture = Image.new("RGB", (pixels.shape[1], header + pixels.shape[0]))
    picture.paste(Image.fromarray(pixels), (0, header))
    draw = ImageDraw.Draw(picture)
    for c, name in enumerate(RECON_COLUMNS):
        left = 2 + c * (tile + 2) + (tile - draw.textlength(name, font=font)) / 2
        draw.text((left, 2), name, fill=(255, 255, 255), font=font)

    png = io.BytesIO()
    picture.save(png, format="png")
    runtime.atomic_save(path, png.getvalue())


# fmt: off
SETTINGS = (
    Setting(name="checkpoint", help="train.py's checkpoint.pt, or a released OpenMixup *_full.pth", type=str,
            unset="none; required"),
    Setting(name="out", default="recon.png", help="the PNG to write"),
    Setting(name="overwrite", default=False, help="replace --out if it exists"),
    Setting(name="seed", default=0, help="seed of the masks", range=SEED),
    Setting(name="n", default=8, help="rows: the first N images", range=AT_LEAST_1),
    Setting(name="img_size", help="the model's input size", range=AT_LEAST_1, type=int,
            unset="the checkpoint's; a CNN takes others"),
    Setting(name="mask_ratio", help="fraction of the mask blocks masked", type=float,
            range=runtime.OPEN_UNIT,
            unset="the checkpoint's, else 0.6"),
    Setting(name="method", help="A²MIM's mask token or SimMIM's", choices=("a2mim", "simmim"),
            unset="the checkpoint's; a released file's: a2mim, simmim where only SimMIM's stem token fits"),
    Setting(name="threads", help="torch CPU threads", range=AT_LEAST_1, type=int,
            unset="torch's own choice"),
)
# fmt: on


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "images", nargs="*", metavar="IMAGES_OR_FOLDER", help="image files and folders of images"
    )
    runtime.add_settings(p, SETTINGS)
    return p


def resolve(args):
    """The settings (defaults < command line) and the images, checked before anything runs: ConfigError /
    RunError, one sentence, for everything that needs no file read."""
    cfg = {s.name: s.default for s in SETTINGS} | runtime.command_line(args, SETTINGS)
    c = argparse.Namespace(images=args.images, **cfg)
    if c.checkpoint is None or not c.images:
        raise ConfigError(
            "name a checkpoint and the images: python reconstruct.py --checkpoint FILE "
            "IMAGES_OR_FOLDER... (train.py's checkpoint.pt or a released *_full.pth)"
        )
    runtime.check_settings(SETTINGS, cfg)
    if not c.out.lower().endswith(".png"):
        raise RunError(f"--out {c.out} must name a .png file")
    if os.path.isdir(c.out):
        raise RunError(f"--out {c.out} is a folder; name the .png file to write")
    if os.path.lexists(c.out) and not c.overwrite:
        raise RunError(
            f"--out {c.out} exists; pass --overwrite to replace it, or name another file"
        )
    return c


def image_paths(names):
    """Every image path: files as given, folders walked by data.py's image-folder rules; either way an image is a
    file named as one (data.IMAGE_EXTENSIONS). DataError for a missing name, a file not named as an image, a folder
    without images."""
    paths, named = [], f"*{', *'.join(data.IMAGE_EXTENSIONS)}"
    for name in names:
        if os.path.isdir(name):
            found = data.images_under(name, {})
            if not found:
                raise DataError(
                    f"{name} holds no images (files named {named}; hidden files are skipped)"
                )
            paths += found
        elif not os.path.isfile(name):
            raise DataError(f"{name} does not exist")
        elif not name.lower().endswith(data.IMAGE_EXTENSIONS):
            raise DataError(f"{name} is not an image file (expected a file named {named})")
        else:
            paths.append(name)
    return paths


def load_with_decoder(path):
    """weights.load_pretrained(path), for a file that holds a decoder; else CheckpointError, one sentence."""
    try:
        found = weights.load_pretrained(path)
    # a plain (torchvision) state dict: an encoder alone, any arch
    except weights.PlainStateDictError:
        raise CheckpointError(NO_DECODER.format(path)) from None
    if not found["decoder"]:
        raise CheckpointError(NO_DECODER.format(path))
    return found


def encoder_at(path, kw, img_size):
    """The file's encoder (its encoder_kwargs `kw`), for `img_size` px images (None: the file's size)."""
    arch, trained_size = kw["arch"], kw["img_size"]
    if img_size is None or img_size == trained_size:
        return models.build_encoder(**kw)
    if models.arch_kind(arch) == "vit":  # its position embedding fixes the size
        raise ConfigError(
            f"{path} holds a {arch} for {trained_size}-px images; pass --img-size "
            f"{trained_size} or leave it out"
        )
    # A CNN takes any size, with the stem its weights were trained with.
    small_stem, _ = models.stem_and_patch(trained_size, kw.get("small_stem"), None)
    return models.build_encoder(**(kw | dict(img_size=img_size, small_stem=small_stem)))


def load_model(path, *, img_size=None, mask_ratio=None, method=None):
    """(a2mim.A2MIM in eval mode holding the file's encoder, mask token and decoder, the file's kind).
    CheckpointError, one sentence, for a file without a decoder or whose token fits neither method."""
    found = load_with_decoder(path)
    config = found["config"]
    encoder = encoder_at(path, found["encoder_kwargs"], img_size)

    # The run's own options; its mask block only at its own size (else the default block of this size).
    options = {k: config[k] for k in PICTURE_OPTIONS if config.get(k) is not None}
    if encoder.img_size == found["encoder_kwargs"]["img_size"] and config.get("mask_patch_size"):
        options["mask_patch_size"] = config["mask_patch_size"]
    options["mask_ratio"] = config.get("mask_ratio", 0.6) if mask_ratio is None else mask_ratio

    # A released file does not say its method: A²MIM's token (a ResNet's: with γ, at layer4) is tried first,
    # then SimMIM's (at the stem, without γ). Where both fit (a ViT's), --method decides.
    methods = [method or config.get("method")]
    if methods == [None]:
        methods = ["a2mim", "simmim"]
    for m in methods:
        model = A2MIM(encoder, method=m, **options)
        if weights.load_into(model, found) == ["encoder", "mask_token", "decoder"]:
            return model.eval(), found["kind"]
    raise CheckpointError(
        f"{path}: its mask token or decoder does not fit a {' or '.join(methods)} {encoder.arch} "
        "model (another token site, mode or stride); pass --method"
    )


def reconstruct(c):
    """Read, run, write (`c`: resolve's settings): → the line saying what was written."""
    if c.threads:
        torch.set_num_threads(c.threads)
    found = image_paths(c.images)
    if os.path.realpath(c.out) in {os.path.realpath(p) for p in [c.checkpoint, *found]}:
        raise RunError(f"--out {c.out} is one of the files read; name another file")
    paths = found[: c.n]
    # uint8 [3, H, W]; before the checkpoint: a bad image fails fast
    images = [data.load_rgb(p) for p in paths]
    model, kind = load_model(
        c.checkpoint, img_size=c.img_size, mask_ratio=c.mask_ratio, method=c.method
    )
    size = model.encoder.img_size
    transform = data.build_transform("none", size)  # resize the short side, centre-crop, normalise
    img_bchw = torch.stack([transform(image) for image in images])

    # The masks from the seed alone, drawn on the CPU's generator: the same masks on any machine.
    generator = torch.Generator().manual_seed(c.seed)
    mask = mask_blocks(
        len(paths), size, model.mask_patch_size, model.mask_ratio, generator=generator
    )
    with torch.no_grad():
        out = model(img_bchw, mask)
    save_reconstructions(c.out, img_bchw, out, n=len(paths))

    shown = f"{len(paths)} images"
    if len(found) > len(paths):
        shown = f"{len(paths)} of {len(found)} images"
    return (
        f"wrote {c.out}: {shown} at {size} px ({' | '.join(RECON_COLUMNS)}), {model.method} "
        f"{model.encoder.arch} from {c.checkpoint} ({kind}), masks of seed {c.seed}: "
        f"{model.mask_patch_size}-px blocks, ratio {model.mask_ratio}"
    )


@runtime.entry_point
def main(argv=None):
    print(reconstruct(resolve(get_parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
