"""A²MIM: Architecture-Agnostic Masked Image Modeling (Li et al., ICML 2023), in the paper's order.

    §2 masking       mask_blocks, mean_fill (zero_fill = SimMIM), resize_mask
    §3 mask token    MaskToken — added to an intermediate feature map, not to the input
    §4 decoder       Decoder — 1×1 conv + PixelShuffle back to pixels
    §5 losses        focal_l1_loss, focal_weight, frequency_loss, mixed_image, a2mim_loss
       the model     A2MIM — encoder + token + decoder + loss; `method="simmim"` for the baseline
    §9 analysis      interaction_strength — the multi-order interactions behind the idea

Section numbers refer to ../shared/PAPER.md, which summarises the paper *and* the released
OpenMixup code; where the two differ we follow the code and say so. Tensor names carry their
layout: `img_bchw`, `mask_bhw` (block grid), `mask_b1hw` (pixel or feature resolution).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ConfigError, token_site

# ---------------------------------------------------------------------------------------------
# §2 Masking on the input side
# ---------------------------------------------------------------------------------------------


def mask_blocks(batch_size, input_size, mask_patch_size=32, mask_ratio=0.6, *, device=None, generator=None):
    """Random block masks, `ceil(ratio · g²)` masked blocks per image (§2).

    Returns mask_bgg: float [B, g, g] of 0/1 with g = input_size // mask_patch_size; 1 = masked.
    At 224 px with 32-px blocks: g = 7, exactly 30 of 49 blocks masked (61.2 %), as released.
    Drawn on `device` in one shot: ranking i.i.d. uniforms gives a uniformly random subset
    of size k per row, with no Python loop over images.
    """
    if input_size % mask_patch_size:
        raise ConfigError(f"input size {input_size} must be divisible by the mask block size {mask_patch_size}")
    if not 0 < mask_ratio < 1:
        raise ConfigError(f"mask ratio must be in (0, 1), got {mask_ratio}")
    g = input_size // mask_patch_size
    k = math.ceil(round(mask_ratio * g * g, 6))  # round first: 0.56·100 is 56.000000000000007 in floats
    noise_bl = torch.rand(batch_size, g * g, device=device, generator=generator)
    rank_bl = noise_bl.argsort(dim=1).argsort(dim=1)  # rank of each block's noise in its row
    return (rank_bl < k).float().view(batch_size, g, g)


def resize_mask(mask, size):
    """Mask at any grid → [B, 1, size, size] float.

    Finer targets (pixels, stride-16 features of a 7×7 mask) use nearest upsampling, i.e. each
    block covers whole cells. A coarser target (e.g. 4-px blocks but a stride-8 token site)
    counts a cell as masked when at least half of it is masked.
    """
    mask_b1hw = mask if mask.ndim == 4 else mask.unsqueeze(1)
    g = mask_b1hw.shape[-1]
    if size == g:
        return mask_b1hw
    if size > g:
        if size % g:
            raise ConfigError(f"a {g}×{g} mask cannot be upsampled to {size}×{size} (not a multiple)")
        return F.interpolate(mask_b1hw, scale_factor=size // g, mode="nearest")
    return (F.adaptive_avg_pool2d(mask_b1hw, size) >= 0.5).to(mask_b1hw.dtype)


def mean_fill(img_bchw, mask):
    """Replace masked blocks by the image's own per-channel mean colour (§2, A²MIM).

    The mean is over the whole (normalised) image. Since normalisation is affine per channel,
    this equals "mean RGB, then normalise" — what the released code computes.
    `mask` [B, g, g] or [B, 1, g, g] at any grid that divides the image.
    """
    mask_b1hw = resize_mask(mask, img_bchw.shape[-1]).to(img_bchw.dtype)
    mean_bc11 = img_bchw.mean(dim=(2, 3), keepdim=True)
    return torch.lerp(img_bchw, mean_bc11.expand_as(img_bchw), mask_b1hw)


def zero_fill(img_bchw, mask):
    """SimMIM's input: masked blocks set to 0 (the dataset mean after normalisation)."""
    mask_b1hw = resize_mask(mask, img_bchw.shape[-1]).to(img_bchw.dtype)
    return img_bchw * (1 - mask_b1hw)


# ---------------------------------------------------------------------------------------------
# §3 The mask token, written into an intermediate feature map
# ---------------------------------------------------------------------------------------------


class MaskToken(nn.Module):
    """A learnable token T [1, C, 1, 1] written into the masked cells of a feature map (§3).

    mode="gate"    (A²MIM, released ResNet/ConvNeXt configs): x ← x·(1−M) + γ·x·M, then x ← x + T·M,
                   with a per-channel γ initialised to 1e-6, so training starts from "replace
                   by T" and may move towards a residual add. The paper text only says "add".
    mode="add"     (A²MIM ViT): x ← x + T·M.
    mode="replace" (SimMIM): x ← x·(1−M) + T·M.
    """

    def __init__(self, channels, *, mode="gate", gamma_init=1e-6):
        super().__init__()
        if mode not in ("gate", "add", "replace"):
            raise ConfigError(f"mask token mode must be 'gate', 'add' or 'replace', got {mode!r}")
        self.mode = mode
        self.token = nn.Parameter(torch.zeros(1, channels, 1, 1))
        nn.init.trunc_normal_(self.token, std=0.02)
        self.gamma = nn.Parameter(torch.full((1, channels, 1, 1), gamma_init)) if mode == "gate" else None

    def forward(self, feat_bchw, mask):
        """feat_bchw [B, C, h, w]; mask at any grid (resized to h×w). Returns [B, C, h, w]."""
        m_b1hw = resize_mask(mask, feat_bchw.shape[-1]).to(feat_bchw.dtype)
        token = self.token.to(feat_bchw.dtype)
        if self.mode == "add":
            return feat_bchw + token * m_b1hw
        if self.mode == "replace":
            return torch.lerp(feat_bchw, token.expand_as(feat_bchw), m_b1hw)
        kept_bchw = feat_bchw * (1 - m_b1hw) + self.gamma.to(feat_bchw.dtype) * feat_bchw * m_b1hw
        return kept_bchw + token * m_b1hw


# ---------------------------------------------------------------------------------------------
# §4 The decoder: deliberately tiny, so the encoder has to do the work
# ---------------------------------------------------------------------------------------------


class Decoder(nn.Module):
    """feat [B, C, H/s, W/s] → image [B, 3, H, W]: a 1×1 conv to 3·s² channels + PixelShuffle(s).

    Each feature cell predicts its own s×s×3 pixel patch; no activation (§4).
    """

    def __init__(self, in_channels, stride):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 3 * stride**2, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)
        nn.init.trunc_normal_(self.conv.weight, std=0.02)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feat_bchw):
        # The 1×1 conv as a matmul over channels (same weights, same maths): PyTorch's CPU 1×1-conv
        # kernels are ~2× slower at ResNet-50 shapes, the largest A²MIM overhead (bench.py --profile).
        B, _, h, w = feat_bchw.shape
        s = self.shuffle.upscale_factor
        pix_bhwo = F.linear(feat_bchw.permute(0, 2, 3, 1), self.conv.weight.flatten(1), self.conv.bias)
        # channel o = c·s² + i·s + j → pixel (c, y·s + i, x·s + j): exactly PixelShuffle's order
        return pix_bhwo.view(B, h, w, 3, s, s).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, h * s, w * s)


# ---------------------------------------------------------------------------------------------
# §5 Losses
# ---------------------------------------------------------------------------------------------


def focal_l1_loss(pred, target, alpha=0.2, gamma=1.0):
    """Elementwise focal-L1, ℓ = |e|·(2·sigmoid(α|e|) − 1)^γ with e = pred − target (§5, CNNs).

    The factor is ≈ α|e|/2 for small errors, → 1 for large ones: easy pixels count less.
    """
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
    """Focal frequency loss on batch-averaged spectra (§5; Jiang et al., ICCV 2021). Scalar.

    1. F = orthonormal 2-D FFT per channel, averaged over the batch (the code's `ave_spectrum`).
       The FFT is linear, so the mean of the spectra is the spectrum of the mean image: one FFT
       per batch instead of one per image.
    2. D = |F̄(pred) − F̄(target)|²; weight W = focal_weight(D), no gradient (§5 step 4).
    3. loss = mean(W · D).
    Always in float32: bf16/fp16 spectra are far too coarse, so autocast is switched off here.
    """
    with torch.autocast(device_type=pred_bchw.device.type, enabled=False):
        mean_pred_chw = pred_bchw.float().mean(dim=0)
        mean_target_chw = target_bchw.float().mean(dim=0)
        diff_chw = torch.fft.fft2(mean_pred_chw - mean_target_chw, norm="ortho")  # linear: F(a)−F(b)=F(a−b)
        dist_chw = diff_chw.real**2 + diff_chw.imag**2
        return (focal_weight(dist_chw) * dist_chw).mean()


def mixed_image(pred_bchw, target_bchw, mask_b1hw, fft_unmask_weight):
    """The Fourier term's input (§5 step 1): x̃ = M·x̂ + (1−M)·[w·x̂ + (1−w)·(½·sg(x̂) + ½·x)].

    Outside the mask: half the (detached) prediction and half the target, so the visible region
    neither dominates the spectrum nor is ignored; only a w-share of it carries gradient.
    """
    w = fft_unmask_weight
    outside_bchw = w * pred_bchw + (1 - w) * (0.5 * pred_bchw.detach() + 0.5 * target_bchw)
    return torch.lerp(outside_bchw, pred_bchw, mask_b1hw)


def a2mim_loss(pred_bchw, target_bchw, mask, *, spatial="focal_l1", fft_weight=0.5, fft_unmask_weight=1e-3):
    """L = L_spa + λ·L_freq (§5). Returns {"loss", "loss_spatial", "loss_freq"} (scalars).

    * L_spa: ℓ averaged over masked pixels and the 3 channels: Σ ℓ·M / (ΣM + 1e-5) / 3.
      ℓ = focal-L1 (CNNs) or L1 (ViT, SimMIM).
    * L_freq (λ = `fft_weight`) compares the target with `mixed_image` (w = `fft_unmask_weight`).
    `mask` at any grid; it is upsampled to the pixels.
    """
    # The loss is always computed in float32: under bf16 autocast the decoder output is bf16,
    # and a bf16 sum over millions of pixels would round the mask count.
    pred_bchw, target_bchw = pred_bchw.float(), target_bchw.float()
    mask_b1hw = resize_mask(mask, pred_bchw.shape[-1]).float()
    if spatial == "focal_l1":
        elem_bchw = focal_l1_loss(pred_bchw, target_bchw)
    elif spatial == "l1":
        elem_bchw = (pred_bchw - target_bchw).abs()
    else:
        raise ConfigError(f"spatial loss must be 'focal_l1' or 'l1', got {spatial!r}")
    channels = pred_bchw.shape[1]
    loss_spatial = (elem_bchw * mask_b1hw).sum() / (mask_b1hw.sum() + 1e-5) / channels

    if fft_weight > 0:
        mixed_bchw = mixed_image(pred_bchw, target_bchw, mask_b1hw, fft_unmask_weight)
        loss_freq = frequency_loss(mixed_bchw, target_bchw)
    else:  # SimMIM, or the "no Fourier loss" ablation: skip the FFT entirely
        loss_freq = torch.zeros((), device=pred_bchw.device)
    return {"loss": loss_spatial + fft_weight * loss_freq, "loss_spatial": loss_spatial, "loss_freq": loss_freq}


# ---------------------------------------------------------------------------------------------
# The model: encoder + mask token + decoder + loss
# ---------------------------------------------------------------------------------------------

# Per-family defaults of the released configs (§3, §5). SimMIM: zero fill, token replaces the
# stem features, plain L1, no Fourier term — the same code otherwise, for a fair comparison.
DEFAULTS = {
    ("a2mim", "cnn"): dict(fill="mean", token_at=None, token_mode="gate", spatial="focal_l1", fft_weight=0.5, fft_unmask_weight=1e-3),
    ("a2mim", "vit"): dict(fill="mean", token_at=None, token_mode="add", spatial="l1", fft_weight=0.1, fft_unmask_weight=0.0),
    ("simmim", "cnn"): dict(fill="zero", token_at="stem", token_mode="replace", spatial="l1", fft_weight=0.0, fft_unmask_weight=0.0),
    ("simmim", "vit"): dict(fill="zero", token_at="stem", token_mode="replace", spatial="l1", fft_weight=0.0, fft_unmask_weight=0.0),
}


class A2MIM(nn.Module):
    """Masked image modeling for any encoder of `models.py` (§2–§5).

    Keyword arguments override the per-family defaults in `DEFAULTS` (for ablations):
    fill ("mean" | "zero"), token_at (a site of the encoder, None = its A²MIM default, "stem"),
    token_mode ("gate" | "add" | "replace"), spatial ("focal_l1" | "l1"), fft_weight (λ),
    fft_unmask_weight (w). `mask_patch_size` / `mask_ratio` as in `mask_blocks`.
    """

    def __init__(self, encoder, *, method="a2mim", mask_patch_size=32, mask_ratio=0.6, **overrides):
        super().__init__()
        if (method, encoder.family) not in DEFAULTS:
            raise ConfigError(f"method must be 'a2mim' or 'simmim', got {method!r}")
        cfg = {**DEFAULTS[method, encoder.family], **overrides}
        unknown = set(cfg) - set(DEFAULTS[method, encoder.family])
        if unknown:
            raise ConfigError(f"unknown A2MIM option(s) {sorted(unknown)}; known: {sorted(DEFAULTS['a2mim', 'cnn'])}")
        if cfg["fill"] not in ("mean", "zero"):
            raise ConfigError(f"fill must be 'mean' or 'zero', got {cfg['fill']!r}")
        if cfg["spatial"] not in ("focal_l1", "l1"):
            raise ConfigError(f"spatial loss must be 'focal_l1' or 'l1', got {cfg['spatial']!r}")
        self.method, self.cfg = method, cfg
        self.mask_patch_size, self.mask_ratio = mask_patch_size, mask_ratio

        self.encoder = encoder
        self.token_at, channels, _ = token_site(encoder, cfg["token_at"])
        self.mask_token = MaskToken(channels, mode=cfg["token_mode"])
        self.decoder = Decoder(encoder.out_channels, encoder.out_stride)

    def forward(self, img_bchw, mask=None, *, generator=None):
        """img_bchw [B, 3, H, W] normalised → dict(loss, loss_spatial, loss_freq, pred, mask).

        pred [B, 3, H, W] is the full reconstruction; mask [B, g, g] (1 = masked).
        """
        B, _, H, W = img_bchw.shape
        if H != W:
            raise ConfigError(f"A2MIM expects square images, got {H}×{W}")

        # 1. Random blocks, drawn on the images' device (§2).
        if mask is None:
            mask = mask_blocks(B, H, self.mask_patch_size, self.mask_ratio, device=img_bchw.device, generator=generator)

        # 2. Fill the masked blocks of the input: mean colour (A²MIM) or zeros (SimMIM).
        fill = mean_fill if self.cfg["fill"] == "mean" else zero_fill
        input_bchw = fill(img_bchw, mask)

        # 3. Encode; the encoder hands us its feature map at the token site (§3).
        feat_bchw = self.encoder(input_bchw, token_fn=lambda f: self.mask_token(f, mask), token_at=self.token_at)

        # 4. Decode back to pixels (§4) and 5. compare with the original, unmasked image (§5).
        pred_bchw = self.decoder(feat_bchw)
        losses = a2mim_loss(
            pred_bchw, img_bchw, mask, spatial=self.cfg["spatial"],
            fft_weight=self.cfg["fft_weight"], fft_unmask_weight=self.cfg["fft_unmask_weight"],
        )
        return {**losses, "pred": pred_bchw, "mask": mask}


# ---------------------------------------------------------------------------------------------
# §9 The analysis behind the idea: multi-order interaction strength J^(m)
# ---------------------------------------------------------------------------------------------


def log_odds(logits_bk, labels_b):
    """log p_y − log(1 − p_y) of the true class y, from logits [B, K] → [B]."""
    true_b = logits_bk.gather(1, labels_b[:, None])[:, 0]
    others_bk = logits_bk.scatter(1, labels_b[:, None], float("-inf"))
    return true_b - torch.logsumexp(others_bk, dim=1)


def _neighbour_pairs(grid, radius):
    """All pairs (i, j), i < j, of grid cells within Chebyshev distance `radius` → [P, 2]."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    near = ((ys[:, None] - ys[None]).abs().maximum((xs[:, None] - xs[None]).abs()) <= radius).triu(1)
    return near.nonzero()


@torch.no_grad()
def interaction_strength(model, images_bchw, labels_b, *, grid=8, orders=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95, 1.0),
                         pairs=16, contexts=16, radius=2, baseline=None, generator=None, chunk=1024):
    """Multi-order interaction strength J^(m) of a classifier (§9; Deng et al., ICLR 2022).

    The image is cut into n = grid² patches (the players). v(S) = log-odds of the true class when
    only the patches in S are kept and the rest set to `baseline` (the mean colour: a tensor
    broadcastable to [3, H, W]; default 0, the dataset mean after normalisation).
        Δv(i, j, S) = v(S ∪ {i, j}) − v(S ∪ {i}) − v(S ∪ {j}) + v(S)
        I^(m)(i, j) = E_{S ⊆ N∖{i,j}, |S| = m} Δv(i, j, S)
        J^(m)       = E_x E_{(i,j)} |I^(m)(i, j)|,  then divided by its mean over the orders.
    m = round(r·(n − 2)) for each ratio r in `orders`. Pairs: an int = that many per image drawn
    from the neighbours within `radius` (the official tool: ~50 with radius 2), None = all those
    neighbours, or an explicit LongTensor [P, 2] of (i, j) cell indices (row-major);
    `contexts` random S per pair and order.
    Everything for one image and order is one batched forward pass (in chunks of `chunk`).

    Returns {"orders": [M] ratios, "J": [M] normalised, "I_abs": [M] un-normalised}.
    """
    B, _, H, W = images_bchw.shape
    n, cell = grid * grid, H // grid
    baseline = torch.zeros(3, 1, 1, device=images_bchw.device) if baseline is None else baseline.to(images_bchw.device)
    all_pairs = _neighbour_pairs(grid, radius)
    I_abs = torch.zeros(len(orders))
    for b in range(B):
        if pairs is None or torch.is_tensor(pairs):
            chosen = all_pairs if pairs is None else pairs
        else:
            chosen = all_pairs[torch.randperm(len(all_pairs), generator=generator)[:pairs]]
        for o, ratio in enumerate(orders):
            keep_pcn = _contexts(chosen, n, round(ratio * (n - 2)), contexts, generator)      # [P, C, n] S
            # The four coalitions S, S∪{i}, S∪{j}, S∪{i,j}, as keep-masks [P, C, 4, n].
            four = keep_pcn[:, :, None, :].repeat(1, 1, 4, 1)
            idx_i, idx_j = chosen[:, 0], chosen[:, 1]
            p = torch.arange(len(chosen))
            four[p, :, 1, idx_i] = True
            four[p, :, 2, idx_j] = True
            four[p, :, 3, idx_i] = True
            four[p, :, 3, idx_j] = True
            v = _coalition_values(model, images_bchw[b], labels_b[b], four.view(-1, n), grid, cell, baseline, chunk)
            v_pc4 = v.view(len(chosen), contexts, 4)
            delta_pc = v_pc4[..., 3] - v_pc4[..., 1] - v_pc4[..., 2] + v_pc4[..., 0]
            I_abs[o] += delta_pc.mean(dim=1).abs().mean().item() / B   # E_S inside |.|, E_pairs outside
    return {"orders": torch.tensor(orders), "J": I_abs / I_abs.mean(), "I_abs": I_abs}


def _contexts(pairs_p2, n, m, contexts, generator):
    """`contexts` random subsets S of size m of the n players minus {i, j}, per pair → bool [P, C, n]."""
    noise_pcn = torch.rand(len(pairs_p2), contexts, n, generator=generator)
    p = torch.arange(len(pairs_p2))
    noise_pcn[p, :, pairs_p2[:, 0]] = 2.0  # i and j rank last, so they are never drawn into S
    noise_pcn[p, :, pairs_p2[:, 1]] = 2.0
    rank_pcn = noise_pcn.argsort(dim=-1).argsort(dim=-1)
    return rank_pcn < m


def _coalition_values(model, img_chw, label, keep_kn, grid, cell, baseline, chunk):
    """v(S) for K coalitions: patches outside S set to the baseline, log-odds of `label` → [K]."""
    out = []
    for keep in keep_kn.split(chunk):
        keep_k1hw = keep.view(-1, 1, grid, grid).to(img_chw.dtype)
        keep_k1hw = keep_k1hw.repeat_interleave(cell, 2).repeat_interleave(cell, 3).to(img_chw.device)
        x_kchw = torch.lerp(baseline.expand_as(img_chw)[None], img_chw[None], keep_k1hw)
        labels = torch.full((len(keep),), int(label), device=img_chw.device)
        out.append(log_odds(model(x_kchw).float(), labels).cpu())
    return torch.cat(out)
