"""Datasets, transforms and loaders: every dataset yields (image float [3, S, S] normalised with the
ImageNet mean/std, int label). Masks are drawn by the training step (a2mim.py), not here.

torchvision reads the files from DIR = data_dir / --data-dir (if given, it must exist and only it is
searched), else from ./data and, for Fashion-MNIST, then /usr/share/datasets/fashion-mnist (Debian):
  fashion-mnist  the IDX files, gzipped or not, in DIR, DIR/fashion-mnist or DIR/FashionMNIST/raw.
  cifar10/100    DIR/cifar-10-batches-py (cifar-100-python); stl10: DIR/stl10_binary (the archives).
  imagenet       DIR (default ./data/imagenet) with train/<class>/*.jpg and val/<class>/*.jpg, the
                 same class folders in both ("What an image folder holds" below says what is read).
  folder         DIR (required), laid out as imagenet (the class count read from disk); pre-training
                 also reads unlabelled images: a flat folder or any tree ("What pre-training reads").
  fake           nothing on disk: images generated from the index (deterministic).
download=True lets torchvision fetch fashion-mnist / cifar / stl10 into DIR (or ./data).
"""

import gzip
import hashlib
import itertools
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torchvision.datasets as tvd
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.transforms import v2

from runtime import DataError

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "stl10", "imagenet", "folder", "fake")
# A whole split as one uint8 tensor; device_loader holds these on a GPU (47-150 MB each).
IN_MEMORY = ("fashion-mnist", "cifar10", "cifar100", "stl10", "fake")
TRANSFORMS = ("pretrain", "finetune", "eval", "none")
SPLITS = ("train", "val")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# §6: the pre-training RandomResizedCrop scale of each encoder family.
FAMILY_CROP_SCALE = {"cnn": (0.8, 1.0), "vit": (0.67, 1.0)}
# SimMIM's released ResNet recipe crops as the ViTs do, whatever the encoder (§3).
SIMMIM_CROP_SCALE = (0.67, 1.0)
# Every pre-training crop by name (the `crop` argument below, train.py's --crop): a family's, or SimMIM's.
CROP_SCALE = FAMILY_CROP_SCALE | {"simmim": SIMMIM_CROP_SCALE}
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Native size below this: CIFAR-style recipes (pad-and-crop, plain resize); else ImageNet-style ones.
LARGE_IMAGE_PX = 96

# name -> (num_classes, default training size, channels stored in the files, native size or None)
# Fashion-MNIST is 28 px but trains at 32: 28 is not divisible by the 4-px mask block nor by the
# encoder stride 8 used at small sizes, 32 is (32 / 4 = 8 mask blocks, 32 / 8 = 4 feature cells).
_INFO = {
    "fashion-mnist": (10, 32, 1, 28),
    "cifar10": (10, 32, 3, 32),
    "cifar100": (100, 32, 3, 32),
    "stl10": (10, 96, 3, 96),
    "imagenet": (1000, 224, 3, None),  # None: varied sizes, "large"
    # Classes counted from disk (none: unlabelled pre-training images).
    "folder": (None, 224, 3, None),
    # Generated at the requested size.
    "fake": (10, 32, 3, 32),
}
# torchvision's class for each archive (the class knows its folder, its files and their md5 sums).
_TORCHVISION = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "stl10": tvd.STL10}


def dataset_info(name):
    """Class count, default training size and stored channel count of a dataset name."""
    if name not in _INFO:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    num_classes, img_size, channels, _ = _INFO[name]
    return {"num_classes": num_classes, "img_size": img_size, "channels_in_files": channels}


def seed_for(*parts):
    """A seed per tuple of ints, e.g. (seed, epoch, index): hashed, so distinct tuples never collide."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_enough(n_images, batch_size, accum_steps, world_size, name):
    """DataError unless each of `world_size` processes gets one full step of batch × accum images."""
    per_process = n_images // world_size  # DistributedSampler(drop_last=True)'s share
    if per_process < batch_size * accum_steps:
        raise DataError(
            f"{name} has {n_images} training images ({per_process} per process): batch_size "
            f"{batch_size} × {accum_steps} accumulation step(s) exceeds that; lower the batch size"
        )


# --- Transforms (§6 for pre-training; §7-style recipes scaled down for the small datasets)
def build_transform(kind, img_size, *, crop="cnn", large=True):
    """uint8 [C, H, W] -> float [C, S, S] normalised; `large`: the ImageNet-style recipe (>= 96 px).
    `crop`: the pre-training crop by name (CROP_SCALE: an encoder family's, or "simmim")."""
    S = img_size
    if kind == "pretrain":
        # §6; also for 28/32-px data: a mild zoom keeps the small objects whole.
        geometry = [v2.RandomResizedCrop(S, scale=CROP_SCALE[crop]), v2.RandomHorizontalFlip()]
    elif kind == "finetune" and large:
        geometry = [v2.RandomResizedCrop(S, scale=(0.08, 1.0)), v2.RandomHorizontalFlip()]
    elif kind == "finetune":
        # CIFAR-style 4-px pad-and-crop: the 0.08 crop would destroy 32-px images.
        geometry = [v2.Resize(S), v2.RandomCrop(S, padding=4), v2.RandomHorizontalFlip()]
    elif kind == "eval" and large:
        geometry = [v2.Resize(int(S / 0.875)), v2.CenterCrop(S)]  # the usual 224-from-256 ratio
    elif kind in ("eval", "none"):
        # CenterCrop: a no-op on square data, squares the folder images.
        geometry = [v2.Resize(S), v2.CenterCrop(S)]
    else:
        raise ValueError(f"unknown transform {kind!r}; choose one of {', '.join(TRANSFORMS)}")
    return v2.Compose(
        geometry
        + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


# --- Reading: each reader returns (images uint8 [N, C, H, W], labels [N], the folder read)
def _root(data_dir, download, default="data", expects=""):
    """The folder the user named (it must exist, unless it is to be downloaded into), else the default."""
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"data directory {data_dir} is a file, not a folder{expects}")
    if data_dir is not None and not (Path(data_dir).is_dir() or download):
        raise DataError(f"data directory {data_dir} does not exist{expects}")
    return Path(default if data_dir is None else data_dir)


def _read_idx(path, reader):
    """torchvision's IDX reader; it takes plain files only, so a .gz is unpacked to a temporary one."""
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        with gzip.open(path) as packed, tempfile.NamedTemporaryFile() as plain:
            shutil.copyfileobj(packed, plain)
            plain.flush()
            return reader(plain.name)
    except (OSError, EOFError, AssertionError, TypeError, ValueError, RuntimeError) as err:
        raise DataError(
            f"{path} is not a readable uint8 IDX file ({type(err).__name__}: {err})"
        ) from None


def _fashion_mnist(name, split, data_dir, download):
    prefix = "train" if split == "train" else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    root = _root(data_dir, download)
    roots = [root] if data_dir is not None else [root, SYSTEM_FASHION_MNIST]
    places = [r / sub for r in roots for sub in ("", "fashion-mnist", "FashionMNIST/raw")]
    if download:  # into root/FashionMNIST/raw, one of the places (torchvision skips files it has)
        try:
            tvd.FashionMNIST(root, train=split == "train", download=True)
        except (OSError, RuntimeError) as err:
            raise DataError(f"downloading fashion-mnist into {root} failed ({err})") from None
    for folder in places:  # the plain file or its .gz twin (plain first: faster to read)
        found = [
            next((p for p in (folder / n, folder / f"{n}.gz") if p.is_file()), None) for n in names
        ]
        if all(found):
            return (
                _read_idx(found[0], read_image_file)[:, None],
                _read_idx(found[1], read_label_file),
                folder,
            )
    raise DataError(
        f"fashion-mnist files {' + '.join(names)} (or .gz) not found in any of: "
        f"{', '.join(map(str, dict.fromkeys(places)))} (pass download=True / --download to fetch them)"
    )


def _torchvision_archive(name, split, data_dir, download):
    cls, root = _TORCHVISION[name], _root(data_dir, download)
    # DIR may be the unpacked folder itself.
    if root.name == cls.base_folder and not (root / cls.base_folder).is_dir():
        root = root.parent
    folder, files = root / cls.base_folder, ", ".join(f for f, _ in cls.train_list + cls.test_list)
    if not (folder.is_dir() or download):
        raise DataError(
            f"{name} expects {files} in {folder} (the unpacked official archive; "
            f"pass download=True / --download to fetch it)"
        )
    if name == "stl10":
        kw = {"split": "train" if split == "train" else "test"}
    else:
        kw = {"train": split == "train"}
    # RuntimeError: torchvision's "not found or corrupted" (a file missing or off its md5 sum);
    # the others: a bad pickle, no network.
    try:
        ds = cls(str(root), download=download, **kw)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as err:
        raise DataError(
            f"{folder} does not hold an intact {name} ({files}; md5 sums checked by torchvision): "
            f"{type(err).__name__}: {err}"
        ) from None
    # CIFAR's data is [N, H, W, C]; STL-10's is [N, C, H, W] already, with labels shifted to 0..9.
    if name == "stl10":
        images, labels = torch.as_tensor(ds.data), torch.as_tensor(ds.labels)
    else:
        images, labels = torch.as_tensor(ds.data).permute(0, 3, 1, 2), torch.as_tensor(ds.targets)
    return images.contiguous(), labels, folder


# Ten well-separated class colours (RGB in 0..1) for the fake dataset; fixed so runs agree.
_FAKE_COLOURS = torch.tensor(
    [
        [0.90, 0.10, 0.10],
        [0.10, 0.80, 0.10],
        [0.10, 0.20, 0.90],
        [0.95, 0.85, 0.10],
        [0.80, 0.10, 0.80],
        [0.10, 0.85, 0.85],
        [0.95, 0.55, 0.10],
        [0.50, 0.50, 0.50],
        [0.55, 0.30, 0.10],
        [0.95, 0.95, 0.95],
    ]
)
_FAKE_SEED = {"train": 20_230_000, "val": 1_020_230_000}  # far apart: the splits share no image


def _fake(split, size, S):
    """Learnable images uint8 [N, 3, S, S]: class (i mod 10) colour + a smooth texture (something to
    reconstruct) + pixel noise, from a generator seeded split base + i, so the same in every run."""

    def image(i):
        gen = torch.Generator().manual_seed(_FAKE_SEED[split] + i)
        grid_13hw = torch.rand(1, 3, 4, 4, generator=gen)  # the texture: a 4×4 grid upsampled
        texture_3hw = torch.nn.functional.interpolate(grid_13hw, size=(S, S), mode="bilinear")[0]
        image_3hw = 0.6 * _FAKE_COLOURS[i % 10, :, None, None] + 0.4 * texture_3hw
        noisy_3hw = (image_3hw + 0.05 * torch.randn(3, S, S, generator=gen)).clamp(0, 1)
        return (noisy_3hw * 255).round().byte()

    return torch.stack([image(i) for i in range(size)]), torch.arange(size) % 10, "generated"


# What an image folder holds. An image: a file whose name ends in one of torchvision's IMG_EXTENSIONS
# (any case) under DIR/<split>/<class>/, in sub-folders too, symlinks followed, no hidden name on the
# way. Ignored: hidden files and folders (.git, .ipynb_checkpoints, .DS_Store, macOS "._x.jpg"
# AppleDouble files), the tool folders in IGNORED_FOLDERS and every other file (Thumbs.db, notes.txt,
# README.md). Refused, naming it, because each would change the dataset unseen: an image in a format
# the folders do not read (UNREAD_IMAGE_EXTENSIONS), an image directly in DIR/<split>, a broken
# symlink, a folder reached twice (a symlink loop, two links to one folder), a class folder of no image.
IMAGE_EXTENSIONS = tvd.folder.IMG_EXTENSIONS
# fmt: off
UNREAD_IMAGE_EXTENSIONS = (".gif", ".jfif", ".jpe", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".apng", ".dng")
# fmt: on
# A zip's macOS resource forks, a Synology NAS's thumbnails.
IGNORED_FOLDERS = ("__MACOSX", "@eaDir")


def _visible(folder):
    """The entries of `folder` whose names are not hidden, sorted by name (as torchvision sorts)."""
    try:
        with os.scandir(folder) as entries:
            keep = [
                e for e in entries if not e.name.startswith(".") and e.name not in IGNORED_FOLDERS
            ]
    except OSError as err:
        raise DataError(f"cannot list the folder {folder} ({err.strerror or err})") from None
    return sorted(keep, key=lambda e: e.name)


def _is_image(entry):
    """True for an image file, False for a file to ignore; DataError for one that would be lost unseen."""
    suffix = os.path.splitext(entry.name)[1].lower()
    if entry.is_symlink() and not os.path.exists(entry.path):
        raise DataError(
            f"{entry.path} is a broken symlink (to {os.readlink(entry.path)}); fix or delete it"
        )
    if suffix in UNREAD_IMAGE_EXTENSIONS:
        raise DataError(
            f"{entry.path} is a {suffix} image, which image folders do not read (they read "
            f"{', '.join(IMAGE_EXTENSIONS)}); convert it or move it out"
        )
    return suffix in IMAGE_EXTENSIONS and entry.is_file()


def _class_folders(split_dir):
    """The class names of DIR/<split>: its visible folders (symlinks followed), sorted."""
    classes = []
    for entry in _visible(split_dir):
        if entry.is_dir():
            classes.append(entry.name)
        elif _is_image(entry):
            raise DataError(
                f"{entry.path} lies directly in {split_dir}: images go in class folders, "
                f"{split_dir}/<class>/{entry.name}"
            )
    return classes


def images_under(class_dir, seen):
    """Image paths under `class_dir` in torchvision's order (os.walk's folders sorted by path, files by
    name). `seen` maps the real path of every folder walked to its path: a second visit is refused."""
    files_of, todo = {}, [class_dir]
    while todo:
        folder = todo.pop()
        real = os.path.realpath(folder)
        if real in seen:
            raise DataError(
                f"{folder} leads to {seen[real]} again (a symlink loop or two links to one "
                f"folder), so its images would count twice; remove the link"
            )
        seen[real], files_of[folder] = folder, []
        for entry in _visible(folder):
            if entry.is_dir():
                todo.append(entry.path)
            elif _is_image(entry):
                files_of[folder].append(entry.path)
    return [path for folder in sorted(files_of) for path in files_of[folder]]


class _ImageFolder(tvd.ImageFolder):
    """torchvision's ImageFolder (classes, samples, targets, loader) with the rules above."""

    def find_classes(self, directory):
        classes = _class_folders(directory)
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(
        self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False
    ):
        seen = {os.path.realpath(directory): str(directory)}
        return [
            (path, i)
            for c, i in class_to_idx.items()
            for path in images_under(os.path.join(directory, c), seen)
        ]


def _some(names, k=8):
    """'a, b, c' or 'a, b, … (12 in all)'."""
    return ", ".join(names[:k]) + (f", … ({len(names)} in all)" if len(names) > k else "")


def _check_val_classes(name, val_dir, val_classes):
    """The val split's labels are positions in its sorted class list, so its class folders must be train's."""
    train_dir = val_dir.parent / "train"
    if not train_dir.is_dir():
        return
    train_classes = _class_folders(train_dir)
    if set(train_classes) != set(val_classes):
        only_train = [c for c in train_classes if c not in val_classes]
        only_val = [c for c in val_classes if c not in train_classes]
        raise DataError(
            f"{name} needs the same class folders in train/ and val/ (a label is a class's place in "
            f"sorted order), but these are only in {train_dir}: {_some(only_train) or 'none'}; "
            f"only in {val_dir}: {_some(only_val) or 'none'}"
        )
    same = [
        c for c in val_classes if os.path.realpath(val_dir / c) == os.path.realpath(train_dir / c)
    ]
    if same:
        raise DataError(
            f"{val_dir} and {train_dir} share the class folders {_some(same)} (through a symlink): "
            f"the accuracy would be measured on training images"
        )
    if len(val_classes) < 2:
        raise DataError(
            f"{val_dir} holds one class folder ({val_classes[0]}): an accuracy needs at least two"
        )


# What a file's pixels become (uint8 RGB), by PIL mode; never clipped or dropped without a word:
#   1, L, P, RGB, CMYK, YCbCr, LAB: PIL's conversion (no colour management: CMYK by PIL's formula, ICC
#     profiles not applied); 16-bit RGB(A) PNGs PIL itself reads as 8-bit, the high byte of each value.
#   16-bit grey (I;16*, and I from a PNG or PGM, which PIL scales to 0..65535): value / 257, rounded;
#     PIL's convert("RGB") would clip everything above 255 to white.
#   alpha (RGBA, LA, PA, a PNG's transparent colour): composited on ALPHA_BACKGROUND, as a viewer shows
#     it; convert("RGB") would keep whatever colour the transparent pixels happen to store.
#   EXIF orientation (phone photos): applied, so the image stands as it is shown (ImageOps.exif_transpose).
#   The content decides, not the name: a PNG named .jpg is read as the PNG it is.
#   Refused, naming the file: several frames (animated, multi-page: which one is the image?) except an
#   MPO photo, whose first frame is the photo; 32-bit integer (I from a TIFF) or float (F) pixels, which
#   have no fixed range to map to 0..255; PIL's decompression-bomb limit; a file PIL cannot decode.
ALPHA_BACKGROUND = (255, 255, 255)  # white
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")
_CONVERTED = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV") + _ALPHA


def _to_rgb(img, path):
    """An opened PIL image -> uint8 [3, H, W] by the rules above."""
    frames, mode = getattr(img, "n_frames", 1), img.mode
    if frames > 1 and img.format != "MPO":
        raise DataError(
            f"{path} holds {frames} frames (an animation or a multi-page file), not one image; "
            f"save the frame meant as a file of its own"
        )
    sixteen_bit = mode in _SIXTEEN_BIT or (mode == "I" and img.format in ("PNG", "PPM"))
    if not (sixteen_bit or mode in _CONVERTED):
        raise DataError(
            f"{path} holds {mode!r} pixels (integers or floats of no fixed range), which cannot be "
            f"mapped to 0..255 without a guess; save it with 8- or 16-bit pixels"
        )
    alpha = mode in _ALPHA or "transparency" in img.info
    img = ImageOps.exif_transpose(img)
    if sixteen_bit:
        grey_1hw = v2.functional.pil_to_tensor(img.convert("I"))  # int32 in 0..65535
        return ((grey_1hw + 128) // 257).to(torch.uint8).repeat(3, 1, 1)
    if alpha:
        background = Image.new("RGBA", img.size, ALPHA_BACKGROUND + (255,))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return v2.functional.pil_to_tensor(img.convert("RGB"))


def load_rgb(path):
    """ImageFolder's loader: uint8 [3, H, W]. A broken image is a DataError naming it, not skipped:
    skipping would silently change the dataset (and the sample order across runs)."""
    try:
        with Image.open(path) as img:
            return _to_rgb(img, path)
    # OSError covers PIL's UnidentifiedImageError and "image file is truncated"
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image {path} ({err}); delete or replace the file") from None


# What pre-training reads from `folder` (split "train", transform "pretrain"; it never reads a label):
#   DIR/train/ exists: it is the training split, the rest of DIR is not read (as for evaluation):
#     only sub-folders in it (no image directly in it): the class folders below, labels as evaluation's;
#     else (a flat folder of images, with sub-folders or not): every image under DIR/train, label 0.
#   neither DIR/train/ nor DIR/val/: every image under DIR at any depth (flat, dated sub-folders, class
#     folders without a split), label 0.
#   DIR/val/ without DIR/train/ (or a train that is not a folder): refused; walking DIR would pre-train
#     on the val images.
# An image is what the rules above say; the walk is sorted (folders by path, files by name), so the
# sample order is the same in every run. imagenet keeps the class layout: a mistyped ImageNet DIR
# (the raw archive nests train/, val/ and test/ deeper) is refused, not walked whole. Evaluation (any
# other transform, or the val split) needs DIR/train/<class>/ and DIR/val/<class>/ and says so in
# one sentence when DIR holds unlabelled images.
class _UnlabelledImages(Dataset):
    """Every image under `folder` (the walk above) as (image, 0), with ImageFolder's samples, targets,
    classes (none), loader and transform; `num_classes` is None: there are no classes."""

    def __init__(self, folder, transform):
        self.samples = [(path, 0) for path in images_under(str(folder), {})]
        self.targets, self.classes, self.num_classes = [0] * len(self.samples), [], None
        self.transform, self.loader, self.source = transform, load_rgb, str(folder)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.transform(self.loader(path)), label


def _split_layout(folder):
    """(images directly in `folder`, whether it has visible sub-folders); DataError for a broken link."""
    entries = _visible(folder)
    direct = [e.path for e in entries if not e.is_dir() and _is_image(e)]
    return direct, any(e.is_dir() for e in entries)


def _pretrain_folder(root):
    """The folder pre-training walks unlabelled (the rules above), or None for DIR/train's class folders."""
    train = root / "train"
    if train.is_dir():
        direct, has_folders = _split_layout(train)
        return None if has_folders and not direct else train
    if os.path.lexists(train) or (root / "val").is_dir():
        what = "an entry 'train' that is not a folder"
        if (root / "val").is_dir():
            what = "a val/ folder"
        raise DataError(
            f"{root} holds {what} but no train/ folder: pre-training reads {root}/train/ when "
            f"{root} is split into train/ and val/, else every image under {root}"
        )
    return root


def _unlabelled(root, folder, transform):
    """_UnlabelledImages of `folder`, refused when it holds no image."""
    dataset = _UnlabelledImages(folder, transform)
    if not dataset.samples:
        raise DataError(
            f"folder found no images under {folder} to pre-train on (it reads {root}/train/, in "
            f"<class> folders or not, else every image under {root}); images are files named "
            f"*{', *'.join(IMAGE_EXTENSIONS)}, hidden files are skipped"
        )
    return dataset


def _refuse_unlabelled(root, split_dir):
    """Evaluation given images without the train/<class>, val/<class> layout: one sentence saying so."""
    folder, how = None, "without class folders"
    if split_dir.is_dir():
        direct, has_folders = _split_layout(split_dir)
        folder = split_dir if direct and not has_folders else None
    elif root.name not in SPLITS and not any(os.path.lexists(root / s) for s in SPLITS):
        folder = root  # (DIR/train given for DIR has its own hint below)
        how = "but no train/ and val/ folders" if _split_layout(root)[1] else how
    n = len(images_under(str(folder), {})) if folder is not None else 0
    if n:
        raise DataError(
            f"evaluation needs labelled images: {root}/train/<class>/*.jpg and {root}/val/<class>/"
            f"*.jpg; {folder} holds {n} image{'s' * (n != 1)} {how} (fine for pre-training)"
        )


def _image_folder(name, split, data_dir, transform, pretrain=False):
    """ImageFolder over DIR/<split>/<class>/*.jpg (the rules above), with one sentence for a bad layout;
    `pretrain`: `folder`'s training split may be unlabelled (_UnlabelledImages)."""
    unlabelled_ok = pretrain and name == "folder" and split == "train"
    if data_dir is None and name == "folder":
        raise DataError(
            "dataset 'folder' needs data_dir: a folder of images for pre-training, or DIR with "
            "DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg for evaluation"
        )
    layout = f"{data_dir or 'data/imagenet'}/{split}/<class>/*.jpg"
    if unlabelled_ok:
        expects = " (folder pre-trains on the images under it)"
    else:
        expects = f" ({name} expects {layout})"
    root = _root(data_dir, False, "data/imagenet", expects=expects)
    split_dir = root / split
    if unlabelled_ok:
        folder = _pretrain_folder(root)
        if folder is not None:
            return _unlabelled(root, folder, transform)
    elif name == "folder":
        _refuse_unlabelled(root, split_dir)
    classes = _class_folders(split_dir) if split_dir.is_dir() else []
    if not classes:
        hint = ""
        if split_dir.parent.name in SPLITS:  # DIR/train given for DIR
            hint = f"; name the folder that holds {split}/, not {data_dir} itself"
        raise DataError(
            f"{name} expects class folders of images at {layout}, found none in {split_dir}{hint}"
        )
    if split == "val":
        _check_val_classes(name, split_dir, classes)
    dataset = _ImageFolder(str(split_dir), transform=transform, loader=load_rgb, allow_empty=True)
    _check_every_class_has_images(name, layout, split_dir, dataset)
    dataset.num_classes, dataset.source = len(dataset.classes), str(split_dir)
    return dataset


def _check_every_class_has_images(name, layout, split_dir, dataset):
    """DataError naming the class folders of `dataset` that hold no image, and what the first holds."""
    have_images = set(dataset.targets)
    empty = [str(split_dir / c) for i, c in enumerate(dataset.classes) if i not in have_images]
    if not empty:
        return
    others = [e.name for e in _visible(empty[0]) if e.is_file()]
    found = f" ({empty[0]} has {_some(others)})" if others else ""
    raise DataError(
        f"{name} expects images at {layout}, but {', '.join(empty)} "
        f"hold{'s' * (len(empty) == 1)} none{found}; images are files named "
        f"*{', *'.join(IMAGE_EXTENSIONS)}, hidden files are skipped"
    )


class _TensorImages(Dataset):
    """A whole split in memory: uint8 images [N, 1 or 3, H, W], labels_n long [N]."""

    def __init__(self, images, labels_n, transform, num_classes, source):
        if len(images) != len(labels_n):
            raise DataError(f"{source} has {len(images)} images but {len(labels_n)} labels")
        if len(labels_n) and not 0 <= labels_n.min() <= labels_n.max() < num_classes:
            raise DataError(f"{source} has labels outside 0..{num_classes - 1}")
        self.images, self.labels_n, self.transform = images, labels_n.long(), transform
        self.num_classes, self.source = num_classes, str(source)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        # A grey [1, H, W] image is replicated to the encoders' 3 channels.
        return self.transform(self.images[index].expand(3, -1, -1)), int(self.labels_n[index])


def build_dataset(
    name,
    split,
    *,
    data_dir=None,
    img_size=None,
    transform="pretrain",
    crop="cnn",
    download=False,
    fake_size=512,
):
    """(image float [3, S, S], int label) of one split through the `transform` recipe, with `.num_classes`
    (read from disk for "folder"; None for its unlabelled pre-training images, whose labels are all 0)
    and `.source` (the folder read, or "generated", for the log line)."""
    info = dataset_info(name)  # raises DataError on an unknown name
    S = info["img_size"] if img_size is None else img_size
    for what, value in (("img_size", S), ("fake_size", fake_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    if split not in SPLITS or crop not in CROP_SCALE:
        raise ValueError(
            f"split must be one of {SPLITS} and crop one of {tuple(CROP_SCALE)}, "
            f"got {split!r} and {crop!r}"
        )
    native = S if name == "fake" else _INFO[name][3]
    tf = build_transform(transform, S, crop=crop, large=native is None or native >= LARGE_IMAGE_PX)
    if name in ("imagenet", "folder"):
        return _image_folder(name, split, data_dir, tf, pretrain=transform == "pretrain")
    if name == "fake":
        images, labels_n, source = _fake(split, fake_size, S)
    else:
        read = _fashion_mnist if name == "fashion-mnist" else _torchvision_archive
        images, labels_n, source = read(name, split, data_dir, download)
    return _TensorImages(images, labels_n, tf, info["num_classes"], source)


# --- Loaders
class _Sampler(DistributedSampler):
    """DistributedSampler (epoch order: randperm seeded seed + epoch, rank r takes r::world; one
    process is world size 1) whose next pass can start part-way: a resumed epoch skips what it saw."""

    start = 0  # set by set_epoch below

    def __iter__(self):
        start, self.start = self.start, 0  # only the next pass starts late
        return itertools.islice(super().__iter__(), start, None)


class _SeededItems(Dataset):
    """Draws item i's random augmentation from its own seed (seed, epoch, i): the same crop in any
    worker, on any number of processes and in a resumed epoch; the global RNG is left as it was."""

    def __init__(self, dataset, sampler):  # no __len__: the DataLoader asks the sampler
        self.dataset, self.sampler = dataset, sampler

    def __getitem__(self, index):
        state = torch.get_rng_state()  # the transforms draw from the CPU default generator
        torch.default_generator.manual_seed(seed_for(self.sampler.seed, self.sampler.epoch, index))
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


def build_loader(
    dataset,
    batch_size,
    *,
    train=True,
    distributed=False,
    workers=None,
    seed=0,
    world_size=None,
    rank=None,
):
    """DataLoader: seeded shuffling and augmentation, the last partial batch dropped (train), or the
    dataset order (eval). distributed: rank r reads its shard, as DistributedSampler (which pads the
    last eval shard with a few repeats); world_size/rank default to the process group's."""
    if not distributed:
        world_size, rank = 1, 0
    world_size = torch.distributed.get_world_size() if world_size is None else world_size
    rank = torch.distributed.get_rank() if rank is None else rank
    if train:
        check_enough(len(dataset), batch_size, 1, world_size, "the dataset")
    sampler = _Sampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=train
    )
    return DataLoader(
        _SeededItems(dataset, sampler) if train else dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=min(8, (os.cpu_count() or 1) // world_size) if workers is None else workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=train,
        persistent_workers=False,  # each epoch's workers start with a copy of the sampler's new epoch
        # Else starting a pass would draw from the global RNG.
        generator=torch.Generator().manual_seed(seed),
    )


def set_epoch(loader, epoch, start_batch=0):
    """Make the next pass over `loader` (build_loader's or device_loader's) yield epoch `epoch`'s
    batches from `start_batch` on without reading the earlier ones: the same batches as there in an
    uninterrupted epoch (order and augmentation are functions of seed, epoch, rank, position only)."""
    if not 0 <= start_batch <= len(loader):
        raise ValueError(f"start_batch must be in 0..{len(loader)}, got {start_batch}")
    loader.sampler.set_epoch(epoch)
    loader.sampler.start = start_batch * loader.batch_size


# --- On the device, à la airbench: a small dataset's uint8 split lives on the GPU (47-150 MB) and
# whole batches are cropped and flipped there, as build_transform("pretrain") + build_loader do
# (DistributedSampler's order, RandomResizedCrop's boxes, flip p = 0.5), except that the resize is
# bilinear without antialias (the CPU's when upsampling, as 28/32-px data to >= 32 px) and unrounded.


def random_resized_crop_params(
    batch_size, height, width, scale, ratio=(3 / 4, 4 / 3), *, generator=None, device=None, tries=10
):
    """RandomResizedCrop's boxes for a batch, (top_b, left_b, height_b, width_b) long [B]: as torchvision,
    the first of `tries` (area, log-aspect) draws that fits (all drawn at once), else the central crop
    of the clamped aspect ratio; the offset uniform over the positions where the box fits."""
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    u_2bt = torch.rand(2, batch_size, tries, generator=generator, device=device)
    area_bt = height * width * (scale[0] + (scale[1] - scale[0]) * u_2bt[0])
    aspect_bt = torch.exp(lo + (hi - lo) * u_2bt[1])
    w_bt = (area_bt * aspect_bt).sqrt().round().long()
    h_bt = (area_bt / aspect_bt).sqrt().round().long()
    fits_bt = (w_bt > 0) & (w_bt <= width) & (h_bt > 0) & (h_bt <= height)
    first_b1 = fits_bt.int().argmax(1, keepdim=True)  # argmax: the first fit
    found_b = fits_bt.any(1)
    # The fallback: the central crop of the clamped aspect ratio.
    fh = min(height, round(width / min(ratio)))
    fw = min(width, round(height * max(ratio)))
    h_b = torch.where(found_b, h_bt.gather(1, first_b1)[:, 0], fh)
    w_b = torch.where(found_b, w_bt.gather(1, first_b1)[:, 0], fw)
    u_2b = torch.rand(2, batch_size, generator=generator, device=device)
    top_b = torch.minimum((u_2b[0] * (height - h_b + 1)).long(), height - h_b)  # as torch.randint
    left_b = torch.minimum((u_2b[1] * (width - w_b + 1)).long(), width - w_b)
    return (
        torch.where(found_b, top_b, (height - fh) // 2),
        torch.where(found_b, left_b, (width - fw) // 2),
        h_b,
        w_b,
    )


def resized_crop(img_bchw, top_b, left_b, height_b, width_b, size, flip_b=None):
    """Box b of image b resized to size × size, float [B, C, size, size], in one grid_sample; `flip_b`
    (bool [B]) mirrors it. F.interpolate's bilinear arithmetic on the crop alone: output pixel o
    reads (o + ½)·h/size − ½, clamped to the crop, so its neighbours are never read."""
    H, W = img_bchw.shape[-2:]
    centre_s = torch.arange(size, device=img_bchw.device, dtype=torch.float32) + 0.5
    h_b1, w_b1 = height_b[:, None].float(), width_b[:, None].float()
    ys_bs = top_b[:, None] + (centre_s * h_b1 / size - 0.5).clamp(
        min=torch.zeros_like(h_b1), max=h_b1 - 1
    )
    xs_bs = left_b[:, None] + (centre_s * w_b1 / size - 0.5).clamp(
        min=torch.zeros_like(w_b1), max=w_b1 - 1
    )
    if flip_b is not None:
        xs_bs = torch.where(flip_b[:, None], xs_bs.flip(1), xs_bs)
    # grid_sample's coordinates (align_corners=False): pixel p of n sits at (2p + 1)/n − 1.
    gx_b1s, gy_bs1 = ((2 * xs_bs + 1) / W - 1)[:, None, :], ((2 * ys_bs + 1) / H - 1)[:, :, None]
    grid_bss2 = torch.stack(torch.broadcast_tensors(gx_b1s, gy_bs1), dim=-1)
    return torch.nn.functional.grid_sample(
        img_bchw.float(), grid_bss2, padding_mode="border", align_corners=False
    )


class DeviceLoader:
    """Yields (img_bchw float [B, 3, S, S] normalised, labels_b long [B]) where the images are:
    `images_nchw` uint8 [N, 1 or 3, H, W] and `labels_n` must be on the device already. Like
    build_loader's loaders it has len() (batches per epoch and rank), `batch_size` and a _Sampler."""

    def __init__(
        self,
        images_nchw,
        labels_n,
        batch_size,
        *,
        img_size,
        crop="cnn",
        seed=0,
        world_size=1,
        rank=0,
        num_classes=None,
        source="",
    ):
        check_enough(len(images_nchw), batch_size, 1, world_size, source or "the dataset")
        self.sampler = _Sampler(
            range(len(images_nchw)), num_replicas=world_size, rank=rank, seed=seed, drop_last=True
        )
        self.images_nchw, self.labels_n = images_nchw, labels_n
        self.batch_size, self.img_size = batch_size, img_size
        self.scale, self.num_classes, self.source = CROP_SCALE[crop], num_classes, str(source)
        # x ↦ (x/255 − mean)/std as one multiply-add; a 1-channel image broadcasts to 3 channels.
        std_311 = torch.tensor(IMAGENET_STD)[:, None, None]
        mean_311 = torch.tensor(IMAGENET_MEAN)[:, None, None]
        self.mul_13 = (1 / (255 * std_311)).to(images_nchw.device)
        self.add_13 = (-mean_311 / std_311).to(images_nchw.device)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def indices(self):
        """This rank's sample order for the current epoch, long [N / world] (from sampler.start on)."""
        return torch.tensor(list(self.sampler))

    def augment(self, img_bchw, generator=None):
        """uint8 [B, C, H, W] → float [B, 3, S, S]: random resized crop, flip, normalise."""
        B, _, H, W = img_bchw.shape
        box = random_resized_crop_params(
            B, H, W, self.scale, generator=generator, device=img_bchw.device
        )
        flip_b = torch.rand(B, generator=generator, device=img_bchw.device) < 0.5
        return torch.addcmul(
            self.add_13, resized_crop(img_bchw, *box, self.img_size, flip_b), self.mul_13
        )

    def __iter__(self):
        first, s = self.sampler.start // self.batch_size, self.sampler
        order_n = self.indices().to(self.images_nchw.device)  # from batch `first` of the epoch on
        for b, idx_b in enumerate(order_n.split(self.batch_size)[: len(self) - first], start=first):
            # Batch b's crops and flips come from its own seed, so a resumed epoch repeats them.
            gen = torch.Generator(self.images_nchw.device).manual_seed(
                seed_for(s.seed, s.epoch, s.rank, b)
            )
            yield self.augment(self.images_nchw[idx_b], gen), self.labels_n[idx_b]


def device_loader(
    name,
    split,
    batch_size,
    device,
    *,
    img_size=None,
    crop="cnn",
    seed=0,
    data_dir=None,
    world_size=1,
    rank=0,
    download=False,
    fake_size=512,
):
    """A small dataset's split on `device` as a pre-training DeviceLoader, read by build_dataset."""
    dataset_info(name)  # DataError on an unknown name
    if name not in IN_MEMORY:
        raise DataError(
            f"{name} is too large to hold on the device; device_loader takes "
            f"{', '.join(IN_MEMORY)} (use build_dataset + build_loader)"
        )
    ds = build_dataset(
        name,
        split,
        data_dir=data_dir,
        img_size=img_size,
        transform="none",
        crop=crop,
        download=download,
        fake_size=fake_size,
    )
    return DeviceLoader(
        ds.images.to(device),
        ds.labels_n.to(device),
        batch_size,
        crop=crop,
        seed=seed,
        img_size=img_size or _INFO[name][1],
        world_size=world_size,
        rank=rank,
        num_classes=ds.num_classes,
        source=ds.source,
    )
