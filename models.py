"""Encoders that A²MIM pre-trains: ResNet, ViT and ConvNeXt (METHOD.md §4), built by `build_encoder(arch,
img_size, **kw)`. All share one interface, so that `a2mim.py` never asks "which architecture is this?":

    feat_bchw = encoder(x_bchw, token_fn=None, token_at=None)

x_bchw [B, 3, H, W] is the (masked and filled) image; `token_fn(feat_bchw) -> feat_bchw` is applied exactly once,
to the feature map at the token site `token_at` (§3: where the mask token is written; None = plain forward);
feat_bchw [B, out_channels, H / out_stride, W / out_stride] is the last feature map. Attributes: `arch`, `family`
("cnn" / "vit": picks the per-family defaults), `out_channels` and `out_stride` (what the decoder needs, §4),
`token_sites` {name: (channels, stride)} in network order ("stem" = the first, SimMIM's), `default_token_site`
(A²MIM's, §3) and `mask_token_std` (the token's init in the released backbone, §3).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from einops import rearrange
from torchvision.models.convnext import CNBlockConfig, LayerNorm2d
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import stochastic_depth

from runtime import ConfigError


# Inputs this small (Fashion-MNIST, CIFAR) get a CIFAR-style stem: a 3×3 stride-1 conv and no
# max-pool for ResNets, 4-px patches for ViTs. Otherwise a 32-px image would leave a 1×1 map.
SMALL_INPUT = 64


# --- ResNet (§4): torchvision's ResNet, so that the weights load straight back into torchvision
RESNET_LAYERS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
    # Not in torchvision: the same blocks, deeper stages 2-3.
    "resnet200": (Bottleneck, [3, 24, 36, 3]),
}


class ResNet(torchvision.models.ResNet):
    """torchvision's ResNet without `avgpool`/`fc`, plus a token hook before any stage.
    Keys of `state_dict()` are exactly torchvision's (minus `fc.*`), see `weights.torchvision_state_dict`.
    Token sites: "layerK" = the input of stage K ("stem" = layer1's input). A²MIM uses
    "layer4" (stride 16 at standard width, 14×14 at 224 px; §3)."""

    family = "cnn"
    default_token_site = "layer4"
    # T ~ trunc-normal, as released (mim_resnet.py: trunc_normal_ on the tensor).
    mask_token_std = 0.02

    def __init__(self, arch, *, width=64, small_stem=False):
        block, layers = RESNET_LAYERS[arch]
        super().__init__(block, layers)
        self.arch = arch
        if width != 64 or small_stem:
            self._rebuild(block, layers, width, small_stem)
        del self.avgpool, self.fc  # MIM never classifies; keeps the param count honest

        # The released code zero-inits the last BN of every residual branch (§4), so each
        # block starts as identity. torchvision's init already did kaiming/ones/zeros above.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

        # Channels of the stem's output, then of each stage's. The input of layer{k+1} is the
        # output of layer{k} (layer1's: the stem's).
        chans = [width] + [width * block.expansion * 2**k for k in range(4)]
        strides, self.out_stride = _site_strides(arch, small_stem=small_stem)
        self.token_sites = {
            name: (chans[k], stride) for k, (name, stride) in enumerate(strides.items())
        }
        self.out_channels = chans[4]

    def _rebuild(self, block, layers, width, small_stem):
        """Re-make stem and stages at another width (for CPU-sized models) or a 32-px stem."""
        self.inplanes = width
        if small_stem:  # CIFAR-style: 3×3 stride-1 conv, no max-pool
            self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        for k, n in enumerate(layers):
            stage = self._make_layer(block, width * 2**k, n, stride=1 if k == 0 else 2)
            setattr(self, f"layer{k + 1}", stage)
        for m in self.modules():  # torchvision's own init, applied to the new modules
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x_bchw, token_fn=None, token_at=None):
        token_at = _resolve_site(self.token_sites, self.default_token_site, token_at)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x_bchw))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            if token_fn is not None and name == token_at:
                x = token_fn(x)
            x = getattr(self, name)(x)
        return x


# --- ConvNeXt (the paper's third family): torchvision's ConvNeXt, token after the last downsampling
CONVNEXT_DEPTHS = {  # depths, first-stage width
    "convnext_tiny": ((3, 3, 9, 3), 96),
    "convnext_small": ((3, 3, 27, 3), 96),
    "convnext_base": ((3, 3, 27, 3), 128),
}


class ConvNeXt(torchvision.models.ConvNeXt):
    """torchvision's ConvNeXt `features` (keys unchanged) without the classifier.
    `features` = [stem, stage1, down, stage2, down, stage3, down, stage4]. Token sites:
    "stageK" = the input of stage K (after its downsampling layer); A²MIM uses "stage4"
    (stride 32, 7×7 at 224 px; §3). "stem" = the input of stage 1."""

    family = "cnn"
    default_token_site = "stage4"
    # T starts at zero, as released: openmixup/models/backbones/convnext.py (MIMConvNeXt.init_weights) calls
    # mmcv's trunc_normal_init(self.mask_token, ...), which initialises a module's `.weight` and `.bias`
    # only, so the bare nn.Parameter keeps its torch.zeros (ResNet and ViT call trunc_normal_ on the tensor).
    mask_token_std = 0.0

    def __init__(self, arch, *, width=None, small_stem=False, drop_path=0.0):
        depths, base = CONVNEXT_DEPTHS[arch]
        dims = [(width or base) * 2**k for k in range(4)]
        setting = [
            CNBlockConfig(dims[k], dims[k + 1] if k < 3 else None, depths[k]) for k in range(4)
        ]
        super().__init__(setting, stochastic_depth_prob=drop_path)
        if small_stem:  # 32-px inputs: a stride-1 3×3 stem instead of the 4×4 patchify stem
            self.features[0] = nn.Sequential(
                nn.Conv2d(3, dims[0], 3, padding=1), LayerNorm2d(dims[0], eps=1e-6)
            )
        del self.avgpool, self.classifier
        # §4: the released encoder ends with a LayerNorm on the last-stage map (`norm3`,
        # gap_before_final_norm=False); the decoder reads that normalised map.
        self.norm = LayerNorm2d(dims[3], eps=1e-6)
        self.arch = arch

        strides, self.out_stride = _site_strides(arch, small_stem=small_stem)
        self.token_sites = {
            name: (dims[k], stride) for k, (name, stride) in enumerate(strides.items())
        }
        self.out_channels = dims[3]

    def forward(self, x_bchw, token_fn=None, token_at=None):
        token_at = _resolve_site(self.token_sites, self.default_token_site, token_at)
        x = self.features[0](x_bchw)
        for k in range(4):
            if k > 0:
                x = self.features[2 * k](x)  # downsampling before stage k+1
            if token_fn is not None and token_at == f"stage{k + 1}":
                x = token_fn(x)
            x = self.features[2 * k + 1](x)
        return self.norm(x)


# --- ViT (§4, "as in SimMIM's ViT"): patch 16, absolute position embedding + relative position bias,
# LayerScale 0.1, drop path, qkv bias, final LayerNorm; cls token dropped at the output.
VIT_CONFIGS = {  # depth, dim, heads, mlp hidden
    "vit_tiny": (6, 192, 3, 768),  # ours, for 32-px CPU runs (not in the paper)
    "vit_small": (8, 768, 8, 2304),  # the paper's "ViT-S": 8 layers, 768 wide (48.8 M), not DeiT-S
    "vit_base": (12, 768, 12, 3072),
    "vit_large": (24, 1024, 16, 4096),
}


class RelativePositionBias(nn.Module):
    """BEiT-style learned bias per head for every (query, key) offset, plus 3 cls entries.
    Returns [heads, 1+N, 1+N], added to the attention logits (passed to SDPA as `attn_mask`)."""

    def __init__(self, grid, heads):
        super().__init__()
        n_rel = (2 * grid - 1) ** 2
        # +3: cls→tok, tok→cls, cls→cls. Zero-initialised, as released (§4): attention starts unbiased.
        self.table = nn.Parameter(torch.zeros(n_rel + 3, heads))

        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, N]
        rel = (coords[:, :, None] - coords[:, None, :]) + (grid - 1)  # [2, N, N], in [0, 2g-2]
        idx = F.pad(rel[0] * (2 * grid - 1) + rel[1], (1, 0, 1, 0), value=n_rel)  # row 0: cls→tok
        idx[1:, 0], idx[0, 0] = n_rel + 1, n_rel + 2
        self.register_buffer("index", idx, persistent=False)

    def forward(self):
        return self.table[self.index].permute(2, 0, 1)  # [heads, 1+N, 1+N]


class Block(nn.Module):
    """Pre-norm Transformer block with LayerScale (init 0.1, §4) and drop path.
    Attention has q and v biases but no k bias, as released (BEiT/SimMIM): a k bias adds the same
    number to every logit of a query, which softmax ignores."""

    def __init__(self, dim, heads, mlp, grid, *, drop_path=0.0, init_values=0.1):
        super().__init__()
        self.heads, self.drop_path = heads, drop_path
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.rel_pos_bias = RelativePositionBias(grid, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))
        self.gamma_1 = nn.Parameter(torch.full((dim,), init_values))  # LayerScale
        self.gamma_2 = nn.Parameter(torch.full((dim,), init_values))

    def attention(self, x_bnd):
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv_bnf = F.linear(x_bnd, self.qkv.weight, qkv_bias)
        q, k, v = rearrange(qkv_bnf, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        bias = self.rel_pos_bias().to(q.dtype)  # [heads, N, N] broadcasts over the batch
        out_bhnd = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(rearrange(out_bhnd, "b h n d -> b n (h d)"))

    def forward(self, x_bnd):
        # Stochastic depth ("row": the whole residual branch of a random subset of samples is dropped).
        x_bnd = x_bnd + stochastic_depth(
            self.gamma_1 * self.attention(self.norm1(x_bnd)), self.drop_path, "row", self.training
        )
        return x_bnd + stochastic_depth(
            self.gamma_2 * self.mlp(self.norm2(x_bnd)), self.drop_path, "row", self.training
        )


class ViT(nn.Module):
    """Vision Transformer returning its patch tokens as a map [B, D, H/p, W/p].
    Token sites: "blockK" = the patch tokens entering block K; "block0" (= "stem") is the patch
    embedding before cls token and position embedding are added — A²MIM's default (§3).
    As released (§4): position embeddings trunc-normal initialised (SimMIM's choice), not sin-cos;
    a zero-initialised relative position bias per block; the patch embedding keeps PyTorch's
    default conv init; every Linear trunc-normal 0.02 with zero bias."""

    family = "vit"
    default_token_site = "block0"
    mask_token_std = 0.02  # T ~ trunc-normal, as released (mim_vit.py: trunc_normal_ on the tensor)

    def __init__(self, arch, *, img_size=224, patch_size=16, drop_path=0.1, init_values=0.1):
        super().__init__()
        depth, dim, heads, mlp = VIT_CONFIGS[arch]
        self.arch = arch
        self.grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        # Linearly increasing stochastic depth; on the CPU whatever the default device (weights.py builds on "meta").
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp, self.grid, drop_path=r, init_values=init_values) for r in rates
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_weights()

        strides, self.out_stride = _site_strides(arch, patch_size=patch_size)
        self.token_sites = {name: (dim, stride) for name, stride in strides.items()}
        self.out_channels = dim

    def _init_weights(self):
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x_bchw, token_fn=None, token_at=None):
        token_at = _resolve_site(self.token_sites, self.default_token_site, token_at)
        feat_bdhw = self.patch_embed(x_bchw)
        B, D, h, w = feat_bdhw.shape
        if (h, w) != (self.grid, self.grid):
            raise ConfigError(
                f"this ViT was built for a {self.grid}×{self.grid} patch grid, got {h}×{w}"
            )
        if token_fn is not None and token_at == "block0":
            feat_bdhw = token_fn(feat_bdhw)
        x_bnd = torch.cat(
            [self.cls_token.expand(B, -1, -1), rearrange(feat_bdhw, "b d h w -> b (h w) d")], dim=1
        )
        x_bnd = x_bnd + self.pos_embed

        for k, block in enumerate(self.blocks):
            if token_fn is not None and k > 0 and token_at == f"block{k}":
                patches = token_fn(_tokens_to_map(x_bnd[:, 1:], h, w))
                x_bnd = torch.cat([x_bnd[:, :1], rearrange(patches, "b d h w -> b (h w) d")], dim=1)
            x_bnd = block(x_bnd)
        return _tokens_to_map(self.norm(x_bnd)[:, 1:], h, w)  # cls token dropped (§4)


def _tokens_to_map(x_bnd, h, w):
    return rearrange(x_bnd, "b (h w) d -> b d h w", h=h, w=w)


def _resolve_site(sites, default, token_at):
    """`None` → `default` (the encoder's A²MIM site); "stem" → the first of `sites` (SimMIM's); else must exist."""
    token_at = default if token_at is None else token_at  # "" or 0 is no site name
    if token_at == "stem":
        return next(iter(sites))
    if token_at not in sites:
        raise ConfigError(f"unknown token site {token_at!r}; choose 'stem' or one of {list(sites)}")
    return token_at


def token_site(encoder, token_at=None):
    """(name, channels, stride) of the site where the mask token goes."""
    name = _resolve_site(encoder.token_sites, encoder.default_token_site, token_at)
    return (name, *encoder.token_sites[name])


# --- Strides and image sizes, known without building an encoder (train.py settles its mask block first)
ARCHS = tuple(RESNET_LAYERS) + tuple(VIT_CONFIGS) + tuple(CONVNEXT_DEPTHS)


def arch_kind(arch):
    """ "resnet", "convnext" or "vit": the kind of encoder an arch builds, whose recipes and
    foreign key names (weights.py) it follows. The one place that tells an arch's kind."""
    if arch in RESNET_LAYERS:
        return "resnet"
    if arch in CONVNEXT_DEPTHS:
        return "convnext"
    return "vit"


def arch_family(arch):
    """ "vit" or "cnn": what an arch's encoder reports as `.family`, known without building it."""
    if arch_kind(arch) == "vit":
        return "vit"
    return "cnn"


def _check_arch(arch):
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")


ENCODER_CLASSES = {"resnet": ResNet, "convnext": ConvNeXt, "vit": ViT}


def _site_strides(arch, *, small_stem=False, patch_size=16):
    """({token site: stride} in network order, output stride): the encoder classes' own geometry.
    ResNet: the stem divides by 4 (7×7/2 conv, 3×3/2 max-pool; CIFAR-style: 1), layers 2–4 by 2 each.
    ConvNeXt: the stem by 4 (4×4/4 patchify; CIFAR-style: 1), each later stage's downsampling by 2.
    ViT: every block at the patch size."""
    kind = arch_kind(arch)
    stem = 1 if small_stem else 4
    if kind == "resnet":
        return {f"layer{k + 1}": stem * 2 ** max(k - 1, 0) for k in range(4)}, stem * 8
    if kind == "convnext":
        return {f"stage{k + 1}": stem * 2**k for k in range(4)}, stem * 8
    return {f"block{k}": patch_size for k in range(VIT_CONFIGS[arch][0])}, patch_size


def stem_and_patch(img_size, small_stem, patch_size):
    """(small_stem, patch_size) with build_encoder's defaults for the ones given as None: a
    CIFAR-style stem and 4-px ViT patches up to SMALL_INPUT px, else the standard stem and 16 px."""
    small = img_size <= SMALL_INPUT
    if small_stem is None:
        small_stem = small
    if not patch_size:
        patch_size = 4 if small else 16
    return small_stem, patch_size


def check_img_size(arch, img_size, *, small_stem=None, patch_size=None):
    """ConfigError unless build_encoder(arch, img_size, …) takes img_size: a multiple of the encoder's
    output stride (the ViT patch), so that the decoder gives back the input size (§4). With the
    default stem and patch that stride is smaller up to SMALL_INPUT px; the sentence says so and
    names the accepted sizes nearest to img_size."""

    def stride_at(size):
        stem, patch = stem_and_patch(size, small_stem, patch_size)
        return _site_strides(arch, small_stem=stem, patch_size=patch)[1]

    _check_arch(arch)
    if img_size < 1:
        raise ConfigError(f"image size must be at least 1 px, got {img_size}")
    stride = stride_at(img_size)
    if img_size % stride == 0:
        return
    small, large = stride_at(SMALL_INPUT), stride_at(SMALL_INPUT + 1)
    rule = f"multiples of {small}"
    if small != large:
        rule += f" up to {SMALL_INPUT} px and of {large} above"
    # The accepted sizes either side of img_size lie within two of the larger stride.
    window = range(max(1, img_size - 2 * max(small, large)), img_size + 2 * max(small, large) + 1)
    accepted = [n for n in window if n % stride_at(n) == 0]
    below = [n for n in accepted if n < img_size][-2:]
    above = [n for n in accepted if n > img_size][:2]
    near = below + above + ["…"]
    if below and below[0] > stride_at(1):  # the smallest size taken is one stride
        near.insert(0, "…")
    what = "patch size" if arch_family(arch) == "vit" else "output stride"
    raise ConfigError(
        f"image size {img_size} is not divisible by the {arch} {what} {stride}: {arch} takes {rule} "
        f"({', '.join(map(str, near))})"
    )


def token_site_stride(arch, img_size, token_at=None, *, small_stem=None, patch_size=None):
    """The stride of `token_site(build_encoder(arch, img_size, …), token_at)`, without building the
    encoder: what the default mask block needs before any model exists. ConfigError for a size the
    encoder refuses (`check_img_size`) or an unknown site."""
    check_img_size(arch, img_size, small_stem=small_stem, patch_size=patch_size)
    small_stem, patch_size = stem_and_patch(img_size, small_stem, patch_size)
    strides, _ = _site_strides(arch, small_stem=small_stem, patch_size=patch_size)
    default_site = ENCODER_CLASSES[arch_kind(arch)].default_token_site
    return strides[_resolve_site(strides, default_site, token_at)]


# --- The one entry point
def build_encoder(
    arch, img_size=224, *, width=None, small_stem=None, patch_size=None, drop_path=None
):
    """Build an encoder by name (see `ARCHS`).
    * `width`       ResNet base width (64 = standard; e.g. 16 for CPU runs) or ConvNeXt first-stage
                    width (96/128 standard).
    * `small_stem`  CIFAR-style stem; default: on when `img_size <= 64`.
    * `patch_size`  ViT patch; default 16, or 4 when `img_size <= 64`.
    * `drop_path`   ViT default 0.1 (§4), ConvNeXt default 0.
    Raises ConfigError naming the choices for an unknown arch, and naming the sizes it takes for an
    image size the encoder cannot tile exactly (`check_img_size`: the decoder must give back the input size)."""
    # First, so that an unknown arch gets its sentence.
    check_img_size(arch, img_size, small_stem=small_stem, patch_size=patch_size)
    small_stem, patch_size = stem_and_patch(img_size, small_stem, patch_size)
    kind = arch_kind(arch)
    if kind == "resnet":
        encoder = ResNet(arch, width=width or 64, small_stem=small_stem)
    elif kind == "convnext":
        encoder = ConvNeXt(arch, width=width, small_stem=small_stem, drop_path=drop_path or 0.0)
    else:
        dp = 0.1 if drop_path is None else drop_path
        encoder = ViT(arch, img_size=img_size, patch_size=patch_size, drop_path=dp)
    encoder.arch, encoder.img_size = arch, img_size
    return encoder
