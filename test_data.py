"""Tests for data.py: each dataset format is generated in tmp_path in its real on-disk layout."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError, build_dataset, build_loader, set_epoch

MEAN = torch.tensor(data.IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(data.IMAGENET_STD)[:, None, None]


def unnormalise(image_3hw):
    """Back to 0..255 pixel values, to compare with what was written."""
    return (image_3hw * STD + MEAN) * 255


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


def write_cifar_batch(path, images_nchw, labels, label_key=b"labels"):
    with open(path, "wb") as f:
        pickle.dump({b"data": images_nchw.reshape(len(images_nchw), -1), label_key: list(labels)}, f)


def write_cifar10(root, per_batch=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
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
    with pytest.raises(DataError) as err:
        build_dataset("fashion-mnist", "train", data_dir=tmp_path / "mine")
    message = str(err.value)
    for place in ["mine", "mine/FashionMNIST/raw", "data/fashion-mnist", "system"]:
        assert place in message
    assert "train-images-idx3-ubyte" in message and "download" in message


@pytest.mark.skipif(not data.SYSTEM_FASHION_MNIST.is_dir(), reason="Debian fashion-mnist files not installed")
def test_real_debian_fashion_mnist_has_60000_train_and_10000_val_images():
    train = build_dataset("fashion-mnist", "train", data_dir=data.SYSTEM_FASHION_MNIST, transform="none")
    val = build_dataset("fashion-mnist", "val", data_dir=data.SYSTEM_FASHION_MNIST, transform="none")
    assert (len(train), len(val)) == (60000, 10000)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == torch.uint8
    assert sorted(train.labels_n.unique().tolist()) == list(range(10))
    assert train[0][0].shape == (3, 32, 32)


# ----------------------------------------------------------------------------------------------
# CIFAR (python pickle batches) and STL-10 (column-major binaries)


def test_cifar10_batches_load_in_order_with_labels_and_rgb_plane_order(tmp_path):
    write_cifar10(tmp_path, per_batch=2)
    train = build_dataset("cifar10", "train", data_dir=tmp_path, transform="none")
    assert len(train) == 10 and [train[i][1] for i in range(10)] == [2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    pixels = unnormalise(train[1][0])  # second image of data_batch_1: R = 1, G = 100, B = 200
    assert pixels[:, 5, 5].round().tolist() == [1.0, 100.0, 200.0]
    assert pixels[0, 0, 0].round() == 255 and pixels[0, 0, 1].round() == 1  # row-major planes
    val = build_dataset("cifar10", "val", data_dir=tmp_path, transform="none")
    assert [val[i][1] for i in range(3)] == [7, 8, 9]


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "train", cifar_images(3), [0, 57, 99], label_key=b"fine_labels")
    ds = build_dataset("cifar100", "train", data_dir=tmp_path, transform="none")
    assert ds.num_classes == 100 and [ds[i][1] for i in range(3)] == [0, 57, 99]


def test_cifar_without_the_label_key_raises_data_error(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "test", cifar_images(2), [1, 2], label_key=b"labels")
    with pytest.raises(DataError, match="fine_labels"):
        build_dataset("cifar100", "val", data_dir=tmp_path)


def test_missing_cifar_error_names_the_expected_files_and_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data_batch_1.*cifar-10-batches-py"):
        build_dataset("cifar10", "train", data_dir=tmp_path / "nowhere")


def test_stl10_column_major_images_are_transposed_and_labels_shifted_to_zero(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
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


def test_none_transform_maps_uniform_grey_to_the_imagenet_normalised_value(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_cifar_batch(folder / "test_batch", np.full((2, 3, 32, 32), 128, dtype=np.uint8), [0, 1])
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


def test_batch_larger_than_the_dataset_with_drop_last_is_a_value_error():
    with pytest.raises(ValueError, match="batch_size 16"):
        build_loader(IndexDataset(8), 16, train=True, workers=0)
