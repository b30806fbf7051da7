"""Tests for data.py: each dataset format is generated in tmp_path in its real on-disk layout."""

import gzip
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

import data
import runtime
from data import build_dataset, build_loader, set_epoch
from runtime import DataError

MEAN = torch.tensor(data.IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(data.IMAGENET_STD)[:, None, None]


def unnormalise(image_3hw):
    """Back to 0..255 pixel values, to compare with what was written."""
    return (image_3hw * STD + MEAN) * 255


@pytest.fixture
def no_md5(monkeypatch):
    """The generated archives are in the real formats but not the real files, so torchvision's md5
    sums cannot match: give the dataset classes' file tables no md5, which torchvision takes as
    "check that the file exists" (torchvision.datasets.utils.check_integrity with md5=None)."""
    for cls in (tvd.CIFAR10, tvd.CIFAR100, tvd.STL10):
        for table in ("train_list", "test_list"):
            monkeypatch.setattr(cls, table, [[name, None] for name, _ in getattr(cls, table)])
        if hasattr(cls, "meta"):
            monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})


# ----------------------------------------------------------------------------------------------
# Writers for the real file formats


def write_idx(path, array, gz=True, magic=None):
    """IDX: 0x0000, type 0x08 (uint8), ndim, big-endian uint32 dims, raw bytes."""
    array = np.asarray(array, dtype=np.uint8)
    magic = bytes((0, 0, 0x08, array.ndim)) if magic is None else magic
    raw = magic + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_fashion(folder, n=6, split="train", gz=True):
    """Image i is uniform grey 10*i with label i % 10; returns the image path."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    images = np.stack([np.full((28, 28), 10 * i) for i in range(n)])
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz=gz)
    return write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz=gz)


def cifar_images(n):
    """[N, 3, 32, 32]: image i has R = i, G = 100, B = 200, and a bright top-left R pixel."""
    images = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    images[:, 0] = np.arange(n)[:, None, None]
    images[:, 1], images[:, 2] = 100, 200
    images[:, 0, 0, 0] = 255
    return images


def write_cifar_batch(path, images_nchw, labels, label_key="labels", **more_keys):
    """One pickled batch as in the official archive (a Python 2 pickle, whose keys load as str):
    "data" [N, 3072] uint8 (R, G, B planes, each 32×32 row-major) and a label list."""
    batch = {
        "data": images_nchw.reshape(len(images_nchw), -1),
        label_key: list(labels),
        **more_keys,
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def write_cifar_meta(folder, cifar100=False):
    """batches.meta (CIFAR-10) / meta (CIFAR-100): the class names, also part of the archive."""
    name, key = ("meta", "fine_label_names") if cifar100 else ("batches.meta", "label_names")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "wb") as f:
        pickle.dump({key: [f"class{k}".encode() for k in range(100 if cifar100 else 10)]}, f)


def touch(folder, *names):
    """Files of the archive that a test does not read: torchvision still wants them to exist."""
    for name in names:
        (folder / name).write_bytes(b"")


def write_cifar10(root, per_batch=2):
    folder = root / "cifar-10-batches-py"
    write_cifar_meta(folder)
    for b in range(1, 6):
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        write_cifar_batch(folder / f"data_batch_{b}", cifar_images(per_batch), labels)
    write_cifar_batch(folder / "test_batch", cifar_images(3), [7, 8, 9])


def write_jpeg(path, colour, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


def write_folder(root, splits=("train", "val")):
    """Two classes, two JPEGs each: class 'cat' is red, class 'dog' is blue."""
    for split in splits:
        for k in range(2):
            write_jpeg(root / split / "cat" / f"{k}.jpg", (250, 0, 0))
            write_jpeg(root / split / "dog" / f"{k}.jpg", (0, 0, 250))


class IndexDataset(torch.utils.data.Dataset):
    """Item i is (i, i): lets a test read the sample order straight off the batches."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, i


def epoch_order(loader, epoch):
    set_epoch(loader, epoch)
    return torch.cat([x for x, _ in loader]).tolist()


# ----------------------------------------------------------------------------------------------
# Names and sizes


def test_unknown_dataset_raises_data_error_listing_the_choices():
    with pytest.raises(DataError, match="cifar10, cifar100, stl10"):
        data.dataset_info("mnist")
    with pytest.raises(DataError, match="fashion-mnist"):
        build_dataset("svhn", "train")


def test_fashion_mnist_trains_at_32px_divisible_by_mask_block_and_stride():
    info = data.dataset_info("fashion-mnist")
    assert info == {"num_classes": 10, "img_size": 32, "channels_in_files": 1}
    assert info["img_size"] % 4 == 0 and info["img_size"] % 8 == 0
    assert data.dataset_info("folder")["num_classes"] is None
    assert data.dataset_info("stl10")["img_size"] == 96


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "test"},
        {"img_size": 0},
        {"img_size": 32.0},
        {"img_size": True},
        {"transform": "strong"},
        {"crop": "mlp"},
    ],
)
def test_bad_split_size_transform_or_crop_is_a_value_error(kwargs):
    args = {"split": "train", **kwargs}
    with pytest.raises(ValueError):
        build_dataset("fake", args.pop("split"), **args)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)


def test_idx_grayscale_is_resized_to_32_and_replicated_to_three_identical_channels(tmp_path):
    write_fashion(tmp_path, n=6)
    ds = build_dataset("fashion-mnist", "train", data_dir=tmp_path, transform="none")
    image, label = ds[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    pixels = unnormalise(image)
    assert torch.allclose(pixels[0], pixels[1], atol=1e-3) and torch.allclose(
        pixels[1], pixels[2], atol=1e-3
    )
    assert torch.allclose(pixels, torch.full_like(pixels, 30.0), atol=1e-3)  # uniform grey 10*3


def test_idx_labels_and_length_match_the_files(tmp_path):
    write_fashion(tmp_path, n=13, split="val")
    ds = build_dataset("fashion-mnist", "val", data_dir=tmp_path, transform="none")
    assert len(ds) == 13 and ds.num_classes == 10
    assert [ds[i][1] for i in range(13)] == [i % 10 for i in range(13)]


def test_idx_uncompressed_files_in_the_torchvision_raw_folder_are_found(tmp_path):
    write_fashion(tmp_path / "FashionMNIST" / "raw", n=4, gz=False)
    ds = build_dataset("fashion-mnist", "train", data_dir=tmp_path, transform="none")
    assert len(ds) == 4 and ds.source.endswith("raw")


@pytest.mark.parametrize("damage", ["bad_magic", "truncated", "not_gzip"])
def test_malformed_idx_file_raises_data_error_naming_it(tmp_path, damage):
    image_path = write_fashion(tmp_path, n=4)
    if damage == "bad_magic":
        write_idx(
            tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28)), magic=b"\x00\x00\x08\x01"
        )
    elif damage == "truncated":
        raw = gzip.decompress(image_path.read_bytes())
        image_path.write_bytes(gzip.compress(raw[:-5]))
    else:
        image_path.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        build_dataset("fashion-mnist", "train", data_dir=tmp_path)


def test_idx_label_count_must_match_image_count(tmp_path):
    write_fashion(tmp_path, n=4)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(3))
    with pytest.raises(DataError, match="4 images but 3 labels"):
        build_dataset("fashion-mnist", "train", data_dir=tmp_path)


def test_missing_fashion_mnist_error_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so ./data is empty
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", tmp_path / "system")
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError) as err:
        build_dataset("fashion-mnist", "train", data_dir=tmp_path / "mine")
    message = str(err.value)
    for place in ["mine,", "mine/fashion-mnist", "mine/FashionMNIST/raw"]:
        assert place in message
    assert "system" not in message and "data/" not in message  # the named folder only
    assert "train-images-idx3-ubyte" in message and "download" in message
    with pytest.raises(DataError) as err:  # no data_dir: ./data, then the Debian copy
        build_dataset("fashion-mnist", "train")
    for place in ["data,", "data/fashion-mnist", "data/FashionMNIST/raw", "system"]:
        assert place in str(err.value)


def test_the_debian_copy_is_used_only_when_no_data_dir_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", tmp_path / "system")
    write_fashion(tmp_path / "system", n=5)  # gzipped, as the Debian package ships them
    ds = build_dataset("fashion-mnist", "train", transform="none")
    assert len(ds) == 5 and ds.source == str(tmp_path / "system")
    assert not (tmp_path / "data").exists()  # nothing copied into the user's tree
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="mine"):
        build_dataset("fashion-mnist", "train", data_dir=tmp_path / "mine")


@pytest.mark.parametrize(
    "name", ["fashion-mnist", "cifar10", "cifar100", "stl10", "imagenet", "folder"]
)
def test_a_data_dir_that_does_not_exist_is_a_data_error_naming_it_even_if_data_holds_the_dataset(
    tmp_path, monkeypatch, name
):
    monkeypatch.chdir(tmp_path)
    write_fashion(tmp_path / "data", n=4)  # a fall-back copy that must not be used silently
    write_cifar10(tmp_path / "data")
    write_folder(tmp_path / "data" / "imagenet")
    with pytest.raises(DataError, match=r"data directory \S*typo does not exist"):
        build_dataset(name, "train", data_dir=tmp_path / "typo")
    if name in data.IN_MEMORY:
        with pytest.raises(DataError, match="typo does not exist"):
            data.device_loader(name, "train", 2, "cpu", data_dir=tmp_path / "typo")


@pytest.mark.skipif(
    not data.SYSTEM_FASHION_MNIST.is_dir(), reason="Debian fashion-mnist files not installed"
)
def test_real_debian_fashion_mnist_has_60000_train_and_10000_val_images():
    train = build_dataset(
        "fashion-mnist", "train", data_dir=data.SYSTEM_FASHION_MNIST, transform="none"
    )
    val = build_dataset(
        "fashion-mnist", "val", data_dir=data.SYSTEM_FASHION_MNIST, transform="none"
    )
    assert (len(train), len(val)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert sorted(train.labels_n.unique().tolist()) == list(range(10))
    assert train[0][0].shape == (3, 32, 32)


# ----------------------------------------------------------------------------------------------
# CIFAR (python pickle batches) and STL-10 (column-major binaries)


def test_cifar10_batches_load_in_order_with_labels_and_rgb_plane_order(tmp_path, no_md5):
    write_cifar10(tmp_path, per_batch=2)
    train = build_dataset("cifar10", "train", data_dir=tmp_path, transform="none")
    assert len(train) == 10 and [train[i][1] for i in range(10)] == [2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    pixels = unnormalise(train[1][0])  # second image of data_batch_1: R = 1, G = 100, B = 200
    assert pixels[:, 5, 5].round().tolist() == [1.0, 100.0, 200.0]
    assert pixels[0, 0, 0].round() == 255 and pixels[0, 0, 1].round() == 1  # row-major planes
    val = build_dataset("cifar10", "val", data_dir=tmp_path, transform="none")
    assert [val[i][1] for i in range(3)] == [7, 8, 9]


def test_cifar100_reads_fine_labels_not_coarse_ones(tmp_path, no_md5):
    folder = tmp_path / "cifar-100-python"
    write_cifar_meta(folder, cifar100=True)
    write_cifar_batch(
        folder / "train",
        cifar_images(3),
        [0, 57, 99],
        label_key="fine_labels",
        coarse_labels=[1, 2, 3],
    )
    touch(folder, "test")
    ds = build_dataset("cifar100", "train", data_dir=tmp_path, transform="none")
    assert ds.num_classes == 100 and [ds[i][1] for i in range(3)] == [0, 57, 99]


def test_cifar_without_the_label_key_raises_data_error(tmp_path, no_md5):
    folder = tmp_path / "cifar-100-python"
    write_cifar_meta(folder, cifar100=True)
    write_cifar_batch(folder / "test", cifar_images(2), [1, 2], label_key="coarse_labels")
    touch(folder, "train")
    with pytest.raises(DataError, match="fine_labels"):
        build_dataset("cifar100", "val", data_dir=tmp_path)


def test_cifar_files_that_fail_torchvisions_md5_check_raise_data_error_naming_the_folder(tmp_path):
    write_cifar10(tmp_path)  # real format, but not the official bytes
    with pytest.raises(
        DataError, match=r"cifar-10-batches-py does not hold an intact cifar10.*md5.*corrupted"
    ):
        build_dataset("cifar10", "train", data_dir=tmp_path)


def test_missing_cifar_error_names_the_expected_files_and_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(DataError, match=r"data_batch_1.*nowhere/cifar-10-batches-py.*download"):
        build_dataset("cifar10", "train", data_dir=tmp_path / "nowhere")
    # no data_dir: ./data
    with pytest.raises(DataError, match=r"test_batch.* data/cifar-10-batches-py"):
        build_dataset("cifar10", "val")


def test_stl10_column_major_images_are_transposed_and_labels_shifted_to_zero(tmp_path, no_md5):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    touch(folder, "train_X.bin", "train_y.bin", "unlabeled_X.bin")
    images_nchw = np.zeros((2, 3, 96, 96), dtype=np.uint8)
    images_nchw[:, :, 0, :] = 255  # the top ROW is white in the true orientation
    # On disk each channel plane is column-major: write the transpose row-major.
    (folder / "test_X.bin").write_bytes(images_nchw.transpose(0, 1, 3, 2).tobytes())
    (folder / "test_y.bin").write_bytes(bytes([1, 10]))
    ds = build_dataset("stl10", "val", data_dir=tmp_path, transform="none")
    image, label = ds[1]
    pixels = unnormalise(image)
    assert image.shape == (3, 96, 96) and label == 9 and ds[0][1] == 0
    # top row white, left column not
    assert pixels[:, 0, :].min() > 250 and pixels[:, 1:, 0].max() < 5


# ----------------------------------------------------------------------------------------------
# Image folders (imagenet / folder)


def test_image_folder_loads_jpegs_with_class_labels_and_counts_classes(tmp_path):
    write_folder(tmp_path)
    ds = build_dataset("folder", "val", data_dir=tmp_path, transform="eval", img_size=32)
    assert len(ds) == 4 and ds.num_classes == 2 and ds.classes == ["cat", "dog"]
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and label == 0
    red, _, blue = unnormalise(image).mean((1, 2)).tolist()
    assert red > 200 and blue < 30  # class 'cat' was written red
    assert ds[3][1] == 1


@pytest.mark.parametrize("layout", ["no_dir", "no_split", "empty_split", "no_images"])
def test_bad_image_folder_error_names_the_expected_layout(tmp_path, layout):
    if layout == "no_split":
        write_folder(tmp_path, splits=("train",))
    elif layout == "empty_split":
        (tmp_path / "val").mkdir()
    elif layout == "no_images":
        (tmp_path / "val" / "cat").mkdir(parents=True)
        (tmp_path / "val" / "cat" / "notes.txt").write_text("not an image")
    root = tmp_path / "missing" if layout == "no_dir" else tmp_path
    with pytest.raises(DataError, match=r"val/<class>/\*\.jpg"):
        build_dataset("imagenet", "val", data_dir=root)


def test_one_empty_class_folder_beside_full_ones_is_named(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"train/<class>/\*\.jpg.*train/bird holds none") as err:
        build_dataset("folder", "train", data_dir=tmp_path)
    assert "cat" not in str(err.value) and "dog" not in str(err.value)


def test_folder_dataset_without_data_dir_raises_data_error():
    with pytest.raises(DataError, match=r"train/<class>/\*\.jpg"):
        build_dataset("folder", "train")


def test_truncated_jpeg_raises_data_error_naming_the_file(tmp_path):
    write_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "1.jpg"
    write_jpeg(bad, (0, 0, 250), size=(200, 200))
    bad.write_bytes(bad.read_bytes()[:400])
    ds = build_dataset("folder", "train", data_dir=tmp_path, img_size=32)
    ds[0]  # the intact files still load
    with pytest.raises(DataError, match="1.jpg"):
        ds[3]


# ----------------------------------------------------------------------------------------------
# Image folders: train and val must name the same classes


def write_classes(root, split, classes, n=1):
    for c in classes:
        for k in range(n):
            write_jpeg(root / split / c / f"{k}.jpg", (200, 20, 20))


@pytest.mark.parametrize("name", ["folder", "imagenet"])
def test_val_class_folders_named_differently_from_train_are_refused_naming_each_side(
    tmp_path, name
):
    write_classes(tmp_path, "train", ["c0", "c1"])
    write_classes(tmp_path, "val", ["c0", "zz"])
    # train alone is fine
    assert build_dataset(name, "train", data_dir=tmp_path).classes == [
        "c0",
        "c1",
    ]
    with pytest.raises(DataError) as err:
        build_dataset(name, "val", data_dir=tmp_path)
    message = str(err.value)
    assert (
        f"only in {tmp_path / 'train'}: c1;" in message
        and f"only in {tmp_path / 'val'}: zz" in message
    )
    assert "\n" not in message


def test_a_val_split_missing_one_of_trains_classes_is_refused_too(tmp_path):
    write_classes(tmp_path, "train", ["a", "b", "c"])
    write_classes(tmp_path, "val", ["a", "c"])  # b's absence would shift c's label from 2 to 1
    with pytest.raises(DataError, match=r"only in \S*train: b; only in \S*val: none"):
        build_dataset("folder", "val", data_dir=tmp_path)


def test_eval_linear_refuses_differing_val_classes_before_writing_anything(
    tmp_path, capsys, monkeypatch, folder_state
):
    import eval_linear

    monkeypatch.chdir(tmp_path)
    write_classes(tmp_path / "d", "train", ["c0", "c1"], n=4)
    write_classes(tmp_path / "d", "val", ["c0", "zz"], n=4)
    before = folder_state(tmp_path)
    flags = "--init random --data folder --img-size 32 --workers 0".split()
    assert eval_linear.main([*flags, "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and ": zz" in err and ": c1;" in err
    assert folder_state(tmp_path) == before and not (tmp_path / "out").exists()


def test_val_class_folders_that_are_links_to_trains_are_refused(tmp_path):
    write_classes(tmp_path, "train", ["cat", "dog"])
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "cat").symlink_to(tmp_path / "train" / "cat")
    write_classes(tmp_path, "val", ["dog"])
    with pytest.raises(DataError, match=r"share the class folders cat .*training images"):
        build_dataset("folder", "val", data_dir=tmp_path)


def test_a_val_split_of_one_class_is_refused_while_pretraining_takes_one_class(tmp_path):
    write_classes(tmp_path, "train", ["all"], n=3)
    write_classes(tmp_path, "val", ["all"])
    # unlabelled images in one folder
    assert len(build_dataset("folder", "train", data_dir=tmp_path)) == 3
    with pytest.raises(
        DataError, match=r"holds one class folder \(all\): an accuracy needs at least two"
    ):
        build_dataset("folder", "val", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# Image folders: what is counted as an image


def write_messy_folder(root):
    """Two classes, four images (one in a sub-folder), and the litter of notebooks, git, macOS,
    Windows and a NAS around them; returns the paths of the four real images in reading order."""
    images = [
        root / "train" / "cat" / "0.jpg",
        root / "train" / "cat" / "1.JPG",
        root / "train" / "dog" / "0.png",
        root / "train" / "dog" / "more" / "1.jpeg",
    ]
    for path in images:
        write_jpeg(path, (0, 0, 250))  # PIL picks the format from the name: dog/0.png is a PNG
    for hidden_copy in [
        "train/.ipynb_checkpoints/0-checkpoint.jpg",
        "train/cat/.ipynb_checkpoints/0-checkpoint.jpg",
        "train/__MACOSX/cat/0.jpg",
        "train/dog/@eaDir/0.png/SYNOFILE_THUMB_S.jpg",
        "train/.trash/x.jpg",
    ]:
        write_jpeg(root / hidden_copy, (0, 250, 0))  # real images, in places no one means as data
    (root / "train" / ".git" / "objects").mkdir(parents=True)
    (root / "train" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "train" / ".empty").mkdir()
    for litter in [
        "train/.DS_Store",
        "train/Thumbs.db",
        "train/README.md",
        "train/cat/.DS_Store",
        "train/cat/Thumbs.db",
        "train/cat/notes.txt",
        "train/dog/desktop.ini",
        "train/cat/labels.csv",
    ]:
        (root / litter).write_bytes(b"\x00\x01 not an image")
    # AppleDouble
    (root / "train" / "cat" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    return [str(p) for p in images]


def test_hidden_folders_and_files_and_non_images_are_not_counted_and_every_counted_file_decodes(
    tmp_path,
):
    images = write_messy_folder(tmp_path)
    ds = build_dataset("folder", "train", data_dir=tmp_path, img_size=8)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert ds.samples == [(images[0], 0), (images[1], 0), (images[2], 1), (images[3], 1)]
    assert [ds[i][0].shape for i in range(len(ds))] == [(3, 8, 8)] * 4


def test_train_py_prints_the_number_of_real_images_of_a_messy_folder(tmp_path, capsys):
    import train

    write_messy_folder(tmp_path / "d")
    flags = "--data folder --img-size 32 --batch-size 2 --workers 0 --max-steps 1 --vis-every 0"
    paths = ["--data-dir", str(tmp_path / "d"), "--out-dir", str(tmp_path / "out")]
    assert train.main([*flags.split(), *paths]) == 0
    assert f"(4 images from {tmp_path / 'd' / 'train'}" in capsys.readouterr().out


def test_images_in_sub_folders_keep_torchvisions_order_and_labels(tmp_path):
    for rel in "a/z.jpg a/b/1.jpg a/b-c/2.jpg a/b/d/3.jpg a/0.jpg b/x/y.png b/0.bmp".split():
        write_jpeg(tmp_path / "train" / rel, (9, 9, 9))
    ours = build_dataset("folder", "train", data_dir=tmp_path).samples
    assert ours == tvd.ImageFolder(str(tmp_path / "train")).samples and len(ours) == 7


@pytest.mark.parametrize(
    "link, target",
    [("train/cat/loop", "train"), ("train/cat/self", "train/cat"), ("train/cat/up", ".")],
)
def test_a_symlink_loop_is_refused_naming_the_link_instead_of_counting_images_again(
    tmp_path, link, target
):
    write_folder(tmp_path)
    (tmp_path / link).symlink_to(tmp_path / target, target_is_directory=True)
    with pytest.raises(
        DataError, match=r"again \(a symlink loop or two links to one folder\)"
    ) as err:
        build_dataset("folder", "train", data_dir=tmp_path)
    # the link, or a folder reached through it
    assert str(err.value).startswith(str(tmp_path / link))


def test_two_class_folders_linked_to_one_folder_are_refused(tmp_path):
    write_classes(tmp_path, "pool", ["cats"], n=2)
    (tmp_path / "train").mkdir()
    for name in ("cat", "kitty"):
        (tmp_path / "train" / name).symlink_to(tmp_path / "pool" / "cats")
    with pytest.raises(DataError, match=r"train/kitty leads to \S*train/cat again"):
        build_dataset("folder", "train", data_dir=tmp_path)


def test_class_folders_that_are_symlinks_are_read(tmp_path):
    write_classes(tmp_path / "elsewhere", "x", ["cats", "dogs"], n=2)
    (tmp_path / "train").mkdir()
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).symlink_to(tmp_path / "elsewhere" / "x" / f"{name}s")
    ds = build_dataset("folder", "train", data_dir=tmp_path, img_size=8)
    assert (
        ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 1, 1] and ds[3][0].shape == (3, 8, 8)
    )


@pytest.mark.parametrize("link", ["train/bird", "train/cat/2.jpg"])
def test_a_broken_symlink_is_refused_naming_it_instead_of_losing_a_class_or_an_image(
    tmp_path, link
):
    write_folder(tmp_path)
    (tmp_path / link).symlink_to(tmp_path / "nowhere")
    with pytest.raises(DataError, match=f"{tmp_path / link} is a broken symlink"):
        build_dataset("folder", "train", data_dir=tmp_path)


def test_an_image_directly_in_the_split_folder_is_refused_naming_it(tmp_path):
    write_folder(tmp_path)
    # ImageNet's val comes flat
    write_jpeg(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", (1, 2, 3))
    with pytest.raises(
        DataError, match=r"ILSVRC2012_val_00000001.JPEG lies directly in \S*val: images go in class"
    ):
        build_dataset("imagenet", "val", data_dir=tmp_path)


@pytest.mark.parametrize("name, suffix", [("2.gif", ".gif"), ("IMG_0001.HEIC", ".heic")])
def test_an_image_in_a_format_folders_do_not_read_is_refused_not_dropped(tmp_path, name, suffix):
    write_folder(tmp_path)
    Image.new("P", (4, 4)).save(tmp_path / "train" / "cat" / name, format="GIF")
    with pytest.raises(DataError, match=f"cat/{name} is a \\{suffix} image.*read \\.jpg, "):
        build_dataset("folder", "train", data_dir=tmp_path)


def test_a_class_folder_of_only_non_images_names_what_it_holds_and_what_counts(tmp_path):
    write_folder(tmp_path)
    for litter in ["Thumbs.db", "notes.txt", ".DS_Store"]:
        (tmp_path / "train" / "bird" / litter).parent.mkdir(exist_ok=True)
        (tmp_path / "train" / "bird" / litter).write_text("x")
    with pytest.raises(
        DataError,
        match=r"train/bird holds none \(\S*bird has Thumbs.db, notes.txt\); "
        r"images are files named \*\.jpg, \*\.jpeg",
    ):
        build_dataset("folder", "train", data_dir=tmp_path)


def test_a_folder_that_cannot_be_listed_is_named_not_taken_as_empty(tmp_path, monkeypatch):
    write_folder(tmp_path)
    locked, scandir = tmp_path / "train" / "dog", data.os.scandir

    def refuse_dog(path):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    # as root, chmod 000 would not stop the tests
    monkeypatch.setattr(data.os, "scandir", refuse_dog)
    with pytest.raises(DataError, match=f"cannot list the folder {locked} \\(Permission denied\\)"):
        build_dataset("folder", "train", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# Image folders: unlabelled images for pre-training (data.py, "What pre-training reads")


def photograph():
    """A real photograph, RGB: matplotlib's sample picture of Grace Hopper (512 × 600 JPEG)."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f, Image.open(f) as img:
        return img.convert("RGB")


def write_photos(root, names):
    """Crops of the photograph at `root`/name, each a different crop, in the format its name says;
    returns their paths."""
    photo = photograph()
    for k, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        photo.crop((20 * k, 15 * k, 20 * k + 120, 15 * k + 100)).save(root / name)
    return [str(root / name) for name in names]


def tiny_pretraining(data_dir, out, *more):
    flags = "--data folder --img-size 32 --width 4 --batch-size 4 --max-steps 2 --threads 1"
    paths = ["--data-dir", str(data_dir), "--out-dir", str(out)]
    return [*flags.split(), "--vis-every", "0", *paths, *more]


def test_an_unlabelled_flat_folder_pretrains_end_to_end_and_its_checkpoint_evaluates_on_class_folders(
    tmp_path, capsys, monkeypatch
):
    import eval_linear
    import train

    monkeypatch.chdir(tmp_path)
    write_photos(
        tmp_path / "photos", [f"IMG_{k:04d}.jpg" for k in range(6)] + ["scan.png", "old.bmp"]
    )
    argv = tiny_pretraining(tmp_path / "photos", tmp_path / "out", "--workers", "1")
    assert train.main(argv) == 0
    assert f"(8 images from {tmp_path / 'photos'}, 32 px)" in capsys.readouterr().out
    checkpoint = tmp_path / "out" / "a2mim_resnet18_folder" / "checkpoint.pt"
    assert runtime.load_checkpoint(checkpoint).step == 2
    # The class layout still evaluates, here the unlabelled run's encoder.
    write_folder(tmp_path / "labelled")
    flags = "--epochs 1 --batch-size 4 --workers 0 --threads 1".split()
    paths = ["--checkpoint", str(checkpoint), "--data-dir", str(tmp_path / "labelled")]
    assert eval_linear.main([*paths, *flags]) == 0
    assert "top-1" in capsys.readouterr().out


def test_a_nested_unlabelled_folder_yields_every_image_under_it_in_sorted_order_with_label_0(
    tmp_path,
):
    # Folders sorted by path ("2023-06" before "2023/05", as torchvision's sorted os.walk), files by name.
    images = write_photos(
        tmp_path,
        "a.jpg 2023/b.JPG 2023-06/x.jpeg 2023/05/a.png 2023/05/b.jpg z/deep/er/y.bmp".split(),
    )
    write_photos(
        tmp_path,
        [".thumbs/t.jpg", "__MACOSX/2023/b.jpg", "2023/.ipynb_checkpoints/b-checkpoint.jpg"],
    )
    for litter in ["notes.txt", "2023/.DS_Store", "2023/05/._a.png", "z/Thumbs.db"]:
        (tmp_path / litter).write_bytes(b"\x00 not an image")
    ds = build_dataset("folder", "train", data_dir=tmp_path, img_size=16)
    assert ds.samples == [(path, 0) for path in images] and ds.targets == [0] * 6
    assert ds.num_classes is None and ds.classes == [] and ds.source == str(tmp_path)
    assert [tuple(ds[i][0].shape) for i in range(6)] == [(3, 16, 16)] * 6 and {
        ds[i][1] for i in range(6)
    } == {0}
    # the same order every run
    assert build_dataset("folder", "train", data_dir=tmp_path).samples == ds.samples
    Image.new("P", (4, 4)).save(tmp_path / "2023" / "05" / "anim.gif")
    with pytest.raises(DataError, match=r"2023/05/anim.gif is a \.gif image"):
        build_dataset("folder", "train", data_dir=tmp_path)


def test_pretraining_reads_only_train_when_the_folder_is_split_with_or_without_class_folders(
    tmp_path,
):
    write_folder(tmp_path / "classes")
    write_photos(tmp_path / "classes", ["stray.jpg"])  # beside train/: not read, as before
    labelled = build_dataset("folder", "train", data_dir=tmp_path / "classes")
    assert labelled.classes == ["cat", "dog"] and labelled.targets == [0, 0, 1, 1]
    assert labelled.samples == tvd.ImageFolder(str(tmp_path / "classes" / "train")).samples
    flat = write_photos(tmp_path / "flat" / "train", ["0.jpg", "1.jpg", "more/2.jpg"])
    write_folder(tmp_path / "flat", splits=("val",))
    write_photos(tmp_path / "flat", ["stray.jpg"])
    ds = build_dataset("folder", "train", data_dir=tmp_path / "flat")
    assert ds.samples == [(path, 0) for path in flat] and ds.source == str(
        tmp_path / "flat" / "train"
    )


def test_a_val_folder_without_train_is_refused_for_pretraining_instead_of_walked(tmp_path):
    write_folder(tmp_path, splits=("val",))
    with pytest.raises(
        DataError,
        match=f"{tmp_path} holds a val/ folder but no train/ folder: pre-training "
        f"reads {tmp_path}/train/ when",
    ):
        build_dataset("folder", "train", data_dir=tmp_path)


def test_a_folder_without_any_image_names_what_pretraining_reads(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(
        DataError,
        match=rf"folder found no images under {tmp_path} to pre-train on .*"
        rf"images are files named \*\.jpg",
    ):
        build_dataset("folder", "train", data_dir=tmp_path)


@pytest.mark.parametrize("layout", ["flat", "nested", "flat_splits"])
def test_eval_linear_on_an_unlabelled_folder_says_the_layout_it_needs_in_one_sentence_and_writes_nothing(
    tmp_path, capsys, monkeypatch, folder_state, layout
):
    import eval_linear

    monkeypatch.chdir(tmp_path)
    d = tmp_path / "d"
    names = {
        "flat": ["a.jpg", "b.jpg", "c.png"],
        "nested": ["2023/a.jpg", "2023/05/b.jpg", "c.jpg"],
        "flat_splits": ["train/a.jpg", "train/b.jpg", "train/c.jpg", "val/d.jpg"],
    }[layout]
    write_photos(d, names)
    held = {
        "flat": f"{d} holds 3 images without class folders",
        "nested": f"{d} holds 3 images but no train/ and val/ folders",
        "flat_splits": f"{d}/train holds 3 images without class folders",
    }[layout]
    before = folder_state(tmp_path)
    flags = "--init random --data folder --img-size 32 --workers 0 --threads 1".split()
    assert eval_linear.main([*flags, "--data-dir", str(d)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: evaluation needs labelled images: {d}/train/<class>/*.jpg "
        f"and {d}/val/<class>/*.jpg; {held} (fine for pre-training)"
    )
    assert folder_state(tmp_path) == before and not (tmp_path / "out").exists()
    with pytest.raises(DataError, match=r"evaluation needs labelled images"):
        # val: evaluation's, whatever the transform
        build_dataset("folder", "val", data_dir=d, transform="pretrain")


# ----------------------------------------------------------------------------------------------
# Image folders: how a file's pixels are decoded


def decoded(tmp_path, name, write):
    """Write one image with `write(path)` as the only file of a one-class folder, and decode it as
    the dataset does: uint8 [3, H, W] (ds.loader, before the transform)."""
    path = tmp_path / "train" / "c" / name
    path.parent.mkdir(parents=True)
    write(path)
    ds = build_dataset("folder", "train", data_dir=tmp_path, img_size=8)
    assert ds.samples == [(str(path), 0)] and ds[0][0].shape == (3, 8, 8)
    return ds.loader(str(path))


def png16(path, array_hwc):
    """A 16-bit PNG (grey, grey + alpha, RGB or RGBA), which PIL cannot write itself."""
    h, w, c = array_hwc.shape
    rows = b"".join(b"\x00" + array_hwc[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, payload):
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def uniform(pixels_3hw):
    """The one colour of a uniform image, as a list of 3 ints."""
    assert (pixels_3hw == pixels_3hw[:, :1, :1]).all()
    return pixels_3hw[:, 0, 0].tolist()


@pytest.mark.parametrize("name", ["grey16.png", "grey16_named.jpg", "grey16.tif", "grey16.pgm"])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped_to_white(tmp_path, name):
    def write(path):
        fmt = {".png": "PNG", ".jpg": "PNG", ".tif": "TIFF", ".pgm": "PPM"}[path.suffix]
        # a PNG named .jpg too
        Image.fromarray(np.full((6, 5), 0x8000, dtype=np.uint16)).save(path, format=fmt)

    assert uniform(decoded(tmp_path, name, write)) == [128, 128, 128]  # 32768 / 257 = 127.5


def test_16_bit_rgb_png_keeps_its_colour(tmp_path):
    rgb = np.empty((4, 4, 3), dtype=np.uint16)
    rgb[...] = (65535, 0x8000, 0x00FF)
    assert uniform(decoded(tmp_path, "rgb16.png", lambda p: png16(p, rgb))) == [255, 128, 0]


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("RGBA", (255, 0, 0, 0), [255, 255, 255]),  # fully transparent red: the white background
        ("RGBA", (255, 0, 0, 255), [255, 0, 0]),  # opaque: unchanged
        ("RGBA", (0, 0, 0, 128), [127, 127, 127]),  # half-transparent black over white
        ("LA", (0, 0), [255, 255, 255]),
        ("LA", (40, 255), [40, 40, 40]),
    ],
)
def test_alpha_is_composited_on_the_stated_white_background(tmp_path, mode, value, expected):
    assert data.ALPHA_BACKGROUND == (255, 255, 255)
    pixels = decoded(tmp_path, "a.png", lambda p: Image.new(mode, (4, 4), value).save(p))
    # alpha_composite's rounding
    assert max(abs(got - want) for got, want in zip(uniform(pixels), expected, strict=True)) <= 1


def test_a_palette_pngs_transparent_colour_becomes_the_background(tmp_path):
    def write(path):
        image = Image.new("P", (4, 4), 0)
        image.putpalette([0, 0, 0, 255, 0, 0])  # index 0 black (transparent), 1 red
        image.putpixel((3, 3), 1)
        image.save(path, transparency=0)

    pixels = decoded(tmp_path, "p.png", write)
    assert pixels[:, 0, 0].tolist() == [255, 255, 255] and pixels[:, 3, 3].tolist() == [255, 0, 0]


def test_cmyk_jpeg_1_bit_and_a_16_bit_grey_alpha_png_decode_to_their_colours(tmp_path):
    cyan = uniform(
        decoded(
            tmp_path / "a", "cmyk.jpg", lambda p: Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(p)
        )
    )
    assert cyan[0] <= 3 and min(cyan[1:]) >= 252
    bits = decoded(tmp_path / "b", "b.png", lambda p: Image.new("1", (4, 4), 1).save(p))
    assert uniform(bits) == [255, 255, 255]
    grey_alpha = np.empty((4, 4, 2), dtype=np.uint16)
    grey_alpha[...] = (0x8000, 0xFFFF)  # opaque mid grey
    assert uniform(decoded(tmp_path / "c", "la16.png", lambda p: png16(p, grey_alpha))) == [
        128,
        128,
        128,
    ]


def test_an_exif_rotated_phone_photo_is_turned_upright(tmp_path):
    # stored 40 wide, 20 high: left half red, right half blue; EXIF 6: turn 90° clockwise
    def write(
        path,
    ):
        image = Image.new("RGB", (40, 20), (0, 0, 255))
        image.paste((255, 0, 0), (0, 0, 20, 20))
        exif = Image.Exif()
        exif[0x0112] = 6
        image.save(path, quality=95, exif=exif.tobytes())

    pixels = decoded(tmp_path, "IMG_0001.jpg", write).int()
    assert pixels.shape == (3, 40, 20)  # as shown: 20 wide, 40 high
    # red on top, blue below
    assert pixels[:, 5, 10].tolist()[0] > 240 and pixels[:, 35, 10].tolist()[2] > 240


@pytest.mark.parametrize(
    "name, fmt", [("pages.tif", "TIFF"), ("anim.png", "PNG"), ("anim.webp", "WEBP")]
)
def test_a_file_of_several_frames_is_refused_naming_it(tmp_path, name, fmt):
    frames = [Image.new("RGB", (4, 4), c) for c in ("red", "blue")]
    with pytest.raises(DataError, match=f"{name} holds 2 frames"):
        decoded(
            tmp_path,
            name,
            lambda p: frames[0].save(p, format=fmt, save_all=True, append_images=frames[1:]),
        )


def test_an_mpo_phone_photo_is_read_as_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 0, 250))]
    pixels = decoded(
        tmp_path,
        "DSCF0001.jpg",
        lambda p: frames[0].save(p, format="MPO", save_all=True, append_images=frames[1:]),
    )
    assert pixels[0].min() > 240 and pixels[2].max() < 15


@pytest.mark.parametrize("mode, value", [("F", 0.5), ("I", 70_000)])
def test_32_bit_float_or_integer_pixels_without_a_range_are_refused_naming_the_file(
    tmp_path, mode, value
):
    with pytest.raises(DataError, match=f"x.tif holds '{mode}' pixels .* no fixed range"):
        decoded(tmp_path, "x.tif", lambda p: Image.new(mode, (4, 4), value).save(p))


def test_an_image_over_pils_decompression_bomb_limit_is_a_data_error_naming_it(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40 × 30 = 1200 px > 2 × 100: PIL refuses
    with pytest.raises(DataError, match=r"cannot decode image \S*big.jpg .*decompression bomb"):
        decoded(tmp_path, "big.jpg", lambda p: write_jpeg(p, (1, 2, 3)))


# ----------------------------------------------------------------------------------------------
# Careless inputs


@pytest.mark.parametrize(
    "name", ["fashion-mnist", "cifar10", "cifar100", "stl10", "imagenet", "folder"]
)
def test_a_data_dir_that_is_a_file_is_named_as_a_file_not_a_missing_folder(tmp_path, name):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really")
    with pytest.raises(
        DataError, match=r"data directory \S*cifar-10-python.tar.gz is a file, not a folder"
    ):
        build_dataset(name, "train", data_dir=archive)
    if name == "cifar10":  # not handed to torchvision's downloader either
        with pytest.raises(DataError, match="is a file, not a folder"):
            build_dataset(name, "train", data_dir=archive, download=True)
    assert archive.read_bytes() == b"\x1f\x8b not really"


def test_the_unpacked_cifar_folder_itself_as_data_dir_is_read_and_extra_files_in_it_are_ignored(
    tmp_path, no_md5
):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "readme.html").write_text("<html>the official archive ships this</html>")
    (folder / ".DS_Store").write_bytes(b"\x00")
    (folder / "data_batch_1.bak").write_bytes(b"an old copy")
    (folder / "notes").mkdir()
    via_parent = build_dataset("cifar10", "train", data_dir=tmp_path, transform="none")
    direct = build_dataset("cifar10", "train", data_dir=folder, transform="none")
    assert direct.source == via_parent.source == str(folder) and len(direct) == 10
    assert torch.equal(direct.images, via_parent.images) and torch.equal(
        direct.labels_n, via_parent.labels_n
    )


def test_a_data_dir_naming_the_train_folder_itself_is_told_to_name_its_parent(tmp_path):
    write_folder(tmp_path)
    with pytest.raises(
        DataError,
        match=f"found none in {tmp_path}/train/val; name the folder that holds val/, "
        f"not {tmp_path}/train itself",
    ):
        build_dataset("folder", "val", data_dir=tmp_path / "train")


def test_an_image_folder_of_one_image_loads_and_a_larger_batch_is_refused(tmp_path):
    write_jpeg(tmp_path / "train" / "only" / "0.jpg", (250, 0, 0))
    ds = build_dataset("folder", "train", data_dir=tmp_path, img_size=8)
    assert (
        len(ds) == 1
        and ds.classes == ["only"]
        and [y for _, y in build_loader(ds, 1, workers=0)] == [0]
    )
    with pytest.raises(DataError, match=r"has 1 training images .*batch_size 2"):
        build_loader(ds, 2, workers=0)


# ----------------------------------------------------------------------------------------------
# Fake data


def test_fake_items_are_deterministic_and_len_is_fake_size():
    ds = build_dataset("fake", "train", fake_size=20, transform="none")
    assert len(ds) == 20
    first, again = ds[7], build_dataset("fake", "train", fake_size=20, transform="none")[7]
    assert torch.equal(first[0], again[0]) and first[1] == again[1] == 7
    with pytest.raises(IndexError):
        ds[20]


def test_fake_class_is_learnable_from_mean_colour():
    train = build_dataset("fake", "train", fake_size=100, transform="none")
    val = build_dataset("fake", "val", fake_size=50, transform="none")
    means = torch.stack([train[i][0].mean((1, 2)) for i in range(100)])
    centroids = torch.stack([means[k::10].mean(0) for k in range(10)])
    val_means = torch.stack([val[i][0].mean((1, 2)) for i in range(50)])
    predicted = torch.cdist(val_means, centroids).argmin(1)
    assert predicted.tolist() == [i % 10 for i in range(50)]  # nearest class colour is always right


def test_fake_train_and_val_splits_hold_different_images():
    train, val = (build_dataset("fake", s, fake_size=4, transform="none") for s in ("train", "val"))
    assert not torch.equal(train[0][0], val[0][0])


# ----------------------------------------------------------------------------------------------
# Transforms


def test_none_transform_maps_uniform_grey_to_the_imagenet_normalised_value(tmp_path, no_md5):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_meta(folder)
    write_cifar_batch(folder / "test_batch", np.full((2, 3, 32, 32), 128, dtype=np.uint8), [0, 1])
    touch(folder, *(f"data_batch_{b}" for b in range(1, 6)))
    image, _ = build_dataset("cifar10", "val", data_dir=tmp_path, transform="none")[0]
    expected = (128 / 255 - MEAN) / STD
    assert torch.allclose(image, expected.expand(3, 32, 32), atol=1e-5)


@pytest.mark.parametrize("transform", data.TRANSFORMS)
@pytest.mark.parametrize("img_size", [32, 96])  # fake data is small at 32 px, "large" at 96 px
def test_every_transform_outputs_a_3xSxS_float_image(transform, img_size):
    ds = build_dataset(
        "fake", "train", img_size=img_size, transform=transform, crop="vit", fake_size=2
    )
    image, _ = ds[1]
    assert image.shape == (3, img_size, img_size) and image.dtype == torch.float32


def test_non_square_folder_images_become_square_with_every_transform(tmp_path):
    write_folder(tmp_path)  # 40x30 JPEGs
    for transform in data.TRANSFORMS:
        ds = build_dataset("folder", "train", data_dir=tmp_path, img_size=24, transform=transform)
        assert ds[0][0].shape == (3, 24, 24)


def test_pretrain_transform_is_random_while_none_and_eval_are_deterministic():
    torch.manual_seed(0)
    pretrain = build_dataset("fake", "train", fake_size=2, transform="pretrain")
    assert not torch.equal(pretrain[0][0], pretrain[0][0])
    for transform in ("none", "eval"):
        ds = build_dataset("fake", "train", fake_size=2, transform=transform)
        assert torch.equal(ds[0][0], ds[0][0])


def test_pretrain_crop_scale_follows_paper_section_6():
    cnn = data.build_transform("pretrain", 224, crop="cnn").transforms[0]
    vit = data.build_transform("pretrain", 224, crop="vit").transforms[0]
    assert tuple(cnn.scale) == (0.8, 1.0) and tuple(vit.scale) == (0.67, 1.0)
    # SimMIM's released recipe crops as the ViTs do (§3), and is one of the crops a run may name.
    simmim = data.build_transform("pretrain", 224, crop="simmim").transforms[0]
    assert tuple(simmim.scale) == data.SIMMIM_CROP_SCALE == (0.67, 1.0)
    assert tuple(data.CROP_SCALE) == (*data.FAMILY_CROP_SCALE, "simmim") == ("cnn", "vit", "simmim")


# ----------------------------------------------------------------------------------------------
# Loaders


def test_loader_yields_normalised_batches_and_drops_the_last_partial_batch():
    ds = build_dataset("fake", "train", fake_size=10)
    loader = build_loader(ds, 4, train=True, workers=0)
    batches = list(loader)
    assert (
        len(batches) == 2 and batches[0][0].shape == (4, 3, 32, 32) and batches[0][1].shape == (4,)
    )
    eval_loader = build_loader(ds, 4, train=False, workers=0)
    assert [len(y) for _, y in eval_loader] == [4, 4, 2]
    assert torch.cat([y for _, y in eval_loader]).tolist() == [i % 10 for i in range(10)]


def test_loader_with_worker_processes_gives_the_same_items():
    ds = build_dataset("fake", "val", fake_size=6, transform="none")
    with_workers = torch.cat([x for x, _ in build_loader(ds, 3, train=False, workers=2)])
    assert torch.equal(with_workers, torch.stack([ds[i][0] for i in range(6)]))


def test_set_epoch_repeats_the_order_of_the_same_epoch_and_changes_it_for_another():
    loader = build_loader(IndexDataset(40), 8, train=True, workers=0, seed=3)
    first = epoch_order(loader, 5)
    assert sorted(first) == list(range(40))
    assert epoch_order(loader, 6) != first
    resumed = build_loader(IndexDataset(40), 8, train=True, workers=0, seed=3)  # a fresh run
    assert epoch_order(resumed, 5) == first
    other_seed = build_loader(IndexDataset(40), 8, train=True, workers=0, seed=4)
    assert epoch_order(other_seed, 5) != first


def test_distributed_ranks_read_disjoint_shards_that_cover_the_dataset():
    loaders = [
        build_loader(IndexDataset(40), 4, distributed=True, world_size=2, rank=r, workers=0)
        for r in (0, 1)
    ]
    orders = [epoch_order(loader, 0) for loader in loaders]
    assert len(orders[0]) == len(orders[1]) == 20
    assert sorted(orders[0] + orders[1]) == list(range(40))


def test_distributed_set_epoch_repeats_the_same_epoch_and_changes_for_another():
    def loader():
        return build_loader(
            IndexDataset(40), 4, distributed=True, world_size=2, rank=1, workers=0, seed=7
        )

    first = epoch_order(loader(), 2)
    assert epoch_order(loader(), 2) == first and epoch_order(loader(), 3) != first


def test_distributed_without_a_process_group_or_world_size_is_a_value_error():
    with pytest.raises(ValueError, match="process group"):
        build_loader(IndexDataset(8), 2, distributed=True)


def test_batch_larger_than_the_dataset_with_drop_last_is_a_data_error():
    with pytest.raises(DataError, match="batch_size 16"):
        build_loader(IndexDataset(8), 16, train=True, workers=0)


def test_check_enough_refuses_fewer_images_per_process_than_one_step_needs():
    data.check_enough(64, 8, 4, 2, "cifar10")  # 32 per process = 8 × 4: exactly one step
    with pytest.raises(
        DataError, match=r"cifar10 has 63 training images \(31 per process\).*batch_size 8 × 4"
    ):
        data.check_enough(63, 8, 4, 2, "cifar10")


def test_in_memory_datasets_are_exactly_those_device_loader_takes():
    assert data.IN_MEMORY == ("fashion-mnist", "cifar10", "cifar100", "stl10", "fake")
    for name in data.DATASETS:
        if name not in data.IN_MEMORY:
            with pytest.raises(DataError, match="too large"):
                data.device_loader(name, "train", 2, "cpu")


def test_every_dataset_and_the_device_loader_say_which_folder_they_read(tmp_path, no_md5):
    write_fashion(tmp_path / "fm", n=4)
    write_cifar10(tmp_path / "c10")
    write_folder(tmp_path / "img")
    assert build_dataset("fashion-mnist", "train", data_dir=tmp_path / "fm").source == str(
        tmp_path / "fm"
    )
    assert build_dataset("cifar10", "val", data_dir=tmp_path / "c10").source == str(
        tmp_path / "c10" / "cifar-10-batches-py"
    )
    assert build_dataset("imagenet", "val", data_dir=tmp_path / "img").source == str(
        tmp_path / "img" / "val"
    )
    assert build_dataset("fake", "train").source == "generated"
    assert data.device_loader(
        "fashion-mnist", "train", 2, "cpu", data_dir=tmp_path / "fm"
    ).source == str(tmp_path / "fm")
    assert data.device_loader("fake", "train", 2, "cpu", fake_size=4).source == "generated"


# ----------------------------------------------------------------------------------------------
# Resuming mid-epoch: set_epoch(loader, epoch, start_batch)


class CountingDataset(IndexDataset):
    """IndexDataset that counts the items read."""

    reads = 0

    def __getitem__(self, i):
        CountingDataset.reads += 1
        return super().__getitem__(i)


def batches(loader, epoch, start_batch=0):
    set_epoch(loader, epoch, start_batch)
    return [torch.as_tensor(x) for x, _ in loader]


@pytest.mark.parametrize("world_size", [1, 3])
def test_starting_at_batch_k_yields_batches_k_on_of_the_same_epoch_without_reading_the_earlier_ones(
    world_size,
):
    for rank in range(world_size):
        loader = build_loader(
            CountingDataset(50),
            4,
            distributed=world_size > 1,
            world_size=world_size,
            rank=rank,
            workers=0,
            seed=5,
        )
        whole = batches(loader, 2)
        CountingDataset.reads = 0
        assert len(loader) == len(whole) == 50 // world_size // 4
        tail = batches(loader, 2, start_batch=2)
        assert len(loader) == len(whole)  # still the full epoch's length
        assert CountingDataset.reads == 4 * (len(whole) - 2)  # batches 0 and 1 never read
        assert [t.tolist() for t in tail] == [w.tolist() for w in whole[2:]]
        # the next pass: whole
        assert [t.tolist() for t in batches(loader, 2)] == [w.tolist() for w in whole]


def test_random_crops_of_a_resumed_epoch_equal_the_uninterrupted_ones_with_any_worker_count():
    ds = build_dataset("fake", "train", fake_size=24, transform="pretrain")
    whole = batches(build_loader(ds, 4, workers=0, seed=1), 3)
    # epochs differ
    assert not torch.equal(whole[0], batches(build_loader(ds, 4, workers=0, seed=1), 4)[0])
    for workers in (0, 2):
        tail = batches(build_loader(ds, 4, workers=workers, seed=1), 3, start_batch=4)
        assert len(tail) == 2 and all(
            torch.equal(t, w) for t, w in zip(tail, whole[4:], strict=True)
        )


def test_loading_a_training_batch_leaves_the_global_rng_untouched():
    loader = build_loader(build_dataset("fake", "train", fake_size=8), 4, workers=0)
    state = torch.get_rng_state()
    batches(loader, 0)
    # drop path / masks draw the same as without data
    assert torch.equal(torch.get_rng_state(), state)


def test_device_loader_started_at_batch_k_gives_the_uninterrupted_epochs_crops_and_skips_the_rest():
    images = torch.randint(
        0, 256, (40, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    for rank in (0, 1):
        loader = data.DeviceLoader(
            images, torch.arange(40), 4, img_size=16, seed=2, world_size=2, rank=rank
        )
        set_epoch(loader, 1)
        whole = list(loader)
        calls = []

        def counted_augment(img_bchw, gen, calls=calls, augment=loader.augment):
            calls.append(1)
            return augment(img_bchw, gen)

        loader.augment = counted_augment
        set_epoch(loader, 1, start_batch=3)
        tail = list(loader)
        assert len(loader) == 5 and len(tail) == len(calls) == 2  # batches 0..2 never augmented
        for (img, labels), (img_whole, labels_whole) in zip(tail, whole[3:], strict=True):
            assert torch.equal(img, img_whole) and torch.equal(labels, labels_whole)
    with pytest.raises(ValueError, match="start_batch"):
        set_epoch(loader, 1, start_batch=6)
