"""Tests of pre-training (train.py): presets, distributed equivalence, accumulation, resume.

All on CPU with the gloo backend and the synthetic `fake` dataset; a few seconds each.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import data
import reconstruct
import runtime
import train
import weights
from a2mim import A2MIM, mask_blocks
from models import arch_kind, build_encoder

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_RUN_ARGS = "--data fake --batch-size 16 --workers 0 --vis-every 0 --log-every 4".split()


def resolved(*argv, world=1):
    args = train.get_parser().parse_args(list(argv))
    return train.resolve_config(args, world)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_weights(path):
    return runtime.load_checkpoint(path).model


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ---------------------------------------------------------------------------------------------
# Recipes from (arch, data), and the settings table (METHOD.md §6)
# ---------------------------------------------------------------------------------------------


def print_config(*argv, env=None):
    """`train.py --print-config` in a subprocess → ({setting: value}, {setting: origin}, stdout)."""
    out = subprocess.run(
        [sys.executable, "train.py", *argv, "--print-config"],
        cwd=HERE,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    rows = [
        line.split(None, 2)
        for line in out.stdout.splitlines()
        if not line.startswith(("note:", "recipe:"))
    ]
    return (
        {r[0]: json.loads(r[1]) for r in rows},
        {r[0]: (r[2] if len(r) > 2 else "") for r in rows},
        out.stdout,
    )


@pytest.mark.slow
def test_design_card_command_is_the_papers_resnet50_recipe_and_2048_at_8_processes():
    for how in (dict(env={"WORLD_SIZE": "8"}), dict(argv=["--assume-world-size", "8"])):
        cfg, origin, _ = print_config(
            "--arch", "resnet50", "--data", "imagenet", *how.get("argv", []), env=how.get("env")
        )
        assert (cfg["global_batch"], cfg["batch_size"], cfg["world_size"]) == (2048, 256, 8)
        assert cfg["lr"] == pytest.approx(1.2e-3)
        assert (
            cfg["width"],
            cfg["epochs"],
            cfg["warmup_epochs"],
            cfg["schedule"],
            cfg["min_lr"],
        ) == (64, 300, 10, "cosine", 1e-5)
        assert (cfg["img_size"], cfg["mask_patch_size"], cfg["mask_ratio"], cfg["accum_steps"]) == (
            224,
            32,
            0.6,
            1,
        )
        assert (cfg["weight_decay"], cfg["token_lr_scale"], cfg["clip_grad"], cfg["sync_bn"]) == (
            0.05,
            0.1,
            None,
            True,
        )
        assert all(
            origin[k].startswith("arch recipe")
            for k in ("width", "epochs", "batch_size", "blr", "warmup_epochs")
        )
        assert origin["arch"] == origin["data"] == "command line"


@pytest.mark.slow
def test_paper_recipe_on_fewer_processes_says_batch_and_lr_against_the_papers():
    _, _, out = print_config("--arch", "vit_base", "--data", "imagenet")
    assert "note: the paper's vit_base recipe is global batch 2048, lr 0.0004" in out
    assert "this run: 1 process(es), global batch 256, lr 5e-05" in out
    assert (
        "note:"
        not in print_config("--arch", "vit_base", "--data", "imagenet", "--assume-world-size", "8")[
            2
        ]
    )


def test_official_preset_stays_accepted_and_gives_the_same_recipe(capsys):
    unset = dict(preset=None, origin=None)
    official = resolved("--arch", "resnet50", "--preset", "official", world=8) | unset
    assert official == resolved("--arch", "resnet50", "--data", "imagenet", world=8) | unset
    # The presets are runtime.PRESETS, every script's: "none" (small's old alias) is gone.
    with pytest.raises(SystemExit):
        resolved("--preset", "none")
    assert "invalid choice: 'none' (choose from" in capsys.readouterr().err


def test_official_vit_base_recipe_matches_paper_at_8_gpus():
    cfg = resolved("--arch", "vit_base", "--data", "imagenet", world=8)
    assert (cfg["batch_size"], cfg["accum_steps"], cfg["global_batch"]) == (128, 2, 2048)
    assert cfg["lr"] == pytest.approx(4e-4)
    assert (cfg["schedule"], cfg["step_epoch"], cfg["epochs"], cfg["warmup_epochs"]) == (
        "step",
        700,
        800,
        10,
    )
    assert (cfg["clip_grad"], cfg["drop_path"], cfg["weight_decay"], cfg["token_lr_scale"]) == (
        5.0,
        0.1,
        0.05,
        1.0,
    )
    assert resolved("--arch", "vit_small", "--data", "imagenet", world=8)["batch_size"] == 256


def test_simmim_on_imagenet_gets_the_released_simmim_lr_and_no_token_lr_multiplier():
    cfg = resolved("--arch", "resnet50", "--data", "imagenet", "--method", "simmim", world=8)
    assert cfg["lr"] == pytest.approx(8e-4) and cfg["token_lr_scale"] == 1.0
    assert cfg["origin"]["blr"] == "arch recipe (SimMIM, §3)"
    # §3: SimMIM's crop scale; A²MIM's is (0.8, 1), by family.
    assert cfg["crop"] == "simmim" and data.CROP_SCALE["simmim"] == (0.67, 1.0)
    assert resolved("--arch", "resnet50", "--data", "imagenet", world=8)["crop"] is None
    crop = data.build_transform("pretrain", 224, crop=cfg["crop"]).transforms[0]
    assert crop.scale == (0.67, 1.0)


def test_the_laptop_comparison_gives_simmim_and_a2mim_the_same_budget_and_crops():
    a2mim, simmim = resolved(), resolved("--method", "simmim")
    own = {"method", "origin", *train.MODEL_OPTIONS}  # each method's own fill, token and loss (§3)
    same = {k for k in a2mim if k not in own and a2mim[k] == simmim[k]}
    assert same == set(a2mim) - own


def test_only_imagenet_or_preset_official_takes_the_papers_recipe_an_image_folder_the_small_data_one_at_its_size():
    for argv in (
        ["--data", "imagenet"],
        ["--data", "folder", "--preset", "official"],
        ["--preset", "official"],
    ):
        paper = resolved("--arch", "resnet50", *argv)
        assert (paper["recipe"], paper["epochs"], paper["width"], paper["batch_size"]) == (
            "paper",
            300,
            64,
            256,
        ), argv
    for size in ([], ["--img-size", "192"]):  # a folder of 224-px (or any) images is small data
        folder = resolved("--arch", "resnet50", "--data", "folder", *size)
        assert (folder["recipe"], folder["epochs"], folder["width"], folder["batch_size"]) == (
            "small-data",
            2,
            16,
            128,
        )
    # The folder's size.
    assert (folder["img_size"], resolved("--data", "folder")["img_size"]) == (192, 224)
    small = resolved("--arch", "resnet50", "--data", "folder", "--img-size", "160")
    # 16 px: the preferred 160 / 8 = 20 makes an 8×8 grid, which does not map onto the 10×10 token site
    assert (small["epochs"], small["width"], small["mask_patch_size"]) == (2, 16, 16)
    assert small["origin"]["mask_patch_size"] == "dataset recipe (folder)"
    cifar = resolved("--arch", "resnet50", "--data", "cifar10")
    assert (cifar["epochs"], cifar["img_size"], cifar["origin"]["epochs"]) == (
        2,
        32,
        "small-data recipe",
    )


@pytest.mark.parametrize(
    "argv, options, why",
    [
        (
            ["--arch", "resnet50", "--data", "imagenet"],
            dict(
                fill="mean",
                token_at="layer4",
                token_mode="gate",
                spatial="focal_l1",
                fft_weight=0.5,
                fft_loss="focal_frequency",
                fft_unmask_weight=1e-3,
            ),
            "arch default",
        ),
        (
            ["--arch", "vit_base"],
            dict(
                fill="mean",
                token_at="block0",
                token_mode="add",
                spatial="l1",
                fft_weight=0.1,
                fft_loss="focal_frequency",
                fft_unmask_weight=0.0,
            ),
            "arch default",
        ),
        (
            ["--arch", "convnext_tiny"],
            dict(token_at="stage4", token_mode="gate", fft_weight=0.0),
            "arch default",
        ),
        (
            ["--method", "simmim"],
            dict(fill="none", token_at="stem", token_mode="replace", spatial="l1", fft_weight=0.0),
            "method default (SimMIM",
        ),
        (
            ["--arch", "resnet101", "--loss-recipe", "paper"],
            dict(fft_weight=0.5, fft_loss="focal_frequency"),
            "--loss-recipe paper",
        ),
    ],
)
def test_the_models_options_are_resolved_with_their_origin_and_the_model_takes_them(
    argv, options, why
):
    cfg = resolved(*argv, "--img-size", "32")
    assert {k: cfg[k] for k in options} == options
    assert all(cfg["origin"][k].startswith(why) for k in options), cfg["origin"]
    assert all(cfg[k] is not None for k in train.MODEL_OPTIONS)
    model = train.build_model(cfg, runtime.Dist())
    # SimMIM's stem token: before the first stage.
    site = {"stem": "layer1"}.get(cfg["token_at"], cfg["token_at"])
    assert model.token_at == site and all(
        model.cfg[k] == cfg[k] for k in model.cfg if k != "token_at"
    )


@pytest.mark.slow
def test_print_config_shows_the_models_resolved_options_not_null_and_which_the_command_line_set():
    cfg, origin, out = print_config("--arch", "resnet50", "--data", "imagenet", "--fill", "zero")
    assert (cfg["fill"], origin["fill"]) == ("zero", "command line")
    assert (
        cfg["token_at"],
        cfg["token_mode"],
        cfg["fft_weight"],
        cfg["fft_loss"],
        cfg["fft_unmask_weight"],
        cfg["spatial"],
    ) == ("layer4", "gate", 0.5, "focal_frequency", 1e-3, "focal_l1")
    assert all(
        origin[k] == "arch default (released config)"
        for k in train.MODEL_OPTIONS
        if k not in ("fill", "loss_recipe")
    )
    assert (
        "recipe: the paper's ImageNet recipe for resnet50 (ResNet, §6: 300 epochs at 224 px" in out
    )


def test_the_start_line_names_the_recipe_and_the_flag_that_gives_the_other(tmp_path, capsys):
    small = [*TINY_RUN_ARGS, "--width", "8", "--max-steps", "1", "--out-dir", str(tmp_path)]
    assert train.main(small) == 0
    out = capsys.readouterr().out
    assert (
        "recipe: small-data (2 epochs at 32 px, width 16, batch 128 per process, blr 0.004; from the command "
        "line: --batch-size, --width); --preset official for the paper's ImageNet recipe for resnet18"
    ) in out
    paper = [*small, "--preset", "official", "--img-size", "32", "--run-name", "paper"]
    assert train.main(paper) == 0
    out = capsys.readouterr().out
    assert (
        "recipe: the paper's ImageNet recipe for resnet18 (ResNet, §6: 300 epochs at 224 px, batch 256 × 1 per "
        "process, blr 0.0003; from the command line: --batch-size, --img-size, --width); --preset small for the "
        "small-data one"
    ) in out


def test_a_folder_with_fewer_images_than_the_recipes_batch_trains_with_the_folder_as_its_batch_and_says_so(
    tmp_path, capsys
):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):  # a flat folder of unlabelled images
        Image.new("RGB", (40, 40), (40 * i, 90, 30)).save(photos / f"{i}.jpg")
    argv = [
        "--data",
        "folder",
        "--data-dir",
        str(photos),
        *"--img-size 32 --width 8 --workers 0 --vis-every 0".split(),
        "--out-dir",
        str(tmp_path / "out"),
        "--max-steps",
        "1",
    ]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "note: folder has 6 training images, fewer than the recipe's batch of 128 per process: batch 6 per process, "
        "global batch 6, lr 4.69e-05 (--batch-size sets another)"
    ) in out
    ckpt = runtime.load_checkpoint(tmp_path / "out" / "a2mim_resnet18_folder" / "checkpoint.pt")
    assert (ckpt.config["batch_size"], ckpt.config["global_batch"], ckpt.step) == (6, 6, 1)
    # The same command resumes: the lowered batch is the same run.
    assert train.main([*argv[:-1], "2"]) == 0
    assert "resuming at epoch 1, step 1" in capsys.readouterr().out
    # A batch asked for is not changed.
    assert train.main([*argv, "--batch-size", "8", "--run-name", "b"]) == 2
    assert "folder has 6 training images (6 per process): batch_size 8" in capsys.readouterr().err


@pytest.mark.slow
def test_a_recipes_schedule_that_does_not_fit_a_shorter_or_smaller_run_is_a_note_the_command_lines_is_refused():
    cfg, _, out = print_config(
        "--arch", "vit_base", "--data", "imagenet", "--epochs", "5", "--batch-size", "4"
    )
    assert (cfg["warmup_epochs"], cfg["step_epoch"], cfg["min_lr"]) == (10, 700, 1e-5)
    assert (
        "note: the recipe's schedule does not fit this run: its 10 warm-up epochs outlast --epochs 5 (the lr rises "
        "all along); its ×0.1 lr step at epoch 700 never comes; its min lr 1e-05 is above the peak lr 1.56e-06 "
        "(the lr climbs to it)"
    ) in out
    with pytest.raises(
        runtime.ConfigError, match=r"--warmup-epochs must be at most --epochs \(5\), got 6"
    ):
        resolved("--epochs", "5", "--warmup-epochs", "6")
    with pytest.raises(runtime.ConfigError, match=r"--min-lr must be at most the peak lr 1.56e-06"):
        resolved(
            "--arch", "vit_base", "--data", "imagenet", "--batch-size", "4", "--min-lr", "1e-5"
        )


def test_default_job_is_the_small_data_recipe_with_the_short_run_lr():
    cfg = resolved()
    assert (cfg["arch"], cfg["width"], cfg["data"], cfg["epochs"], cfg["batch_size"]) == (
        "resnet18",
        16,
        "fashion-mnist",
        2,
        128,
    )
    assert cfg["blr"] == 4e-3 and cfg["lr"] == pytest.approx(1e-3)


def test_command_line_flags_override_the_recipe_and_are_named_as_the_origin():
    cfg = resolved(
        "--arch", "resnet50", "--data", "imagenet", "--batch-size", "64", "--epochs", "100", world=8
    )
    assert cfg["global_batch"] == 512 and cfg["lr"] == pytest.approx(3e-4) and cfg["epochs"] == 100
    assert cfg["origin"]["batch_size"] == "command line" and cfg["origin"]["blr"].startswith(
        "arch recipe"
    )


def test_help_shows_every_settings_default():
    text = " ".join(train.get_parser().format_help().split())
    for s in train.SETTINGS:
        assert f"{s.flag} " in text and f"(default: {s.default}" in text, s.name


# ---------------------------------------------------------------------------------------------
# Weight decay, the token and its gate γ, and the schedule of every group (§6)
# ---------------------------------------------------------------------------------------------


def group_of(model, groups):
    """{parameter name: (weight_decay, lr_scale)}."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)]: (g["weight_decay"], g["lr_scale"]) for g in groups for p in g["params"]}


def test_resnet_decay_follows_the_released_name_rule_downsample_bn_is_decayed():
    model = A2MIM(build_encoder("resnet18", 32, width=8), mask_patch_size=4)
    got = group_of(
        model, runtime.param_groups(model, weight_decay=0.05, kind="resnet", token_lr_scale=0.1)
    )
    # Released: 'downsample.1' matches no key.
    assert got["encoder.layer2.0.downsample.1.weight"] == (0.05, 1.0)
    assert got["encoder.layer2.0.downsample.1.bias"] == (0.0, 1.0)
    assert got["encoder.bn1.weight"] == got["encoder.layer1.0.bn2.weight"] == (0.0, 1.0)
    assert got["encoder.layer1.0.conv1.weight"] == got["decoder.conv.weight"] == (0.05, 1.0)
    assert got["mask_token.token"] == (0.0, 0.1)


def test_convnext_layernorm_weights_are_decayed_and_layerscale_is_not():
    model = A2MIM(build_encoder("convnext_tiny", 32, width=8), mask_patch_size=4)
    got = group_of(
        model, runtime.param_groups(model, weight_decay=0.05, kind=arch_kind("convnext_tiny"))
    )
    norms = [n for n, m in model.named_modules() if "Norm" in type(m).__name__]
    assert norms and all(
        got[f"{n}.weight"][0] == 0.05 and got[f"{n}.bias"][0] == 0.0 for n in norms
    )
    scales = [n for n in got if "layer_scale" in n]
    assert scales and all(got[n][0] == 0.0 for n in scales)


def test_vit_norms_embeddings_layerscale_and_rel_pos_tables_are_not_decayed():
    model = A2MIM(build_encoder("vit_tiny", 32), mask_patch_size=4)
    got = group_of(
        model, runtime.param_groups(model, weight_decay=0.05, kind=arch_kind("vit_tiny"))
    )
    for n in (
        "encoder.pos_embed",
        "encoder.cls_token",
        "encoder.blocks.0.gamma_1",
        "encoder.blocks.0.norm1.weight",
        "encoder.norm.weight",
        "encoder.blocks.0.rel_pos_bias.table",
        "mask_token.token",
    ):
        assert got[n][0] == 0.0, n
    assert got["encoder.blocks.0.qkv.weight"][0] == got["encoder.blocks.0.mlp.0.weight"][0] == 0.05


@pytest.mark.parametrize(
    "argv, gamma",
    [
        (["--arch", "resnet50", "--data", "imagenet"], (0.05, 1.0)),  # r50_..._init_..._ep300
        # r50_..._init_..._ep100
        (
            ["--arch", "resnet50", "--data", "imagenet", "--epochs", "100"],
            (0.0, 0.1),
        ),
        (["--arch", "resnet101", "--data", "imagenet"], (0.05, 1.0)),
        (["--arch", "convnext_tiny", "--data", "imagenet"], (0.0, 0.1)),
        (["--data", "fake"], (0.0, 0.1)),  # the small-data recipe
    ],
)
def test_gamma_gate_weight_decay_and_lr_follow_the_recipe(argv, gamma):
    cfg = resolved(*argv) | dict(
        arch="resnet18" if "convnext" not in " ".join(argv) else "convnext_tiny",
        img_size=32,
        width=8,
        mask_patch_size=4,
    )
    model = train.build_model(cfg, runtime.Dist())
    got = group_of(model, train.build_optimizer(model, cfg, runtime.Dist()).param_groups)
    assert got["mask_token.gamma"] == gamma
    assert got["mask_token.token"] == (0.0, 0.1)


def test_every_group_anneals_from_its_own_peak_to_the_same_absolute_min_lr():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.AdamW(
        [{"params": [p], "lr_scale": s} for p, s in zip(params, (1.0, 0.1, 0.01), strict=True)]
    )
    sched = dict(lr=1e-3, total_steps=100, warmup_steps=10, min_lr=1e-5)
    runtime.set_scheduled_lr(opt, 10, **sched)  # end of warm-up: each at its own peak
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4, 1e-5])
    # Half-way through the cosine: min + (peak − min) / 2.
    runtime.set_scheduled_lr(opt, 55, **sched)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [1e-5 + (p - 1e-5) / 2 for p in (1e-3, 1e-4, 1e-5)]
    )
    runtime.set_scheduled_lr(opt, 100, **sched)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5] * 3)


def test_lr_schedule_warms_up_then_follows_cosine_or_step():
    kw = dict(lr=1.0, total_steps=100, warmup_steps=10, min_lr=0.0)
    # As the released CNN hook (runtime.lr_at): the warm-up rises linearly from 0 to the peak at its end.
    assert runtime.lr_at(0, **kw) == 0.0 and runtime.lr_at(10, **kw) == pytest.approx(1.0)
    assert runtime.lr_at(55, **kw) == pytest.approx(0.5) and runtime.lr_at(
        100, **kw
    ) == pytest.approx(0.0)
    step = dict(kw, schedule="step", step_at=[70])
    assert runtime.lr_at(69, **step) == 1.0 and runtime.lr_at(70, **step) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# Distributed: same result on 2 ranks as on 1 process with the whole batch
# ---------------------------------------------------------------------------------------------


def _tiny_vit_model():
    """A ViT has no BatchNorm, so a split batch gives exactly the whole batch's gradient.
    The Fourier term is off: its spectra are averaged over each process's own batch (as in the
    released code), which is *not* additive over a split batch."""
    torch.manual_seed(0)
    return A2MIM(build_encoder("vit_tiny", 32, drop_path=0.0), mask_patch_size=4, fft_weight=0.0)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), mask_blocks(8, 32, 4, generator=g)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ddp_grad_worker(rank, port, out_dir):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    runtime.setup_distributed(device="cpu")
    model = torch.nn.parallel.DistributedDataParallel(_tiny_vit_model())
    img, mask = _batch()
    half = slice(4 * rank, 4 * rank + 4)
    model(img[half], mask[half])["loss"].backward()  # DDP all-reduces (averages) the gradients
    torch.save(_grads(model.module), os.path.join(out_dir, f"grads{rank}.pt"))
    runtime.cleanup_distributed()


@pytest.mark.slow
def test_two_rank_vit_gradient_equals_single_process_batch(tmp_path):
    mp.spawn(_ddp_grad_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    model, (img, mask) = _tiny_vit_model(), _batch()
    model(img, mask)["loss"].backward()
    whole = _grads(model)
    for rank in range(2):
        split = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert split.keys() == whole.keys()
        for k in whole:
            torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-6, msg=k)


def test_accumulating_two_half_batches_steps_on_the_whole_batchs_gradient_each_with_its_own_masks(
    tmp_path, monkeypatch
):
    """--accum-steps 2 at half the batch: the optimiser steps on the whole batch's gradient (each micro-step
    backward of loss / 2), and micro-step m of step s draws its masks from generator s × 2 + m, its own,
    which a resumed run draws again. Seen at public seams: A2MIM.forward (which is made to put one mask on
    every image, so that the whole batch and its halves are masked alike) and AdamW.step."""
    seeds, grads = [], []
    forward, step = A2MIM.forward, torch.optim.AdamW.step

    def one_mask_for_every_image(self, img, mask=None, *, generator=None):
        seeds.append(generator.initial_seed())
        fixed = torch.Generator().manual_seed(0)  # not the global RNG, which augments the images
        one = mask_blocks(1, img.shape[-1], self.mask_patch_size, self.mask_ratio, generator=fixed)
        return forward(self, img, one.expand(len(img), -1, -1), generator=generator)

    def recorded_step(self, *args, **kw):
        grads.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return step(self, *args, **kw)

    monkeypatch.setattr(A2MIM, "forward", one_mask_for_every_image)
    monkeypatch.setattr(torch.optim.AdamW, "step", recorded_step)
    # A ViT without the Fourier term or stochastic depth: a split batch gives the whole batch's gradient.
    vit = ["--arch", "vit_tiny", "--img-size", "32", "--drop-path", "0", "--fft-weight", "0"]
    common = [*TINY_RUN_ARGS, *vit, "--max-steps", "2", "--out-dir", str(tmp_path)]
    seen = {}
    for batch, accum in ((16, 1), (8, 2)):
        seeds.clear()
        grads.clear()
        argv = ["--batch-size", str(batch), "--accum-steps", str(accum), "--run-name", str(accum)]
        assert train.main([*common, *argv]) == 0
        seen[accum] = list(seeds), list(grads)
    generators = [
        train.mask_generator({"seed": 0}, runtime.Dist(), i).initial_seed() for i in range(4)
    ]
    assert seen[1][0] == generators[:2] and seen[2][0] == generators
    whole, halves = seen[1][1][0], seen[2][1][0]  # the first step's (the weights are the same)
    assert len(seen[2][1]) == 2 and len(whole) == len(halves)
    for a, b in zip(halves, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


TORCHRUN_SCRIPT = """
import sys, torch, runtime, train
args = train.get_parser().parse_args(sys.argv[2:])
env = runtime.setup_distributed()
cfg = train.resolve_config(args, env.world_size)
model, _ = train.run(cfg, args, env)
torch.save(model.state_dict(), f"{sys.argv[1]}/rank{env.rank}.pt")
runtime.cleanup_distributed()
"""


def torchrun(tmp_path, *argv):
    script = tmp_path / "run_and_dump.py"
    script.write_text(TORCHRUN_SCRIPT)
    cmd = [
        sys.executable,
        *"-m torch.distributed.run --nproc_per_node=2".split(),
        "--master_port",
        str(free_port()),
        str(script),
        str(tmp_path),
        *TINY_RUN_ARGS,
        *argv,
    ]
    out = subprocess.run(
        cmd,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_two_process_gloo_run_finishes_with_identical_weights_on_both_ranks(tmp_path):
    torchrun(tmp_path, "--max-steps", "3", "--out-dir", str(tmp_path / "out"))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert_same_weights(r0, r1)
    ckpt = runtime.load_checkpoint(tmp_path / "out" / "a2mim_resnet18_fake" / "checkpoint.pt")
    assert ckpt.step == 3 and ckpt.config["global_batch"] == 32
    assert_same_weights(ckpt.model, r0)


@pytest.mark.slow
def test_two_process_gloo_run_resumed_mid_epoch_matches_the_uninterrupted_run(tmp_path):
    """Each rank's own RNG state is saved and restored; the loaders start at the batch after the
    checkpoint without reading the earlier ones (16 steps per epoch here; stopped at step 5)."""
    common = ["--epochs", "2", "--width", "8", "--drop-path", "0.1", "--arch", "resnet18"]
    torchrun(tmp_path, *common, "--out-dir", str(tmp_path / "a"))
    for stop in ("5", None):
        torchrun(
            tmp_path,
            *common,
            "--out-dir",
            str(tmp_path / "b"),
            *(["--max-steps", stop] if stop else []),
        )
    a = runtime.load_checkpoint(tmp_path / "a" / "a2mim_resnet18_fake" / "checkpoint.pt")
    b = runtime.load_checkpoint(tmp_path / "b" / "a2mim_resnet18_fake" / "checkpoint.pt")
    assert len(b.rng) == 2 and not torch.equal(b.rng[0]["torch"], b.rng[1]["torch"])
    assert b.step == a.step == 32
    assert_same_weights(a.model, b.model)


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert (
        train.main(
            [*TINY_RUN_ARGS, *"--epochs 2 --arch resnet18 --width 8".split(), "--out-dir", str(out)]
        )
        == 0
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [10, 32])  # mid-epoch, and exactly at the epoch boundary
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, uninterrupted, stop_after):
    common = [*TINY_RUN_ARGS, "--epochs", "2", "--arch", "resnet18", "--width", "8"]
    assert (
        train.main([*common, "--out-dir", str(tmp_path / "b"), "--max-steps", str(stop_after)]) == 0
    )
    stopped = runtime.load_checkpoint(tmp_path / "b" / "a2mim_resnet18_fake" / "checkpoint.pt")
    assert stopped.step == stop_after
    # The same command resumes itself.
    assert train.main([*common, "--out-dir", str(tmp_path / "b")]) == 0
    a = model_weights(uninterrupted / "a2mim_resnet18_fake" / "checkpoint.pt")
    b = model_weights(tmp_path / "b" / "a2mim_resnet18_fake" / "checkpoint.pt")
    assert_same_weights(a, b)


def test_run_folder_writes_checkpoint_log_and_legible_labelled_reconstructions_from_the_dataloader(
    tmp_path, capsys
):
    argv = [
        *TINY_RUN_ARGS,
        *"--max-steps 4 --vis-every 2 --device-data off".split(),
        "--out-dir",
        str(tmp_path),
    ]
    assert train.main(argv) == 0
    run = tmp_path / "a2mim_resnet18_fake"
    pngs = sorted(p.name for p in run.glob("recon_step*.png"))
    assert pngs == [f"recon_step00000{s}_original-input-prediction-pasted.png" for s in (2, 4)]
    assert {"checkpoint.pt", "config.json", "log.jsonl"} <= set(os.listdir(run))
    with Image.open(run / pngs[0]) as png:  # 8 rows × 4 columns of 32-px images, upscaled to 96 px,
        width, height = png.size  # under a header naming the columns
        assert width == 4 * 96 + 5 * 2 and 10 <= height - (8 * 96 + 9 * 2) <= 40
    rec = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "loss_spatial", "loss_freq", "lr", "img_per_s"} <= rec.keys()
    assert "python eval_linear.py --checkpoint" in capsys.readouterr().out
    assert not list(run.glob("*.tmp"))  # the atomic write left no temporary file


def test_reconstruction_columns_come_from_the_models_own_output(tmp_path):
    """The input column is the model's `input` (its own fill), not a fill redone outside it: read back
    from the PNG that train.py writes."""
    model = A2MIM(build_encoder("resnet18", 32, width=8), mask_patch_size=4, method="simmim")
    img = torch.randn(2, 3, 32, 32)
    out = model(img)
    out["input"] = torch.full_like(img, 0.5)  # a marker only the model's output can carry
    reconstruct.save_reconstructions(str(tmp_path / "recon.png"), img, out)
    with Image.open(tmp_path / "recon.png") as png:
        pixels = torch.from_numpy(np.asarray(png.convert("RGB")).copy())
    header = pixels.shape[0] - (2 * 96 + 3 * 2)
    # row 1, column 2 ("input")
    column = pixels[header + 2 : header + 2 + 96, 2 + 96 + 2 : 2 + 2 * 96 + 2]
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    expected = ((0.5 * std + mean).clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    assert (column == expected).all()


def test_folder_of_another_run_is_refused_and_left_untouched(tmp_path, capsys):
    assert train.main([*TINY_RUN_ARGS, "--max-steps", "2", "--out-dir", str(tmp_path)]) == 0
    ckpt = tmp_path / "a2mim_resnet18_fake" / "checkpoint.pt"
    before = ckpt.read_bytes()
    assert (
        train.main(
            [*TINY_RUN_ARGS, "--max-steps", "2", "--out-dir", str(tmp_path), "--mask-ratio", "0.5"]
        )
        == 2
    )
    assert "holds a different run" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


def test_resume_refuses_a_checkpoint_of_another_arch(tmp_path, capsys):
    assert train.main([*TINY_RUN_ARGS, "--max-steps", "1", "--out-dir", str(tmp_path)]) == 0
    ckpt = str(tmp_path / "a2mim_resnet18_fake" / "checkpoint.pt")
    code = train.main(
        [*TINY_RUN_ARGS, "--arch", "vit_tiny", "--out-dir", str(tmp_path / "v"), "--resume", ckpt]
    )
    assert code == 2 and "holds a resnet18 model, but --arch is vit_tiny" in capsys.readouterr().err


def test_non_checkpoint_file_is_refused_with_one_sentence(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(runtime.CheckpointError, match="not a readable PyTorch checkpoint"):
        runtime.load_checkpoint(bad)
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(runtime.CheckpointError, match="not an A²MIM checkpoint"):
        runtime.load_checkpoint(bad)


def test_ablation_flags_reach_the_model_and_the_rest_keep_the_family_defaults():
    cfg = resolved(
        "--data",
        "fake",
        "--fill",
        "zero",
        "--token-at",
        "stem",
        "--token-mode",
        "add",
        "--fft-weight",
        "0",
    )
    model = train.build_model(cfg, runtime.Dist())
    assert (
        model.cfg["fill"],
        model.token_at,
        model.cfg["token_mode"],
        model.cfg["fft_weight"],
    ) == ("zero", "layer1", "add", 0.0)
    # Untouched CNN defaults.
    assert (model.cfg["spatial"], model.cfg["fft_unmask_weight"]) == ("focal_l1", 1e-3)


@pytest.mark.slow
def test_device_resident_data_resumes_exactly_like_the_loader(tmp_path):
    """--device-data on (the GPU default for small datasets) keeps the resume guarantee."""
    common = [*TINY_RUN_ARGS, "--epochs", "2", "--width", "8", "--device-data", "on"]
    assert train.main([*common, "--out-dir", str(tmp_path / "a")]) == 0
    assert train.main([*common, "--out-dir", str(tmp_path / "b"), "--max-steps", "10"]) == 0
    assert train.main([*common, "--out-dir", str(tmp_path / "b")]) == 0
    assert_same_weights(
        model_weights(tmp_path / "a" / "a2mim_resnet18_fake" / "checkpoint.pt"),
        model_weights(tmp_path / "b" / "a2mim_resnet18_fake" / "checkpoint.pt"),
    )


# ---------------------------------------------------------------------------------------------
# --init-from: a new run from existing weights (ours, or a released OpenMixup file)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def at_step_0(monkeypatch):
    """What the first step of a run sees, at public seams: the model's weights at its first forward
    (A2MIM.forward) and the optimiser's state at its first step (AdamW.step)."""
    seen = {}
    forward, step = A2MIM.forward, torch.optim.AdamW.step

    def first_forward(self, *args, **kw):
        seen.setdefault("model", {k: v.clone() for k, v in self.state_dict().items()})
        return forward(self, *args, **kw)

    def first_step(self, *args, **kw):
        seen.setdefault("optimizer", dict(self.state_dict()["state"]))
        return step(self, *args, **kw)

    monkeypatch.setattr(A2MIM, "forward", first_forward)
    monkeypatch.setattr(torch.optim.AdamW, "step", first_step)
    return seen


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A train.py checkpoint after 2 steps: the file the new runs start from."""
    out = tmp_path_factory.mktemp("ours")
    assert train.main([*TINY_RUN_ARGS, "--max-steps", "2", "--out-dir", str(out)]) == 0
    return out / "a2mim_resnet18_fake" / "checkpoint.pt"


def test_init_from_our_checkpoint_is_a_new_run_from_its_weights_with_a_fresh_optimiser_and_the_rerun_resumes(
    tmp_path, ours, at_step_0, capsys, folder_state
):
    file = tmp_path / "start.pt"
    file.write_bytes(ours.read_bytes())
    argv = [
        *TINY_RUN_ARGS,
        "--log-every",
        "1",
        "--out-dir",
        str(tmp_path / "out"),
        "--init-from",
        str(file),
    ]
    assert train.main([*argv, "--max-steps", "1"]) == 0
    assert f"starting from {file} (encoder, mask token, decoder) in" in capsys.readouterr().out
    # Encoder, mask token and decoder: the file's; a fresh optimiser.
    assert_same_weights(at_step_0["model"], model_weights(file))
    assert at_step_0["optimizer"] == {}
    run = tmp_path / "out" / "a2mim_resnet18_fake"
    ckpt = runtime.load_checkpoint(run / "checkpoint.pt")
    assert ckpt.step == 1
    assert {s["step"].item() for s in ckpt.optimizer["state"].values()} == {1.0}
    first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert (first["step"], first["lr"]) == (0, 0.0)  # the schedule from its start: warm-up from 0
    config = json.loads((run / "config.json").read_text())
    assert (config["init_from"], config["init_parts"]) == (
        str(file),
        ["encoder", "mask_token", "decoder"],
    )

    file.write_bytes(b"gone")  # the rerun resumes its own checkpoint: the file is not read again
    assert train.main([*argv, "--max-steps", "2"]) == 0
    assert "resuming at epoch 0, step 1" in capsys.readouterr().out
    assert runtime.load_checkpoint(run / "checkpoint.pt").step == 2
    assert json.loads((run / "config.json").read_text())["init_parts"] == [
        "encoder",
        "mask_token",
        "decoder",
    ]

    # Another file into this folder is another run.
    before = folder_state(tmp_path / "out")
    assert train.main([*argv[:-1], str(ours), "--max-steps", "3"]) == 2
    assert "holds a different run (differs in init_from)" in capsys.readouterr().err
    assert folder_state(tmp_path / "out") == before


def test_init_from_a_released_openmixup_resnet50_copies_its_encoder_mask_token_and_decoder(
    tmp_path, at_step_0, capsys, released
):
    # publish_model.py's layout, from openmixup_keys.json's names and shapes
    file, _ = released.resnet50(tmp_path)
    assert (
        train.main(
            [
                *"--arch resnet50 --width 64 --img-size 96 --data fake --batch-size 2".split(),
                *"--max-steps 1 --workers 0 --vis-every 0 --threads 1".split(),
                "--out-dir",
                str(tmp_path / "out"),
                "--init-from",
                str(file),
            ]
        )
        == 0
    )
    assert f"starting from {file} (encoder, mask token, decoder)" in capsys.readouterr().out
    found = weights.load_pretrained(str(file))
    for part in ("encoder", "mask_token", "decoder"):
        got = {
            k.removeprefix(part + "."): v
            for k, v in at_step_0["model"].items()
            if k.startswith(part + ".")
        }
        assert_same_weights(got, found[part])
    assert at_step_0["optimizer"] == {}


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--arch", "vit_tiny"], "holds a resnet18 model, but --arch is vit_tiny"),
        (
            ["--width", "8"],
            "does not fit this resnet18 encoder (size mismatch for conv1.weight: copying a param with shape "
            "torch.Size([16, 3, 3, 3]) from checkpoint, the shape in current model is "
            "torch.Size([8, 3, 3, 3]).); it holds a "
            "resnet18 of width 16: pass --width 16 and an --img-size at most 64 (the small stem)",
        ),
        (["--init-from", "nope.pt"], "checkpoint nope.pt does not exist"),
    ],
)
def test_init_from_a_file_that_does_not_fit_is_one_sentence_and_nothing_is_written(
    tmp_path, ours, capsys, argv, expect
):
    code = train.main(
        [
            *TINY_RUN_ARGS,
            "--max-steps",
            "1",
            "--out-dir",
            str(tmp_path / "out"),
            "--init-from",
            str(ours),
            *argv,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and expect in err[-1], err
    assert not (tmp_path / "out").exists()
