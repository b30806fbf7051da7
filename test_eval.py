"""Invariants of eval_linear.py: what a probe may and may not touch, the optimiser's layer-wise
lrs, the low-label subset, torchvision export, accuracy on learnable data, one-sentence errors."""

import functools
import json
import os
import pickletools
import stat
import zipfile

import pytest
import torch
import torchvision

import data
import eval_linear as E
import runtime
from models import build_encoder
from runtime import Dist, set_lr

SMALL = ["--data", "fake", "--workers", "0", "--precision", "fp32"]


@pytest.fixture(autouse=True)
def small_and_fast(monkeypatch):
    """200 fake images per split (20 a class) instead of 512 (and one thread: conftest.py)."""
    monkeypatch.setattr(data, "build_dataset", functools.partial(data.build_dataset, fake_size=200))


def prepared(argv):
    """(encoder, cfg) exactly as main() builds them, for tests that look inside a run."""
    args = E.get_parser().parse_args(argv)
    source = E.load_source(args)
    cfg = E.resolve_config(args, source, world_size=1)
    torch.manual_seed(cfg["seed"])
    return E.build_loaded_encoder(source, cfg), cfg


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------
# What the probe may touch, and what fine-tuning must.


@pytest.mark.parametrize("extra", [[], ["--augment"]], ids=["cached", "augmented"])
def test_linear_probe_leaves_encoder_weights_and_bn_statistics_bit_identical(extra):
    encoder, cfg = prepared(
        ["--init", "random", "--width", "8", "--epochs", "2", "--batch-size", "64", *SMALL, *extra]
    )
    before = snapshot(encoder)
    assert any("running_mean" in k for k in before)  # there are BN statistics to protect
    result = E.evaluate(encoder, cfg, Dist())
    assert result["num_val"] == 200
    after = encoder.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_finetuning_changes_encoder_weights_and_bn_statistics():
    encoder, cfg = prepared(
        [*"--init random --width 8 --finetune --epochs 1 --batch-size 64".split(), *SMALL]
    )
    before = snapshot(encoder)
    E.evaluate(encoder, cfg, Dist())
    after = encoder.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["layer4.1.bn2.running_mean"], after["layer4.1.bn2.running_mean"])


# ------------------------------------------------------------------------------------------
# Optimiser and schedule.


def test_layer_decay_gives_each_vit_layer_decay_to_the_depth_minus_its_index():
    encoder = build_encoder("vit_tiny", 32)  # 6 blocks
    depth, decay = len(encoder.blocks), 0.65
    model = E.Classifier(encoder, 10)
    cfg = dict(weight_decay=0.05, optimizer="adamw", lr=1.0)
    optimizer = E.build_optimizer(model, cfg, E.layer_decay_fn(depth, decay))
    set_lr(optimizer, 2.0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    expected = {
        "encoder.patch_embed.weight": decay ** (depth + 1),
        "encoder.pos_embed": decay ** (depth + 1),
        "encoder.cls_token": decay ** (depth + 1),
        "encoder.blocks.0.qkv.weight": decay**depth,
        f"encoder.blocks.{depth - 1}.mlp.0.weight": decay,
        "fc_norm.weight": 1.0,  # after the blocks (the encoder's own final norm is off when fine-tuning)
        "head.weight": 1.0,
    }
    for name, scale in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(2.0 * scale), name


def test_step_schedule_multiplies_by_a_tenth_at_each_milestone():
    cfg = dict(
        lr=30.0, epochs=100, warmup_epochs=0, min_lr=0.0, schedule="step", milestones=[60, 80]
    )
    lrs = [E.lr_for_step(epoch * 10, cfg, steps_per_epoch=10) for epoch in (0, 59, 60, 79, 80, 99)]
    assert lrs == pytest.approx([30.0, 30.0, 3.0, 3.0, 0.3, 0.3])


# ------------------------------------------------------------------------------------------
# Low-label subset and distributed gathering.


def test_label_subset_has_exactly_k_per_class_and_is_seed_stable():
    labels = torch.arange(1000) % 10
    idx = E.class_balanced_subset(labels, 7, seed=3)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [7] * 10
    assert len(set(idx.tolist())) == 70
    assert torch.equal(idx, E.class_balanced_subset(labels, 7, seed=3))
    assert not torch.equal(idx, E.class_balanced_subset(labels, 7, seed=4))


def test_label_subset_refuses_a_class_with_fewer_than_k_images():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(
        runtime.DataError,
        match="class 1 has only 3 training images, fewer than --labels-per-class 5",
    ):
        E.class_balanced_subset(labels, 5, seed=0)


def test_gathered_shards_count_every_val_sample_exactly_once_in_order():
    # 11 samples on 3 ranks: DistributedSampler pads to 12 by repeating sample 0.
    dataset = torch.utils.data.TensorDataset(torch.arange(11))
    parts = []
    for rank in range(3):
        loader = data.build_loader(
            dataset, 2, train=False, distributed=True, world_size=3, rank=rank, workers=0
        )
        parts.append(torch.cat([batch[0] for batch in loader]))
    assert E.interleave_shards(parts, len(dataset)).tolist() == list(range(11))


# ------------------------------------------------------------------------------------------
# Export to torchvision.


def test_exported_resnet_loads_strictly_into_torchvision_and_gives_the_same_features(
    tmp_path, train_checkpoint
):
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "resnet18.pth"
    encoder = train_checkpoint(ckpt, img_size=224, width=64).eval()  # standard stem and width
    assert E.main(["--checkpoint", str(ckpt), "--export", str(out)]) == 0

    tv = torchvision.models.resnet18()
    tv.load_state_dict(torch.load(out, weights_only=True))  # strict
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(tv.eval()(x), E.pool(encoder(x)), atol=1e-5)

    # ...and the exported file is itself an accepted --checkpoint (torchvision format + --arch).
    reloaded, _ = prepared(
        ["--checkpoint", str(out), "--arch", "resnet18", "--img-size", "224", *SMALL]
    )
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in encoder.state_dict().items())


@pytest.mark.parametrize(
    "arch,width,why",
    [
        ("resnet18", 8, "export needs the standard width and stem"),
        ("vit_tiny", None, "export vit_tiny with --export-to timm"),
    ],
)
def test_export_refuses_encoders_without_a_torchvision_twin(
    tmp_path, capsys, arch, width, why, train_checkpoint
):
    ckpt = tmp_path / "ckpt.pt"
    train_checkpoint(ckpt, arch=arch, width=width)  # 32 px: small stem; or a ViT
    assert E.main(["--checkpoint", str(ckpt), "--export", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and why in err
    assert not (tmp_path / "x.pth").exists()


# ------------------------------------------------------------------------------------------
# Accuracy on learnable data (fake classes differ in mean colour), and the results file.


def test_probe_of_a_checkpoint_beats_chance_and_appends_one_result_line(
    tmp_path, capsys, train_checkpoint
):
    ckpt, results = tmp_path / "ckpt.pt", tmp_path / "results.jsonl"
    train_checkpoint(ckpt)
    argv = [
        "--checkpoint",
        str(ckpt),
        "--results",
        str(results),
        *"--workers 0 --batch-size 64".split(),
    ]
    assert E.main(argv) == 0  # data "fake" comes from the checkpoint's config
    out = capsys.readouterr().out
    assert "top-1" in out
    # the start line names the recipe taken and the flag for the other one
    assert "on fake, small-data settings (--preset official: §7's resnet recipe):" in out
    (line,) = results.read_text().splitlines()
    rec = json.loads(line)
    assert rec["checkpoint"] == str(ckpt) and rec["mode"] == "probe" and rec["data"] == "fake"
    assert rec["top1"] > 50 and rec["top5"] >= rec["top1"]
    assert rec["config"]["epochs"] == 30 and rec["config"]["lr"] == pytest.approx(0.1 * 64 / 256)


def test_random_encoder_probe_on_colour_coded_classes_beats_chance_with_ten_labels_a_class(
    tmp_path,
):
    results = tmp_path / "r.jsonl"
    argv = [
        *"--init random --width 8 --labels-per-class 10".split(),
        "--results",
        str(results),
        *SMALL,
    ]
    assert E.main(argv) == 0
    rec = json.loads(results.read_text())
    assert rec["num_train"] == 100 and rec["num_val"] == 200 and rec["checkpoint"] is None
    assert rec["top1"] > 50


def test_a_few_epochs_of_finetuning_beat_chance(tmp_path):
    results = tmp_path / "r.jsonl"
    argv = [
        *"--init random --width 8 --finetune --epochs 3 --batch-size 32 --blr 3e-2 --warmup-epochs 0.5".split(),
        "--results",
        str(results),
        *SMALL,
    ]
    assert E.main(argv) == 0
    assert json.loads(results.read_text())["top1"] > 50


# ------------------------------------------------------------------------------------------
# Bad inputs: one sentence on stderr, exit code 2.


def not_a_checkpoint(tmp_path, train_checkpoint):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    return ["--checkpoint", str(path)]


def other_arch(tmp_path, train_checkpoint):
    train_checkpoint(tmp_path / "r18.pt")
    return ["--checkpoint", str(tmp_path / "r18.pt"), "--arch", "resnet50"]


def plain_dict_of_another_arch(tmp_path, train_checkpoint):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    return ["--checkpoint", str(tmp_path / "tv.pth"), "--arch", "resnet34"]


@pytest.mark.parametrize(
    "argv_of,message",
    [
        (not_a_checkpoint, "is not a readable PyTorch checkpoint"),
        (other_arch, "holds a resnet18 model, but --arch is resnet50"),
        (plain_dict_of_another_arch, "does not fit a resnet34 encoder"),
        (
            lambda p, _: ["--init", "random", "--data", "folder", "--data-dir", str(p / "missing")],
            "does not exist",
        ),
        (
            lambda p, _: ["--init", "random", "--data", "cifar10", "--data-dir", str(p)],
            "cifar10 expects",
        ),
        (
            lambda p, _: "--init random --arch resnet18 --layer-decay 0.7 --finetune".split(),
            "ViT blocks",
        ),
    ],
)
def test_bad_inputs_exit_2_with_one_sentence(
    tmp_path, capsys, monkeypatch, train_checkpoint, argv_of, message
):
    monkeypatch.chdir(tmp_path)  # no ./data to fall back on
    assert E.main(argv_of(tmp_path, train_checkpoint)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err


def test_no_arguments_without_a_trained_run_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert E.main([]) == 2
    assert "run `python3 train.py` first, or pass --init random" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# §7's recipes, chosen from (arch, data).


def source_for(arch, data_name="imagenet", img_size=224):
    """A checkpoint's source as load_source returns it, without building or saving a model."""
    return dict(
        kind="checkpoint",
        path="ckpt.pt",
        weights=None,
        method="a2mim",
        data=data_name,
        data_dir=None,
        encoder_kwargs=dict(arch=arch, img_size=img_size),
    )


def resolved(arch, argv=(), world_size=8, **source):
    return E.resolve_config(
        E.get_parser().parse_args(list(argv)), source_for(arch, **source), world_size
    )


@pytest.mark.parametrize(
    "arch,expected",
    [
        # vit_*_swin_ft_simmim_*: lr 2.5e-3 per 256 → 1e-2 at batch 1024; EMA for B and L only; 200/100/150 epochs.
        (
            "vit_small",
            dict(
                epochs=200,
                lr=1e-2,
                global_batch=1024,
                layer_decay=0.65,
                warmup_epochs=20,
                clip_grad=5.0,
                drop_path=0.1,
                mixup=0.8,
                cutmix=1.0,
                label_smoothing=0.1,
                rand_augment=9,
                random_erasing=0.25,
                ema=0.0,
                optimizer="adamw",
                weight_decay=0.05,
                schedule="cosine",
            ),
        ),
        ("vit_base", dict(epochs=100, lr=1e-2, ema=0.99996)),
        ("vit_large", dict(epochs=150, lr=1e-2, ema=0.99996)),
        # convnext_{s,b}_spark_ft_*: AdamW 4e-3 at batch 4096, wd 0.05, EMA 0.9999, 300 epochs.
        (
            "convnext_small",
            dict(
                epochs=300,
                lr=4e-3,
                global_batch=4096,
                weight_decay=0.05,
                drop_path=0.4,
                ema=0.9999,
                label_smoothing=0.1,
                mixup=0.8,
                cutmix=1.0,
                rand_augment=9,
                random_erasing=0.25,
            ),
        ),
        ("convnext_base", dict(drop_path=0.5)),
        ("convnext_tiny", dict(drop_path=0.1)),
        # RSB A3: LAMB lr 8e-3 at batch 2048 (AdamW here), wd 0.02, 5 warm-up, BCE, Mixup 0.1 / CutMix 1.0,
        # RandAugment m6, 100 epochs, train 160 px, test 224 from 236.
        (
            "resnet50",
            dict(
                epochs=100,
                lr=8e-3,
                global_batch=2048,
                optimizer="adamw",
                weight_decay=0.02,
                warmup_epochs=5,
                schedule="cosine",
                loss="bce",
                mixup=0.1,
                cutmix=1.0,
                rand_augment=6,
                img_size=160,
                test_size=224,
                test_resize=236,
                drop_path=None,
                ema=0.0,
            ),
        ),
    ],
)
def test_official_finetune_recipes_follow_the_released_configs(arch, expected):
    cfg = resolved(arch, ["--finetune"])
    assert cfg["recipe"] is not None and cfg["origin"]["epochs"] == "arch recipe"
    assert {k: cfg[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize(
    "arch,expected",
    [
        # r50_linear_*: SGD lr 30 at batch 256, momentum 0.9, no wd, 100 epochs, ×0.1 at 60 and 80.
        (
            "resnet50",
            dict(
                epochs=100,
                lr=30.0,
                global_batch=256,
                momentum=0.9,
                weight_decay=0.0,
                schedule="step",
                milestones=[60, 80],
            ),
        ),
        # vit_small_p16_linear_*: SGD lr 12 at batch 1024, cosine, 90 epochs.
        (
            "vit_small",
            dict(epochs=90, lr=12.0, global_batch=1024, weight_decay=0.0, schedule="cosine"),
        ),
    ],
)
def test_official_probe_is_avgpool_fc_on_augmented_crops_with_sgd(arch, expected):
    cfg = resolved(arch)
    assert cfg["head"] == "fc" and cfg["augment"] and cfg["optimizer"] == "sgd"
    # pytest.approx takes no list inside a dict
    lists = {k: v for k, v in expected.items() if isinstance(v, list)}
    numbers = {k: v for k, v in expected.items() if k not in lists}
    assert {k: cfg[k] for k in numbers} == pytest.approx(numbers)
    assert {k: cfg[k] for k in lists} == lists  # milestones: whole epochs, compared exactly
    # avgpool + fc: no BatchNorm
    assert isinstance(E.linear_head(8, 10, cfg["head"]), torch.nn.Linear)


@pytest.mark.parametrize(
    "data_name,img_size,argv,recipe",
    [
        # §7's arch recipe: on --data imagenet, or with --preset official on any data
        ("imagenet", 224, [], "resnet"),
        ("fake", 32, ["--preset", "official"], "resnet"),
        ("folder", 224, ["--preset", "official"], "resnet"),
        # the small-data settings everywhere else: an image folder of any size too, as in train.py
        ("folder", 224, [], None),
        ("folder", 192, [], None),
        ("folder", 128, [], None),
        ("fashion-mnist", 32, [], None),
        ("imagenet", 224, ["--preset", "small"], None),
    ],
)
def test_the_arch_recipe_is_taken_on_imagenet_or_with_preset_official_never_for_a_folders_size(
    data_name, img_size, argv, recipe
):
    cfg = resolved("resnet50", argv, world_size=1, data_name=data_name, img_size=img_size)
    assert cfg["recipe"] == recipe
    assert cfg["origin"]["blr"] == ("arch recipe" if recipe else "small-data default")
    assert cfg["blr"] == (30.0 if recipe else E.DEFAULTS["probe"]["blr"])
    assert (recipe is not None) == runtime.takes_paper_recipe(cfg["preset"], data_name)


def test_the_presets_are_train_pys(capsys):
    (preset,) = [a for a in E.get_parser()._actions if a.dest == "preset"]
    assert tuple(preset.choices) == runtime.PRESETS
    with pytest.raises(SystemExit):
        E.get_parser().parse_args(["--preset", "laptop"])
    assert "invalid choice: 'laptop'" in capsys.readouterr().err


def test_random_encoder_on_imagenet_is_the_standard_width(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = E.get_parser().parse_args(
        ["--init", "random", "--arch", "resnet50", "--data", "imagenet"]
    )
    assert E.load_source(args)["encoder_kwargs"] == dict(arch="resnet50", img_size=224, width=None)
    # fashion-mnist, and an image folder of ImageNet's size: the small-data width
    args = E.get_parser().parse_args(["--init", "random", "--arch", "resnet50"])
    assert E.load_source(args)["encoder_kwargs"]["width"] == 16
    folder = ["--data", "folder", "--img-size", "224"]
    args = E.get_parser().parse_args(["--init", "random", "--arch", "resnet50", *folder])
    assert E.load_source(args)["encoder_kwargs"]["width"] == 16
    args = E.get_parser().parse_args(
        ["--init", "random", "--arch", "resnet50", *folder, "--preset", "official"]
    )
    assert E.load_source(args)["encoder_kwargs"]["width"] is None


def test_print_config_shows_each_value_and_where_it_came_from(tmp_path, capsys, train_checkpoint):
    ckpt = tmp_path / "ckpt.pt"
    train_checkpoint(ckpt)
    assert E.main(["--checkpoint", str(ckpt), "--epochs", "3", "--print-config"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert set(E.DEFAULTS["probe"]) <= set(lines)
    assert lines["epochs"][1:] == ["3", "command", "line"]
    assert lines["blr"][1:] == ["0.1", "small-data", "default"]
    assert lines["img_size"][1:] == ["32", "checkpoint"]
    assert lines["data"][1:] == ['"fake"', "checkpoint"]
    assert lines["lr"][-1] == "derived"
    assert (
        E.main("--init random --arch vit_small --data imagenet --finetune --print-config".split())
        == 0
    )
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert lines["epochs"][1:] == ["200", "arch", "recipe"]
    assert lines["img_size"][1:] == ["224", "dataset"]


def test_help_shows_every_setting_with_its_small_data_default_and_range():
    text = " ".join(E.get_parser().format_help().split())
    for s in E.SETTINGS:
        assert s.flag in text
    assert "(default: probe 30, finetune 5; valid: greater than 0)" in text  # --epochs
    assert "(default: bn)" in text  # --head
    assert "(default: the encoder's; valid: greater than 0)" in text  # --img-size: unset
    assert "Defaults shown are the small-data ones" in text


def test_vit_official_finetune_uses_mean_patch_token_and_fc_norm():
    encoder = build_encoder("vit_tiny", 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens_bdhw = encoder(x)
        model = E.Classifier(encoder, 10).eval()
        assert isinstance(encoder.norm, torch.nn.Identity)  # the encoder's final norm is off
        assert isinstance(model.fc_norm, torch.nn.LayerNorm)
        raw_bdhw = encoder(x)  # the same blocks, without the final norm
        assert not torch.allclose(raw_bdhw, tokens_bdhw)
        # mean patch token, then LN
        expected = model.head(model.fc_norm(raw_bdhw.flatten(2).mean(dim=2)))
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_convnext_finetune_moves_the_trained_final_norm_behind_the_pool():
    encoder = build_encoder("convnext_tiny", 32, width=8).eval()
    with torch.no_grad():
        encoder.norm.weight.uniform_(0.5, 2.0)
        trained = {k: v.clone() for k, v in encoder.norm.state_dict().items()}
        model = E.Classifier(encoder, 10).eval()
        assert isinstance(encoder.norm, torch.nn.Identity)
        assert all(torch.equal(model.fc_norm.state_dict()[k], v) for k, v in trained.items())
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(model(x), model.head(model.fc_norm(E.pool(encoder(x)))))


def test_resnet_classifier_is_a_plain_fc_on_the_pooled_map():
    encoder = build_encoder("resnet18", 32, width=8).eval()
    model = E.Classifier(encoder, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), model.head(E.pool(encoder(x))))


def test_rsb_recipe_trains_at_160_and_tests_224_from_236_with_randaugment():
    _, cfg = prepared(
        ["--init", "random", "--width", "8", "--finetune", "--preset", "official", *SMALL]
    )
    train_set, val_set, _ = E.build_data(cfg)
    assert train_set[0][0].shape == (3, 160, 160) and val_set[0][0].shape == (3, 224, 224)
    ops = {type(t).__name__: t for t in train_set.transform.transforms}
    assert (
        ops["RandomResizedCrop"].interpolation == torchvision.transforms.InterpolationMode.BICUBIC
    )
    assert (
        ops["RandAugment"].magnitude == 6
        and "RandomHorizontalFlip" in ops
        and "RandomErasing" not in ops
    )
    test_ops = {type(t).__name__: t for t in val_set.transform.transforms}
    assert test_ops["Resize"].size == [236] and test_ops["CenterCrop"].size == (224, 224)


def test_official_probe_trains_on_bicubic_crops_and_flips_only():
    _, cfg = prepared(["--init", "random", "--width", "8", "--preset", "official", *SMALL])
    train_set, val_set, _ = E.build_data(cfg)
    ops = {type(t).__name__: t for t in train_set.transform.transforms}
    assert (
        ops["RandomResizedCrop"].interpolation == torchvision.transforms.InterpolationMode.BICUBIC
    )
    assert "RandomHorizontalFlip" in ops and "RandAugment" not in ops and "RandomErasing" not in ops
    assert train_set[0][0].shape == val_set[0][0].shape == (3, 32, 32)


def test_vit_recipe_adds_random_erasing_and_randaugment_m9():
    _, cfg = prepared(
        ["--init", "random", "--arch", "vit_tiny", "--finetune", "--preset", "official", *SMALL]
    )
    train_set, val_set, _ = E.build_data(cfg)
    ops = {type(t).__name__: t for t in train_set.transform.transforms}
    assert ops["RandAugment"].magnitude == 9 and ops["RandomErasing"].p == 0.25
    # a ViT trains and tests at its own size
    assert train_set[0][0].shape == val_set[0][0].shape == (3, 32, 32)


def test_recipe_only_augmentations_are_refused_with_the_small_data_settings(capsys):
    assert E.main(["--init", "random", "--finetune", "--rand-augment", "9", *SMALL]) == 2
    assert "add --preset official" in capsys.readouterr().err


def test_ema_weights_are_evaluated_beside_the_last_weights():
    encoder, cfg = prepared(
        [*"--init random --width 8 --finetune --epochs 1 --batch-size 64 --ema 0.5".split(), *SMALL]
    )
    train_set, val_set, num_classes = E.build_data(cfg)
    out, _ = E.finetune(encoder, train_set, val_set, cfg, Dist(), num_classes)
    assert set(out) == {"", "ema_"}
    (last, labels), (ema, ema_labels) = out[""], out["ema_"]
    assert torch.equal(labels, ema_labels) and last.shape == ema.shape == (200, 10)
    assert not torch.allclose(last, ema)  # an average over the steps, not the last weights


def test_clip_grad_clips_every_step_at_the_given_norm(monkeypatch):
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def recorded_clip(params, max_norm):
        calls.append(max_norm)
        return clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recorded_clip)
    encoder, cfg = prepared(
        [*"--init random --width 8 --epochs 2 --batch-size 64 --clip-grad 5".split(), *SMALL]
    )
    E.evaluate(encoder, cfg, Dist())
    assert calls == [5.0] * 6  # 2 epochs × 3 steps of 64 out of 200 cached features


# ------------------------------------------------------------------------------------------
# The run folder is safe: refused cases change nothing on disk.


def test_export_refuses_to_overwrite_its_own_checkpoint(
    tmp_path, capsys, train_checkpoint, folder_state
):
    ckpt = tmp_path / "ckpt.pt"
    train_checkpoint(ckpt, img_size=224, width=64)
    before = folder_state(tmp_path)
    assert E.main(["--checkpoint", str(ckpt), "--export", str(ckpt)]) == 2
    assert "is the checkpoint being read" in capsys.readouterr().err
    assert folder_state(tmp_path) == before
    # not even with it
    assert E.main(["--checkpoint", str(ckpt), "--export", str(ckpt), "--overwrite"]) == 2
    assert folder_state(tmp_path) == before


def test_export_replaces_an_existing_file_only_with_overwrite(
    tmp_path, capsys, train_checkpoint, folder_state
):
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "r18.pth"
    train_checkpoint(ckpt, img_size=224, width=64)
    out.write_text("an earlier export")
    before = folder_state(tmp_path)
    assert E.main(["--checkpoint", str(ckpt), "--export", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert folder_state(tmp_path) == before
    assert E.main(["--checkpoint", str(ckpt), "--export", str(out), "--overwrite"]) == 0
    torchvision.models.resnet18().load_state_dict(torch.load(out, weights_only=True))


def test_exported_convnext_loads_strictly_into_torchvision_and_back(tmp_path):
    import weights

    encoder = build_encoder("convnext_tiny", 224)  # standard stem and width
    with torch.no_grad():
        encoder.norm.weight.uniform_(0.5, 2.0)  # the final norm must travel too
    weights.export(encoder, tmp_path / "cnx.pth", "torchvision")
    # shapes only: the strict key and shape check without torchvision's init
    with torch.device("meta"):
        torchvision.models.convnext_tiny().load_state_dict(
            torch.load(tmp_path / "cnx.pth", weights_only=True), assign=True
        )
    reloaded, _ = prepared(
        [
            "--checkpoint",
            str(tmp_path / "cnx.pth"),
            *"--arch convnext_tiny --img-size 224".split(),
            *SMALL,
        ]
    )
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in encoder.state_dict().items())


def test_results_unwritable_prints_accuracy_first(tmp_path, capsys, folder_state):
    (tmp_path / "not_a_dir").write_text("a file where the results folder should be")
    before = folder_state(tmp_path)
    argv = [
        *"--init random --width 8 --epochs 1".split(),
        "--results",
        str(tmp_path / "not_a_dir" / "r.jsonl"),
        *SMALL,
    ]
    assert E.main(argv) == 2
    out, err = capsys.readouterr()
    assert "top-1" in out  # the accuracy is not lost...
    last = err.strip().splitlines()[-1]  # (above it: the progress bars)
    # ...then one sentence
    assert last.startswith("error: cannot append the result to") and "r.jsonl" in last
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize(
    "flag,value,valid",
    [
        ("--labels-per-class", "0", "greater than 0"),
        ("--labels-per-class", "-3", "greater than 0"),
        ("--epochs", "0", "greater than 0"),
        ("--batch-size", "-1", "greater than 0"),
        ("--drop-path", "1.5", "in [0, 1)"),
        ("--label-smoothing", "1", "in [0, 1)"),
        ("--weight-decay", "-0.1", "at least 0"),
        ("--threads", "0", "greater than 0"),
        ("--milestones", "0", "greater than 0"),
        ("--seed", "-1", "in [0, 4294967295]"),
    ],
)
def test_out_of_range_settings_are_refused_with_the_valid_range(
    tmp_path, capsys, monkeypatch, flag, value, valid, folder_state
):
    monkeypatch.chdir(tmp_path)
    argv = ["--init", "random", "--width", "8", *SMALL, flag, value] + (
        ["--finetune"] if flag == "--drop-path" else []
    )
    assert E.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {flag} must be {valid}, got {value}"
    assert folder_state(tmp_path) == {}


def test_threads_sets_torch_cpu_threads():
    assert E.main(["--init", "random", "--threads", "2", "--print-config", *SMALL]) == 0
    assert torch.get_num_threads() == 2  # conftest's one_thread puts it back


def test_a_bug_keeps_its_traceback_while_user_errors_exit_2(monkeypatch, capsys):
    argv = ["--init", "random", "--width", "8", *SMALL]
    monkeypatch.setattr(E, "build_data", lambda cfg: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        E.main(argv)

    def bad_data(cfg):
        raise runtime.DataError("no such dataset here")

    monkeypatch.setattr(E, "build_data", bad_data)
    assert E.main(argv) == 2 and "error: no such dataset here" in capsys.readouterr().err


class RunsCode:
    """Unpickling this calls exec(code): what a crafted checkpoint can do to a plain torch.load."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def test_a_checkpoint_holding_python_objects_is_refused_by_the_tensors_only_load(
    tmp_path, capsys, folder_state
):
    import argparse

    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    before = folder_state(tmp_path)
    assert E.main(["--checkpoint", str(tmp_path / "pickled.pt")]) == 2
    assert "was refused" in capsys.readouterr().err
    assert folder_state(tmp_path) == before

    # A pickle whose loading would run code (here: create a file) is refused with README's sentence, unrun.
    control, marker = tmp_path / "control", tmp_path / "code_ran"
    control.mkdir()
    torch.save(
        {"model": RunsCode(f"open({str(control / 'code_ran')!r}, 'w').close()")},
        control / "crafted.pt",
    )
    # The payload is live: the pickle inside calls exec on load (read, not loaded, with pickletools)...
    with zipfile.ZipFile(control / "crafted.pt") as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert "__builtin__ exec" in " ".join(str(arg) for _, arg, _ in pickletools.genops(pickled))
    torch.save({"model": RunsCode(f"open({str(marker)!r}, 'w').close()")}, tmp_path / "crafted.pt")
    before = folder_state(tmp_path)
    assert E.main(["--checkpoint", str(tmp_path / "crafted.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert (
        f"{tmp_path / 'crafted.pt'} was refused: it holds Python objects, not only tensors, and loading it could "
        "run code from the file; "
    ) in err
    # ...the tensors-only load did not
    assert not marker.exists() and folder_state(tmp_path) == before


@pytest.mark.parametrize("mode", [[], ["--finetune"]])
def test_interactions_measure_j_of_the_trained_classifier_on_k_val_images_per_class(tmp_path, mode):
    """§9 after training: 13 orders, J normalised to mean 1, one row of I^(m) per image (for a bootstrap), the
    images class-balanced; the same seed gives the same numbers."""
    results = tmp_path / "r.jsonl"
    argv = [
        *"--init random --width 8 --epochs 1 --interactions 1 --interaction-pairs 2 --interaction-contexts 2".split(),
        "--results",
        str(results),
        *mode,
        *SMALL,
    ]
    assert E.main(argv) == 0 and E.main(argv) == 0
    first, second = [json.loads(line) for line in results.read_text().splitlines()]
    j = first["interactions"]
    assert len(j["orders"]) == len(j["J"]) == 13 and abs(sum(j["J"]) / 13 - 1) < 1e-5
    per_image = torch.tensor(j["I_abs_per_image"])
    # 1 image of each of the 10 classes
    assert per_image.shape == (10, 13) and (per_image >= 0).all()
    torch.testing.assert_close(per_image.mean(0) / per_image.mean(), torch.tensor(j["J"]))
    fake_val = data.build_dataset("fake", "val")
    assert sorted(int(fake_val.labels_n[i]) for i in j["images"]) == list(range(10))
    assert second["interactions"]["I_abs_per_image"] == j["I_abs_per_image"]


# ------------------------------------------------------------------------------------------
# Careless settings and damaged files: refused before training, nothing on disk lost.


@pytest.fixture
def trainings(monkeypatch):
    """The calls of eval_linear.fit: a refusal 'before training' leaves this empty."""
    calls = []
    fit = E.fit

    def counted(*args, **kwargs):
        calls.append(args[5]["mode"])
        return fit(*args, **kwargs)

    monkeypatch.setattr(E, "fit", counted)
    return calls


def test_a_results_append_that_fails_half_way_leaves_the_file_byte_identical_after_printing_the_accuracy(
    tmp_path, capsys, fill_disk, folder_state
):
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps({"mode": "probe", "top1": 12.5}) + "\n")
    before = folder_state(tmp_path)
    fill_disk()
    argv = ["--init", "random", "--width", "8", "--epochs", "1", "--results", str(results), *SMALL]
    assert E.main(argv) == 2
    out, err = capsys.readouterr()
    assert "top-1" in out  # the accuracy first...
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"error: cannot append the result to {results} (no space left on the device"
    )
    assert last.endswith("the accuracy above is not recorded")
    assert folder_state(tmp_path) == before  # ...and not half a line, nor a .tmp


def glued_lines(path):
    """Two records on one line: what two appends without a newline between them leave."""
    path.write_text(json.dumps({"top1": 1.0}) + json.dumps({"top1": 2.0}) + "\n")
    return f"{path}, line 1, is not a JSON record"


def garbled_middle_line(path):
    path.write_text(
        json.dumps({"top1": 1.0}) + "\n\x00\x17#garbage\n" + json.dumps({"top1": 2.0}) + "\n"
    )
    return f"{path}, line 2, is not a JSON record"


def a_folder(path):
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    return "--results must name a JSONL file, not a folder"


@pytest.mark.parametrize("damage", [glued_lines, garbled_middle_line, a_folder])
def test_a_results_file_that_is_damaged_or_a_folder_is_refused_before_training(
    tmp_path, capsys, trainings, damage, folder_state
):
    message = damage(tmp_path / "r.jsonl")
    before = folder_state(tmp_path)
    assert (
        E.main(["--init", "random", "--width", "8", "--results", str(tmp_path / "r.jsonl"), *SMALL])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err
    assert trainings == [] and folder_state(tmp_path) == before


def test_more_interaction_images_per_class_than_val_holds_is_refused_before_training_naming_interactions(
    tmp_path, capsys, trainings, folder_state
):
    # The fake val split holds 20 images a class (200 in all); the train split is not the constraint.
    argv = [
        *"--init random --width 8 --interactions 21".split(),
        "--results",
        str(tmp_path / "r.jsonl"),
        *SMALL,
    ]
    assert E.main(argv) == 2
    out, err = capsys.readouterr()
    assert (
        "error: class 0 has only 20 val images, fewer than --interactions 21" in err
        and "top-1" not in out
    )
    assert trainings == [] and folder_state(tmp_path) == {}


@pytest.mark.parametrize(
    "argv,batch",
    [
        # 10 a class: 100 cached features, fewer than the default batch 256
        (["--labels-per-class", "10"], 100),
        (["--batch-size", "100000"], 200),  # all 200 fake train images in one step
    ],
)
def test_cached_probe_scales_the_lr_to_and_records_the_batch_actually_used(
    tmp_path, monkeypatch, argv, batch
):
    results, lrs, batches = tmp_path / "r.jsonl", [], []
    set_lr, loss = E.set_lr, E.classification_loss

    def recorded_set_lr(optimizer, lr):
        lrs.append(lr)
        set_lr(optimizer, lr)

    def recorded_loss(logits_bk, *args):
        batches.append(len(logits_bk))
        return loss(logits_bk, *args)

    monkeypatch.setattr(E, "set_lr", recorded_set_lr)
    monkeypatch.setattr(E, "classification_loss", recorded_loss)
    assert (
        E.main(
            [
                *"--init random --width 8 --epochs 2".split(),
                "--results",
                str(results),
                *argv,
                *SMALL,
            ]
        )
        == 0
    )
    assert batches == [batch, batch]  # one step an epoch, of every train image
    # the cosine's first step: the peak lr of that batch
    assert lrs[0] == pytest.approx(0.1 * batch / 256)
    config = json.loads(results.read_text())["config"]
    assert config["global_batch"] == batch and config["lr"] == pytest.approx(0.1 * batch / 256)
    assert config["origin"]["global_batch"] == "derived (all train images)"
    asked = dict(zip(argv[::2], argv[1::2], strict=True)).get("--batch-size", "256")
    assert config["batch_size"] == int(asked)  # the setting as given stays beside the batch used


@pytest.mark.parametrize(
    "flag,value,valid,finetune",
    [
        ("--blr", "inf", "greater than 0", False),
        ("--blr", "nan", "greater than 0", False),
        ("--momentum", "nan", "in [0, 1)", False),
        ("--warmup-epochs", "inf", "at least 0", False),
        ("--min-lr", "inf", "at least 0", False),
        ("--clip-grad", "inf", "at least 0", False),
        ("--weight-decay", "1e999", "at least 0", False),
        ("--mixup", "inf", "at least 0", True),
        ("--cutmix", "nan", "at least 0", True),
        ("--ema", "nan", "in [0, 1)", True),
        ("--layer-decay", "inf", "greater than 0", True),
    ],
)
def test_a_non_finite_float_setting_is_refused_with_its_range_before_anything_runs(
    tmp_path, capsys, monkeypatch, trainings, flag, value, valid, finetune, folder_state
):
    monkeypatch.chdir(tmp_path)
    arch = ["--arch", "vit_tiny"] if flag == "--layer-decay" else ["--width", "8"]
    argv = ["--init", "random", *arch, *SMALL, flag, value, *(["--finetune"] if finetune else [])]
    assert E.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {flag} must be a finite number {valid}, got {float(value)}"
    assert trainings == [] and folder_state(tmp_path) == {}


def test_a_min_lr_above_the_peak_lr_is_refused_naming_both(
    tmp_path, capsys, monkeypatch, trainings, folder_state
):
    monkeypatch.chdir(tmp_path)
    assert E.main(["--init", "random", "--width", "8", "--finetune", "--blr", "1e-7", *SMALL]) == 2
    assert "error: --min-lr 1e-06 is above the peak lr 5e-08" in capsys.readouterr().err
    assert trainings == [] and folder_state(tmp_path) == {}


def test_a_checkpoint_that_is_a_folder_is_named_as_a_folder(
    tmp_path, capsys, train_checkpoint, folder_state
):
    (tmp_path / "run").mkdir()
    train_checkpoint(tmp_path / "run" / "checkpoint.pt")
    before = folder_state(tmp_path)
    assert (
        E.main(["--checkpoint", str(tmp_path / "run"), "--results", str(tmp_path / "r.jsonl")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: --checkpoint {tmp_path / 'run'} is a folder; name the file in it (train.py writes "
        f"{tmp_path / 'run' / 'checkpoint.pt'})"
    )
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_to_a_folder_is_refused_before_anything_is_read(
    tmp_path, capsys, monkeypatch, overwrite, train_checkpoint, folder_state
):
    ckpt, target = tmp_path / "ckpt.pt", tmp_path / "exports"
    train_checkpoint(ckpt, img_size=224, width=64)
    target.mkdir()
    (target / "older.pth").write_text("an earlier export")
    before = folder_state(tmp_path)
    read = []

    def load_source(args):  # reached only if the refusal comes too late
        read.append(args)
        raise AssertionError("the checkpoint was read before --export was checked")

    monkeypatch.setattr(E, "load_source", load_source)
    assert E.main(["--checkpoint", str(ckpt), "--export", str(target), *overwrite]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"error: --export {target} is a folder; name the file to write in it, e.g. {target / 'encoder.pth'}"
    )
    assert read == [] and folder_state(tmp_path) == before


def test_an_export_whose_write_fails_is_one_sentence_and_leaves_no_tmp(
    tmp_path, capsys, fill_disk, train_checkpoint, folder_state
):
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "r18.pth"
    train_checkpoint(ckpt, img_size=224, width=64)
    before = folder_state(tmp_path)
    fill_disk()
    assert E.main(["--checkpoint", str(ckpt), "--export", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: no space left on the device while writing {out}; nothing was written"
    assert folder_state(tmp_path) == before  # no r18.pth, no r18.pth.tmp


@pytest.mark.parametrize("flag", [["--finetune"], ["--interactions", "1"]])
def test_export_with_an_evaluation_flag_is_refused_rather_than_ignored(
    tmp_path, capsys, flag, train_checkpoint, folder_state
):
    ckpt = tmp_path / "ckpt.pt"
    train_checkpoint(ckpt, img_size=224, width=64)
    before = folder_state(tmp_path)
    assert E.main(["--checkpoint", str(ckpt), "--export", str(tmp_path / "r18.pth"), *flag]) == 2
    assert "--export writes the checkpoint's encoder as it is and exits" in capsys.readouterr().err
    assert folder_state(tmp_path) == before


def test_results_or_export_naming_a_device_is_refused_and_the_device_left_as_it_is(
    tmp_path, capsys, monkeypatch, train_checkpoint
):
    """append_line and atomic_save replace their file by a rename: over /dev/null (as root) that would put a
    regular file in its place. Both writers are disarmed here, so a missed refusal fails without harm."""

    def disarmed(*args):
        raise AssertionError(f"wrote {args[0]}")

    ckpt = tmp_path / "ckpt.pt"
    train_checkpoint(ckpt, img_size=224, width=64)
    monkeypatch.setattr(E, "append_line", disarmed)
    monkeypatch.setattr(runtime, "atomic_save", disarmed)
    assert (
        E.main(
            ["--init", "random", "--width", "8", "--epochs", "1", "--results", os.devnull, *SMALL]
        )
        == 2
    )
    assert (
        capsys.readouterr().err.strip()
        == f"error: --results must name a regular JSONL file, got {os.devnull}"
    )
    assert E.main(["--checkpoint", str(ckpt), "--export", os.devnull, "--overwrite"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: --export must name a regular file to write, got {os.devnull}"
    )
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_a_probe_batch_of_one_is_refused_since_its_batchnorm_head_needs_two(
    tmp_path, capsys, monkeypatch, trainings, folder_state
):
    monkeypatch.chdir(tmp_path)
    assert E.main(["--init", "random", "--width", "8", "--batch-size", "1", *SMALL]) == 2
    assert "error: the probe's BatchNorm head needs --batch-size >= 2" in capsys.readouterr().err
    assert trainings == [] and folder_state(tmp_path) == {}


def test_more_interaction_pairs_than_the_grid_holds_are_refused_before_training(
    tmp_path, capsys, trainings, folder_state
):
    argv = [
        *"--init random --width 8 --interactions 1 --interaction-pairs 100000".split(),
        "--results",
        str(tmp_path / "r.jsonl"),
        *SMALL,
    ]
    assert E.main(argv) == 2
    out, err = capsys.readouterr()
    assert "error: --interaction-pairs 100000 is too many at 32 px: a 8×8 grid has only" in err
    assert "but 100000 were asked for" in err and "top-1" not in out
    assert trainings == [] and folder_state(tmp_path) == {}
