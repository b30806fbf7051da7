"""Encoders that A²MIM pre-trains: ResNet, ViT and ConvNeXt (METHOD.md §4), built by `build_encoder(arch,
img_size, **kw)`. All share one interface, so that `a2mim.py` never asks "which architecture is this?":

    feat_bchw = encoder(x_bchw, token_fn=None, token_at=None)

x_bchw [B, 3, H, W] is the (masked and filled) image; `token_fn(feat_bchw) -> feat_bchw` is applied exactly once,
to the feature map at the token site `token_at` (§3: where the mask token is written; None = plain forward);
feat_bchw [B, out_channels, H / out_stride, W / out_stride] is the last feature map. Attributes: `arch`, `family`
("cnn" / "vit": picks the per-family defaults), `out_channels` and `out_stride` (what the decoder needs, §4),
`token_sites` {name: (channels, stride)} in network order ("stem" = the first, SimMIM's) and `default_token_site`
(A²MIM's, §3).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from einops import rearrange
from torchvision.models.convnext import CNBlockConfig, LayerNorm2d
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import stochastic_depth

class ConfigError(ValueError):
    """A setting the user can fix (unknown arch or option, a size that does not tile). The
    scripts print its one sentence and exit with code 2; any other exception is a bug and keeps
    its traceback. A ValueError, so library callers may catch either."""

# Inputs this small (Fashion-MNIST, CIFAR) get a CIFAR-style stem: a 3×3 stride-1 conv and no
# max-pool for ResNets, 4-px patches for ViTs. Otherwise a 32-px image would leave a 1×1 map.
SMALL_INPUT = 64


# --- ResNet (§4): torchvision's ResNet, so that the weights load straight back into torchvision
RESNET_LAYERS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
                 "resnet50": (Bottleneck, [3, 4, 6, 3]), "resnet101": (Bottleneck, [3, 4, 23, 3]),
                 "resnet152": (Bottleneck, [3, 8, 36, 3]),
                 "resnet200": (Bottleneck, [3, 24, 36, 3])}  # not in torchvision; same blocks, deeper stages 2-3

class ResNet(torchvision.models.ResNet):
    """torchvision's ResNet without `avgpool`/`fc`, plus a token hook before any stage.
    Keys of `state_dict()` are exactly torchvision's (minus `fc.*`), see `torchvision_state_dict`.
    Token sites: "layerK" = the input of stage K ("stem" = layer1's input). A²MIM uses
    "layer4" (stride 16 at standard width, 14×14 at 224 px; §3)."""

    family = "cnn"

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

        stem_stride = 1 if small_stem else 4
        chans = [width] + [width * block.expansion * 2**k for k in range(4)]  # the stem's, then each stage's output
        # The input of layer{k+1} is the output of layer{k} (layer1's: the stem's, at the stem's stride).
        self.token_sites = {f"layer{k + 1}": (chans[k], stem_stride * 2 ** max(k - 1, 0)) for k in range(4)}
        self.default_token_site = "layer4"
        self.out_channels, self.out_stride = chans[4], stem_stride * 8

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
        token_at = _resolve_site(self, token_at)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x_bchw))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            if token_fn is not None and name == token_at:
                x = token_fn(x)
            x = getattr(self, name)(x)
        return x

def torchvision_state_dict(encoder, num_classes=1000):
    """Encoder weights as a state dict that `torchvision.models.<arch>()` loads with strict=True.
    The encoder holds no classifier, so a freshly initialised one (torchvision's own init) is
    added: fine-tuning recipes replace or re-train it anyway. ResNet and ConvNeXt only (a ViT has
    no torchvision twin with relative position bias)."""
    if isinstance(encoder, ResNet):
        head = nn.Linear(encoder.out_channels, num_classes)
        extra = {f"fc.{k}": v for k, v in head.state_dict().items()}
    elif isinstance(encoder, ConvNeXt):
        # torchvision's head is LayerNorm2d → Flatten → Linear. Our final norm (on the 7×7 map,
        # before pooling) has the same shape as the head's LayerNorm (after pooling): its weights
        # become `classifier.0`, the closest place torchvision has for them.
        c = encoder.out_channels
        linear = nn.Linear(c, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.02)  # torchvision's ConvNeXt head init
        nn.init.zeros_(linear.bias)
        extra = {f"classifier.0.{k}": v for k, v in encoder.norm.state_dict().items()}
        extra |= {f"classifier.2.{k}": v for k, v in linear.state_dict().items()}
    else:
        raise ConfigError(f"only ResNet and ConvNeXt encoders export to torchvision, got {type(encoder).__name__}")
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items() if not k.startswith("norm.")}
    return {**state, **extra}

def export_torchvision(encoder, path):
    """Write torchvision_state_dict(encoder) to `path` once torchvision's own model loads it strictly."""
    from runtime import atomic_save  # the one file models.py writes
    if not hasattr(torchvision.models, encoder.arch):
        raise ConfigError(f"torchvision has no {encoder.arch}, so there is nothing to export it to")
    state = torchvision_state_dict(encoder)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        reference = getattr(torchvision.models, encoder.arch)()
    try:
        reference.load_state_dict(state, assign=True)  # strict: torchvision's keys and shapes
    except RuntimeError as e:  # torch lists every mismatch; the first says enough
        first = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:160]
        raise ConfigError(f"this {encoder.arch} is not torchvision's ({first}); export needs the standard width "
                          "and stem, i.e. pre-training at img_size > 64 with --width 64") from None
    atomic_save(path, state)


# --- ConvNeXt (the paper's third family): torchvision's ConvNeXt, token after the last downsampling
CONVNEXT_DEPTHS = {"convnext_tiny": ((3, 3, 9, 3), 96), "convnext_small": ((3, 3, 27, 3), 96),  # depths, width
                   "convnext_base": ((3, 3, 27, 3), 128)}

class ConvNeXt(torchvision.models.ConvNeXt):
    """torchvision's ConvNeXt `features` (keys unchanged) without the classifier.
    `features` = [stem, stage1, down, stage2, down, stage3, down, stage4]. Token sites:
    "stageK" = the input of stage K (after its downsampling layer); A²MIM uses "stage4"
    (stride 32, 7×7 at 224 px; §3). "stem" = the input of stage 1."""

    family = "cnn"

    def __init__(self, arch, *, width=None, small_stem=False, drop_path=0.0):
        depths, base = CONVNEXT_DEPTHS[arch]
        dims = [(width or base) * 2**k for k in range(4)]
        setting = [CNBlockConfig(dims[k], dims[k + 1] if k < 3 else None, depths[k]) for k in range(4)]
        super().__init__(setting, stochastic_depth_prob=drop_path)
        if small_stem:  # 32-px inputs: a stride-1 3×3 stem instead of the 4×4 patchify stem
            self.features[0] = nn.Sequential(nn.Conv2d(3, dims[0], 3, padding=1), LayerNorm2d(dims[0], eps=1e-6))
        del self.avgpool, self.classifier
        # §4: the released encoder ends with a LayerNorm on the last-stage map (`norm3`,
        # gap_before_final_norm=False); the decoder reads that normalised map.
        self.norm = LayerNorm2d(dims[3], eps=1e-6)
        self.arch = arch

        s = 1 if small_stem else 4
        self.token_sites = {f"stage{k + 1}": (dims[k], s * 2**k) for k in range(4)}
        self.default_token_site = "stage4"
        self.out_channels, self.out_stride = dims[3], s * 8

    def forward(self, x_bchw, token_fn=None, token_at=None):
        token_at = _resolve_site(self, token_at)
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
    "vit_tiny": (6, 192, 3, 768),     # ours, for 32-px CPU runs (not in the paper)
    "vit_small": (8, 768, 8, 2304),   # the paper's "ViT-S": 8 layers, 768 wide (48.8 M), not DeiT-S
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
        coords = torch.stack([ys.flatten(), xs.flatten()])              # [2, N]
        rel = (coords[:, :, None] - coords[:, None, :]) + (grid - 1)    # [2, N, N], in [0, 2g-2]
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
        x_bnd = x_bnd + stochastic_depth(self.gamma_1 * self.attention(self.norm1(x_bnd)), self.drop_path, "row",
                                         self.training)
        return x_bnd + stochastic_depth(self.gamma_2 * self.mlp(self.norm2(x_bnd)), self.drop_path, "row", self.training)

class ViT(nn.Module):
    """Vision Transformer returning its patch tokens as a map [B, D, H/p, W/p].
    Token sites: "blockK" = the patch tokens entering block K; "block0" (= "stem") is the patch
    embedding before cls token and position embedding are added — A²MIM's default (§3).
    As released (§4): position embeddings trunc-normal initialised (SimMIM's choice), not sin-cos;
    a zero-initialised relative position bias per block; the patch embedding keeps PyTorch's
    default conv init; every Linear trunc-normal 0.02 with zero bias."""

    family = "vit"

    def __init__(self, arch, *, img_size=224, patch_size=16, drop_path=0.1, init_values=0.1):
        super().__init__()
        depth, dim, heads, mlp = VIT_CONFIGS[arch]
        self.arch = arch
        self.grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        rates = torch.linspace(0, drop_path, depth).tolist()  # linearly increasing stochastic depth
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp, self.grid, drop_path=r, init_values=init_values) for r in rates
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_weights()

        self.token_sites = {f"block{k}": (dim, patch_size) for k in range(depth)}
        self.default_token_site = "block0"
        self.out_channels, self.out_stride = dim, patch_size

    def _init_weights(self):
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x_bchw, token_fn=None, token_at=None):
        token_at = _resolve_site(self, token_at)
        feat_bdhw = self.patch_embed(x_bchw)
        B, D, h, w = feat_bdhw.shape
        if (h, w) != (self.grid, self.grid):
            raise ConfigError(f"this ViT was built for a {self.grid}×{self.grid} patch grid, got {h}×{w}")
        if token_fn is not None and token_at == "block0":
            feat_bdhw = token_fn(feat_bdhw)
        x_bnd = torch.cat([self.cls_token.expand(B, -1, -1), rearrange(feat_bdhw, "b d h w -> b (h w) d")], dim=1)
        x_bnd = x_bnd + self.pos_embed

        for k, block in enumerate(self.blocks):
            if token_fn is not None and k > 0 and token_at == f"block{k}":
                patches = token_fn(_tokens_to_map(x_bnd[:, 1:], h, w))
                x_bnd = torch.cat([x_bnd[:, :1], rearrange(patches, "b d h w -> b (h w) d")], dim=1)
            x_bnd = block(x_bnd)
        return _tokens_to_map(self.norm(x_bnd)[:, 1:], h, w)  # cls token dropped (§4)

def _tokens_to_map(x_bnd, h, w):
    return rearrange(x_bnd, "b (h w) d -> b d h w", h=h, w=w)

def _resolve_site(encoder, token_at):
    """`None` → the encoder's A²MIM default; "stem" → the first site (SimMIM's); else must exist."""
    token_at = token_at or encoder.default_token_site
    if token_at == "stem":
        return next(iter(encoder.token_sites))
    if token_at not in encoder.token_sites:
        raise ConfigError(f"unknown token site {token_at!r}; choose 'stem' or one of {list(encoder.token_sites)}")
    return token_at

def token_site(encoder, token_at=None):
    """(name, channels, stride) of the site where the mask token goes."""
    name = _resolve_site(encoder, token_at)
    return (name, *encoder.token_sites[name])


# --- The one entry point
ARCHS = tuple(RESNET_LAYERS) + tuple(VIT_CONFIGS) + tuple(CONVNEXT_DEPTHS)

def arch_family(arch):
    """"vit" or "cnn": what an arch's encoder reports as `.family`, known without building it."""
    return "vit" if arch in VIT_CONFIGS else "cnn"

def build_encoder(arch, img_size=224, *, width=None, small_stem=None, patch_size=None, drop_path=None):
    """Build an encoder by name (see `ARCHS`).
    * `width`       ResNet base width (64 = standard; e.g. 16 for CPU runs) or ConvNeXt first-stage
                    width (96/128 standard).
    * `small_stem`  CIFAR-style stem; default: on when `img_size <= 64`.
    * `patch_size`  ViT patch; default 16, or 4 when `img_size <= 64`.
    * `drop_path`   ViT default 0.1 (§4), ConvNeXt default 0.
    Raises ValueError naming the choices for an unknown arch, and for an image size the encoder
    cannot tile exactly (the decoder must give back the input size)."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    small = img_size <= SMALL_INPUT
    small_stem = small if small_stem is None else small_stem
    if arch in RESNET_LAYERS:
        encoder = ResNet(arch, width=width or 64, small_stem=small_stem)
    elif arch in CONVNEXT_DEPTHS:
        encoder = ConvNeXt(arch, width=width, small_stem=small_stem, drop_path=drop_path or 0.0)
    else:
        patch_size = patch_size or (4 if small else 16)
        if img_size % patch_size:
            raise ConfigError(f"image size {img_size} is not divisible by the ViT patch size {patch_size}")
        dp = 0.1 if drop_path is None else drop_path
        encoder = ViT(arch, img_size=img_size, patch_size=patch_size, drop_path=dp)
    if img_size % encoder.out_stride:
        raise ConfigError(f"image size {img_size} must be divisible by the {arch} output stride {encoder.out_stride}")
    encoder.arch, encoder.img_size = arch, img_size
    return encoder

