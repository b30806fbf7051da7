"""reconstruct.py and R.save_reconstructions: the picture of any pre-trained model, for real colour images of
any size; the same bytes for the same seed; train.py's checkpoints and the released files; one-sentence refusals
that leave the folder as it was. CPU, tiny models (a released-layout ResNet-50 at 224 px where the layout matters)."""

import shutil

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image

import data
import reconstruct as R
import train
import weights
from a2mim import mask_blocks, mean_fill
from models import build_encoder


@pytest.fixture
def photos(tmp_path):
    """A folder of real colour images of different sizes and modes: matplotlib's photograph (512 × 600 JPEG), a
    small wide RGB PNG, a tall grey one, a transparent RGBA one; and a hidden file the walk skips."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(
        matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False),
        folder / "a_grace.jpg",
    )
    Image.radial_gradient("L").convert("RGB").resize((40, 30)).save(folder / "b_wide.png")
    Image.linear_gradient("L").resize((300, 500)).save(folder / "c_tall_grey.png")
    rgba = Image.new("RGBA", (64, 64), (20, 120, 220, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 32, 32))
    rgba.save(folder / "d_alpha.png")
    (folder / ".hidden.jpg").write_bytes(b"not read")
    return folder


@pytest.fixture
def ckpt(tmp_path, train_checkpoint):
    path = tmp_path / "ckpt.pt"
    train_checkpoint(path, img_size=32, width=8)
    return path


def read_png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def layout(picture, rows):
    """(header height, tile side) of a picture of `rows` rows of 4 tiles with 2-px lines under a thin header."""
    tile = (picture.shape[1] - 2) // 4 - 2
    assert picture.shape[1] == 4 * (tile + 2) + 2
    header = picture.shape[0] - (rows * (tile + 2) + 2)
    assert 10 <= header <= 40
    return header, tile


def as_uint8(tile_chw):
    """A denormalised float tile as save_image rounds it."""
    pixels = tile_chw.clamp(0, 1).mul(255).add(0.5).clamp(0, 255)
    return pixels.permute(1, 2, 0).to(torch.uint8).numpy()


def denormalise(img_chw):
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    return img_chw * std + mean


# ------------------------------------------------------------------------------------------
# The picture: layout, content, sizes, the same bytes for the same seed.


def test_a_folder_of_photos_gives_one_row_per_image_in_walk_order_under_a_header_of_the_4_column_names(
    tmp_path, photos, ckpt, capsys
):
    out = tmp_path / "recon.png"
    assert R.main(["--checkpoint", str(ckpt), str(photos), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert (
        f"wrote {out}: 4 images at 32 px (original | input | prediction | pasted), a2mim resnet18"
        in said
    )
    picture = read_png(out)
    header, tile = layout(picture, rows=4)
    assert tile == 96  # 32 px upscaled 3× (nearest)
    assert (picture[:header] > 200).any(), "the header holds the column names, in white"

    # The original column is each image (the hidden file skipped), resized, centre-cropped, upscaled 3×.
    paths = sorted(str(p) for p in photos.glob("[!.]*"))
    transform = data.build_transform("none", 32)
    for r, path in enumerate(paths):
        original = denormalise(transform(data.load_rgb(path)))
        expected = original.repeat_interleave(3, 1).repeat_interleave(3, 2)
        top = header + 2 + r * (tile + 2)
        assert np.array_equal(picture[top : top + tile, 2 : 2 + tile], as_uint8(expected)), path


def test_n_keeps_the_first_images_files_in_the_order_given_then_the_folders_walk(
    tmp_path, photos, ckpt, capsys
):
    out = tmp_path / "two.png"
    first = photos / "d_alpha.png"
    argv = ["--checkpoint", str(ckpt), str(first), str(photos), "--n", "2", "--out", str(out)]
    assert R.main(argv) == 0
    assert "2 of 5 images at 32 px" in capsys.readouterr().out
    picture = read_png(out)
    header, tile = layout(picture, rows=2)
    # Row 0 is the transparent image (composited on white: its top-left quarter is white), row 1 Grace Hopper's.
    quarter = tile // 2 - 6  # away from the edge the resize blends
    assert (picture[header + 2 : header + 2 + quarter, 2 : 2 + quarter] == 255).all()
    second = header + tile + 4
    assert not (picture[second : second + quarter, 2 : 2 + quarter] == 255).all()


def test_the_same_seed_writes_the_same_bytes_and_another_seed_another_mask(tmp_path, photos, ckpt):
    pictures = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / f"{name}.png"
        argv = ["--checkpoint", str(ckpt), str(photos), "--seed", seed, "--out", str(out)]
        assert R.main(argv) == 0
        pictures[name] = out.read_bytes()
    assert pictures["a"] == pictures["b"]
    assert pictures["a"] != pictures["c"]


@pytest.mark.parametrize("size,tile", [(28, 112), (32, 96), (224, 224), (512, 256)])
def test_tiles_are_upscaled_to_96_px_or_shrunk_to_256_and_train_pys_picture_lies_under_the_header(
    tmp_path, size, tile
):
    torch.manual_seed(0)
    img = torch.randn(3, 3, size, size)
    mask = mask_blocks(3, size, size // 7 if size == 28 else size // 8, 0.6)
    out = dict(pred=torch.randn(3, 3, size, size), mask=mask, input=mean_fill(img, mask))
    R.save_reconstructions(str(tmp_path / "ours.png"), img, out, n=3)
    ours = read_png(tmp_path / "ours.png")
    assert layout(ours, rows=3)[1] == tile  # a row of 4 is 4 · (tile + 2) + 2 px wide: 394 to 1,034
    if size <= 256:  # the same tiles as train.py's own picture, pixel for pixel
        train.save_reconstructions(str(tmp_path / "train.png"), img, out)
        theirs = read_png(tmp_path / "train.png")
        assert ours.shape[1] == theirs.shape[1] and np.array_equal(ours[-theirs.shape[0] :], theirs)


def test_the_input_column_is_the_models_own_input_not_a_fill_redone_here(tmp_path):
    img = torch.randn(2, 3, 32, 32)
    # the marker 0.5: only `out` carries it
    marker_input = torch.full_like(img, 0.5)
    out = dict(pred=torch.randn(2, 3, 32, 32), mask=mask_blocks(2, 32, 4, 0.6), input=marker_input)
    R.save_reconstructions(str(tmp_path / "r.png"), img, out)
    picture = read_png(tmp_path / "r.png")
    header, tile = layout(picture, rows=2)
    marker = as_uint8(denormalise(torch.full((3, tile, tile), 0.5)))
    for r in range(2):
        top = header + 2 + r * (tile + 2)
        assert np.array_equal(picture[top : top + tile, tile + 4 : 2 * tile + 4], marker)


def test_a_checkpoint_written_by_train_py_gives_its_picture_with_the_runs_mask_block(
    tmp_path, photos, capsys
):
    # fmt: off
    argv = ["--data", "fake", "--width", "4", "--batch-size", "16", "--workers", "0", "--max-steps", "1",
            "--vis-every", "0", "--threads", "1", "--mask-patch-size", "8", "--out-dir", str(tmp_path / "out")]
    # fmt: on
    assert train.main(argv) == 0
    ckpt = tmp_path / "out" / "a2mim_resnet18_fake" / "checkpoint.pt"
    assert R.main(["--checkpoint", str(ckpt), str(photos), "--out", str(tmp_path / "r.png")]) == 0
    said = capsys.readouterr().out
    assert "a2mim resnet18" in said
    assert "(checkpoint), masks of seed 0: 8-px blocks, ratio 0.6" in said
    assert layout(read_png(tmp_path / "r.png"), rows=4)[1] == 96


def test_a_cnn_takes_another_img_size_with_the_stem_it_was_trained_with(
    tmp_path, photos, ckpt, capsys
):
    out = tmp_path / "r96.png"
    argv = ["--checkpoint", str(ckpt), str(photos), "--img-size", "96", "--out", str(out)]
    assert R.main(argv) == 0
    assert "4 images at 96 px" in capsys.readouterr().out
    assert layout(read_png(out), rows=4)[1] == 96  # 96 px: neither upscaled nor shrunk


def test_a_vit_checkpoint_gives_its_picture_and_mask_ratio_and_threads_are_taken(
    tmp_path, photos, capsys, train_checkpoint
):
    train_checkpoint(tmp_path / "vit.pt", arch="vit_tiny", img_size=32)
    out = tmp_path / "vit.png"
    argv = ["--checkpoint", str(tmp_path / "vit.pt"), str(photos), "--out", str(out)]
    argv += ["--threads", "2"]
    assert R.main([*argv, "--mask-ratio", "0.25"]) == 0
    said = capsys.readouterr().out
    assert "a2mim vit_tiny" in said and "4-px blocks, ratio 0.25" in said
    assert torch.get_num_threads() == 2  # the fixture puts it back
    quarter = read_png(out)
    assert R.main([*argv, "--overwrite"]) == 0
    assert "4-px blocks, ratio 0.6" in capsys.readouterr().out
    assert layout(quarter, rows=4)[1] == 96 and not np.array_equal(read_png(out), quarter)


# ------------------------------------------------------------------------------------------
# The released files: a full A²MIM file, a SimMIM file (its method found from its token).


def released_simmim_resnet50(tmp_path, released):
    """A released-layout SimMIM ResNet-50 (OpenMixup's simmim/r50: the token at the stem, without γ; SimMIMNeck)."""
    torch.manual_seed(0)
    encoder = build_encoder("resnet50", 224).eval()
    released.perturb_(encoder)
    backbone = dict(encoder.state_dict()) | dict(mask_token=torch.randn(1, 64, 1, 1))
    neck = {
        "decoder.0.weight": torch.randn(3072, 2048, 1, 1) * 0.01,
        "decoder.0.bias": torch.zeros(3072),
    }
    return released.save(tmp_path / "simmim_r50_full.pth", backbone, neck, "full")


@pytest.mark.parametrize("method", ["a2mim", "simmim"])
def test_a_released_full_file_gives_its_224_px_picture_with_the_method_its_token_fits(
    tmp_path, photos, method, capsys, released
):
    if method == "a2mim":
        path, _ = released.resnet50(tmp_path, "full")
    else:
        path = released_simmim_resnet50(tmp_path, released)
    out = tmp_path / "released.png"
    assert R.main(["--checkpoint", str(path), str(photos), "--n", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "2 of 4 images at 224 px" in said
    assert f"{method} resnet50 from {path} (openmixup)" in said
    assert "32-px blocks, ratio 0.6" in said  # the released block and ratio
    assert layout(read_png(out), rows=2)[1] == 224


# ------------------------------------------------------------------------------------------
# Refusals: one sentence, exit 2, nothing written or changed.


def torchvision_file(tmp_path):
    path = tmp_path / "resnet18_torchvision.pth"
    torch.save(weights.torchvision_state_dict(build_encoder("resnet18", 224)), path)
    return path


NO_DECODER = "has no decoder: the picture needs a pre-trained A²MIM/SimMIM model"
# fmt: off
# case: (argv from (tmp_path, photos, ckpt, released), what the sentence says)
REFUSED = {
    "no arguments": (lambda t, p, c, r: [], "name a checkpoint and the images"),
    "no images": (lambda t, p, c, r: ["--checkpoint", c], "name a checkpoint and the images"),
    "folder without images": (lambda t, p, c, r: ["--checkpoint", c, t / "empty"],
                              "empty holds no images (files named"),
    "missing image": (lambda t, p, c, r: ["--checkpoint", c, p / "nope.jpg"], "nope.jpg does not exist"),
    "not an image": (lambda t, p, c, r: ["--checkpoint", c, t / "notes.txt"], "notes.txt is not an image file"),
    "broken image": (lambda t, p, c, r: ["--checkpoint", c, t / "broken.jpg"], "cannot decode image"),
    "missing checkpoint": (lambda t, p, c, r: ["--checkpoint", t / "no.pt", p], "no.pt does not exist"),
    "out is a folder": (lambda t, p, c, r: ["--checkpoint", c, p, "--out", t / "empty.png"], "is a folder"),
    "out exists": (lambda t, p, c, r: ["--checkpoint", c, p, "--out", t / "old.png"],
                   "old.png exists; pass --overwrite to replace it"),
    "out not a png": (lambda t, p, c, r: ["--checkpoint", c, p, "--out", t / "r.jpg"], "must name a .png file"),
    "out is an input": (lambda t, p, c, r: ["--checkpoint", c, p, "--out", p / "b_wide.png", "--overwrite"],
                        "is one of the files read"),
    "n 0": (lambda t, p, c, r: ["--checkpoint", c, p, "--n", "0"], "--n must be at least 1, got 0"),
    "threads 0": (lambda t, p, c, r: ["--checkpoint", c, p, "--threads", "0"], "--threads must be at least 1, got 0"),
    "img size 0": (lambda t, p, c, r: ["--checkpoint", c, p, "--img-size", "0"],
                   "--img-size must be at least 1, got 0"),
    "seed -1": (lambda t, p, c, r: ["--checkpoint", c, p, "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    "mask ratio 1": (lambda t, p, c, r: ["--checkpoint", c, p, "--mask-ratio", "1"],
                     "--mask-ratio must be in (0, 1), got 1"),
    "mask ratio nan": (lambda t, p, c, r: ["--checkpoint", c, p, "--mask-ratio", "nan"],
                       "--mask-ratio must be a finite number in (0, 1), got nan"),
    "token of another method": (lambda t, p, c, r: ["--checkpoint", c, p, "--method", "simmim"],
                                "its mask token or decoder does not fit a simmim resnet18 model"),
    "vit at another size": (lambda t, p, c, r: ["--checkpoint", t / "vit.pt", p, "--img-size", "64"],
                            "holds a vit_tiny for 32-px images; pass --img-size 32"),
    "backbone-only released file": (lambda t, p, c, r: ["--checkpoint", r.resnet50(t, "backbone")[0], p], NO_DECODER),
    "torchvision file": (lambda t, p, c, r: ["--checkpoint", torchvision_file(t), p], NO_DECODER),
}
# fmt: on


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_command_is_one_sentence_exit_2_and_leaves_the_folder_unchanged(
    tmp_path, photos, ckpt, case, capsys, monkeypatch, released, train_checkpoint, folder_state
):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.png").mkdir()
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (tmp_path / "old.png").write_bytes(b"an earlier picture")
    train_checkpoint(tmp_path / "vit.pt", arch="vit_tiny", img_size=32)
    argv, says = REFUSED[case]
    argv = [str(a) for a in argv(tmp_path, photos, ckpt, released)]
    monkeypatch.chdir(tmp_path)  # the default --out, recon.png, would land here
    before = folder_state(tmp_path)
    assert R.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert folder_state(tmp_path) == before


def test_a_full_disk_while_writing_the_picture_is_one_sentence_and_leaves_nothing(
    tmp_path, photos, ckpt, capsys, fill_disk_for_pngs, folder_state
):
    fill_disk_for_pngs()
    before = folder_state(tmp_path)
    out = tmp_path / "r.png"
    assert R.main(["--checkpoint", str(ckpt), str(photos), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: no space left on the device while writing {out}; nothing was written\n"
    assert folder_state(tmp_path) == before


def test_overwrite_replaces_an_existing_picture(tmp_path, photos, ckpt):
    out = tmp_path / "recon.png"
    out.write_bytes(b"an earlier picture")
    assert R.main(["--checkpoint", str(ckpt), str(photos), "--out", str(out), "--overwrite"]) == 0
    assert layout(read_png(out), rows=4)[1] == 96


def test_a_bug_keeps_its_traceback(tmp_path, photos, ckpt, monkeypatch):
    monkeypatch.setattr(R, "mask_blocks", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        R.main(["--checkpoint", str(ckpt), str(photos), "--out", str(tmp_path / "r.png")])
    assert not (tmp_path / "r.png").exists()
