"""Weights in and out (weights.py): the authors' released OpenMixup checkpoints load into our encoders, and our
encoders export to torchvision and timm, whose models load them strictly and give our features.

No network, no OpenMixup code: the released files are made here from openmixup_keys.json, the key names and
shapes of the models built from the released configs (facts; a side-by-side run outside this repository
compared their features with ours, README "Weights in and out"). timm models are created with pretrained=False."""

import json
import math
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
import runtime
import weights
from a2mim import A2MIM, Decoder, MaskToken, method_defaults
from models import ARCHS, arch_kind, build_encoder
from runtime import CheckpointError

# The 10 released A²MIM encoders: conftest's `released.archs`, read here for the parametrization.
KEYS_FILE = Path(__file__).parent / "openmixup_keys.json"
RELEASED_ARCHS = [a for a in json.loads(KEYS_FILE.read_text()) if not a.startswith("_")]


def tagged_state(released, arch):
    """(backbone, neck): every released tensor at its official shape and dtype, filled with its own tag
    (1, 2, 3, ...), so that where each one lands can be read off; as a stride-0 view, so that even ViT-L
    costs a few bytes. The relative position index is BEiT's, from timm's code (not ours)."""
    parts, tag = [], 0
    for part in ("backbone", "neck"):
        state = {}
        for key, (shape, dtype) in released.keys(arch, part).items():
            if key.endswith("relative_position_index"):
                grid = math.isqrt(shape[0] - 1)
                state[key] = gen_relative_position_index((grid, grid))
                continue
            tag += 1
            state[key] = torch.tensor(tag, dtype=dtype).expand(shape)
        parts.append(state)
    return parts


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
@pytest.mark.parametrize("arch", RELEASED_ARCHS)
def test_a_released_file_loads_into_our_encoder_with_its_arch_found_and_every_tensor_placed_once(
    tmp_path, released, arch, layout
):
    backbone, neck = tagged_state(released, arch)
    path = released.save(tmp_path / "released.pth", backbone, neck, layout)
    found = weights.load_pretrained(path)
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
    placed = tags(found["encoder"])
    placed |= {t: f"mask_token.{k}" for t, k in tags(found["mask_token"]).items()}
    placed |= {t: f"decoder.{k}" for t, k in tags(found["decoder"]).items()}
    n_placed = len(found["encoder"]) + len(found["mask_token"]) + len(found["decoder"])
    given = {
        int(v.flatten()[0]): k
        for k, v in backbone.items()
        if not k.endswith("relative_position_index")
    }
    if layout == "full":
        given |= {int(v.flatten()[0]): f"neck.{k}" for k, v in neck.items()}
    assert sorted(placed) == sorted(given) and n_placed == len(given)
    for official, ours in LANDS.get(arch, {}).items():
        assert placed[int(backbone[official].flatten()[0])] == ours


def test_the_parametrized_archs_are_conftests_released_archs(released):
    assert RELEASED_ARCHS == released.archs


def test_a_train_py_checkpoint_loads_as_its_three_parts_with_its_config_and_its_arch_checked(
    tmp_path, train_checkpoint
):
    path = tmp_path / "ckpt.pt"
    encoder = train_checkpoint(path, arch="resnet18", img_size=32, width=8)
    found = weights.load_pretrained(path, arch="resnet18")
    assert found["kind"] == "checkpoint" and found["path"] == path and found["unused"] == []
    assert found["arch"] == "resnet18" and found["config"] == dict(data="fake", method="a2mim")
    assert found["encoder_kwargs"] == dict(arch="resnet18", img_size=32, width=8)
    assert found["encoder"].keys() == encoder.state_dict().keys()
    assert all(torch.equal(v, found["encoder"][k]) for k, v in encoder.state_dict().items())
    model = A2MIM(build_encoder(**found["encoder_kwargs"]))
    assert weights.load_into(model, found) == ["encoder", "mask_token", "decoder"]
    with pytest.raises(CheckpointError, match="holds a resnet18 model, but --arch is resnet50"):
        weights.load_pretrained(path, arch="resnet50")


def test_a_released_vit_file_gives_its_image_and_patch_size_and_a_cnn_the_released_224(released):
    def arch_of(arch):
        return weights.openmixup_arch(
            {k: torch.empty(s) for k, (s, _) in released.keys(arch).items()}
        )

    assert arch_of("vit_large") == (
        "vit_large",
        dict(arch="vit_large", img_size=224, patch_size=16),
    )
    assert arch_of("convnext_base") == (
        "convnext_base",
        dict(arch="convnext_base", img_size=224, small_stem=False),
    )


def test_eval_linear_builds_the_encoder_of_a_released_file_with_its_weights(
    tmp_path, capsys, released
):
    path, encoder = released.resnet50(tmp_path, "full", head={"fc.weight": torch.randn(1000, 2048)})
    args = E.get_parser().parse_args(["--checkpoint", str(path), "--data", "fake"])
    source = E.load_source(args)
    loaded = E.build_loaded_encoder(source, E.resolve_config(args, source, world_size=1))
    assert source["kind"] == "openmixup" and source["encoder_kwargs"]["arch"] == "resnet50"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in encoder.state_dict().items())
    # A key of no part (a fine-tuned file's head) is said, not dropped silently.
    note = f"note: {path}: 1 tensors outside the encoder, mask token and decoder are not used"
    assert f"{note} (head.fc.weight" in capsys.readouterr().err


# SimMIM's token: the stem's, not the released A²MIM token's site
@pytest.mark.parametrize(
    "method,parts",
    [("a2mim", ["encoder", "mask_token", "decoder"]), ("simmim", ["encoder", "decoder"])],
)
def test_a_released_file_starts_a_model_with_its_encoder_and_the_token_and_decoder_that_fit(
    tmp_path, released, method, parts
):
    path, encoder = released.resnet50(tmp_path)
    found = weights.load_pretrained(path)
    torch.manual_seed(1)
    model = A2MIM(build_encoder("resnet50", 224), method=method)
    before = {k: v.clone() for k, v in model.mask_token.state_dict().items()}
    assert weights.load_into(model, found) == parts
    assert all(
        torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.state_dict().items()
    )
    assert torch.equal(model.decoder.conv.weight, found["decoder"]["conv.weight"])
    # a token of another site stays as it was
    token = found["mask_token"] if "mask_token" in parts else before
    assert all(torch.equal(v, model.mask_token.state_dict()[k]) for k, v in token.items())


def test_a_released_simmim_baseline_starts_a_simmim_model_with_its_stem_token_and_decoder(
    tmp_path, released
):
    # SimMIM's release differs in two places (OpenMixup's simmim/r50.py: MIMResNet mask_layer=0, SimMIMNeck):
    # the token is the stem's, without γ, and the neck's conv is decoder.0.
    backbone, neck = tagged_state(released, "resnet50")
    backbone = {k: v for k, v in backbone.items() if k not in ("mask_token", "mask_gamma")}
    backbone["mask_token"] = torch.tensor(-1.0).expand(1, 64, 1, 1)
    neck = {k.replace("decoder_pred.", "decoder."): v for k, v in neck.items()}
    found = weights.load_pretrained(
        released.save(tmp_path / "simmim_r50.pth", backbone, neck, "full")
    )
    with torch.device("meta"):
        model = A2MIM(build_encoder("resnet50", 224), method="simmim")
    state = {}
    for part in ("encoder", "mask_token", "decoder"):
        state |= {f"{part}.{k}": v for k, v in found[part].items()}
    model.load_state_dict(state, assign=True)  # strict: every part, every key
    assert found["unused"] == [] and int(model.mask_token.token.flatten()[0]) == -1


def test_a_file_of_another_encoder_is_refused_by_load_into_in_one_sentence(tmp_path, released):
    path, _ = released.resnet50(tmp_path, "backbone")
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
    if encoder.family == "vit":
        kw = dict(arch=encoder.arch, img_size=encoder.img_size, patch_size=encoder.out_stride)
    else:  # the standard stem, any size
        kw = dict(arch=encoder.arch, img_size=encoder.img_size, small_stem=False)
    checkpoint = runtime.Checkpoint(
        model=model.state_dict(), encoder_kwargs=kw, config=dict(data="fake")
    )
    runtime.save_checkpoint(ckpt, checkpoint)
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
    tmp_path, capsys, released, arch, img_size, input_size
):
    torch.manual_seed(0)
    encoder = build_encoder(arch, img_size).eval()
    released.perturb_(encoder)
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
    # No BEiT has our ViT-S (8 × 768) or ViT-T: timm.models.beit.Beit with their dims.
    names = {
        "vit_base": "beit_base_patch16_224",
        "vit_large": "beit_large_patch16_224",
        "vit_small": None,
        "vit_tiny": None,
    }
    assert weights.timm_recipe(encoder)[0] == names.get(arch, arch)


def test_released_resnet50_exports_to_timm_and_torchvision_with_its_features(tmp_path, released):
    path, encoder = released.resnet50(tmp_path)
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
    tmp_path, released, arch
):
    torch.manual_seed(0)
    encoder = build_encoder(arch, 224).eval()
    released.perturb_(encoder)
    resnet = arch_kind(arch) == "resnet"
    frozen = dict(norm_layer=FrozenBatchNorm2d) if resnet else {}  # as torchvision's detectors
    net = getattr(torchvision.models, arch)(**frozen)
    net.load_state_dict(exported(tmp_path, encoder, "torchvision"))  # strict
    if resnet:
        layers, channels = {f"layer{k}": str(k - 1) for k in range(1, 5)}, [64, 128, 256, 512]
    else:  # features: stem, stage 1, down, stage 2, ... the output of each stage
        layers, channels = {"1": "0", "3": "1", "5": "2", "7": "3"}, [96, 192, 384, 768]
        net = net.features
    backbone = BackboneWithFPN(net, layers, channels, out_channels=64)
    detector = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64).eval()
    x = torch.rand(3, 64, 64)
    with torch.no_grad():
        (boxes,) = detector([x])
        deepest = backbone.body(x[None])["3"]
        ours = encoder(x[None])
    assert set(boxes) == {"boxes", "labels", "scores"} and boxes["boxes"].shape[1] == 4
    assert_close_rel(ours, deepest if resnet else encoder.norm(deepest))


# ------------------------------------------------------------------------------------------
# Refused: one sentence, exit 2, nothing written.


# Each case: (tmp_path, released) → (eval_linear's arguments, what its one sentence says).
def not_released_at_all(tmp_path, released):
    path = tmp_path / "x.pth"
    torch.save({"state_dict": {"encoder.stem.weight": torch.randn(8, 3, 3, 3)}, "meta": {}}, path)
    return ["--checkpoint", str(path)], "has OpenMixup's layout, but its backbone is none of the"


def not_a_checkpoint_dict(tmp_path, released):
    path = tmp_path / "x.pth"
    torch.save({"weights": [1, 2, 3], "note": "hello"}, path)
    return ["--checkpoint", str(path)], "is not an A²MIM checkpoint written by train.py"


def released_of_another_arch(tmp_path, released):
    backbone, neck = tagged_state(released, "resnet50")
    path = released.save(tmp_path / "r50.pth", backbone, neck, "backbone")
    argv = ["--checkpoint", str(path), "--arch", "resnet101"]
    return argv, f"{path} holds a resnet50 model, but --arch is resnet101"


def released_vit_with_another_position_index(tmp_path, released):
    backbone, neck = tagged_state(released, "vit_small")
    key = "layers.3.attn.relative_position_index"
    backbone[key] = backbone[key].T.clone()
    path = released.save(tmp_path / "vit.pth", backbone, neck, "full")
    return ["--checkpoint", str(path)], f"{key} is not BEiT's relative position index"


def released_vit_to_torchvision(tmp_path, released):
    backbone, neck = tagged_state(released, "vit_small")
    path = released.save(tmp_path / "vit.pth", backbone, neck, "backbone")
    said = (
        "torchvision has no ViT with relative position bias; export vit_small with --export-to timm"
    )
    return ["--checkpoint", str(path)], said


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
    tmp_path, capsys, released, folder_state, case
):
    argv, message = case(tmp_path, released)
    before = folder_state(tmp_path)
    assert E.main([*argv, "--export", str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err
    assert folder_state(tmp_path) == before


def test_export_to_without_export_is_refused_rather_than_ignored(tmp_path, capsys):
    assert E.main(["--init", "random", "--export-to", "timm"]) == 2
    assert "--export-to names the library of --export" in capsys.readouterr().err
