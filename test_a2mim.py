"""Invariants of A²MIM (METHOD.md §2–§6) and of its encoders (§9's analysis: test_interaction.py).

Each test name states one invariant of the method; the test fails if that invariant breaks.
Everything runs on CPU in well under a minute: tiny encoders at 32 px (4-px mask blocks → 8×8
grid), batch 1 wherever a 224-px shape is checked.
"""

import math
import re

import pytest
import torch
import torchvision

import runtime

from a2mim import (
    A2MIM,
    method_defaults,
    mixed_image,
    spectral_focal_l1_loss,
    Decoder,
    MaskToken,
    a2mim_loss,
    check_grids,
    default_mask_patch_size,
    focal_l1_loss,
    frequency_loss,
    mask_blocks,
    mask_patch_size_for,
    mean_fill,
    resize_mask,
    zero_fill,
)
from models import (
    ARCHS,
    arch_kind,
    build_encoder,
    check_img_size,
    token_site,
    token_site_stride,
)
from runtime import ConfigError
from weights import torchvision_state_dict


def count_params(module):
    return sum(p.numel() for p in module.parameters())


# Tiny, CPU-sized members of each family (32 px: CIFAR stem, 4-px ViT patches).
TINY_ENCODER_KWARGS = {"resnet18": dict(width=8), "vit_tiny": {}, "convnext_tiny": dict(width=8)}


def tiny(arch, img_size=32):
    torch.manual_seed(0)
    return build_encoder(arch, img_size, **TINY_ENCODER_KWARGS[arch])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed))


def capture_token_site(encoder, x, token_fn, token_at=None):
    """Run the encoder; return (features entering token_fn, features it returned, #calls)."""
    seen = {"calls": 0}

    def recorder(feat):
        seen["calls"] += 1
        seen["in"] = feat.detach().clone()
        out = token_fn(feat)
        seen["out"] = out.detach().clone()
        return out

    encoder(x, token_fn=recorder, token_at=token_at)
    return seen["in"], seen["out"], seen["calls"]


# ---------------------------------------------------------------------------------------------
# §2 Masking: mask_blocks
# ---------------------------------------------------------------------------------------------


def test_exactly_30_of_49_blocks_masked_for_every_image_at_224():
    mask = mask_blocks(64, 224, 32, 0.6, generator=gen(0))
    assert mask.shape == (64, 7, 7)
    assert (mask.sum(dim=(1, 2)) == 30).all()


@pytest.mark.parametrize(
    "input_size, block, ratio, grid, n_masked",
    [
        (32, 4, 0.6, 8, 39),  # ceil(0.6 · 64) = ceil(38.4)
        (192, 32, 0.75, 6, 27),  # 0.75 · 36 = 27 exactly
        (224, 16, 0.6, 14, 118),  # ceil(0.6 · 196) = ceil(117.6)
        (64, 8, 0.5, 8, 32),
        (96, 32, 0.1, 3, 1),  # ceil(0.9)
    ],
)
def test_masked_block_count_is_ceil_ratio_times_grid_squared(
    input_size, block, ratio, grid, n_masked
):
    mask = mask_blocks(16, input_size, block, ratio, generator=gen(1))
    assert mask.shape == (16, grid, grid)
    assert (mask.sum(dim=(1, 2)) == n_masked).all()


@pytest.mark.parametrize(
    "input_size, block, ratio, n_masked", [(160, 16, 0.56, 56), (320, 32, 0.07, 7)]
)
def test_masked_block_count_is_exact_when_ratio_times_grid_squared_is_an_integer(
    input_size, block, ratio, n_masked
):
    # 0.56 · 100 is 56.00000000000001 in floating point; ceil of it must still be 56, not 57.
    mask = mask_blocks(4, input_size, block, ratio, generator=gen(1))
    assert (mask.sum(dim=(1, 2)) == n_masked).all()


def test_mask_is_float_zero_one_of_shape_b_g_g():
    mask = mask_blocks(5, 224, 32, 0.6, generator=gen(0))
    assert mask.shape == (5, 7, 7)
    assert mask.dtype == torch.float32
    assert ((mask == 0) | (mask == 1)).all()


def test_masks_differ_across_images_in_a_batch():
    mask = mask_blocks(8, 224, 32, 0.6, generator=gen(0)).flatten(1)
    n_distinct = len({tuple(row.tolist()) for row in mask})
    assert n_distinct == 8  # C(49, 30) ≈ 4·10^12 subsets: a repeat would mean shared randomness


def test_same_generator_seed_gives_same_masks_and_another_seed_different_ones():
    a = mask_blocks(4, 224, 32, 0.6, generator=gen(123))
    b = mask_blocks(4, 224, 32, 0.6, generator=gen(123))
    c = mask_blocks(4, 224, 32, 0.6, generator=gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_every_block_is_masked_with_frequency_near_30_of_49():
    mask = mask_blocks(4000, 224, 32, 0.6, generator=gen(7))
    freq = mask.mean(dim=0)  # [7, 7]; binomial std ≈ 0.008 per block
    assert (freq - 30 / 49).abs().max() < 0.04


def test_mask_blocks_rejects_input_size_not_divisible_by_block_size():
    with pytest.raises(
        ValueError, match="image size 224 must be a multiple of the mask block size 30"
    ):
        mask_blocks(2, 224, 30, 0.6)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_blocks_rejects_ratio_outside_open_unit_interval(ratio):
    with pytest.raises(ValueError, match="ratio"):
        mask_blocks(2, 224, 32, ratio)


@pytest.mark.parametrize(
    "input_size, block, ratio, expect",
    [
        (224, 32, 0.999, "masks all 49 blocks of the 7×7 grid of 32-px blocks of a 224-px image"),
        (32, 4, 0.99, "masks all 64 blocks of the 8×8 grid"),
        (32, 4, 1e-9, "masks none of the 64 blocks of the 8×8 grid"),
        (32, 32, 0.5, "a 32-px mask block covers the whole 32-px image"),
    ],
)
def test_a_ratio_or_block_that_masks_every_block_or_none_is_refused_naming_grid_and_count(
    input_size, block, ratio, expect
):
    with pytest.raises(ConfigError, match=expect):
        mask_blocks(2, input_size, block, ratio)
    # and when the model is built, before any step runs
    with pytest.raises(ConfigError, match=expect):
        A2MIM(
            build_encoder("resnet18", input_size, width=4), mask_patch_size=block, mask_ratio=ratio
        )


def test_the_refusal_names_the_largest_ratio_that_works_and_it_leaves_exactly_one_block_visible():
    with pytest.raises(ConfigError, match=r"at most 48/49 \(0\.9795\)"):
        mask_blocks(2, 224, 32, 0.999)
    for ratio in (48 / 49, 0.9795):
        assert (mask_blocks(8, 224, 32, ratio, generator=gen(0)).sum(dim=(1, 2)) == 48).all()
    # ceil(0.049): one
    assert (mask_blocks(8, 224, 32, 1e-3, generator=gen(0)).sum(dim=(1, 2)) == 1).all()


def test_fractional_mask_block_size_is_refused_not_a_float_grid():
    with pytest.raises(ConfigError, match="whole number of pixels, got 4.0"):
        A2MIM(tiny("resnet18"), mask_patch_size=4.0)


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--mask-ratio", "0.999"], "masks all 64 blocks of the 8×8 grid"),
        (["--mask-patch-size", "32"], "a 32-px mask block covers the whole 32-px image"),
    ],
)
def test_train_py_refuses_a_mask_that_hides_every_block_before_writing_anything(
    tmp_path, capsys, folder_state, argv, expect
):
    import train

    out = tmp_path / "out"
    (out / "earlier_run").mkdir(parents=True)
    (out / "earlier_run" / "log.jsonl").write_text('{"step": 0}\n')
    before = folder_state(tmp_path)
    flags = "--data fake --arch resnet18 --width 4 --img-size 32 --mask-patch-size 4 --workers 0"
    argv = [*flags.split(), "--max-steps", "1", "--out-dir", str(out), *argv]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert folder_state(tmp_path) == before
    assert sorted(p.name for p in out.iterdir()) == ["earlier_run"]  # no run folder made either


# ---------------------------------------------------------------------------------------------
# §2 Filling the masked input: mean_fill (A²MIM) and zero_fill (SimMIM); resize_mask
# ---------------------------------------------------------------------------------------------


def _masks_at_three_resolutions():
    """The same 8×8 block mask for 32-px images as [B,g,g], [B,1,g,g] and pixel [B,1,H,W]."""
    mask_bgg = mask_blocks(3, 32, 4, 0.6, generator=gen(2))
    pixel = mask_bgg.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    return {"grid": mask_bgg, "grid_b1hw": mask_bgg.unsqueeze(1), "pixel": pixel}, pixel.bool()


@pytest.mark.parametrize("resolution", ["grid", "grid_b1hw", "pixel"])
def test_mean_fill_sets_masked_pixels_to_that_images_per_channel_mean(resolution):
    masks, pixel_b1hw = _masks_at_three_resolutions()
    img = randn(3, 3, 32, 32) * 2 + torch.tensor([0.5, -1.0, 3.0]).view(1, 3, 1, 1)
    out = mean_fill(img, masks[resolution])
    mean_bc11 = img.mean(dim=(2, 3), keepdim=True)  # over the whole image, masked part included
    expected = mean_bc11.expand_as(img)
    m = pixel_b1hw.expand_as(img)
    torch.testing.assert_close(out[m], expected[m], rtol=0, atol=1e-6)


@pytest.mark.parametrize("resolution", ["grid", "grid_b1hw", "pixel"])
def test_mean_fill_leaves_unmasked_pixels_bit_identical(resolution):
    masks, pixel_b1hw = _masks_at_three_resolutions()
    img = randn(3, 3, 32, 32)
    out = mean_fill(img, masks[resolution])
    keep = ~pixel_b1hw.expand_as(img)
    assert torch.equal(out[keep], img[keep])


@pytest.mark.parametrize("resolution", ["grid", "pixel"])
def test_zero_fill_sets_masked_pixels_to_zero_and_keeps_the_rest(resolution):
    masks, pixel_b1hw = _masks_at_three_resolutions()
    img = randn(3, 3, 32, 32) + 5
    out = zero_fill(img, masks[resolution])
    m = pixel_b1hw.expand_as(img)
    assert (out[m] == 0).all()
    assert torch.equal(out[~m], img[~m])


def test_resize_mask_nearest_upsampling_preserves_blocks():
    mask = mask_blocks(2, 224, 32, 0.6, generator=gen(3))
    up = resize_mask(mask, 224)
    assert up.shape == (2, 1, 224, 224)
    expected = mask.repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1)
    assert torch.equal(up, expected)
    # 7×7 → 14×14 (a ResNet's layer4 input at 224): every block covers exactly 2×2 cells
    assert torch.equal(
        resize_mask(mask, 14), mask.repeat_interleave(2, 1).repeat_interleave(2, 2).unsqueeze(1)
    )


def test_resize_mask_downsampling_masks_a_cell_when_at_least_half_of_it_is_masked():
    # 4×4 → 2×2: the four 2×2 quadrants are masked in 1, 2, 3 and 4 of their 4 cells.
    mask = torch.tensor(
        [[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.float32
    )[None]
    down = resize_mask(mask, 2)
    assert torch.equal(down, torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]]))


def test_resize_mask_rejects_upsampling_to_a_non_multiple():
    with pytest.raises(ValueError):
        resize_mask(torch.ones(1, 7, 7), 16)


# ---------------------------------------------------------------------------------------------
# §3 The mask token at an intermediate feature map
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gate", "add", "replace"])
@pytest.mark.parametrize("site", [None, "stem"])
@pytest.mark.parametrize("arch", list(TINY_ENCODER_KWARGS))
def test_mask_token_changes_only_masked_positions_of_the_token_site_features(arch, site, mode):
    encoder = tiny(arch).eval()
    _, channels, _ = token_site(encoder, site)
    token = MaskToken(channels, mode=mode)
    mask = mask_blocks(2, 32, 4, 0.6, generator=gen(4))
    with torch.no_grad():
        feat_in, feat_out, calls = capture_token_site(
            encoder, randn(2, 3, 32, 32), lambda f: token(f, mask), site
        )
    assert calls == 1
    m_b1hw = resize_mask(mask, feat_in.shape[-1]).bool()
    changed_bchw = feat_out != feat_in
    assert not changed_bchw[~m_b1hw.expand_as(changed_bchw)].any()
    assert changed_bchw.any(dim=1)[m_b1hw[:, 0]].all()  # every masked cell gets the token


@pytest.mark.parametrize("arch", list(TINY_ENCODER_KWARGS))
def test_gate_mode_with_gamma_1e6_turns_masked_features_into_the_token(arch):
    encoder = tiny(arch).eval()
    _, channels, _ = token_site(encoder)
    token = MaskToken(channels, mode="gate")
    assert torch.equal(token.gamma, torch.full((1, channels, 1, 1), 1e-6))
    mask = mask_blocks(2, 32, 4, 0.6, generator=gen(5))
    with torch.no_grad():
        feat_in, feat_out, _ = capture_token_site(
            encoder, randn(2, 3, 32, 32) * 3, lambda f: token(f, mask)
        )
    m = resize_mask(mask, feat_in.shape[-1]).bool().expand_as(feat_in)
    scale = feat_in.abs().max()
    assert scale > 0.1
    dev = (feat_out - token.token.detach()).abs()[m].max()
    assert dev <= 1e-4 * scale
    assert (feat_out - feat_in).abs()[m].max() > 1e-3  # ... and the features really were replaced


def test_add_mode_adds_the_token_to_masked_features():
    token = MaskToken(4, mode="add")
    assert token.gamma is None
    feat = randn(2, 4, 6, 6) * 3
    mask = mask_blocks(2, 6, 2, 0.5, generator=gen(6))
    out = token(feat, mask)
    m = resize_mask(mask, 6).bool().expand_as(feat)
    expected = feat + token.token.detach()
    assert torch.equal(out.detach()[m], expected[m])
    assert torch.equal(out.detach()[~m], feat[~m])


def test_replace_mode_replaces_masked_features_by_the_token():
    token = MaskToken(4, mode="replace")
    feat = randn(2, 4, 6, 6) * 3
    mask = mask_blocks(2, 6, 2, 0.5, generator=gen(6))
    out = token(feat, mask)
    m = resize_mask(mask, 6).bool().expand_as(feat)
    assert torch.equal(out.detach()[m], token.token.detach().expand_as(feat)[m])
    assert torch.equal(out.detach()[~m], feat[~m])


def test_mask_token_is_trunc_normal_with_std_002():
    torch.manual_seed(0)
    t = MaskToken(4096).token.detach()
    assert t.shape == (1, 4096, 1, 1)
    assert 0.018 < t.std().item() < 0.022
    assert t.abs().max() <= 2.0  # nn.init.trunc_normal_ default bounds


def test_convnext_mask_token_starts_at_zero_while_resnet_and_vit_start_trunc_normal():
    # As released: MIMConvNeXt's trunc_normal_init(parameter) initialises nothing (models.ConvNeXt.mask_token_std).
    tokens = {
        arch: A2MIM(tiny(arch), mask_patch_size=4).mask_token.token.detach()
        for arch in TINY_ENCODER_KWARGS
    }
    assert torch.equal(tokens["convnext_tiny"], torch.zeros_like(tokens["convnext_tiny"]))
    for arch in ("resnet18", "vit_tiny"):
        assert 0.01 < tokens[arch].std().item() < 0.03, arch


def test_a_zero_token_in_gate_mode_leaves_masked_convnext_features_near_zero_at_init():
    model = A2MIM(tiny("convnext_tiny"), mask_patch_size=4).eval()
    mask = mask_blocks(2, 32, 4, 0.6, generator=gen(5))
    with torch.no_grad():
        feat_in, feat_out, _ = capture_token_site(
            model.encoder, randn(2, 3, 32, 32) * 3, lambda f: model.mask_token(f, mask)
        )
    m = resize_mask(mask, feat_in.shape[-1]).bool().expand_as(feat_in)
    # γ·x + 0: the masked cells are ≈ 0
    assert feat_out[m].abs().max() <= 1e-6 * feat_in.abs().max()
    assert torch.equal(feat_out[~m], feat_in[~m])


def test_mask_token_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        MaskToken(8, mode="multiply")


@pytest.mark.parametrize("arch", list(TINY_ENCODER_KWARGS))
def test_gradients_reach_mask_token_and_gamma_through_the_model(arch):
    model = A2MIM(tiny(arch), mask_patch_size=4, token_mode="gate")
    out = model(randn(2, 3, 32, 32), generator=gen(0))
    out["loss"].backward()
    assert model.mask_token.token.grad is not None and model.mask_token.token.grad.abs().sum() > 0
    assert model.mask_token.gamma.grad is not None and model.mask_token.gamma.grad.abs().sum() > 0


def test_resnet50_default_token_site_is_layer4_input_with_1024_channels_at_stride_16():
    torch.manual_seed(0)
    encoder = build_encoder("resnet50", 224).eval()
    assert token_site(encoder) == ("layer4", 1024, 16)
    received = {}
    encoder.layer4.register_forward_pre_hook(lambda mod, args: received.update(x=args[0].clone()))
    with torch.no_grad():
        feat_in, feat_out, _ = capture_token_site(encoder, randn(1, 3, 224, 224), lambda f: f + 1.0)
    assert feat_in.shape == (1, 1024, 14, 14)
    assert torch.equal(received["x"], feat_out)  # what the token site returns is layer4's input


def test_vit_default_token_site_is_block0_the_patch_embedding_before_cls_and_position():
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", 224).eval()
    assert token_site(encoder) == ("block0", 192, 16)
    x = randn(1, 3, 224, 224)
    received = {}
    encoder.blocks[0].register_forward_pre_hook(
        lambda mod, args: received.update(x=args[0].clone())
    )
    with torch.no_grad():
        feat_in, feat_out, _ = capture_token_site(encoder, x, lambda f: f + 1.0)
        patches = encoder.patch_embed(x)
    assert feat_in.shape == (1, 192, 14, 14)
    assert torch.equal(feat_in, patches)
    # block 0 sees [cls, token-site output] + position embedding: the token went in before it
    expected_patches = feat_out.flatten(2).transpose(1, 2) + encoder.pos_embed[:, 1:].detach()
    torch.testing.assert_close(received["x"][:, 1:], expected_patches, rtol=0, atol=1e-6)


def test_convnext_default_token_site_is_stage4_input_at_stride_32():
    encoder = tiny("convnext_tiny", 224).eval()
    assert token_site(encoder) == ("stage4", 64, 32)
    received = {}
    encoder.features[7].register_forward_pre_hook(
        lambda mod, args: received.update(x=args[0].clone())
    )
    with torch.no_grad():
        feat_in, feat_out, _ = capture_token_site(encoder, randn(1, 3, 224, 224), lambda f: f + 1.0)
    assert feat_in.shape == (1, 64, 7, 7)
    assert torch.equal(received["x"], feat_out)


@pytest.mark.parametrize("arch", list(TINY_ENCODER_KWARGS))
def test_token_sites_declare_the_channels_and_stride_that_token_fn_sees(arch):
    encoder = tiny(arch).eval()
    x = randn(1, 3, 32, 32)
    for name, (channels, stride) in encoder.token_sites.items():
        with torch.no_grad():
            feat_in, _, calls = capture_token_site(encoder, x, lambda f: f, name)
        assert calls == 1, name
        assert feat_in.shape == (1, channels, 32 // stride, 32 // stride), name
    assert token_site(encoder, "stem")[0] == next(iter(encoder.token_sites))


# ---------------------------------------------------------------------------------------------
# §4 Decoder: back to the input's shape for every encoder
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def zero_init(monkeypatch):
    """Weights don't matter for a shape check, and drawing vit_large's 300 M random weights alone
    takes ~5 s of CPU: while this fixture is active, every random nn.init fills with zeros."""

    def zeros_(tensor, *args, **kwargs):
        with torch.no_grad():
            return tensor.zero_()

    for name in (
        "trunc_normal_",
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "uniform_",
        "normal_",
    ):
        monkeypatch.setattr(torch.nn.init, name, zeros_)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_output_has_the_input_shape_for_every_arch_at_224(arch, zero_init):
    model = A2MIM(build_encoder(arch, 224)).eval()
    with torch.no_grad():
        out = model(randn(1, 3, 224, 224), generator=gen(0))
    assert out["pred"].shape == (1, 3, 224, 224)
    assert out["mask"].shape == (1, 7, 7)
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("arch", list(TINY_ENCODER_KWARGS))
def test_decoder_output_has_the_input_shape_for_small_variants_at_32(arch):
    model = A2MIM(tiny(arch), mask_patch_size=4).eval()
    with torch.no_grad():
        out = model(randn(2, 3, 32, 32), generator=gen(0))
    assert out["pred"].shape == (2, 3, 32, 32)


def test_decoder_is_a_1x1_conv_to_3s2_channels_with_zero_bias_and_pixel_shuffle():
    torch.manual_seed(0)
    dec = Decoder(16, 4)
    assert dec.conv.weight.shape == (48, 16, 1, 1) and (dec.conv.bias == 0).all()
    feat = randn(1, 16, 2, 3)
    out = dec(feat)
    assert out.shape == (1, 3, 8, 12)
    # pixel (c, 4i+a, 4j+b) comes from conv channel c·16 + 4a + b at cell (i, j)
    conv = dec.conv(feat)
    torch.testing.assert_close(out[0, 2, 4 * 1 + 3, 4 * 2 + 1], conv[0, 2 * 16 + 4 * 3 + 1, 1, 2])
    # the whole output equals conv + PixelShuffle (the decoder computes the conv as a matmul)
    torch.testing.assert_close(out, torch.nn.PixelShuffle(4)(conv), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# §5 Losses
# ---------------------------------------------------------------------------------------------


def focal_by_formula(abs_err):
    """|e| · (2·sigmoid(0.2|e|) − 1), written out with math.exp."""
    return abs_err * (2 / (1 + math.exp(-0.2 * abs_err)) - 1)


def test_focal_l1_equals_its_formula_elementwise():
    pred, target = randn(2, 3, 5, 5, seed=1) * 4, randn(2, 3, 5, 5, seed=2)
    out = focal_l1_loss(pred, target)
    expected = [focal_by_formula(abs(e)) for e in (pred - target).flatten().tolist()]
    torch.testing.assert_close(out.flatten(), torch.tensor(expected), rtol=1e-5, atol=1e-7)


def test_focal_l1_is_below_plain_l1_for_every_nonzero_error():
    # up to |e| = 50: beyond ~90, 2·sigmoid(0.2|e|) − 1 rounds to exactly 1 in float32
    err = torch.cat(
        [torch.logspace(-4, math.log10(50), 200), -torch.logspace(-4, math.log10(50), 200)]
    )
    focal = focal_l1_loss(err, torch.zeros_like(err))
    assert (focal < err.abs()).all()
    assert (focal > 0).all()
    assert focal_l1_loss(torch.zeros(3), torch.zeros(3)).eq(0).all()


def _tiny_spatial_example():
    """B=1, 3×2×2; mask on the diagonal. Errors e = pred − target at the two masked pixels:
    ch0: 1, −2; ch1: 3, 0.5; ch2: −1, 4. Unmasked errors are 100 (must not count)."""
    target = torch.tensor(
        [[[[0.5, 1.0], [2.0, -1.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 2.0], [3.0, 4.0]]]]
    )
    err = torch.tensor(
        [
            [
                [[1.0, 100.0], [100.0, -2.0]],
                [[3.0, 100.0], [100.0, 0.5]],
                [[-1.0, 100.0], [100.0, 4.0]],
            ]
        ]
    )
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    return target + err, target, mask


@pytest.mark.parametrize("spatial", ["l1", "focal_l1"])
def test_spatial_loss_equals_hand_computed_value_on_a_tiny_tensor(spatial):
    pred, target, mask = _tiny_spatial_example()
    out = a2mim_loss(pred, target, mask, spatial=spatial, fft_weight=0.0)
    abs_errs = [1.0, 2.0, 3.0, 0.5, 1.0, 4.0]  # masked pixels only
    ell = abs_errs if spatial == "l1" else [focal_by_formula(a) for a in abs_errs]
    expected = sum(ell) / (2 + 1e-5) / 3  # Σ ℓ·M / (ΣM + 1e-5) / 3, ΣM = 2 masked pixels
    if spatial == "l1":
        assert expected == pytest.approx(11.5 / 6.00003)
    assert out["loss_spatial"].item() == pytest.approx(expected, rel=1e-6)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["loss_freq"].item() == 0.0


@pytest.mark.parametrize("spatial", ["l1", "focal_l1"])
def test_spatial_loss_ignores_unmasked_pixels_and_sees_masked_ones(spatial):
    target = randn(2, 3, 16, 16, seed=1)
    pred = randn(2, 3, 16, 16, seed=2)
    mask = mask_blocks(2, 16, 4, 0.6, generator=gen(3))
    pixel = resize_mask(mask, 16)[:, 0]
    base = a2mim_loss(pred, target, mask, spatial=spatial, fft_weight=0.0)["loss"]

    b, i, j = (pixel == 0).nonzero()[0].tolist()
    pred_unmasked = pred.clone()
    pred_unmasked[b, 1, i, j] += 10.0
    assert a2mim_loss(pred_unmasked, target, mask, spatial=spatial, fft_weight=0.0)["loss"] == base

    b, i, j = (pixel == 1).nonzero()[0].tolist()
    pred_masked = pred.clone()
    pred_masked[b, 1, i, j] += 10.0
    assert a2mim_loss(pred_masked, target, mask, spatial=spatial, fft_weight=0.0)["loss"] != base


def test_a2mim_loss_total_is_spatial_plus_lambda_times_fourier():
    pred, target = randn(2, 3, 16, 16, seed=1), randn(2, 3, 16, 16, seed=2)
    mask = mask_blocks(2, 16, 4, 0.6, generator=gen(3))
    out = a2mim_loss(pred, target, mask, fft_weight=0.5, fft_unmask_weight=1e-3)
    assert out["loss_freq"] > 0
    torch.testing.assert_close(out["loss"], out["loss_spatial"] + 0.5 * out["loss_freq"])


def test_a2mim_loss_rejects_unknown_spatial_loss():
    with pytest.raises(ValueError, match="spatial"):
        a2mim_loss(
            torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.ones(1, 1, 1), spatial="l2"
        )


def reference_frequency_loss(pred_bchw, target_bchw):
    """The straightforward way: per-image orthonormal FFT, then average the spectra over the batch."""
    f_pred = torch.fft.fft2(pred_bchw.double(), norm="ortho").mean(dim=0)
    f_target = torch.fft.fft2(target_bchw.double(), norm="ortho").mean(dim=0)
    dist = (f_pred - f_target).abs() ** 2
    weight = torch.log1p(dist.sqrt())
    weight = torch.nan_to_num(weight / weight.max(), nan=0.0).clamp(0, 1)
    return (weight * dist).mean()


def test_frequency_loss_is_zero_and_finite_for_identical_inputs():
    x = randn(2, 3, 8, 8)
    loss = frequency_loss(x, x.clone())
    assert torch.isfinite(loss) and loss.item() == 0.0
    # ... and its gradient is finite too (0/0 in the weight must not leak NaN)
    p = x.clone().requires_grad_()
    frequency_loss(p, x).backward()
    assert torch.isfinite(p.grad).all()


def test_frequency_loss_equals_hand_computed_2x2_dft():
    # d = pred − target = [[1, 2], [3, 4]]. Orthonormal 2×2 DFT: X = ½·[[a+b+c+d, a−b+c−d], [a+b−c−d, a−b−c+d]]
    # = [[5, −1], [−2, 0]], so D = [25, 1, 4, 0]; W = log(1+√D)/log 6 = [1, log2/log6, log3/log6, 0].
    target = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]])
    pred = target + torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    log6 = math.log(6)
    expected = (25 * 1 + 1 * math.log(2) / log6 + 4 * math.log(3) / log6 + 0) / 4
    assert frequency_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_frequency_loss_equals_explicit_dft_matrix_computation_with_complex_spectra():
    pred, target = randn(1, 2, 3, 4, seed=1), randn(1, 2, 3, 4, seed=2)

    def dft(n):  # orthonormal DFT matrix, F[j, k] = exp(−2πi·jk/n)/√n
        jk = torch.outer(torch.arange(n), torch.arange(n)).double()
        return torch.exp(-2j * math.pi * jk / n) / math.sqrt(n)

    d = (pred - target)[0].double().to(torch.complex128)  # [C, 3, 4]
    spec = dft(3) @ d @ dft(4).T
    dist = spec.abs() ** 2
    weight = torch.log1p(dist.sqrt()) / torch.log1p(dist.sqrt()).max()
    expected = (weight * dist).mean().item()
    assert frequency_loss(pred, target).item() == pytest.approx(expected, rel=1e-5)


def test_frequency_loss_compares_batch_averaged_spectra_like_per_image_fft_then_mean():
    pred, target = randn(4, 3, 8, 8, seed=1), randn(4, 3, 8, 8, seed=2)
    expected = reference_frequency_loss(pred, target).item()
    assert frequency_loss(pred, target).item() == pytest.approx(expected, rel=1e-5)
    # not the mean of per-image losses: averaging spectra first is the released behaviour
    per_image = (
        sum(reference_frequency_loss(pred[i : i + 1], target[i : i + 1]) for i in range(4)) / 4
    )
    assert abs(per_image.item() - expected) > 1e-3 * expected


def test_frequency_loss_passes_no_gradient_through_its_weight_matrix():
    target = randn(2, 3, 8, 8, seed=2)
    pred = randn(2, 3, 8, 8, seed=1).requires_grad_()
    (grad,) = torch.autograd.grad(frequency_loss(pred, target), pred)

    def spectrum_distance(p):
        diff = torch.fft.fft2(p.mean(0) - target.mean(0), norm="ortho")
        return diff.real**2 + diff.imag**2

    dist = spectrum_distance(pred)
    weight_const = torch.log1p(dist.sqrt()).detach()
    weight_const = weight_const / weight_const.max()  # W precomputed, a constant
    (grad_detached,) = torch.autograd.grad((weight_const * dist).mean(), pred)
    dist = spectrum_distance(pred)
    weight_live = torch.log1p(dist.sqrt())  # W with its gradient: a different loss surface
    (grad_live,) = torch.autograd.grad((weight_live / weight_live.max() * dist).mean(), pred)

    torch.testing.assert_close(grad, grad_detached, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(grad, grad_live, rtol=1e-3, atol=1e-9)


def test_frequency_loss_returns_float32_close_to_fp32_under_bf16_autocast():
    pred, target = randn(2, 3, 16, 16, seed=1), randn(2, 3, 16, 16, seed=2)
    fp32 = frequency_loss(pred, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_in = frequency_loss(pred.bfloat16(), target.bfloat16())
        fp32_in = frequency_loss(pred, target)
    assert bf16_in.dtype == torch.float32 and fp32_in.dtype == torch.float32
    torch.testing.assert_close(fp32_in, fp32, rtol=1e-6, atol=0)  # autocast changes nothing
    # bf16 inputs: only the inputs' rounding (~0.4 %) differs, the FFT itself is float32
    exact_on_rounded = frequency_loss(pred.bfloat16().float(), target.bfloat16().float())
    torch.testing.assert_close(bf16_in, exact_on_rounded, rtol=1e-5, atol=0)
    torch.testing.assert_close(bf16_in, fp32, rtol=2e-2, atol=0)


def _mixed_setup(w):
    target = randn(2, 3, 16, 16, seed=2)
    pred = randn(2, 3, 16, 16, seed=1).requires_grad_()
    mask = mask_blocks(2, 16, 4, 0.6, generator=gen(3))
    out = a2mim_loss(pred, target, mask, spatial="l1", fft_weight=0.5, fft_unmask_weight=w)
    (grad_pred,) = torch.autograd.grad(out["loss_freq"], pred)
    m_bchw = resize_mask(mask, 16).expand_as(pred).bool()
    return pred.detach(), target, m_bchw, out["loss_freq"].detach(), grad_pred


@pytest.mark.parametrize("w", [1e-3, 0.3])
def test_fourier_mixed_term_gives_unmasked_pixels_w_times_the_gradient_at_the_mixed_image(w):
    pred, target, m, loss_freq, grad_pred = _mixed_setup(w)
    # x̃ = M·x̂ + (1−M)·[w·x̂ + (1−w)·(½·x̂ + ½·x)], built by hand as a leaf
    outside = w * pred + (1 - w) * (0.5 * pred + 0.5 * target)
    mixed = torch.where(m, pred, outside).requires_grad_()
    loss_mixed = frequency_loss(mixed, target)
    (grad_mixed,) = torch.autograd.grad(loss_mixed, mixed)

    torch.testing.assert_close(loss_freq, loss_mixed.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_pred[~m], w * grad_mixed[~m], rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(grad_pred[m], grad_mixed[m], rtol=1e-4, atol=1e-10)


def test_fourier_mixed_term_with_w_0_gives_unmasked_pixels_exactly_zero_gradient():
    _, _, m, _, grad_pred = _mixed_setup(0.0)
    assert (grad_pred[~m] == 0).all()
    assert (grad_pred[m] != 0).float().mean() > 0.99


# ---------------------------------------------------------------------------------------------
# The model: A2MIM wrapper
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(TINY_ENCODER_KWARGS))
def test_a2mim_forward_returns_losses_pred_of_input_shape_and_block_mask(arch):
    model = A2MIM(tiny(arch), mask_patch_size=4)
    out = model(randn(3, 3, 32, 32), generator=gen(0))
    assert set(out) == {"loss", "loss_spatial", "loss_freq", "pred", "mask", "input"}
    assert out["pred"].shape == (3, 3, 32, 32)
    assert out["mask"].shape == (3, 8, 8)
    assert (out["mask"].sum(dim=(1, 2)) == 39).all()
    for key in ("loss", "loss_spatial", "loss_freq"):
        assert out[key].shape == () and torch.isfinite(out[key])
    lam = model.cfg["fft_weight"]
    torch.testing.assert_close(out["loss"], out["loss_spatial"] + lam * out["loss_freq"])


# (arch, METHOD.md §3/§5, released configs): spatial loss, λ, Fourier form, w, token mode, token site
RELEASED_DEFAULTS = {
    "resnet18": ("focal_l1", 0.5, "focal_frequency", 1e-3, "gate", "layer4"),  # ours: as ResNet-50
    "convnext_tiny": ("focal_l1", 0.0, "focal_frequency", 0.0, "gate", "stage4"),  # no Fourier term
    "vit_tiny": ("l1", 0.1, "focal_frequency", 0.0, "add", "block0"),
}


@pytest.mark.parametrize("arch", list(RELEASED_DEFAULTS))
def test_per_arch_defaults_equal_the_released_configs_and_are_what_forward_uses(arch):
    spatial, lam, form, w, mode, site = RELEASED_DEFAULTS[arch]
    model = A2MIM(tiny(arch), mask_patch_size=4)
    assert model.cfg["fill"] == "mean"
    assert (
        model.cfg["spatial"],
        model.cfg["fft_weight"],
        model.cfg["fft_loss"],
        model.cfg["fft_unmask_weight"],
    ) == (spatial, lam, form, w)
    assert (model.mask_token.mode, model.token_at) == (mode, site)
    # ... and the forward really uses them: recompute the loss from pred with the released values
    img = randn(2, 3, 32, 32)
    out = model(img, generator=gen(0))
    expected = a2mim_loss(
        out["pred"],
        img,
        out["mask"],
        spatial=spatial,
        fft_weight=lam,
        fft_loss=form,
        fft_unmask_weight=w,
    )
    torch.testing.assert_close(out["loss"], expected["loss"])


@pytest.mark.parametrize(
    "arch, lam, form, w",
    [
        ("resnet50", 0.5, "focal_frequency", 1e-3),
        ("resnet101", 0.1, "spectral_focal_l1", 1e-3),
        ("vit_small", 0.1, "focal_frequency", 0.0),
        ("vit_base", 0.1, "focal_frequency", 0.0),
        ("vit_large", 0.1, "focal_frequency", 0.0),
    ],
)
def test_fourier_term_per_arch_follows_the_released_table(arch, lam, form, w):
    d = method_defaults(arch)
    assert (d["fft_weight"], d["fft_loss"], d["fft_unmask_weight"]) == (lam, form, w)


@pytest.mark.parametrize(
    "arch", ["resnet152", "resnet200", "convnext_tiny", "convnext_small", "convnext_base"]
)
def test_resnet152_200_and_every_convnext_have_no_fourier_term_by_default(arch):
    assert method_defaults(arch)["fft_weight"] == 0.0
    # the paper-text variant has one
    assert method_defaults(arch, loss_recipe="paper")["fft_weight"] > 0


def test_resnet152_loss_has_no_fourier_part():
    torch.manual_seed(0)
    model = A2MIM(build_encoder("resnet152", 32, width=4), mask_patch_size=4)
    out = model(randn(2, 3, 32, 32), generator=gen(0))
    assert out["loss_freq"].item() == 0.0 and torch.equal(out["loss"], out["loss_spatial"])


def test_paper_loss_recipe_puts_the_focal_frequency_term_on_every_cnn():
    for arch in ("resnet18", "resnet101", "resnet200", "convnext_base"):
        d = method_defaults(arch, loss_recipe="paper")
        released_r50 = (0.5, "focal_frequency", 1e-3)
        assert (d["fft_weight"], d["fft_loss"], d["fft_unmask_weight"]) == released_r50, arch


def test_resnet101_model_uses_the_spectral_focal_l1_form_on_the_mixed_image():
    torch.manual_seed(0)
    model = A2MIM(build_encoder("resnet101", 32, width=4), mask_patch_size=4)
    img = randn(2, 3, 32, 32)
    out = model(img, generator=gen(0))
    mixed = mixed_image(out["pred"], img, resize_mask(out["mask"], 32), 1e-3)
    torch.testing.assert_close(out["loss_freq"], spectral_focal_l1_loss(mixed, img))
    torch.testing.assert_close(out["loss"], out["loss_spatial"] + 0.1 * out["loss_freq"])


def test_spectral_focal_l1_is_the_per_image_focal_l1_of_the_spectrum_modulus_without_batch_averaging():
    pred, target = randn(3, 3, 8, 8, seed=1), randn(3, 3, 8, 8, seed=2)
    per_image = []
    for b in range(3):  # one image at a time: no batch averaging of spectra
        d = (torch.fft.fft2(pred[b], norm="ortho") - torch.fft.fft2(target[b], norm="ortho")).abs()
        per_image.append(d * (2 * torch.sigmoid(0.2 * d) - 1))
    torch.testing.assert_close(spectral_focal_l1_loss(pred, target), torch.stack(per_image).mean())
    # batch-averaging first (the focal-frequency form) would give a different number
    assert not torch.allclose(
        spectral_focal_l1_loss(pred, target),
        spectral_focal_l1_loss(pred.mean(0, keepdim=True), target.mean(0, keepdim=True)),
    )


@pytest.mark.parametrize("method, fill", [("a2mim", mean_fill), ("simmim", lambda img, mask: img)])
@pytest.mark.parametrize("arch", list(TINY_ENCODER_KWARGS))
def test_encoder_input_is_mean_filled_for_a2mim_and_equals_the_image_for_simmim(arch, method, fill):
    model = A2MIM(tiny(arch), method=method, mask_patch_size=4)
    seen = {}
    model.encoder.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0].clone()))
    img = randn(2, 3, 32, 32) + 1.0
    out = model(img, generator=gen(0))
    assert torch.equal(seen["x"], fill(img, out["mask"]))
    # what forward returns as `input` is what the encoder saw
    assert torch.equal(out["input"], seen["x"])


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_simmim_token_replaces_the_stem_output_in_masked_cells(arch):
    model = A2MIM(tiny(arch), method="simmim", mask_patch_size=4)
    img = randn(2, 3, 32, 32)
    mask = mask_blocks(2, 32, 4, 0.6, generator=gen(1))
    before, after, calls = capture_token_site(
        model.encoder, img, lambda f: model.mask_token(f, mask), "stem"
    )
    m = resize_mask(mask, after.shape[-1]).bool().expand_as(after)
    token = model.mask_token.token.expand_as(after)
    assert calls == 1 and torch.equal(after[m], token[m]) and torch.equal(after[~m], before[~m])


def test_reconstruction_target_is_the_original_image_not_the_filled_one():
    model = A2MIM(tiny("resnet18"), mask_patch_size=4)
    img = randn(2, 3, 32, 32) + 1.0
    out = model(img, generator=gen(0))
    pred = out["pred"].detach()
    on_original = a2mim_loss(pred, img, out["mask"], fft_weight=0.5, fft_unmask_weight=1e-3)
    on_filled = a2mim_loss(
        pred, mean_fill(img, out["mask"]), out["mask"], fft_weight=0.5, fft_unmask_weight=1e-3
    )
    torch.testing.assert_close(out["loss"].detach(), on_original["loss"])
    assert not torch.allclose(out["loss"].detach(), on_filled["loss"])


@pytest.mark.parametrize("arch", list(TINY_ENCODER_KWARGS))
def test_simmim_leaves_the_input_untouched_and_uses_stem_token_replace_l1_and_no_fourier_term(arch):
    encoder = tiny(arch)
    model = A2MIM(encoder, method="simmim", mask_patch_size=4)
    assert model.cfg["fill"] == "none" and model.cfg["spatial"] == "l1"
    assert model.token_at == next(iter(encoder.token_sites))  # the stem
    assert model.mask_token.mode == "replace"
    img = randn(2, 3, 32, 32)
    out = model(img, generator=gen(0))
    assert out["loss_freq"].item() == 0.0
    expected = a2mim_loss(out["pred"], img, out["mask"], spatial="l1", fft_weight=0.0)["loss"]
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize("arch", list(TINY_ENCODER_KWARGS))
def test_a2mim_losses_are_float32_and_finite_under_bf16_autocast(arch):
    model = A2MIM(tiny(arch), mask_patch_size=4)
    img = randn(2, 3, 32, 32)
    mask = mask_blocks(2, 32, 4, 0.6, generator=gen(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(img, mask)
    for key in ("loss", "loss_spatial", "loss_freq"):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]), key
    out["loss"].backward()
    assert torch.isfinite(model.mask_token.token.grad).all()


def test_a2mim_masks_are_reproducible_with_a_generator_and_a_given_mask_is_used():
    model = A2MIM(tiny("vit_tiny"), mask_patch_size=4).eval()
    img = randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(img, generator=gen(9)), model(img, generator=gen(9))
        mask = mask_blocks(2, 32, 4, 0.6, generator=gen(10))
        c = model(img, mask)
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["loss"], b["loss"])
    assert c["mask"] is mask


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="mae"), "method"),
        (dict(fft_loss="l2_spectrum"), "Fourier"),
        (dict(fft_weight=-1.0), "fft_weight"),
        (dict(mask_ratio=1.0), "ratio"),
        (dict(fill="noise"), "fill"),
        (dict(token_mode="multiply"), "mode"),
        (dict(token_at="layer9"), "site"),
    ],
)
def test_unknown_method_or_option_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        A2MIM(tiny("resnet18"), mask_patch_size=4, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fft_weight=float("nan")),
        dict(fft_weight=float("inf")),
        dict(fft_unmask_weight=float("nan")),
        dict(fft_unmask_weight=1.5),
    ],
)
def test_non_finite_or_out_of_range_fourier_weights_are_refused(kwargs):
    with pytest.raises(ConfigError, match="need a finite fft_weight"):
        A2MIM(tiny("resnet18"), mask_patch_size=4, **kwargs)


@pytest.mark.parametrize(
    "arch, kwargs, expect",
    [
        (
            "convnext_tiny",
            dict(fft_unmask_weight=0.5),
            "fft_unmask_weight=0.5 has no effect: the Fourier term is off by "
            "default for a2mim convnext_tiny",
        ),
        (
            "resnet18",
            dict(fft_weight=0.0, fft_loss="spectral_focal_l1"),
            "fft_loss='spectral_focal_l1' has no effect",
        ),
        (
            "resnet18",
            dict(method="simmim", fft_unmask_weight=0.1),
            "fft_unmask_weight=0.1 has no effect",
        ),
    ],
)
def test_a_fourier_option_given_while_the_fourier_term_is_off_is_refused(arch, kwargs, expect):
    with pytest.raises(ConfigError, match=expect):
        A2MIM(tiny(arch), mask_patch_size=4, **kwargs)


def test_a_fourier_option_equal_to_its_default_is_accepted_with_the_term_off():
    # ResNet's own w
    model = A2MIM(tiny("resnet18"), mask_patch_size=4, fft_weight=0.0, fft_unmask_weight=1e-3)
    assert model.cfg["fft_weight"] == 0.0
    # λ > 0: takes effect
    model = A2MIM(tiny("resnet18"), mask_patch_size=4, fft_weight=0.1, fft_unmask_weight=0.5)
    assert model.cfg["fft_unmask_weight"] == 0.5


@pytest.mark.parametrize("site", ["", 0])
def test_an_empty_or_zero_token_site_is_refused_not_taken_for_the_default(site):
    with pytest.raises(ConfigError, match="unknown token site"):
        A2MIM(tiny("resnet18"), mask_patch_size=4, token_at=site)


@pytest.mark.parametrize(
    "arch, site", [("resnet18", "layer5"), ("vit_tiny", "block6"), ("convnext_tiny", "stage5")]
)
def test_a_token_site_after_the_last_stage_is_refused_naming_the_sites(arch, site):
    with pytest.raises(ConfigError, match=f"unknown token site '{site}'; choose 'stem' or one of"):
        A2MIM(tiny(arch), mask_patch_size=4, token_at=site)


def test_method_defaults_refuses_an_unknown_arch_naming_the_choices():
    with pytest.raises(ConfigError, match="arch must be one of 'resnet18'"):
        method_defaults("resnet9")


def test_unknown_spatial_loss_is_refused_when_the_model_is_built():
    with pytest.raises(ConfigError, match="spatial"):
        A2MIM(tiny("resnet18"), mask_patch_size=4, spatial="l2")


def test_a_misspelt_option_is_a_type_error_not_silently_ignored():
    with pytest.raises(TypeError, match="fft_wieght"):
        A2MIM(tiny("resnet18"), mask_patch_size=4, fft_wieght=0.5)


@pytest.mark.parametrize("img_size, block", [(48, 6), (32, 3)])
def test_mask_grid_that_does_not_map_onto_the_token_site_is_refused_at_build_time(img_size, block):
    # 48 px, 6-px blocks: an 8×8 mask grid against a 12×12 token site (stride 4) — neither divides.
    with pytest.raises(ConfigError, match="mask"):
        A2MIM(build_encoder("resnet18", img_size, width=4), mask_patch_size=block)


# ---------------------------------------------------------------------------------------------
# Defaults that always fit: the mask block follows the encoder's token site (§2, §3)
# ---------------------------------------------------------------------------------------------

# Every multiple of 4 from 32 to 256 px, and a few sizes off every stride.
SWEEP = [*range(32, 257, 4), 33, 50, 99, 250]
# The smallest member of each family with its real token sites (width changes no stride).
FAMILIES = {
    "resnet18": dict(width=4),
    "resnet50": dict(width=4),
    "convnext_tiny": dict(width=8),
    "vit_tiny": {},
}
# The encoder's own refusal: its stride rule and the accepted sizes around the one given.
TAKES = re.compile(
    r"takes multiples of \d+( up to 64 px and of \d+ above)? \((…, )?\d+(, \d+)*, …\)$"
)


# The tiny member of each kind of encoder.
TINY_OF_KIND = {"resnet": "resnet18", "convnext": "convnext_tiny", "vit": "vit_tiny"}


def site_names(arch):
    """Every token site of `arch`, from a tiny member of its kind (all ViT blocks share one stride)."""
    return [None, "stem", *tiny(TINY_OF_KIND[arch_kind(arch)]).token_sites]


def test_released_configs_keep_32_px_blocks_at_224_and_the_small_recipe_its_4_px_at_32():
    for arch in ARCHS:
        for method in ("a2mim", "simmim"):
            assert mask_patch_size_for(arch, 224, method=method) == 32
            assert mask_patch_size_for(arch, 32, method=method) == 4


def test_the_default_block_is_img_size_over_8_or_32_px_from_192_wherever_that_block_fits():
    # So no run that the earlier default could build changes its mask.
    for img_size in range(1, 321):
        preferred = 32 if img_size >= 192 else max(1, img_size // 8)
        for stride in (s for s in (1, 2, 4, 8, 16, 32) if img_size % s == 0):
            try:
                check_grids(img_size, preferred, stride, 0.6)
            except ConfigError:
                continue
            assert default_mask_patch_size(img_size, stride) == preferred


@pytest.mark.parametrize("img_size", [96, 160])
def test_resnet50_vit_base_and_convnext_tiny_build_at_96_and_160_px_with_16_px_blocks(img_size):
    # The earlier img_size / 8 (12, 20 px) mapped onto none of their 6×6 / 10×10 or 3×3 / 5×5 token sites.
    for arch in ("resnet50", "vit_base", "convnext_tiny"):
        assert mask_patch_size_for(arch, img_size) == 16
    # Built narrow: width changes no stride (vit_tiny has vit_base's 16-px patches above 64 px).
    for arch, kw in (
        ("resnet50", dict(width=4)),
        ("vit_tiny", {}),
        ("convnext_tiny", dict(width=8)),
    ):
        assert A2MIM(build_encoder(arch, img_size, **kw)).mask_patch_size == 16


def test_every_size_an_encoder_takes_gets_a_default_block_that_fits_each_of_its_token_sites():
    pairs = set()  # (image size, site stride): the default depends on nothing else
    for arch in ARCHS:
        sites = site_names(arch)
        for img_size in range(1, 321):
            try:
                check_img_size(arch, img_size)
            except ConfigError as e:
                assert TAKES.search(str(e)), e
                continue
            pairs |= {(img_size, token_site_stride(arch, img_size, site)) for site in sites}
    for img_size, stride in sorted(pairs):
        check_grids(img_size, default_mask_patch_size(img_size, stride), stride, 0.6)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_every_image_size_trains_a_step_with_the_default_mask_or_the_encoder_names_the_sizes_it_takes(
    arch,
):
    trained, refused = [], []
    for img_size in SWEEP:
        try:
            encoder = build_encoder(arch, img_size, **FAMILIES[arch])
        except ConfigError as e:  # the encoder's own size rule, never the mask
            assert TAKES.search(str(e)) and "mask" not in str(e), e
            refused.append(img_size)
            continue
        torch.manual_seed(0)
        model = A2MIM(encoder).train()  # the default mask block
        out = model(randn(2, 3, img_size, img_size), generator=gen(img_size))
        out["loss"].backward()
        assert out["pred"].shape == (2, 3, img_size, img_size) and torch.isfinite(out["loss"])
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        trained.append(img_size)
    assert {32, 64, 96, 128, 160, 192, 224, 256} <= set(trained) and {33, 50, 99, 250} <= set(
        refused
    )


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_token_site_stride_known_without_building_is_the_built_encoders(arch):
    for img_size, kw in (
        (32, {}),
        (64, {}),
        (96, {}),
        (224, {}),
        (96, dict(small_stem=True)),
        (64, dict(patch_size=8)),
    ):
        encoder = build_encoder(arch, img_size, **FAMILIES[arch], **kw)
        for site in [None, "stem", *encoder.token_sites]:
            assert token_site_stride(arch, img_size, site, **kw) == token_site(encoder, site)[2]


@pytest.mark.parametrize(
    "arch, img_size, kw, expect",
    [
        (
            "vit_base",
            100,
            {},
            "image size 100 is not divisible by the vit_base patch size 16: vit_base takes multiples of 4 "
            "up to 64 px and of 16 above (…, 80, 96, 112, 128, …)",
        ),
        (
            "resnet50",
            70,
            {},
            "the resnet50 output stride 32: resnet50 takes multiples of 8 up to 64 px and of 32 above "
            "(…, 56, 64, 96, 128, …)",
        ),
        (
            "convnext_tiny",
            4,
            {},
            "convnext_tiny takes multiples of 8 up to 64 px and of 32 above (8, 16, …)",
        ),
        (
            "vit_base",
            100,
            dict(patch_size=12),
            "vit_base takes multiples of 12 (…, 84, 96, 108, 120, …)",
        ),
        ("resnet18", 40, dict(small_stem=False), "resnet18 takes multiples of 32 (32, 64, 96, …)"),
    ],
)
def test_a_size_the_encoder_refuses_is_one_sentence_naming_the_sizes_it_takes(
    arch, img_size, kw, expect
):
    with pytest.raises(ConfigError) as info:
        build_encoder(arch, img_size, **kw)
    assert expect in str(info.value) and len(str(info.value).splitlines()) == 1
    if not kw:  # asking for the default mask block gets the encoder's sentence too, not a mask one
        with pytest.raises(ConfigError, match=re.escape(expect)):
            mask_patch_size_for(arch, img_size)


def test_the_default_block_honours_the_mask_ratio_with_a_finer_grid():
    # 0.99 of the 8×8 grid of 8-px blocks is all 64 of them; of the 16×16 grid of 4-px blocks, 254 of 256.
    with pytest.raises(ConfigError, match="masks all 64 blocks"):
        check_grids(64, 8, 4, 0.99)
    assert default_mask_patch_size(64, 4, 0.99) == 4
    assert A2MIM(tiny("resnet18", 64), mask_ratio=0.99).mask_patch_size == 4
    with pytest.raises(ConfigError, match="masks all 64 blocks of the 8×8 grid of 1-px blocks"):
        default_mask_patch_size(8, 4, 0.999)  # no grid of an 8-px image leaves a block visible


# ---------------------------------------------------------------------------------------------
# Encoders (models.py)
# ---------------------------------------------------------------------------------------------


def _randomise_norms_(module, seed=0):
    """Move BN / LayerScale away from their init (zero-γ residual branches, 1e-6 layer scale), so
    that comparing two networks actually exercises every residual branch."""
    g = gen(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if "layer_scale" in name or name.endswith(("bn3.weight", "bn2.weight")):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_weights_load_strictly_into_torchvision_and_give_the_same_features(arch):
    torch.manual_seed(0)
    encoder = build_encoder(arch, 224).eval()
    _randomise_norms_(encoder)
    tv = getattr(torchvision.models, arch)()
    tv.load_state_dict(torchvision_state_dict(encoder), strict=True)
    tv.eval()
    x = randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = encoder(x)
        theirs = torch.nn.Sequential(*list(tv.children())[:-2])(x)  # up to layer4
    assert theirs.shape == (1, encoder.out_channels, 2, 2)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_convnext_tiny_weights_load_strictly_into_torchvision_and_give_the_same_features():
    torch.manual_seed(0)
    encoder = build_encoder("convnext_tiny", 224).eval()
    _randomise_norms_(encoder)
    tv = torchvision.models.convnext_tiny()
    tv.load_state_dict(torchvision_state_dict(encoder), strict=True)
    tv.eval()
    x = randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = encoder(x), tv.features(x)
        pooled_ours, pooled_theirs = (
            encoder.norm(theirs.mean((2, 3), keepdim=True)),
            tv.classifier[0](tv.avgpool(theirs)),
        )
    assert theirs.shape == (1, 768, 2, 2)
    # same stages, then our final norm
    torch.testing.assert_close(ours, encoder.norm(theirs), rtol=0, atol=0)
    # the final norm became classifier.0
    torch.testing.assert_close(pooled_ours, pooled_theirs, rtol=0, atol=0)


def test_resnet50_encoder_has_23_5M_parameters():
    n = count_params(build_encoder("resnet50", 224))  # 23,508,032 = torchvision's 25.56 M minus fc
    assert abs(n - 23.5e6) / 23.5e6 < 0.01


def test_vit_base_has_86M_parameters():
    n = count_params(build_encoder("vit_base", 224))  # 85,922,496 (relative position bias included)
    assert abs(n - 86e6) / 86e6 < 0.02


def test_vit_small_is_the_papers_8_layer_768_wide_model_of_48_8M_with_its_classifier_head():
    encoder = build_encoder("vit_small", 224)
    assert (len(encoder.blocks), encoder.out_channels, encoder.blocks[0].heads) == (8, 768, 8)
    assert encoder.blocks[0].mlp[0].out_features == 2304
    # The paper's 48.8 M counts the 1000-class fine-tuning head (768·1000 + 1000): 48,831,976.
    # The encoder alone is 48,062,976.
    n = count_params(encoder) + 768 * 1000 + 1000
    assert abs(n - 48.8e6) / 48.8e6 < 0.005


def test_resnet_residual_branches_start_as_identity_with_zero_init_last_bn():
    for arch, bn in (("resnet18", "bn2"), ("resnet50", "bn3")):
        encoder = build_encoder(arch, 32, width=8)
        blocks = [b for k in range(1, 5) for b in getattr(encoder, f"layer{k}")]
        assert blocks and all((getattr(b, bn).weight == 0).all() for b in blocks), arch


def test_vit_blocks_have_layerscale_0_1_and_a_zero_initialised_relative_position_bias():
    encoder = tiny("vit_tiny")
    for block in encoder.blocks:
        assert (block.gamma_1 == 0.1).all() and (block.gamma_2 == 0.1).all()
        assert block.rel_pos_bias().shape == (3, 1 + 64, 1 + 64)  # [heads, 1+N, 1+N] at 8×8 patches
        assert (block.rel_pos_bias.table == 0).all()


def test_vit_attention_has_q_and_v_biases_but_no_k_bias():
    block = tiny("vit_tiny").blocks[0]
    assert block.qkv.bias is None and block.q_bias.shape == block.v_bias.shape == (192,)
    assert not any(
        ".k_bias" in n or n.endswith("qkv.bias") for n, _ in tiny("vit_tiny").named_parameters()
    )
    # The q bias reaches the queries and the v bias the values: moving them changes the output.
    x = randn(1, 65, 192)
    base = block.attention(x)
    with torch.no_grad():
        block.v_bias.fill_(0.5)
    assert not torch.allclose(block.attention(x), base)


def test_vit_patch_embedding_keeps_pytorchs_default_conv_init():
    # PyTorch's default (kaiming-uniform, a=√5) bounds the weights by 1/√fan_in; the xavier init
    # used before reaches √(6/(fan_in + fan_out)), which is larger here (fan_in 48, fan_out 192).
    w = tiny("vit_tiny").patch_embed.weight
    fan_in = w[0].numel()
    assert w.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
    assert w.abs().max() > 0.95 / math.sqrt(fan_in)


def test_convnext_encoder_output_is_the_layer_normalised_last_stage_map():
    encoder = tiny("convnext_tiny").eval()
    seen = {}
    encoder.features[-1].register_forward_hook(lambda mod, args, out: seen.update(x=out))
    with torch.no_grad():
        out = encoder(randn(2, 3, 32, 32))
        ref = encoder.norm(seen["x"])
    torch.testing.assert_close(out, ref)
    # with the LayerNorm's init (weight 1, bias 0): zero mean, unit variance over channels per cell
    torch.testing.assert_close(out.mean(1), torch.zeros_like(out.mean(1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out.var(1, unbiased=False), torch.ones_like(out.mean(1)), atol=1e-3, rtol=0
    )


def test_build_encoder_rejects_unknown_arch_listing_the_choices():
    with pytest.raises(ValueError, match="resnet5") as info:
        build_encoder("resnet5", 224)
    for arch in ARCHS:
        assert arch in str(info.value)


@pytest.mark.parametrize(
    "arch, img_size", [("resnet18", 100), ("convnext_tiny", 200), ("vit_tiny", 100)]
)
def test_build_encoder_rejects_image_size_not_divisible_by_the_stride(arch, img_size):
    with pytest.raises(ValueError, match="divisible"):
        build_encoder(arch, img_size, **TINY_ENCODER_KWARGS[arch])


# ---------------------------------------------------------------------------------------------
# Training signal: the whole pipeline learns
# ---------------------------------------------------------------------------------------------


def smooth_images(n, seed):
    """Learnable content: a random 4×4 pattern, bilinearly upsampled, plus a per-image colour."""
    g = gen(seed)
    low_bchw = torch.randn(n, 3, 4, 4, generator=g)
    colour_bc11 = torch.randn(n, 3, 1, 1, generator=g)
    return (
        torch.nn.functional.interpolate(low_bchw, size=32, mode="bilinear", align_corners=False)
        + colour_bc11
    )


@pytest.mark.parametrize("arch", list(TINY_ENCODER_KWARGS))
def test_a_few_adamw_steps_lower_the_a2mim_loss_on_a_fixed_batch(arch):
    # Across seeds 0-3 the final/initial ratio was 0.36-0.54 for all three families (lr 3e-3).
    model = A2MIM(tiny(arch), mask_patch_size=4).train()
    img = smooth_images(8, seed=11)
    mask = mask_blocks(8, 32, 4, 0.6, generator=gen(12))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    losses = []
    for _ in range(25):
        loss = model(img, mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.75 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# §6 The lr schedule (runtime.lr_at): the released mmcv hooks, warm-up included
# ---------------------------------------------------------------------------------------------


def test_warmup_and_schedule_equal_the_released_mmcv_hooks_at_every_printed_step():
    # Numbers of mmcv 1.7 + OpenMixup run side by side at 100 iterations per epoch, 10 warm-up epochs.
    # ResNet-50, 300 ep (StepFixCosineAnnealing: its linear warm-up ignores warmup_ratio, so lr 0 at step 0).
    r50 = dict(lr=1.2e-3, total_steps=30000, warmup_steps=1000, min_lr=1e-5)
    for step, lr in ((1, 1.1965e-6), (500, 5.9956e-4), (999, 1.1988e-3), (1000, 1.2e-3)):
        assert runtime.lr_at(step, **r50) == pytest.approx(lr, rel=1e-4), step
    assert runtime.lr_at(0, **r50) == 0.0
    # ViT-B, 800 ep, ×0.1 at epoch 700 (mmcv's StepLrUpdaterHook, warmup_ratio 5e-7 · 2048 / 512).
    vit = dict(
        lr=4e-4,
        total_steps=80000,
        warmup_steps=1000,
        schedule="step",
        step_at=[70000],
        warmup_ratio=2e-6,
    )
    for step, lr in (
        (0, 8e-10),
        (1, 4.008e-7),
        (500, 2.0000e-4),
        (1000, 4e-4),
        (69999, 4e-4),
        (70000, 4e-5),
    ):
        assert runtime.lr_at(step, **vit) == pytest.approx(lr, rel=1e-4), step


def test_warmup_scales_each_groups_own_cosine_value_towards_the_same_absolute_min_lr():
    # mmcv warms each group up from its own regular lr (peak × lr_mult annealed to the absolute min_lr).
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.AdamW(
        [{"params": [p], "lr_scale": s} for p, s in zip(params, (1.0, 0.1), strict=True)]
    )
    sched = dict(lr=1.2e-3, total_steps=30000, warmup_steps=1000, min_lr=1e-5)
    runtime.set_scheduled_lr(opt, 500, **sched)
    regular = [
        1e-5 + (p - 1e-5) * 0.5 * (1 + math.cos(math.pi * 500 / 29000)) for p in (1.2e-3, 1.2e-4)
    ]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [r * 0.5 for r in regular], rel=1e-12
    )
