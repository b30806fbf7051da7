"""Tests for data.py: each dataset format is generated in tmp_path in its real on-disk layout."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import torchvision.datasets as tvd

import data
from data import DataError, build_dataset, build_loader, set_epoch

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
    batch = {"data": images_nchw.reshape(len(images_nchw), -1), label_key: list(labels), **more_keys}
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


@pytest.mark.parametrize("kwargs", [{"split": "test"}, {"img_size": 0}, {"img_size": 32.0},
                                    {"img_size": True}, {"transform": "strong"}, {"family": "mlp"}])
def test_bad_split_size_transform_or_family_is_a_value_error(kwargs):
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
    assert torch.allclose(pixels[0], pixels[1], atol=1e-3) and torch.allclose(pixels[1], pixels[2], atol=1e-3)
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
        write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28)), magic=b"\x00\x00\x08\x01")
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


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10", "cifar100", "stl10", "imagenet", "folder"])
def test_a_data_dir_that_does_not_exist_is_a_data_error_naming_it_even_if_data_holds_the_dataset(
        tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    write_fashion(tmp_path / "data", n=4)  # a fall-back copy that must not be used silently
    write_cifar10(tmp_path / "data")
    write_folder(tmp_path / "data" / "imagenet")
    with pytest.raises(DataError, match=r"data directory \S*typo does not exist"):
        build_dataset(name, "train", data_dir=tmp_path / "typo")
    if name in data.IN_MEMORY:
        with pytest.raises(DataError, match="typo does not exist"):
            data.device_loader(name, "train", 2, "cpu", data_dir=tmp_path / "typo")


@pytest.mark.skipif(not data.SYSTEM_FASHION_MNIST.is_dir(), reason="Debian fashion-mnist files not installed")
def test_real_debian_fashion_mnist_has_60000_train_and_10000_val_images():
    train = build_dataset("fashion-mnist", "train", data_dir=data.SYSTEM_FASHION_MNIST, transform="none")
    val = build_dataset("fashion-mnist", "val", data_dir=data.SYSTEM_FASHION_MNIST, transform="none")
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
    write_cifar_batch(folder / "train", cifar_images(3), [0, 57, 99], label_key="fine_labels",
                      coarse_labels=[1, 2, 3])
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
    with pytest.raises(DataError, match=r"cifar-10-batches-py does not hold an intact cifar10.*md5.*corrupted"):
        build_dataset("cifar10", "train", data_dir=tmp_path)


def test_missing_cifar_error_names_the_expected_files_and_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(DataError, match=r"data_batch_1.*nowhere/cifar-10-batches-py.*download"):
        build_dataset("cifar10", "train", data_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"test_batch.* data/cifar-10-batches-py"):  # no data_dir: ./data
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
    assert pixels[:, 0, :].min() > 250 and pixels[:, 1:, 0].max() < 5  # top row white, left column not


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
    ds = build_dataset("fake", "train", img_size=img_size, transform=transform, family="vit", fake_size=2)
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
    cnn = data.build_transform("pretrain", 224, family="cnn").transforms[0]
    vit = data.build_transform("pretrain", 224, family="vit").transforms[0]
    assert tuple(cnn.scale) == (0.8, 1.0) and tuple(vit.scale) == (0.67, 1.0)


# ----------------------------------------------------------------------------------------------
# Loaders


def test_loader_yields_normalised_batches_and_drops_the_last_partial_batch():
    ds = build_dataset("fake", "train", fake_size=10)
    loader = build_loader(ds, 4, train=True, workers=0)
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 32, 32) and batches[0][1].shape == (4,)
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
    loaders = [build_loader(IndexDataset(40), 4, distributed=True, world_size=2, rank=r, workers=0)
               for r in (0, 1)]
    orders = [epoch_order(loader, 0) for loader in loaders]
    assert len(orders[0]) == len(orders[1]) == 20
    assert sorted(orders[0] + orders[1]) == list(range(40))


def test_distributed_set_epoch_repeats_the_same_epoch_and_changes_for_another():
    def loader():
        return build_loader(IndexDataset(40), 4, distributed=True, world_size=2, rank=1, workers=0, seed=7)
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
    with pytest.raises(DataError, match=r"cifar10 has 63 training images \(31 per process\).*batch_size 8 × 4"):
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
    assert build_dataset("fashion-mnist", "train", data_dir=tmp_path / "fm").source == str(tmp_path / "fm")
    assert build_dataset("cifar10", "val", data_dir=tmp_path / "c10").source == str(tmp_path / "c10" / "cifar-10-batches-py")
    assert build_dataset("imagenet", "val", data_dir=tmp_path / "img").source == str(tmp_path / "img" / "val")
    assert build_dataset("fake", "train").source == "generated"
    assert data.device_loader("fashion-mnist", "train", 2, "cpu", data_dir=tmp_path / "fm").source == str(tmp_path / "fm")
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
def test_starting_at_batch_k_yields_batches_k_on_of_the_same_epoch_without_reading_the_earlier_ones(world_size):
    for rank in range(world_size):
        loader = build_loader(CountingDataset(50), 4, distributed=world_size > 1, world_size=world_size,
                              rank=rank, workers=0, seed=5)
        whole = batches(loader, 2)
        CountingDataset.reads = 0
        assert len(loader) == len(whole) == 50 // world_size // 4
        tail = batches(loader, 2, start_batch=2)
        assert len(loader) == len(whole)  # still the full epoch's length
        assert CountingDataset.reads == 4 * (len(whole) - 2)  # batches 0 and 1 never read
        assert [t.tolist() for t in tail] == [w.tolist() for w in whole[2:]]
        assert [t.tolist() for t in batches(loader, 2)] == [w.tolist() for w in whole]  # the next pass: whole


def test_random_crops_of_a_resumed_epoch_equal_the_uninterrupted_ones_with_any_worker_count():
    ds = build_dataset("fake", "train", fake_size=24, transform="pretrain")
    whole = batches(build_loader(ds, 4, workers=0, seed=1), 3)
    assert not torch.equal(whole[0], batches(build_loader(ds, 4, workers=0, seed=1), 4)[0])  # epochs differ
    for workers in (0, 2):
        tail = batches(build_loader(ds, 4, workers=workers, seed=1), 3, start_batch=4)
        assert len(tail) == 2 and all(torch.equal(t, w) for t, w in zip(tail, whole[4:]))


def test_loading_a_training_batch_leaves_the_global_rng_untouched():
    loader = build_loader(build_dataset("fake", "train", fake_size=8), 4, workers=0)
    state = torch.get_rng_state()
    batches(loader, 0)
    assert torch.equal(torch.get_rng_state(), state)  # drop path / masks draw the same as without data


def test_device_loader_started_at_batch_k_gives_the_uninterrupted_epochs_crops_and_skips_the_rest():
    images = torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for rank in (0, 1):
        loader = data.DeviceLoader(images, torch.arange(40), 4, img_size=16, seed=2, world_size=2, rank=rank)
        set_epoch(loader, 1)
        whole = list(loader)
        calls, augment = [], loader.augment
        loader.augment = lambda img_bchw, gen: calls.append(1) or augment(img_bchw, gen)
        set_epoch(loader, 1, start_batch=3)
        tail = list(loader)
        assert len(loader) == 5 and len(tail) == len(calls) == 2  # batches 0..2 never augmented
        for (img, labels), (img_whole, labels_whole) in zip(tail, whole[3:]):
            assert torch.equal(img, img_whole) and torch.equal(labels, labels_whole)
    with pytest.raises(ValueError, match="start_batch"):
        set_epoch(loader, 1, start_batch=6)
