"""Invariants of eval_linear.py: what a probe may and may not touch, the optimiser's layer-wise
lrs, the low-label subset, torchvision export, accuracy on learnable data, one-sentence errors."""
import functools
import json

import pytest
import torch
import torchvision

import data
import eval_linear as E
from a2mim import A2MIM
from models import build_encoder
from runtime import Dist, save_checkpoint, set_lr

SMALL = ["--data", "fake", "--workers", "0", "--precision", "fp32"]


@pytest.fixture(autouse=True)
def small_and_fast(monkeypatch):
    """200 fake images per split (20 a class) instead of 512, and one thread: these models are so
    small that a second thread costs more than it gives (3× slower on a busy 2-core machine)."""
    monkeypatch.setattr(data, "build_dataset", functools.partial(data.build_dataset, fake_size=200))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_checkpoint(path, arch="resnet18", img_size=32, width=8, data_name="fake"):
    """A checkpoint in train.py's format (see train.checkpoint_state), built in-process."""
    kw = dict(arch=arch, img_size=img_size) | ({} if arch.startswith("vit") else dict(width=width))
    torch.manual_seed(1)
    model = A2MIM(build_encoder(**kw), mask_patch_size=img_size // 8)
    save_checkpoint(path, dict(model=model.state_dict(), encoder_kwargs=kw, config=dict(data=data_name, method="a2mim")))
    return model.encoder


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
    encoder, cfg = prepared(["--init", "random", "--width", "8", "--epochs", "2", "--batch-size", "64", *SMALL, *extra])
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
    encoder, cfg = prepared(["--init", "random", "--width", "8", "--finetune", "--epochs", "1",
                             "--batch-size", "64", *SMALL])
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
        "encoder.blocks.0.qkv.weight": decay ** depth,
        f"encoder.blocks.{depth - 1}.mlp.0.weight": decay,
        "encoder.norm.weight": 1.0,
        "head.weight": 1.0,
    }
    for name, scale in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(2.0 * scale), name


def test_step_schedule_multiplies_by_a_tenth_at_each_milestone():
    cfg = dict(lr=30.0, epochs=100, warmup_epochs=0, min_lr=0.0, schedule="step", milestones=[60, 80])
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
    with pytest.raises(ValueError, match="class 1 has only 3 training images, fewer than --labels-per-class 5"):
        E.class_balanced_subset(labels, 5, seed=0)


def test_gathered_shards_count_every_val_sample_exactly_once_in_order():
    # 11 samples on 3 ranks: DistributedSampler pads to 12 by repeating sample 0.
    dataset = torch.utils.data.TensorDataset(torch.arange(11))
    parts = []
    for rank in range(3):
        loader = data.build_loader(dataset, 2, train=False, distributed=True, world_size=3, rank=rank, workers=0)
        parts.append(torch.cat([batch[0] for batch in loader]))
    assert E.interleave_shards(parts, len(dataset)).tolist() == list(range(11))


# ------------------------------------------------------------------------------------------
# Export to torchvision.


def test_exported_resnet_loads_strictly_into_torchvision_and_gives_the_same_features(tmp_path):
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "resnet18.pth"
    encoder = make_checkpoint(ckpt, img_size=224, width=64).eval()  # standard stem and width
    assert E.main(["--checkpoint", str(ckpt), "--export", str(out)]) == 0

    tv = torchvision.models.resnet18()
    tv.load_state_dict(torch.load(out, weights_only=True))  # strict
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(tv.eval()(x), E.pool(encoder(x)), atol=1e-5)

    # ...and the exported file is itself an accepted --checkpoint (torchvision format + --arch).
    reloaded, _ = prepared(["--checkpoint", str(out), "--arch", "resnet18", "--img-size", "224", *SMALL])
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in encoder.state_dict().items())


@pytest.mark.parametrize("arch,width", [("resnet18", 8), ("vit_tiny", None)])
def test_export_refuses_encoders_without_a_torchvision_twin(tmp_path, capsys, arch, width):
    ckpt = tmp_path / "ckpt.pt"
    make_checkpoint(ckpt, arch=arch, width=width)  # 32 px: small stem; or a ViT
    assert E.main(["--checkpoint", str(ckpt), "--export", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "x.pth").exists()


# ------------------------------------------------------------------------------------------
# Accuracy on learnable data (fake classes differ in mean colour), and the results file.


def test_probe_of_a_checkpoint_beats_chance_and_appends_one_result_line(tmp_path, capsys):
    ckpt, results = tmp_path / "ckpt.pt", tmp_path / "results.jsonl"
    make_checkpoint(ckpt)
    argv = ["--checkpoint", str(ckpt), "--results", str(results), "--workers", "0", "--batch-size", "64"]
    assert E.main(argv) == 0  # data "fake" comes from the checkpoint's config
    assert "top-1" in capsys.readouterr().out
    (line,) = results.read_text().splitlines()
    rec = json.loads(line)
    assert rec["checkpoint"] == str(ckpt) and rec["mode"] == "probe" and rec["data"] == "fake"
    assert rec["top1"] > 50 and rec["top5"] >= rec["top1"]
    assert rec["config"]["epochs"] == 30 and rec["config"]["lr"] == pytest.approx(0.1 * 64 / 256)


def test_random_encoder_probe_on_colour_coded_classes_beats_chance_with_ten_labels_a_class(tmp_path):
    results = tmp_path / "r.jsonl"
    argv = ["--init", "random", "--width", "8", "--labels-per-class", "10", "--results", str(results), *SMALL]
    assert E.main(argv) == 0
    rec = json.loads(results.read_text())
    assert rec["num_train"] == 100 and rec["num_val"] == 200 and rec["checkpoint"] is None
    assert rec["top1"] > 50


def test_a_few_epochs_of_finetuning_beat_chance(tmp_path):
    results = tmp_path / "r.jsonl"
    argv = ["--init", "random", "--width", "8", "--finetune", "--epochs", "3", "--batch-size", "32",
            "--blr", "3e-2", "--warmup-epochs", "0.5", "--results", str(results), *SMALL]
    assert E.main(argv) == 0
    assert json.loads(results.read_text())["top1"] > 50


# ------------------------------------------------------------------------------------------
# Bad inputs: one sentence on stderr, exit code 2.


def not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    return ["--checkpoint", str(path)]


def other_arch(tmp_path):
    make_checkpoint(tmp_path / "r18.pt")
    return ["--checkpoint", str(tmp_path / "r18.pt"), "--arch", "resnet50"]


def plain_dict_of_another_arch(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    return ["--checkpoint", str(tmp_path / "tv.pth"), "--arch", "resnet34"]


@pytest.mark.parametrize("argv_of,message", [
    (not_a_checkpoint, "is not a readable PyTorch checkpoint"),
    (other_arch, "holds a resnet18 model, but --arch is resnet50"),
    (plain_dict_of_another_arch, "does not fit a resnet34 encoder"),
    (lambda p: ["--init", "random", "--data", "folder", "--data-dir", str(p / "missing")], "does not exist"),
    (lambda p: ["--init", "random", "--data", "cifar10", "--data-dir", str(p)], "not found"),
    (lambda p: ["--init", "random", "--arch", "resnet18", "--layer-decay", "0.7", "--finetune"], "ViT blocks"),
])
def test_bad_inputs_exit_2_with_one_sentence(tmp_path, capsys, monkeypatch, argv_of, message):
    monkeypatch.chdir(tmp_path)  # no ./data to fall back on
    assert E.main(argv_of(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err


def test_no_arguments_without_a_trained_run_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert E.main([]) == 2
    assert "run `python3 train.py` first, or pass --init random" in capsys.readouterr().err
