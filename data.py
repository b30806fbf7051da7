"""Datasets, transforms and loaders for A²MIM pre-training and evaluation.

Every dataset yields `(image_3hw, label)`: a float tensor [3, S, S] normalised with the ImageNet
mean/std (also for CIFAR & co., so one normalisation serves every encoder), and an int label.
Images are kept as uint8 until the transform, which does the geometry first (cheap on uint8) and
converts to float last.

Masks are NOT drawn here: the training step draws them on the device (a2mim.py), so the loader
stays a plain image pipeline that eval_linear.py can reuse.

Where data is looked for (first hit wins):
  fashion-mnist  DATA_DIR, DATA_DIR/fashion-mnist, DATA_DIR/FashionMNIST/raw, the same under ./data,
                 then /usr/share/datasets/fashion-mnist (Debian package); IDX files, gzipped or not.
  cifar10/100    DATA_DIR/cifar-10-batches-py (cifar-100-python), or DATA_DIR itself, then ./data.
  stl10          DATA_DIR/stl10_binary, or DATA_DIR itself, then ./data.
  imagenet       DATA_DIR (default ./data/imagenet) with train/<class>/*.jpg and val/<class>/*.jpg.
  folder         DATA_DIR (required), same layout as imagenet; the class count is read from disk.
  fake           nothing on disk: images are generated from the index (deterministic).
`download=True` lets torchvision fetch fashion-mnist / cifar / stl10 into DATA_DIR (or ./data).
We read the files ourselves instead of through torchvision's dataset classes, because those check
md5 sums and so refuse the small generated files the tests use.
"""

import gzip
import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler
from torchvision.transforms import v2

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "stl10", "imagenet", "folder", "fake")
TRANSFORMS = ("pretrain", "finetune", "eval", "none")
SPLITS = ("train", "val")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Datasets smaller than this (in native pixels) get the CIFAR-style recipes (pad-and-crop, plain
# resize); from here on the ImageNet-style ones (scale-jitter crops, resize-then-centre-crop).
LARGE_IMAGE_PX = 96

# name -> (num_classes, default training size, channels stored in the files, native size or None)
# Fashion-MNIST is 28 px but trains at 32: 28 is not divisible by the 4-px mask block nor by the
# encoder stride 8 used at small sizes, 32 is (32 / 4 = 8 mask blocks, 32 / 8 = 4 feature cells).
_INFO = {
    "fashion-mnist": (10, 32, 1, 28),
    "cifar10": (10, 32, 3, 32),
    "cifar100": (100, 32, 3, 32),
    "stl10": (10, 96, 3, 96),
    "imagenet": (1000, 224, 3, None),  # None: varied sizes, treated as large
    "folder": (None, 224, 3, None),  # classes counted from disk when built
    "fake": (10, 32, 3, 32),  # generated at the requested size; see _FakeImages
}
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DataError(Exception):
    """A missing or malformed dataset; the message is one sentence naming the layout and place."""


def dataset_info(name):
    """Class count, default training size and stored channel count of a dataset name."""
    if name not in _INFO:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    num_classes, img_size, channels, _ = _INFO[name]
    return {"num_classes": num_classes, "img_size": img_size, "channels_in_files": channels}


# ----------------------------------------------------------------------------------------------
# Transforms (PAPER §6 for pre-training; §7-style recipes scaled down for the small datasets)


def build_transform(kind, img_size, *, family="cnn", large=True):
    """uint8 [C, H, W] -> float [C, S, S] normalised with the ImageNet mean/std.

    `large` picks the ImageNet-style recipe (native images >= 96 px) over the CIFAR-style one.
    """
    S = img_size
    if kind == "pretrain":
        # §6: RandomResizedCrop scale (0.8, 1) for ResNet/ConvNeXt, (0.67, 1) for ViT, plus flip.
        # The same crop is used for 28/32-px data: a mild zoom keeps the small objects whole.
        scale = (0.67, 1.0) if family == "vit" else (0.8, 1.0)
        geometry = [v2.RandomResizedCrop(S, scale=scale), v2.RandomHorizontalFlip()]
    elif kind == "finetune" and large:
        geometry = [v2.RandomResizedCrop(S, scale=(0.08, 1.0)), v2.RandomHorizontalFlip()]
    elif kind == "finetune":
        # CIFAR-style: the standard 4-px pad-and-crop; the 0.08 crop would destroy 32-px images.
        geometry = [v2.Resize(S), v2.RandomCrop(S, padding=4), v2.RandomHorizontalFlip()]
    elif kind == "eval" and large:
        # The usual 0.875 centre-crop ratio (224 from 256).
        geometry = [v2.Resize(int(S / 0.875)), v2.CenterCrop(S)]
    elif kind in ("eval", "none"):
        # Deterministic. CenterCrop is a no-op on square data and squares the folder images.
        geometry = [v2.Resize(S), v2.CenterCrop(S)]
    else:
        raise ValueError(f"unknown transform {kind!r}; choose one of {', '.join(TRANSFORMS)}")
    # Inputs are plain uint8 tensors (folder images are converted on load), so outputs stay plain.
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(geometry + to_float)


# ----------------------------------------------------------------------------------------------
# Finding files


def _roots(name, data_dir):
    """Directories to search, in order: DATA_DIR, ./data, and the Debian copy of Fashion-MNIST."""
    roots = [Path(data_dir)] if data_dir is not None else []
    roots.append(Path("data"))
    if name == "fashion-mnist":
        roots.append(SYSTEM_FASHION_MNIST)
    return list(dict.fromkeys(roots))  # drop duplicates, keep order


# Sub-folders tried under each root (the names the official archives unpack to; "" = the root).
_SUBDIRS = {
    "fashion-mnist": ("", "fashion-mnist", "FashionMNIST/raw"),
    "cifar10": ("cifar-10-batches-py", ""),
    "cifar100": ("cifar-100-python", ""),
    "stl10": ("stl10_binary", ""),
}


def _existing(path):
    """The file itself or its .gz twin, whichever exists (uncompressed first: faster to read)."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _find_files(name, data_dir, filenames):
    """Paths of `filenames` in the first searched folder that holds all of them, else None."""
    places = [root / sub for root in _roots(name, data_dir) for sub in _SUBDIRS[name]]
    for folder in places:
        found = [_existing(folder / f) for f in filenames]
        if all(found):
            return found, places
    return None, places


def _locate(name, data_dir, filenames, download):
    """Find the files, downloading once through torchvision if allowed; else a DataError."""
    found, places = _find_files(name, data_dir, filenames)
    if found is None and download:
        _download(name, Path(data_dir) if data_dir is not None else Path("data"))
        found, places = _find_files(name, data_dir, filenames)
    if found is None:
        where = ", ".join(str(p) for p in dict.fromkeys(places))
        raise DataError(
            f"{name} files {' + '.join(filenames)} not found in any of: {where} "
            f"(pass download=True / --download to fetch them)"
        )
    return found


def _download(name, root):
    """Let torchvision download and unpack the official archive into `root`."""
    import torchvision.datasets as tvd

    fetch = {
        "fashion-mnist": lambda: tvd.FashionMNIST(root, train=True, download=True),
        "cifar10": lambda: tvd.CIFAR10(root, download=True),
        "cifar100": lambda: tvd.CIFAR100(root, download=True),
        "stl10": lambda: tvd.STL10(root, split="train", download=True),
    }[name]
    try:
        fetch()
    except Exception as err:  # no network, disk full, bad archive: all end the same way for us
        raise DataError(f"downloading {name} into {root} failed ({err})") from None


def _read_bytes(path):
    """Whole file contents, gunzipped when the name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as err:  # bad or truncated gzip stream
        raise DataError(f"cannot read {path} ({err})") from None


# ----------------------------------------------------------------------------------------------
# File-format readers. Each returns (images uint8 [N, H, W] or [N, 3, H, W], labels int64 [N]).


def _read_idx(path, ndim):
    """An IDX array (the MNIST format): magic 0x0000 08 <ndim>, ndim big-endian uint32 dims, data.

    0x08 is the uint8 type code, so images start 0x00000803 and labels 0x00000801.
    """
    raw = _read_bytes(path)
    header_len = 4 + 4 * ndim
    if len(raw) < header_len or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise DataError(f"{path} is not a uint8 IDX file with {ndim} dims (bad magic number)")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    if len(raw) != header_len + math.prod(dims):
        raise DataError(f"{path} holds {len(raw) - header_len} data bytes, header says {dims}")
    data = torch.frombuffer(bytearray(memoryview(raw)[header_len:]), dtype=torch.uint8)
    return data.reshape(dims)


def _read_fashion_mnist(split, data_dir, download):
    prefix = "train" if split == "train" else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    image_path, label_path = _locate("fashion-mnist", data_dir, names, download)
    images_nhw = _read_idx(image_path, 3)  # [N, 28, 28]
    labels_n = _read_idx(label_path, 1).long()
    _check_pair(images_nhw, labels_n, 10, image_path)
    return images_nhw, labels_n, image_path.parent


def _unpickle(path, label_key):
    """One CIFAR python batch: a dict with b"data" [N, 3072] uint8 and a label list.

    pickle can run code: only point this at archives you trust (torchvision does the same).
    """
    try:
        batch = pickle.loads(_read_bytes(path), encoding="bytes")
        data, labels = np.asarray(batch[b"data"], dtype=np.uint8), batch[label_key]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path} is not a CIFAR python batch with b'data' and {label_key}: {err}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path} has b'data' of shape {data.shape}, expected [N, 3072]")
    # Each row is the R plane, then G, then B, each 32x32 row-major -> [N, 3, 32, 32] directly.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(labels)


def _read_cifar(name, split, data_dir, download):
    if name == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, num_classes = b"labels", 10
    else:
        names, label_key, num_classes = ["train" if split == "train" else "test"], b"fine_labels", 100
    paths = _locate(name, data_dir, names, download)
    images, labels = zip(*(_unpickle(p, label_key) for p in paths))
    images_nchw, labels_n = torch.cat(images), torch.cat(labels).long()
    _check_pair(images_nchw, labels_n, num_classes, paths[0])
    return images_nchw, labels_n, paths[0].parent


def _read_stl10(split, data_dir, download):
    """STL-10 binaries: uint8 images [N, 3, 96, 96] stored column-major, labels 1..10.

    unlabeled_X.bin (100k images) is not used: it would make a pre-training epoch 20x longer
    than the labelled split; train on it by pointing a "folder" dataset at extracted images.
    """
    prefix = "train" if split == "train" else "test"
    image_path, label_path = _locate("stl10", data_dir, [f"{prefix}_X.bin", f"{prefix}_y.bin"], download)
    pixels = np.frombuffer(_read_bytes(image_path), dtype=np.uint8)
    if pixels.size % (3 * 96 * 96):
        raise DataError(f"{image_path} holds {pixels.size} bytes, not a multiple of 3*96*96")
    # Each channel plane is stored column by column (MATLAB order): [N, C, W, H] -> [N, C, H, W].
    images_nchw = torch.from_numpy(pixels.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy())
    labels_n = torch.from_numpy(np.frombuffer(_read_bytes(label_path), dtype=np.uint8).copy())
    labels_n = labels_n.long() - 1  # 1..10 on disk -> 0..9
    _check_pair(images_nchw, labels_n, 10, image_path)
    return images_nchw, labels_n, image_path.parent


def _check_pair(images, labels_n, num_classes, path):
    """One label per image and every label inside 0..num_classes-1."""
    if len(images) != len(labels_n):
        raise DataError(f"{path.parent} has {len(images)} images but {len(labels_n)} labels")
    if len(labels_n) and (labels_n.min() < 0 or labels_n.max() >= num_classes):
        raise DataError(f"{path.parent} has labels outside 0..{num_classes - 1}")


# ----------------------------------------------------------------------------------------------
# Dataset classes


class _TensorImages(Dataset):
    """A whole split held in memory as uint8 [N, H, W] (grayscale) or [N, 3, H, W]."""

    def __init__(self, images, labels_n, transform, num_classes, source):
        self.images, self.labels_n, self.transform = images, labels_n, transform
        self.num_classes, self.source = num_classes, str(source)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        if image.ndim == 2:  # grayscale [H, W] -> replicated RGB [3, H, W], as the encoders want
            image = image.expand(3, -1, -1)
        return self.transform(image), int(self.labels_n[index])


# Ten well-separated class colours (RGB in 0..1) for the fake dataset; fixed so runs agree.
_FAKE_COLOURS = torch.tensor([
    [0.90, 0.10, 0.10], [0.10, 0.80, 0.10], [0.10, 0.20, 0.90], [0.95, 0.85, 0.10],
    [0.80, 0.10, 0.80], [0.10, 0.85, 0.85], [0.95, 0.55, 0.10], [0.50, 0.50, 0.50],
    [0.55, 0.30, 0.10], [0.95, 0.95, 0.95],
])
_FAKE_SEED = {"train": 20_230_000, "val": 1_020_230_000}  # far apart: the splits share no image


class _FakeImages(Dataset):
    """Synthetic images whose class is learnable: class colour + smooth texture + pixel noise.

    Image i is generated from a torch.Generator seeded with (split base + i), so it is the same
    on every call, in every worker, with no storage. Label = i mod 10 (balanced classes).
    The smooth texture gives masked-image modeling something non-trivial to reconstruct.
    """

    def __init__(self, split, size, img_size, transform):
        self.base_seed, self.size, self.img_size = _FAKE_SEED[split], size, img_size
        self.transform, self.num_classes, self.source = transform, 10, "generated"

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        index = int(index)  # a Subset built from a tensor passes 0-d tensors
        if not 0 <= index < self.size:
            raise IndexError(f"fake index {index} outside 0..{self.size - 1}")
        label = index % self.num_classes
        gen = torch.Generator().manual_seed(self.base_seed + index)
        S = self.img_size

        # Low-frequency texture: a random 4x4 RGB grid upsampled to S x S.
        grid_13hw = torch.rand(1, 3, 4, 4, generator=gen)
        texture_3hw = torch.nn.functional.interpolate(grid_13hw, size=(S, S), mode="bilinear")[0]
        noise_3hw = 0.05 * torch.randn(3, S, S, generator=gen)
        image_3hw = 0.6 * _FAKE_COLOURS[label, :, None, None] + 0.4 * texture_3hw + noise_3hw
        image_3hw = (image_3hw.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.transform(image_3hw), label


def _load_rgb(path):
    """PIL loader for image folders; an undecodable file is a DataError naming it.

    Policy: fail loudly. Skipping or substituting a broken image would silently change the
    dataset (and the sample order across runs); one clear message lets the user fix the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            return v2.functional.pil_to_tensor(img.convert("RGB"))  # uint8 [3, H, W]
    except OSError as err:  # covers UnidentifiedImageError and "image file is truncated"
        raise DataError(f"cannot decode image {path} ({err}); delete or replace the file") from None


def _image_folder(name, split, data_dir, transform):
    """torchvision ImageFolder over DIR/<split>/<class>/*.jpg with clear errors for bad layouts."""
    from torchvision.datasets import ImageFolder

    if data_dir is None and name == "folder":
        raise DataError("dataset 'folder' needs data_dir pointing at DIR with "
                        "DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg")
    root = Path(data_dir) if data_dir is not None else Path("data/imagenet")
    split_dir = root / split
    layout = f"{root}/{split}/<class>/*.jpg"
    if not split_dir.is_dir() or not any(p.is_dir() for p in split_dir.iterdir()):
        raise DataError(f"{name} expects class folders of images at {layout}, found none in {split_dir}")
    try:
        dataset = ImageFolder(str(split_dir), transform=transform, loader=_load_rgb)
    except FileNotFoundError:  # class folders exist but hold no image files
        raise DataError(f"{name} expects images at {layout}, "
                        f"but the class folders in {split_dir} hold none") from None
    dataset.num_classes, dataset.source = len(dataset.classes), str(split_dir)
    return dataset


# ----------------------------------------------------------------------------------------------
# Public builders


def _check_positive_int(what, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


def build_dataset(name, split, *, data_dir=None, img_size=None, transform="pretrain", family="cnn",
                  download=False, fake_size=512):
    """A Dataset of (image float [3, S, S] normalised, int label) for one split.

    `transform` is a recipe name (see build_transform). The result has `.num_classes` (read from
    disk for "folder") and `.source` (where the data came from, for the log line).
    """
    info = dataset_info(name)  # raises DataError on an unknown name
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if img_size is None:
        img_size = info["img_size"]
    _check_positive_int("img_size", img_size)
    if family not in ("cnn", "vit"):
        raise ValueError(f"family must be 'cnn' or 'vit', got {family!r}")
    native = img_size if name == "fake" else _INFO[name][3]
    large = native is None or native >= LARGE_IMAGE_PX
    tf = build_transform(transform, img_size, family=family, large=large)

    if name in ("imagenet", "folder"):
        return _image_folder(name, split, data_dir, tf)
    if name == "fake":
        _check_positive_int("fake_size", fake_size)
        return _FakeImages(split, fake_size, img_size, tf)
    if name == "fashion-mnist":
        images, labels_n, source = _read_fashion_mnist(split, data_dir, download)
    elif name == "stl10":
        images, labels_n, source = _read_stl10(split, data_dir, download)
    else:
        images, labels_n, source = _read_cifar(name, split, data_dir, download)
    return _TensorImages(images, labels_n, tf, info["num_classes"], source)


class _EpochRandomSampler(Sampler):
    """Single-process shuffling: the order of epoch E is randperm seeded with seed + E.

    So a run resumed at epoch E sees the same order as one that never stopped (like
    DistributedSampler, whose seed + epoch convention this follows). Call set_epoch every epoch.
    """

    def __init__(self, num_samples, seed):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=gen).tolist())

    def __len__(self):
        return self.num_samples


def _world(distributed, world_size, rank):
    """(world_size, rank): explicit values win, else torch.distributed's, else a single process."""
    if not distributed:
        return 1, 0
    if world_size is None or rank is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("distributed=True needs an initialised process group "
                             "or explicit world_size and rank")
        world_size = torch.distributed.get_world_size() if world_size is None else world_size
        rank = torch.distributed.get_rank() if rank is None else rank
    return world_size, rank


def build_loader(dataset, batch_size, *, train=True, distributed=False, workers=None, seed=0,
                 drop_last=None, pin_memory=None, world_size=None, rank=None):
    """DataLoader with seeded shuffling (train) or the dataset order (eval).

    distributed: each rank reads its own 1/world_size shard via DistributedSampler. Note that for
    eval (drop_last=False) DistributedSampler pads the last shard by repeating a few samples.
    world_size/rank default to the initialised process group; pass them to test without one.
    """
    world_size, rank = _world(distributed, world_size, rank)
    drop_last = train if drop_last is None else drop_last
    if distributed:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                                     seed=seed, drop_last=train)
    elif train:
        sampler = _EpochRandomSampler(len(dataset), seed)
    else:
        sampler = SequentialSampler(dataset)
    if drop_last and len(sampler) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(sampler)} samples per process, "
                         f"so drop_last would leave no batch; lower the batch size")
    if workers is None:
        workers = min(8, (os.cpu_count() or 1) // world_size)
    # loader.generator seeds the worker processes' RNGs (the random crops); set_epoch re-seeds it.
    generator = torch.Generator().manual_seed(seed) if train else None
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        # Not persistent: workers restart every epoch, re-seeded by set_epoch, so a resumed run
        # sees the same random crops as an uninterrupted one (costs a second per epoch).
        drop_last=drop_last, persistent_workers=False, generator=generator,
    )


def set_epoch(loader, epoch):
    """Make the sample order (and fresh workers' augmentation seeds) a function of (seed, epoch).

    Sample order is then exactly reproducible on resume, and so are the workers' random crops
    (workers are not persistent, so they start afresh each epoch from this seed). With
    workers=0 the crops use the main process's global torch RNG, which train.py seeds per epoch.
    """
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if loader.generator is not None:
        # Different per rank, so ranks do not share augmentation streams.
        rank = getattr(sampler, "rank", 0)
        loader.generator.manual_seed(getattr(sampler, "seed", 0) * 1_000_003 + epoch * 1009 + rank)


# ----------------------------------------------------------------------------------------------
# Device-resident small datasets (issue 6)
#
# Fashion-MNIST, CIFAR and STL-10 fit on a GPU many times over (47, 150 and 138 MB as uint8), and
# a GPU step of a small encoder is quicker than CPU workers can crop a batch. So `device_loader`
# puts the uint8 array on the device once and augments whole batches there. It follows
# build_transform("pretrain") + build_loader(train=True): the order is DistributedSampler's
# (randperm seeded seed + epoch, shard rank::world, the last incomplete batch dropped; with one
# process this is _EpochRandomSampler's order), crops are RandomResizedCrop's (scale (0.8, 1) CNN,
# (0.67, 1) ViT, aspect (3/4, 4/3), up to 10 tries), flip p = 0.5. Two differences: the resize is
# bilinear without antialiasing, so it equals the CPU one only when upsampling (always so for
# 28/32-px data at 32 px and up), and the result is not rounded to uint8 before normalising.

DEVICE_DATASETS = ("fashion-mnist", "cifar10", "cifar100", "stl10", "fake")


def random_resized_crop_params(batch_size, height, width, scale, ratio=(3 / 4, 4 / 3), *, generator=None,
                               device=None, tries=10):
    """RandomResizedCrop's boxes for a whole batch: (top_b, left_b, height_b, width_b), long [B].

    torchvision draws up to `tries` (area fraction, log aspect) pairs per image and keeps the first
    whose rounded box fits; here all tries are drawn at once and the first fit picked per image.
    Images with no fit get torchvision's fallback, the central crop of the clamped aspect ratio.
    """
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    u_2bt = torch.rand(2, batch_size, tries, generator=generator, device=device)
    area_bt = height * width * (scale[0] + (scale[1] - scale[0]) * u_2bt[0])
    aspect_bt = torch.exp(lo + (hi - lo) * u_2bt[1])
    w_bt = torch.sqrt(area_bt * aspect_bt).round().long()  # round half to even, like Python's round
    h_bt = torch.sqrt(area_bt / aspect_bt).round().long()
    fits_bt = (w_bt > 0) & (w_bt <= width) & (h_bt > 0) & (h_bt <= height)
    first_b1 = fits_bt.int().argmax(dim=1, keepdim=True)  # argmax gives the first of equal maxima
    found_b = fits_bt.any(dim=1)

    # The fallback box, the same for every image.
    fw, fh = width, height
    if width / height < min(ratio):
        fh = int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fw = int(round(height * max(ratio)))
    h_b = torch.where(found_b, h_bt.gather(1, first_b1)[:, 0], fh)
    w_b = torch.where(found_b, w_bt.gather(1, first_b1)[:, 0], fw)

    # Offsets uniform over the integer positions where the box fits, like torch.randint.
    u_2b = torch.rand(2, batch_size, generator=generator, device=device)
    top_b = torch.minimum((u_2b[0] * (height - h_b + 1)).long(), height - h_b)
    left_b = torch.minimum((u_2b[1] * (width - w_b + 1)).long(), width - w_b)
    top_b = torch.where(found_b, top_b, (height - fh) // 2)
    left_b = torch.where(found_b, left_b, (width - fw) // 2)
    return top_b, left_b, h_b, w_b


def resized_crop(img_bchw, top_b, left_b, height_b, width_b, size, flip_b=None):
    """Crop box b out of image b and resize it to size × size: float [B, C, size, size].

    Bilinear with F.interpolate's arithmetic (align_corners=False, no antialias) applied to each
    crop: output pixel o reads crop pixel (o + ½)·h/size − ½, clamped to the crop, so the crop's
    border pixels are repeated rather than its neighbours read. One grid_sample for the batch.
    `flip_b` (bool [B]) mirrors the output horizontally. Values stay in the input's range.
    """
    H, W = img_bchw.shape[-2:]
    centre_s = torch.arange(size, device=img_bchw.device, dtype=torch.float32) + 0.5
    h_b1, w_b1 = height_b[:, None].float(), width_b[:, None].float()
    # Source coordinates in the full image, in pixels: [B, size] for rows and for columns.
    ys_bs = top_b[:, None] + (centre_s * h_b1 / size - 0.5).clamp(min=torch.zeros_like(h_b1), max=h_b1 - 1)
    xs_bs = left_b[:, None] + (centre_s * w_b1 / size - 0.5).clamp(min=torch.zeros_like(w_b1), max=w_b1 - 1)
    if flip_b is not None:
        xs_bs = torch.where(flip_b[:, None], xs_bs.flip(1), xs_bs)
    # grid_sample's coordinates (align_corners=False): pixel p of n sits at (2p + 1)/n − 1.
    gx_b1s, gy_bs1 = ((2 * xs_bs + 1) / W - 1)[:, None, :], ((2 * ys_bs + 1) / H - 1)[:, :, None]
    grid_bss2 = torch.stack(torch.broadcast_tensors(gx_b1s, gy_bs1), dim=-1)
    return torch.nn.functional.grid_sample(img_bchw.float(), grid_bss2, mode="bilinear",
                                           padding_mode="border", align_corners=False)


class DeviceLoader:
    """Yields (img_bchw float [B, 3, S, S] normalised, labels_b long [B]), both on the images' device.

    Pre-training augmentation on the device (see the section comment); `images_nchw` uint8
    [N, 1 or 3, H, W] and `labels_n` must already be there. Like a DataLoader it has `__len__`
    (batches per epoch and rank) and `set_epoch`; `sampler` is the loader itself, so that
    `set_epoch(loader, epoch)` above works for both kinds of loader.
    """

    def __init__(self, images_nchw, labels_n, batch_size, *, img_size, family="cnn", seed=0, world_size=1,
                 rank=0, num_classes=None, source=""):
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        if family not in ("cnn", "vit"):
            raise ValueError(f"family must be 'cnn' or 'vit', got {family!r}")
        self.images_nchw, self.labels_n = images_nchw, labels_n
        self.batch_size, self.img_size, self.seed = batch_size, img_size, seed
        self.world_size, self.rank, self.epoch = world_size, rank, 0
        self.scale = (0.67, 1.0) if family == "vit" else (0.8, 1.0)  # §6, as build_transform
        self.num_classes, self.source = num_classes, str(source)
        self.num_samples = len(images_nchw) // world_size  # per rank: DistributedSampler(drop_last=True)
        if self.num_samples < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.num_samples} samples per process, "
                             f"so drop_last would leave no batch; lower the batch size")
        self.sampler, self.generator = self, None  # see the class docstring
        # x ↦ (x/255 − mean)/std as one multiply-add; a 1-channel image broadcasts to 3 channels.
        std_13 = torch.tensor(IMAGENET_STD, device=images_nchw.device).view(1, 3, 1, 1)
        mean_13 = torch.tensor(IMAGENET_MEAN, device=images_nchw.device).view(1, 3, 1, 1)
        self.mul_13, self.add_13 = 1 / (255 * std_13), -mean_13 / std_13

    def __len__(self):
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def indices(self):
        """This rank's sample order for the current epoch (on the CPU, as DistributedSampler's)."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order_n = torch.randperm(len(self.images_nchw), generator=gen)
        return order_n[: self.num_samples * self.world_size][self.rank :: self.world_size]

    def augment(self, img_bchw, generator=None):
        """uint8 [B, C, H, W] → float [B, 3, S, S]: random resized crop, flip, normalise."""
        B, _, H, W = img_bchw.shape
        box = random_resized_crop_params(B, H, W, self.scale, generator=generator, device=img_bchw.device)
        flip_b = torch.rand(B, generator=generator, device=img_bchw.device) < 0.5
        crop_bcss = resized_crop(img_bchw, *box, self.img_size, flip_b)
        return torch.addcmul(self.add_13, crop_bcss, self.mul_13)

    def __iter__(self):
        device = self.images_nchw.device
        order_n = self.indices().to(device)
        # Augmentation seed per (seed, epoch, rank), the formula set_epoch uses for the workers.
        gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + self.rank)
        for b in range(len(self)):
            idx_b = order_n[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.augment(self.images_nchw[idx_b], gen), self.labels_n[idx_b]


def device_loader(name, split, batch_size, device, *, img_size=None, family="cnn", seed=0, data_dir=None,
                  world_size=1, rank=0, download=False, fake_size=512):
    """The whole split of a small dataset on `device`, as a pre-training DeviceLoader.

    Reads the files with the readers above (same places, same errors); `img_size` defaults to
    the dataset's training size. world_size/rank shard it like DistributedSampler.
    """
    info = dataset_info(name)  # raises DataError on an unknown name
    if name not in DEVICE_DATASETS:
        raise DataError(f"{name} is too large to hold on the device; device_loader takes "
                        f"{', '.join(DEVICE_DATASETS)} (use build_dataset + build_loader)")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    img_size = img_size or info["img_size"]
    _check_positive_int("img_size", img_size)
    if name == "fake":
        fake = _FakeImages(split, fake_size, img_size, transform=lambda image: image)
        images, labels_n = torch.stack([fake[i][0] for i in range(fake_size)]), torch.arange(fake_size) % 10
        source = "generated"
    elif name == "fashion-mnist":
        images, labels_n, source = _read_fashion_mnist(split, data_dir, download)
        images = images[:, None]  # [N, 1, 28, 28]: grey, becomes 3 channels when normalised
    elif name == "stl10":
        images, labels_n, source = _read_stl10(split, data_dir, download)
    else:
        images, labels_n, source = _read_cifar(name, split, data_dir, download)
    return DeviceLoader(images.to(device), labels_n.to(device), batch_size, img_size=img_size, family=family,
                        seed=seed, world_size=world_size, rank=rank, num_classes=info["num_classes"], source=source)
