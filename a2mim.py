"""A²MIM: Architecture-Agnostic Masked Image Modeling (Li et al., ICML 2023), in the paper's order.

    §2 masking       mask_blocks, mean_fill (A²MIM), zero_fill (ablation), resize_mask;
                     default_mask_patch_size — the block that fits the encoder's token site
    §3 mask token    MaskToken — written into an intermediate feature map, not into the input
    §4 decoder       Decoder — 1×1 conv + PixelShuffle back to pixels
    §5 losses        focal_l1_loss, mixed_image, frequency_loss, spectral_focal_l1_loss, a2mim_loss
       the model     A2MIM — encoder + token + decoder + loss; `method="simmim"` for the baseline;
                     method_defaults — the released configs' options for each arch;
                     resolve_options — those defaults with the options given in their place

§9's analysis of trained models (the multi-order interactions behind the idea) is interaction.py.

Section numbers refer to METHOD.md, which describes the paper *and* the released OpenMixup code;
where the two differ we follow the code and say so. Tensor names carry their layout:
`img_bchw`, `mask_bgg` (block grid), `mask_b1hw` (pixel or feature resolution).
"""

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import repeat

from models import ARCHS, arch_family, token_site, token_site_stride
from runtime import ConfigError


def _check_choice(what, value, choices):
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}")


# --- §2 Masking on the input side
def mask_count(input_size, mask_patch_size, mask_ratio):
    """(g, k): the g×g block grid of an image and the k = ceil(ratio · g²) blocks masked in each (§2).
    ConfigError unless the blocks tile the image and 1 ≤ k ≤ g² − 1: an image with every block
    masked has nothing left to reconstruct from, one with none has nothing to learn."""
    if not isinstance(mask_patch_size, numbers.Integral):
        raise ConfigError(
            f"the mask block size must be a whole number of pixels, got {mask_patch_size!r}"
        )
    if mask_patch_size < 1 or input_size % mask_patch_size:
        raise ConfigError(
            f"image size {input_size} must be a multiple of the mask block size {mask_patch_size}"
        )
    if not 0 < mask_ratio < 1:
        raise ConfigError(f"mask ratio must be in (0, 1), got {mask_ratio}")
    g = input_size // mask_patch_size
    n = g * g
    k = math.ceil(round(mask_ratio * n, 6))  # round first: 0.56·100 is 56.000000000000007 in floats
    grid = f"the {g}×{g} grid of {mask_patch_size}-px blocks of a {input_size}-px image"
    if n == 1:
        raise ConfigError(
            f"a {mask_patch_size}-px mask block covers the whole {input_size}-px image, so no mask "
            "ratio leaves one block masked and another visible; use a smaller block that divides "
            f"{input_size}"
        )
    if k == n:
        raise ConfigError(
            f"mask ratio {mask_ratio} masks all {n} blocks of {grid} (ceil(ratio · {n}) = {n}), but at "
            f"least one must stay visible; use a ratio of at most {n - 1}/{n} "
            f"({math.floor((n - 1) / n * 1e4) / 1e4:g})"
        )
    if k == 0:
        raise ConfigError(
            f"mask ratio {mask_ratio} masks none of the {n} blocks of {grid}, but at least one must be "
            f"masked; use a ratio of at least 1/{n} ({math.ceil(1 / n * 1e4) / 1e4:g})"
        )
    return g, k


def mask_blocks(
    batch_size, input_size, mask_patch_size=32, mask_ratio=0.6, *, device=None, generator=None
):
    """Random block masks, `ceil(ratio · g²)` masked blocks per image (§2, `mask_count`).
    Returns mask_bgg: float [B, g, g] of 0/1 with g = input_size // mask_patch_size; 1 = masked.
    At 224 px with 32-px blocks: g = 7, exactly 30 of 49 blocks masked (61.2 %), as released.
    Drawn on `device` in one shot: ranking i.i.d. uniforms gives a uniformly random subset
    of size k per row, with no Python loop over images."""
    g, k = mask_count(input_size, mask_patch_size, mask_ratio)
    noise_bl = torch.rand(batch_size, g * g, device=device, generator=generator)
    rank_bl = noise_bl.argsort(dim=1).argsort(dim=1)  # rank of each block's noise in its row
    return (rank_bl < k).float().view(batch_size, g, g)


def resize_mask(mask, size):
    """Mask at any grid → [B, 1, size, size] float.
    Finer targets (pixels, stride-16 features of a 7×7 mask) repeat each block over whole cells.
    A coarser target (e.g. 4-px blocks but a stride-8 token site) counts a cell as masked when at
    least half of it is masked."""
    mask_b1gg = mask if mask.ndim == 4 else mask.unsqueeze(1)
    g = mask_b1gg.shape[-1]
    if size == g:
        return mask_b1gg
    if size > g:
        if size % g:
            raise ConfigError(
                f"a {g}×{g} mask cannot be upsampled to {size}×{size} (not a multiple)"
            )
        return repeat(mask_b1gg, "b 1 h w -> b 1 (h r1) (w r2)", r1=size // g, r2=size // g)
    return (F.adaptive_avg_pool2d(mask_b1gg, size) >= 0.5).to(mask_b1gg.dtype)


def mean_fill(img_bchw, mask):
    """Replace masked blocks by the image's own per-channel mean colour (§2, A²MIM).
    The mean is over the whole (normalised) image. Since normalisation is affine per channel,
    this equals "mean RGB, then normalise" — what the released code computes.
    `mask` [B, g, g] or [B, 1, g, g] at any grid that divides the image."""
    mask_b1hw = resize_mask(mask, img_bchw.shape[-1]).to(img_bchw.dtype)
    mean_bc11 = img_bchw.mean(dim=(2, 3), keepdim=True)
    return torch.lerp(img_bchw, mean_bc11.expand_as(img_bchw), mask_b1hw)


def zero_fill(img_bchw, mask):
    """Masked blocks set to 0 (the dataset mean after normalisation): an ablation only. Released
    SimMIM leaves the input untouched and masks in feature space (fill "none", §2)."""
    mask_b1hw = resize_mask(mask, img_bchw.shape[-1]).to(img_bchw.dtype)
    return img_bchw * (1 - mask_b1hw)


def no_fill(img_bchw, mask):
    """The input untouched: released SimMIM masks in feature space only (fill "none", §2)."""
    return img_bchw


FILLS = {"mean": mean_fill, "zero": zero_fill, "none": no_fill}


# --- §3 The mask token, written into an intermediate feature map
class MaskToken(nn.Module):
    """A learnable token T [1, C, 1, 1] written into the masked cells of a feature map (§3).
    mode="gate"    (A²MIM, released ResNet/ConvNeXt configs): x ← x·(1−M) + γ·x·M, then x ← x + T·M,
                   with a per-channel γ initialised to 1e-6, so training starts from "replace
                   by T" and may move towards a residual add. The paper text only says "add".
    mode="add"     (A²MIM ViT): x ← x + T·M.
    mode="replace" (SimMIM): x ← x·(1−M) + T·M.
    T is trunc-normal with std `init_std` (0.02, as the released ResNet and ViT), or zero at init_std 0."""

    def __init__(self, channels, *, mode="gate", gamma_init=1e-6, init_std=0.02):
        super().__init__()
        _check_choice("mask token mode", mode, ("gate", "add", "replace"))
        self.mode = mode
        self.token = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # init_std 0: T starts at zero (the released ConvNeXt, see models.ConvNeXt.mask_token_std).
        if init_std > 0:
            nn.init.trunc_normal_(self.token, std=init_std)
        self.gamma = None
        if mode == "gate":
            self.gamma = nn.Parameter(torch.full((1, channels, 1, 1), gamma_init))

    def forward(self, feat_bchw, mask):
        """feat_bchw [B, C, h, w]; mask at any grid (resized to h×w). Returns [B, C, h, w]."""
        # The block mask at this feature map's resolution; the token in the map's dtype (autocast).
        m_b1hw = resize_mask(mask, feat_bchw.shape[-1]).to(feat_bchw.dtype)
        token = self.token.to(feat_bchw.dtype)
        # "add": the masked cells keep their features and gain T (A²MIM's ViT).
        if self.mode == "add":
            return feat_bchw + token * m_b1hw
        # "replace": the masked cells become T (SimMIM).
        if self.mode == "replace":
            return torch.lerp(feat_bchw, token.expand_as(feat_bchw), m_b1hw)
        # "gate": masked features are scaled by γ (≈ 0 at start), then T is added.
        kept_bchw = feat_bchw * (1 - m_b1hw) + self.gamma.to(feat_bchw.dtype) * feat_bchw * m_b1hw
        return kept_bchw + token * m_b1hw


# --- §4 The decoder: deliberately tiny, so the encoder has to do the work
class Decoder(nn.Module):
    """feat [B, C, H/s, W/s] → image [B, 3, H, W]: a 1×1 conv to 3·s² channels + PixelShuffle(s).
    Each feature cell predicts its own s×s×3 pixel patch; no activation (§4)."""

    def __init__(self, in_channels, stride):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 3 * stride**2, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)
        nn.init.trunc_normal_(self.conv.weight, std=0.02)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feat_bchw):
        return self.shuffle(self.conv(feat_bchw))


# --- §5 Losses
def focal_l1_loss(pred, target, alpha=0.2, gamma=1.0):
    """Elementwise focal-L1, ℓ = |e|·(2·sigmoid(α|e|) − 1)^γ with e = pred − target (§5, CNNs).
    The factor is ≈ α|e|/2 for small errors, → 1 for large ones: easy pixels count less.
    Works on real tensors, and on the modulus of a complex spectrum difference (`e` complex)."""
    err = (pred - target).abs()
    return err * (2 * torch.sigmoid(alpha * err) - 1) ** gamma


def focal_weight(dist_chw):
    """Focal frequency weight W = log(1 + √D) / its single global maximum, NaN → 0, clamped to
    [0, 1], without gradient (§5 step 4): frequencies that are badly reconstructed count more."""
    with torch.no_grad():
        weight_chw = torch.log1p(dist_chw.sqrt())
        weight_chw = weight_chw / weight_chw.max()  # one global maximum, as released
        return torch.nan_to_num(weight_chw, nan=0.0).clamp(0, 1)  # 0/0 when pred == target


def frequency_loss(pred_bchw, target_bchw):
    """Focal frequency loss on batch-averaged spectra (§5, `fft_focal=True`; Jiang et al., ICCV
    2021): the form of ResNet-50 and ViT. Scalar. Always in float32 (bf16 spectra are too coarse)."""
    with torch.autocast(device_type=pred_bchw.device.type, enabled=False):
        # 1. Average over the batch before the FFT (the code's `ave_spectrum`): the FFT is linear,
        #    so the mean of the spectra is the spectrum of the mean image, and F(a)−F(b) = F(a−b).
        diff_chw = pred_bchw.float().mean(dim=0) - target_bchw.float().mean(dim=0)
        # 2. Orthonormal 2-D FFT per channel; D = squared complex distance.
        spec_chw = torch.fft.fft2(diff_chw, norm="ortho")
        dist_chw = spec_chw.real**2 + spec_chw.imag**2
        # 3. Weight each frequency by how badly it is reconstructed (no gradient), then average.
        return (focal_weight(dist_chw) * dist_chw).mean()


def spectral_focal_l1_loss(pred_bchw, target_bchw):
    """The other released Fourier form (§5, `fft_focal=False`, ResNet-101): focal-L1 on |ΔF|
    between per-image orthonormal spectra, averaged over images, channels and frequencies.
    No batch averaging of spectra and no weight matrix. Scalar, in float32."""
    with torch.autocast(device_type=pred_bchw.device.type, enabled=False):
        # 1. One spectrum per image (linear again: the FFT of the difference is the difference).
        spec_bchw = torch.fft.fft2(pred_bchw.float() - target_bchw.float(), norm="ortho")
        # 2. Focal-L1 on the modulus of the complex difference, mean-reduced.
        return focal_l1_loss(spec_bchw, torch.zeros_like(spec_bchw)).mean()


FOURIER_LOSSES = {"focal_frequency": frequency_loss, "spectral_focal_l1": spectral_focal_l1_loss}


def mixed_image(pred_bchw, target_bchw, mask_b1hw, fft_unmask_weight):
    """The Fourier term's input (§5 step 1): x̃ = M·x̂ + (1−M)·[w·x̂ + (1−w)·(½·sg(x̂) + ½·x)].
    Outside the mask: half the (detached) prediction and half the target, so the visible region
    neither dominates the spectrum nor is ignored; only a w-share of it carries gradient."""
    w = fft_unmask_weight
    outside_bchw = w * pred_bchw + (1 - w) * (0.5 * pred_bchw.detach() + 0.5 * target_bchw)
    return torch.lerp(outside_bchw, pred_bchw, mask_b1hw)


def a2mim_loss(
    pred_bchw,
    target_bchw,
    mask,
    *,
    spatial="focal_l1",
    fft_weight=0.5,
    fft_loss="focal_frequency",
    fft_unmask_weight=1e-3,
):
    """L = L_spa + λ·L_freq (§5). Returns {"loss", "loss_spatial", "loss_freq"} (scalars).
    `spatial` ℓ: "focal_l1" (CNNs) or "l1" (ViT, SimMIM); `fft_weight` λ; `fft_loss` one of
    FOURIER_LOSSES; `fft_unmask_weight` w of `mixed_image`. `mask` at any grid."""
    _check_choice("spatial loss", spatial, ("focal_l1", "l1"))
    _check_choice("Fourier loss", fft_loss, FOURIER_LOSSES)
    # In float32: under bf16 autocast a sum over millions of pixels would round the mask count.
    pred_bchw, target_bchw = pred_bchw.float(), target_bchw.float()
    mask_b1hw = resize_mask(mask, pred_bchw.shape[-1]).float()

    # 1. L_spa: the pixel loss on masked pixels only, averaged over them and the channels.
    if spatial == "focal_l1":
        elem_bchw = focal_l1_loss(pred_bchw, target_bchw)
    else:
        elem_bchw = (pred_bchw - target_bchw).abs()
    loss_spatial = (elem_bchw * mask_b1hw).sum() / (mask_b1hw.sum() + 1e-5) / pred_bchw.shape[1]

    # 2. L_freq on the "mixed" image (skipped entirely at λ = 0: SimMIM, R-152/200, ConvNeXt).
    if fft_weight > 0:
        mixed_bchw = mixed_image(pred_bchw, target_bchw, mask_b1hw, fft_unmask_weight)
        loss_freq = FOURIER_LOSSES[fft_loss](mixed_bchw, target_bchw)
    else:
        loss_freq = torch.zeros((), device=pred_bchw.device)

    # 3. The total, L = L_spa + λ·L_freq.
    return {
        "loss": loss_spatial + fft_weight * loss_freq,
        "loss_spatial": loss_spatial,
        "loss_freq": loss_freq,
    }


# --- The model: encoder + mask token + decoder + loss, with each arch's released options
# §5 table: λ, Fourier form and w of the released configs, per arch. Ours, not released: ResNet-18/34
# (our CPU models) take ResNet-50's values — they stand in for it in laptop runs; vit_tiny takes the
# ViTs'; every ConvNeXt, whatever its width, has no Fourier term, as all released ConvNeXt configs.
_FOCAL_FREQ_CNN = dict(fft_weight=0.5, fft_loss="focal_frequency", fft_unmask_weight=1e-3)
_NO_FOURIER = dict(fft_weight=0.0, fft_loss="focal_frequency", fft_unmask_weight=0.0)
# fmt: off
RELEASED_FOURIER = {
    "resnet18": _FOCAL_FREQ_CNN, "resnet34": _FOCAL_FREQ_CNN, "resnet50": _FOCAL_FREQ_CNN,
    "resnet101": dict(fft_weight=0.1, fft_loss="spectral_focal_l1", fft_unmask_weight=1e-3),
    "resnet152": _NO_FOURIER, "resnet200": _NO_FOURIER,
    "convnext_tiny": _NO_FOURIER, "convnext_small": _NO_FOURIER, "convnext_base": _NO_FOURIER,
}
# fmt: on
_VIT_FOURIER = dict(fft_weight=0.1, fft_loss="focal_frequency", fft_unmask_weight=0.0)
LOSS_RECIPES = ("released", "paper")


def method_defaults(arch, method="a2mim", loss_recipe="released"):
    """The options A2MIM uses for `arch` unless told otherwise (§2, §3, §5).
    loss_recipe "released": the per-arch Fourier term of the released configs (RELEASED_FOURIER);
    "paper": the paper text's Fourier term for every arch (ResNet-50's values for all CNNs).
    SimMIM as released: input untouched, the token replaces the stem / patch embeddings, L1 only."""
    _check_choice("arch", arch, ARCHS)
    _check_choice("method", method, ("a2mim", "simmim"))
    _check_choice("loss recipe", loss_recipe, LOSS_RECIPES)
    if method == "simmim":
        return dict(fill="none", token_at="stem", token_mode="replace", spatial="l1", **_NO_FOURIER)
    if arch_family(arch) == "vit":
        return dict(fill="mean", token_at=None, token_mode="add", spatial="l1", **_VIT_FOURIER)
    fourier = RELEASED_FOURIER[arch] if loss_recipe == "released" else _FOCAL_FREQ_CNN
    return dict(fill="mean", token_at=None, token_mode="gate", spatial="focal_l1", **fourier)


def check_grids(img_size, mask_patch_size, site_stride, mask_ratio):
    """The grid arithmetic of §2–§4, before anything runs: the image tiles into mask blocks of which
    some but not all are masked (`mask_count`), and the block grid maps onto the token site's grid
    (one a multiple of the other)."""
    g, _ = mask_count(img_size, mask_patch_size, mask_ratio)
    h = img_size // site_stride
    if h % g and g % h:
        raise ConfigError(
            f"the {g}×{g} mask grid ({mask_patch_size}-px blocks of {img_size} px) does not map onto "
            f"the {h}×{h} token site; use a mask block size whose grid divides or is a multiple of {h}"
        )


# §2: images from 192 px up are ImageNet-scale and prefer the released 32-px mask block (7×7 at
# 224 px); smaller ones prefer img_size / 8 (4 px at 32, an 8×8 grid). The project's only 192-px
# rule: the scripts ask `mask_patch_size_for` instead of repeating it.
IMAGENET_SCALE_PX = 192
RELEASED_MASK_PATCH_PX = 32


def default_mask_patch_size(img_size, site_stride, mask_ratio=0.6):
    """The mask block (px) used unless one is given (§2), for an image size the encoder takes and
    the stride of the token site. Preferred: 32 px from IMAGENET_SCALE_PX (192) up (7×7 at 224,
    as released), img_size / 8 below (4 px at 32). Used: of the blocks that `check_grids` accepts,
    the one nearest the preferred by ratio (the larger on a tie), so the preferred block wherever
    it fits. One always fits a size the encoder takes: 1-px blocks make a grid that is a multiple
    of the site's."""
    if img_size >= IMAGENET_SCALE_PX:
        preferred = RELEASED_MASK_PATCH_PX
    else:
        preferred = max(1, img_size // 8)
    fits = []
    for block in range(1, img_size + 1):
        try:
            check_grids(img_size, block, site_stride, mask_ratio)
        except ConfigError:
            continue
        fits.append(block)
    # No block fits only for a ratio no grid of this image can honour: the preferred block's
    # sentence says why.
    if not fits:
        check_grids(img_size, preferred, site_stride, mask_ratio)
    return min(fits, key=lambda block: (abs(math.log(block / preferred)), -block))


def mask_patch_size_for(arch, img_size, *, method="a2mim", token_at=None, mask_ratio=0.6):
    """`default_mask_patch_size` for build_encoder(arch, img_size) and the method's token site,
    without building anything (train.py settles its settings before the model exists). ConfigError
    for a size the encoder refuses (naming the sizes it takes) or an unknown site."""
    token_at = method_defaults(arch, method)["token_at"] if token_at is None else token_at
    return default_mask_patch_size(
        img_size, token_site_stride(arch, img_size, token_at), mask_ratio
    )


def resolve_options(arch, method, loss_recipe, given):
    """`method_defaults(arch, method, loss_recipe)` with each option of `given` that is not None in
    its place. ConfigError for an unknown choice, a λ or w out of range, or a Fourier option that
    would change nothing because the Fourier term is off."""
    defaults = method_defaults(arch, method, loss_recipe)
    cfg = defaults | {k: v for k, v in given.items() if v is not None}
    _check_choice("fill", cfg["fill"], FILLS)
    _check_choice("spatial loss", cfg["spatial"], ("focal_l1", "l1"))
    _check_choice("Fourier loss", cfg["fft_loss"], FOURIER_LOSSES)
    # Written so that NaN fails too; an infinite λ would make every loss infinite.
    if not (0 <= cfg["fft_weight"] < math.inf and 0 <= cfg["fft_unmask_weight"] <= 1):
        raise ConfigError(
            f"need a finite fft_weight ≥ 0 and 0 ≤ fft_unmask_weight ≤ 1, got "
            f"{cfg['fft_weight']} and {cfg['fft_unmask_weight']}"
        )
    # A Fourier option given while λ = 0 (SimMIM, ConvNeXt, R-152/200, or fft_weight=0) would
    # change nothing.
    inert = [
        k
        for k in ("fft_loss", "fft_unmask_weight")
        if given[k] is not None and given[k] != defaults[k]
    ]
    if cfg["fft_weight"] == 0 and inert:
        if given["fft_weight"] is not None:
            off = "off"
        else:
            off = f"off by default for {method} {arch}"
        raise ConfigError(
            f"{inert[0]}={given[inert[0]]!r} has no effect: the Fourier term is {off} "
            f"(fft_weight 0); give fft_weight > 0 as well, or leave {inert[0]} out"
        )
    return cfg


class A2MIM(nn.Module):
    """Masked image modeling for any encoder of `models.py` (§2–§5).
    Every option defaults to None = `method_defaults(encoder.arch, method, loss_recipe)`:
    fill ("mean" | "zero" | "none"), token_at (a site of the encoder, None = its A²MIM default,
    "stem"), token_mode ("gate" | "add" | "replace"), spatial ("focal_l1" | "l1"), fft_weight (λ),
    fft_loss ("focal_frequency" | "spectral_focal_l1"), fft_unmask_weight (w). The resolved
    options are in `self.cfg`. `mask_patch_size` / `mask_ratio` as in `mask_blocks`; mask_patch_size
    None = `default_mask_patch_size` for the encoder's size and token site (32 px at 224)."""

    def __init__(
        self,
        encoder,
        *,
        method="a2mim",
        mask_patch_size=None,
        mask_ratio=0.6,
        loss_recipe="released",
        fill=None,
        token_at=None,
        token_mode=None,
        spatial=None,
        fft_weight=None,
        fft_loss=None,
        fft_unmask_weight=None,
    ):
        super().__init__()
        given = dict(
            fill=fill,
            token_at=token_at,
            token_mode=token_mode,
            spatial=spatial,
            fft_weight=fft_weight,
            fft_loss=fft_loss,
            fft_unmask_weight=fft_unmask_weight,
        )
        cfg = resolve_options(encoder.arch, method, loss_recipe, given)
        self.method, self.cfg = method, cfg

        self.encoder = encoder
        self.token_at, channels, stride = token_site(encoder, cfg["token_at"])
        if mask_patch_size is None:
            mask_patch_size = default_mask_patch_size(encoder.img_size, stride, mask_ratio)
        check_grids(encoder.img_size, mask_patch_size, stride, mask_ratio)
        self.mask_patch_size, self.mask_ratio = mask_patch_size, mask_ratio
        self.mask_token = MaskToken(
            channels, mode=cfg["token_mode"], init_std=encoder.mask_token_std
        )
        self.decoder = Decoder(encoder.out_channels, encoder.out_stride)

    def forward(self, img_bchw, mask=None, *, generator=None):
        """img_bchw [B, 3, H, W] normalised → dict(loss, loss_spatial, loss_freq, pred, mask, input).
        pred [B, 3, H, W] is the full reconstruction; mask [B, g, g] (1 = masked); input the
        pixels the encoder saw (for pictures: never rebuild the fill outside the model)."""
        B, _, H, W = img_bchw.shape
        if H != W:
            raise ConfigError(f"A2MIM expects square images, got {H}×{W}")

        # 1. Random blocks, drawn on the images' device (§2).
        if mask is None:
            mask = mask_blocks(
                B,
                H,
                self.mask_patch_size,
                self.mask_ratio,
                device=img_bchw.device,
                generator=generator,
            )

        # 2. Fill the masked blocks of the input: mean colour (A²MIM); SimMIM leaves it untouched.
        input_bchw = FILLS[self.cfg["fill"]](img_bchw, mask)

        # 3. Encode; the encoder hands us its feature map at the token site (§3).
        feat_bchw = self.encoder(
            input_bchw, token_fn=lambda f: self.mask_token(f, mask), token_at=self.token_at
        )

        # 4. Decode back to pixels (§4) and 5. compare with the original, unmasked image (§5).
        pred_bchw = self.decoder(feat_bchw)
        losses = a2mim_loss(pred_bchw, img_bchw, mask, **{k: self.cfg[k] for k in LOSS_KEYS})
        return {**losses, "pred": pred_bchw, "mask": mask, "input": input_bchw}


LOSS_KEYS = ("spatial", "fft_weight", "fft_loss", "fft_unmask_weight")
