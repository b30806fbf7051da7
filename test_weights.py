"""Weights in and out (weights.py): the authors' released OpenMixup checkpoints load into our encoders, and our
encoders export to torchvision and timm, whose models load them strictly and give our features.

No network, no OpenMixup code: the released files are made here from openmixup_keys.json, the key names and
shapes of the models built from the released configs (facts; a side-by-side run outside this repository
compared their features with ours, README "Weights in and out"). timm models are created with pretrained=False."""

import json
import math
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from timm.models.beit import gen_relative_position_index
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d

import eval_linear as E
import weights
from a2mim import A2MIM, Decoder, MaskToken, method_defaults
from models import ARCHS, build_encoder
from runtime import CheckpointError, save_checkpoint
from test_eval import folder_state

FACTS = json.loads((Path(__file__).parent / "openmixup_keys.json").read_text())
RELEASED = [a for a in FACTS if not a.startswith("_")]  # the 10 released A²MIM encoders


def expand(rows):
    """The fixture's compact rows → one row per key: consecutive rows that share "prefix{a..b}." stand for
    blocks a..b of that prefix, block after block (e.g. "layer3.{1..22}.conv1.weight")."""
    full, i = [], 0
    while i < len(rows):
        m = re.search(r"\{(\d+)\.\.(\d+)\}", rows[i][0])
        if not m:
            full.append(rows[i])
            i += 1
            continue
        head, group = rows[i][0][: m.end()], []
        while i < len(rows) and rows[i][0].startswith(head):
            group.append(rows[i])
            i += 1
        for b in range(int(m[1]), int(m[2]) + 1):
            full += [[r[0][: m.start()] + str(b) + r[0][m.end() :]] + r[1:] for r in group]
    return full


def released_keys(arch, part="backbone"):
    """{key: (shape, dtype)} of a released model's backbone or neck, in the released order."""
    return {
        r[0]: (tuple(r[1]), getattr(torch, r[2]) if len(r) > 2 else torch.float32)
        for r in expand(FACTS[arch][part])
    }


def tagged_state(arch):
    """(backbone, neck): every released tensor at its official shape and dtype, filled with its own tag
    (1, 2, 3, ...), so that where each one lands can be read off; as a stride-0 view, so that even ViT-L
    costs a few bytes. The relative position index is BEiT's, from timm's code (not ours)."""
    parts, tag = [], 0
    for part in ("backbone", "neck"):
        state = {}
        for key, (shape, dtype) in released_keys(arch, part).items():
            if key.endswith("relative_position_index"):
                grid = math.isqrt(shape[0] - 1)
                state[key] = gen_relative_position_index((grid, grid))
                continue
            tag += 1
            state[key] = torch.tensor(tag, dtype=dtype).expand(shape)
        parts.append(state)
    return parts


def save_released(path, backbone, neck, layout, head=None):
    """The two published layouts: "full" = the mmcv runner checkpoint publish_model.py writes (meta + prefixed
    state dict, torch's legacy serialization; `head`: a fine-tuned file's classifier); "backbone" =
    extract_backbone_weights.py's (zip)."""
    if layout == "full":
        state = {f"backbone.{k}": v for k, v in backbone.items()} | {
            f"neck.{k}": v for k, v in neck.items()
        }
        state |= {f"head.{k}": v for k, v in (head or {}).items()}
        meta = dict(
            openmixup_version="0.2.9",
            config="model = dict(type='A2MIM')",
            seed=0,
            epoch=300,
            iter=375300,
            hook_msgs=dict(last_ckpt="work_dirs/epoch_300.pth"),
            mmcv_version="1.7.2",
            time="Thu Jan  1",
        )
        torch.save(dict(meta=meta, state_dict=state), path, _use_new_zipfile_serialization=False)
    else:
        torch.save(dict(state_dict=backbone, author="openmixup"), path)
    return path


def tags(state):
    """{tag: our key} of a state dict made by tagged_state, after conversion (each tensor one tag throughout)."""
    out = {}
    for key, value in state.items():
        assert value.min() == value.max(), f"{key} mixes tensors"
        out[int(value.flatten()[0])] = key
    return out


# Where some released tensors must land: the places that only the names tell apart (same shapes elsewhere).
LANDS = {
    "resnet50": {
        "layer3.5.bn2.running_var": "layer3.5.bn2.running_var",
        "layer1.0.downsample.1.weight": "layer1.0.downsample.1.weight",
    },
    "convnext_small": {
        "downsample_layers.0.1.weight": "features.0.1.weight",
        "downsample_layers.2.0.bias": "features.4.0.bias",
        "stages.2.26.norm.weight": "features.5.26.block.2.weight",
        "stages.1.2.gamma": "features.3.2.layer_scale",
        "norm3.weight": "norm.weight",
    },
    "vit_base": {
        "layers.3.ln1.weight": "blocks.3.norm1.weight",
        "layers.3.ln2.weight": "blocks.3.norm2.weight",
        "layers.7.attn.q_bias": "blocks.7.q_bias",
        "layers.7.attn.v_bias": "blocks.7.v_bias",
        "layers.11.ffn.layers.1.weight": "blocks.11.mlp.2.weight",
        "layers.0.gamma_2": "blocks.0.gamma_2",
        "ln1.bias": "norm.bias",
    },
}


# ------------------------------------------------------------------------------------------
# In: the released checkpoints, both layouts, every released arch.


@pytest.mark.parametrize("layout", ["full", "backbone"])
@pytest.mark.parametrize("arch", RELEASED)
def test_a_released_file_loads_into_our_encoder_with_its_arch_found_and_every_tensor_placed_once(
    tmp_path, arch, layout
):
    backbone, neck = tagged_state(arch)
    found = weights.load_pretrained(
        save_released(tmp_path / "released.pth", backbone, neck, layout)
    )
    assert found["kind"] == "openmixup" and found["arch"] == arch and found["unused"] == []

    # Strictly: our encoder, the released mode's mask token and the decoder take them as they are.
    with torch.device("meta"):
        encoder = build_encoder(**found["encoder_kwargs"])
        token = MaskToken(
            encoder.token_sites[encoder.default_token_site][0],
            mode=method_defaults(arch)["token_mode"],
        )
        decoder = Decoder(encoder.out_channels, encoder.out_stride)
    encoder.load_state_dict(found["encoder"], assign=True)
    token.load_state_dict(found["mask_token"], assign=True)
    if layout == "full":
        decoder.load_state_dict(found["decoder"], assign=True)
    else:
        assert found["decoder"] == {}  # the backbone-only file has no neck

    # Every released tensor lands in exactly one place (the relative position index: checked, then dropped).
    placed = tags(found["encoder"]) | {
        t: f"mask_token.{k}" for t, k in tags(found["mask_token"]).items()
    }
    placed |= {t: f"decoder.{k}" for t, k in tags(found["decoder"]).items()}
    n_placed = len(found["encoder"]) + len(found["mask_token"]) + len(found["decoder"])
    released = {
        int(v.flatten()[0]): k
        for k, v in backbone.items()
        if not k.endswith("relative_position_index")
    }
    if layout == "full":
        released |= {int(v.flatten()[0]): f"neck.{k}" for k, v in neck.items()}
    assert sorted(placed) == sorted(released) and n_placed == len(released)
    for official, ours in LANDS.get(arch, {}).items():
        assert placed[int(backbone[official].flatten()[0])] == ours


def test_a_released_vit_file_gives_its_image_and_patch_size_and_a_cnn_the_released_224():
    found = weights.openmixup_arch(
        {k: torch.empty(s) for k, (s, _) in released_keys("vit_large").items()}
    )
    assert found == ("vit_large", dict(arch="vit_large", img_size=224, patch_size=16))
    found = weights.openmixup_arch(
        {k: torch.empty(s) for k, (s, _) in released_keys("convnext_base").items()}
    )
    assert found == ("convnext_base", dict(arch="convnext_base", img_size=224, small_stem=False))


def released_resnet50(tmp_path, layout="full", head=None):
    """A released-layout ResNet-50 with perturbed values (every BN statistic too), built from our encoder: the
    ResNet key map is the identity, so its keys must be the fixture's. Returns (path, our encoder)."""
    torch.manual_seed(0)
    encoder = build_encoder("resnet50", 224).eval()
    perturb_(encoder)
    backbone = dict(encoder.state_dict()) | dict(
        mask_token=torch.randn(1, 1024, 1, 1), mask_gamma=torch.rand(1, 1024, 1, 1)
    )
    assert {k: tuple(v.shape) for k, v in backbone.items()} == {
        k: s for k, (s, _) in released_keys("resnet50").items()
    }
    neck = {
        "decoder_pred.0.weight": torch.randn(3072, 2048, 1, 1),
        "decoder_pred.0.bias": torch.randn(3072),
    }
    path = save_released(tmp_path / f"r50_{layout}.pth", backbone, neck, layout, head)
    return path, encoder


def perturb_(module):
    """Every parameter and buffer away from its init (no zero or one hiding a wrong place), BN variances > 0."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape) + 0.5)
            elif t.is_floating_point():
                t.add_(torch.randn(t.shape) * (0.02 if t.ndim > 1 else 0.2))


def test_eval_linear_builds_the_encoder_of_a_released_file_with_its_weights(tmp_path, capsys):
    path, encoder = released_resnet50(tmp_path, "full", head={"fc.weight": torch.randn(1000, 2048)})
    args = E.get_parser().parse_args(["--checkpoint", str(path), "--data", "fake"])
    source = E.load_source(args)
    loaded = E.build_loaded_encoder(source, E.resolve_config(args, source, world_size=1))
    assert source["kind"] == "openmixup" and source["encoder_kwargs"]["arch"] == "resnet50"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in encoder.state_dict().items())
    # A key of no part (a fine-tuned file's head) is said, not dropped silently.
    assert (
        f"note: {path}: 1 tensors outside the encoder, mask token and decoder are not used (head.fc.weight"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "method,parts",
    [("a2mim", ["encoder", "mask_token", "decoder"]), ("simmim", ["encoder", "decoder"])],
)  # SimMIM's token: the stem's
def test_a_released_file_starts_a_model_with_its_encoder_and_the_token_and_decoder_that_fit(
    tmp_path, method, parts
):
    path, encoder = released_resnet50(tmp_path)
    found = weights.load_pretrained(path)
    torch.manual_seed(1)
    model = A2MIM(build_encoder("resnet50", 224), method=method)
    before = {k: v.clone() for k, v in model.mask_token.state_dict().items()}
    assert weights.load_into(model, found) == parts
    assert all(
        torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.state_dict().items()
    )
    assert torch.equal(model.decoder.conv.weight, found["decoder"]["conv.weight"])
    token = (
        found["mask_token"] if "mask_token" in parts else before
    )  # a token of another site stays as it was
    assert all(torch.equal(v, model.mask_token.state_dict()[k]) for k, v in token.items())


def test_a_released_simmim_baseline_starts_a_simmim_model_with_its_stem_token_and_decoder(tmp_path):
    # SimMIM's release differs in two places (OpenMixup's simmim/r50.py: MIMResNet mask_layer=0, SimMIMNeck):
    # the token is the stem's, without γ, and the neck's conv is decoder.0.
    backbone, neck = tagged_state("resnet50")
    backbone = {k: v for k, v in backbone.items() if k not in ("mask_token", "mask_gamma")}
    backbone["mask_token"] = torch.tensor(-1.0).expand(1, 64, 1, 1)
    neck = {k.replace("decoder_pred.", "decoder."): v for k, v in neck.items()}
    found = weights.load_pretrained(
        save_released(tmp_path / "simmim_r50.pth", backbone, neck, "full")
    )
    with torch.device("meta"):
        model = A2MIM(build_encoder("resnet50", 224), method="simmim")
    model.load_state_dict(
        {
            f"{part}.{k}": v
            for part in ("encoder", "mask_token", "decoder")
            for k, v in found[part].items()
        },
        assign=True,
    )  # strict: every part, every key
    assert found["unused"] == [] and int(model.mask_token.token.flatten()[0]) == -1


def test_a_file_of_another_encoder_is_refused_by_load_into_in_one_sentence(tmp_path):
    path, _ = released_resnet50(tmp_path, "backbone")
    model = A2MIM(build_encoder("resnet50", 32))  # the CIFAR-style stem: another conv1
    with pytest.raises(CheckpointError, match="does not fit this resnet50 encoder"):
        weights.load_into(model, weights.load_pretrained(path))


# ------------------------------------------------------------------------------------------
# Out: timm and torchvision load the export strictly and give our features.


def assert_close_rel(ours, theirs, rel=1e-5):
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= rel * theirs.abs().max()


def exported(tmp_path, encoder, to):
    """Our encoder in a train.py checkpoint → eval_linear --export --export-to `to` → the exported state dict."""
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / f"{encoder.arch}_{to}.pth"
    model = A2MIM(encoder)
    kw = dict(
        arch=encoder.arch, img_size=encoder.img_size, small_stem=False
    )  # the standard stem, any size
    if encoder.family == "vit":
        kw = dict(arch=encoder.arch, img_size=encoder.img_size, patch_size=encoder.out_stride)
    save_checkpoint(
        ckpt, dict(model=model.state_dict(), encoder_kwargs=kw, config=dict(data="fake"))
    )
    assert E.main(["--checkpoint", str(ckpt), "--export", str(out), "--export-to", to]) == 0
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize(
    "arch,img_size,input_size",
    [
        ("resnet18", 224, 64),
        ("resnet50", 224, 64),
        ("convnext_tiny", 224, 64),
        ("vit_tiny", 32, 32),
    ],
)
def test_timm_export_loads_strictly_and_its_features_and_pooled_features_are_ours(
    tmp_path, capsys, arch, img_size, input_size
):
    torch.manual_seed(0)
    encoder = build_encoder(arch, img_size).eval()
    perturb_(encoder)
    state = exported(tmp_path, encoder, "timm")
    assert "as a timm state dict" in capsys.readouterr().out
    model = weights.timm_model(encoder).eval()
    model.load_state_dict(state)  # strict
    x = torch.randn(2, 3, input_size, input_size)
    with torch.no_grad():
        ours, theirs, pooled = encoder(x), model.forward_features(x), model(x)
    if encoder.family == "vit":  # timm keeps the cls token in front
        theirs = theirs[:, 1:].transpose(1, 2).reshape(ours.shape)
    assert_close_rel(ours, theirs)
    assert_close_rel(E.pool(ours), pooled)  # global_pool "avg": the linear probe's feature


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_exports_to_a_timm_model_that_loads_it_strictly_vit_base_and_large_by_beits_name(
    arch,
):
    with torch.device("meta"):  # shapes only
        encoder = build_encoder(arch, 224)
        model = weights.timm_model(encoder)
    model.load_state_dict(weights.timm_state_dict(encoder), assign=True)  # strict
    names = {
        "vit_base": "beit_base_patch16_224",
        "vit_large": "beit_large_patch16_224",
        "vit_small": None,
        "vit_tiny": None,
    }  # no BEiT has our ViT-S (8 × 768) or ViT-T: timm.models.beit.Beit with their dims
    assert weights.timm_recipe(encoder)[0] == names.get(arch, arch)


def test_released_resnet50_exports_to_timm_and_torchvision_with_its_features(tmp_path):
    path, encoder = released_resnet50(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = E.pool(encoder(x))
    for to, model in (
        ("timm", timm.create_model("resnet50", pretrained=False, num_classes=0)),
        ("torchvision", torchvision.models.resnet50()),
    ):
        out = tmp_path / f"r50_{to}.pth"
        assert E.main(["--checkpoint", str(path), "--export", str(out), "--export-to", to]) == 0
        model.load_state_dict(torch.load(out, weights_only=True))  # strict
        if to == "torchvision":
            model.fc = torch.nn.Identity()  # a fresh 1000-class head rides along
        with torch.no_grad():
            assert_close_rel(ours, model.eval()(x))


@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny"])
def test_torchvision_export_is_the_backbone_of_a_faster_rcnn_whose_deepest_map_is_our_encoders(
    tmp_path, arch
):
    torch.manual_seed(0)
    encoder = build_encoder(arch, 224).eval()
    perturb_(encoder)
    frozen = (
        dict(norm_layer=FrozenBatchNorm2d) if arch.startswith("resnet") else {}
    )  # as torchvision's detectors
    net = getattr(torchvision.models, arch)(**frozen)
    net.load_state_dict(exported(tmp_path, encoder, "torchvision"))  # strict
    if arch.startswith("resnet"):
        layers, channels = {f"layer{k}": str(k - 1) for k in range(1, 5)}, [64, 128, 256, 512]
    else:  # features: stem, stage 1, down, stage 2, ... the output of each stage
        layers, channels, net = (
            {"1": "0", "3": "1", "5": "2", "7": "3"},
            [96, 192, 384, 768],
            net.features,
        )
    backbone = BackboneWithFPN(net, layers, channels, out_channels=64)
    detector = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64).eval()
    x = torch.rand(3, 64, 64)
    with torch.no_grad():
        (boxes,) = detector([x])
        deepest = backbone.body(x[None])["3"]
        ours = encoder(x[None])
    assert set(boxes) == {"boxes", "labels", "scores"} and boxes["boxes"].shape[1] == 4
    assert_close_rel(ours, deepest if arch.startswith("resnet") else encoder.norm(deepest))


# ------------------------------------------------------------------------------------------
# Refused: one sentence, exit 2, nothing written.


def not_released_at_all(tmp_path):
    torch.save(
        {"state_dict": {"encoder.stem.weight": torch.randn(8, 3, 3, 3)}, "meta": {}},
        tmp_path / "x.pth",
    )
    return [
        "--checkpoint",
        str(tmp_path / "x.pth"),
    ], "has OpenMixup's layout, but its backbone is none of the"


def not_a_checkpoint_dict(tmp_path):
    torch.save({"weights": [1, 2, 3], "note": "hello"}, tmp_path / "x.pth")
    return [
        "--checkpoint",
        str(tmp_path / "x.pth"),
    ], "is not an A²MIM checkpoint written by train.py"


def released_of_another_arch(tmp_path):
    backbone, neck = tagged_state("resnet50")
    path = save_released(tmp_path / "r50.pth", backbone, neck, "backbone")
    return [
        "--checkpoint",
        str(path),
        "--arch",
        "resnet101",
    ], f"{path} holds a resnet50 model, but --arch is resnet101"


def released_vit_with_another_position_index(tmp_path):
    backbone, neck = tagged_state("vit_small")
    backbone["layers.3.attn.relative_position_index"] = backbone[
        "layers.3.attn.relative_position_index"
    ].T.clone()
    path = save_released(tmp_path / "vit.pth", backbone, neck, "full")
    return [
        "--checkpoint",
        str(path),
    ], "layers.3.attn.relative_position_index is not BEiT's relative position index"


def released_vit_to_torchvision(tmp_path):
    backbone, neck = tagged_state("vit_small")
    path = save_released(tmp_path / "vit.pth", backbone, neck, "backbone")
    return [
        "--checkpoint",
        str(path),
    ], "torchvision has no ViT with relative position bias; export vit_small with --export-to timm"


@pytest.mark.parametrize(
    "case",
    [
        not_released_at_all,
        not_a_checkpoint_dict,
        released_of_another_arch,
        released_vit_with_another_position_index,
        released_vit_to_torchvision,
    ],
)
def test_a_file_that_is_not_a_released_encoder_we_have_is_refused_in_one_sentence_and_nothing_written(
    tmp_path, capsys, case
):
    argv, message = case(tmp_path)
    before = folder_state(tmp_path)
    assert E.main([*argv, "--export", str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err
    assert folder_state(tmp_path) == before


def test_export_to_without_export_is_refused_rather_than_ignored(tmp_path, capsys):
    assert E.main(["--init", "random", "--export-to", "timm"]) == 2
    assert "--export-to names the library of --export" in capsys.readouterr().err
