"""Weights in and out: the one place that knows other code's names for our encoders' tensors.

In, `load_pretrained(path, arch=None)`: a file of pre-trained weights → our names
  * a checkpoint written by train.py;
  * the authors' released OpenMixup A²MIM pre-training checkpoints, in both published layouts: the mmcv
    runner checkpoint {"meta": {...}, "state_dict": {"backbone.*", "neck.*"}} (publish_model.py, torch's
    legacy serialization) and the backbone-only {"state_dict": {...}, "author": "openmixup"}
    (extract_backbone_weights.py). The arch is found from the keys and shapes (`openmixup_arch`); one key
    map per family (`openmixup_key`), as timm's `checkpoint_filter_fn`s;
  * a plain torchvision state dict (`torchvision_state_dict`'s export, or torchvision's own), given its arch.
Out, `export(encoder, path, to)`: a plain state dict that torchvision's or timm's model loads with strict=True.

Every file is read by torch.load(weights_only=True) (runtime.load_tensors), and the released files need
no allow-list: besides tensors their `meta` holds only dict / str / int (checked on files saved by
OpenMixup's own code), which the safe loader takes as they are.
"""

import math
import re

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

import models
import runtime
from runtime import CheckpointError, ConfigError, atomic_save

# --- In: the released OpenMixup checkpoints (openmixup/models/backbones/{mim_resnet,convnext,mim_vit}.py)
# Module paths there → ours, whole dotted components; the leaf (.weight, .bias, ...) follows unchanged.
# A ConvNeXt block → torchvision's CNBlock Sequential.
CONVNEXT_BLOCK = {
    "depthwise_conv": "block.0",
    "norm": "block.2",
    "pointwise_conv1": "block.3",
    "pointwise_conv2": "block.5",
    "gamma": "layer_scale",
}
# A ViT block.
VIT_BLOCK = {
    "ln1": "norm1",
    "ln2": "norm2",
    "attn.qkv": "qkv",
    "attn.proj": "proj",
    "attn.q_bias": "q_bias",
    "attn.v_bias": "v_bias",
    "attn.relative_position_bias_table": "rel_pos_bias.table",
    "ffn.layers.0.0": "mlp.0",
    "ffn.layers.1": "mlp.2",
    "gamma_1": "gamma_1",
    "gamma_2": "gamma_2",
}
# A ViT outside its blocks (the final norm is `ln1` there too).
VIT_TOP = {
    "patch_embed.projection": "patch_embed",
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "ln1": "norm",
}
MASK_TOKEN = {"mask_token": "token", "mask_gamma": "gamma"}  # → a2mim.MaskToken, [1, C, 1, 1] both
# The neck's 1×1 conv → a2mim.Decoder (then PixelShuffle, no weights): A²MIM's neck, and SimMIMNeck's for the
# released SimMIM baselines (its token: the stem's, [1, 64, 1, 1] for a ResNet, without γ).
DECODER = {"neck.decoder_pred.0": "conv", "neck.decoder.0": "conv"}


def _rename(name, table):
    """`name` with its leading module path replaced by the table's (whole components only); None: no entry."""
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


def openmixup_key(family, key):
    """A released backbone key (without "backbone.") → our encoder's, None for a key we have no place for.
    family: "resnet", "convnext" or "vit" (`models.arch_kind`)."""
    if family == "resnet":  # mmcls's ResNet names are torchvision's, which ours keep
        return key
    if family == "convnext":
        m = re.fullmatch(r"downsample_layers\.(\d)\.(.+)", key)
        if m:  # 0: the stem (4×4 conv, LN) = features.0; i: the LN + 2×2 conv before stage i = features.2i
            return f"features.{2 * int(m[1])}.{m[2]}"
        m = re.fullmatch(r"stages\.(\d)\.(\d+)\.(.+)", key)
        if m:  # block j of stage i = features.2i+1.j
            rest = _rename(m[3], CONVNEXT_BLOCK)
            return None if rest is None else f"features.{2 * int(m[1]) + 1}.{m[2]}.{rest}"
        return _rename(key, {"norm3": "norm"})  # the final norm on the last-stage map
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m:
        rest = _rename(m[2], VIT_BLOCK)
        return None if rest is None else f"blocks.{m[1]}.{rest}"
    return _rename(key, VIT_TOP)


def _size(state, key, dim):
    """state[key].shape[dim]; None where the key is missing or the tensor has fewer dims."""
    value = state.get(key)
    if not torch.is_tensor(value) or value.ndim <= (dim if dim >= 0 else -dim - 1):
        return None
    return value.shape[dim]


def _count(keys, prefix):
    """How many blocks `prefix.N.*` there are (N counted once)."""
    return len({k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix)})


def openmixup_arch(backbone):
    """(arch, encoder_kwargs) of a released backbone state dict (keys without "backbone."), found from its keys
    and shapes; None when it is none of ours. CNN weights take any image size: their img_size is the released 224."""
    keys = set(backbone)
    if "patch_embed.projection.weight" in keys:
        return _vit_arch(backbone)
    if "downsample_layers.0.0.weight" in keys:
        depths = tuple(_count(keys, f"stages.{i}.") for i in range(4))
        found = (depths, _size(backbone, "downsample_layers.0.0.weight", 0))  # depths, stem width
        arch = next((a for a, spec in models.CONVNEXT_DEPTHS.items() if spec == found), None)
    else:
        block = Bottleneck if "layer1.0.conv3.weight" in keys else BasicBlock
        found = (block, [_count(keys, f"layer{i}.") for i in range(1, 5)])
        arch = next((a for a, spec in models.RESNET_LAYERS.items() if spec == found), None)
    if arch is None:
        return None
    return arch, dict(arch=arch, img_size=224, small_stem=False)


def _vit_arch(backbone):
    """openmixup_arch of a ViT: its dims name the arch; its patch and position embedding, the image size."""
    found = (
        _count(backbone, "layers."),  # depth
        _size(backbone, "patch_embed.projection.weight", 0),  # dim
        _size(backbone, "layers.0.attn.relative_position_bias_table", 1),  # heads
        _size(backbone, "layers.0.ffn.layers.0.0.weight", 0),  # mlp
    )
    arch = next((a for a, spec in models.VIT_CONFIGS.items() if spec == found), None)
    patch = _size(backbone, "patch_embed.projection.weight", -1)
    tokens = _size(backbone, "pos_embed", 1)  # the cls token + grid × grid
    if arch is None or patch is None or tokens is None:
        return None
    grid = math.isqrt(tokens - 1)
    if grid**2 != tokens - 1:
        return None
    return arch, dict(arch=arch, img_size=grid * patch, patch_size=patch)


def from_openmixup(state, *, arch=None, path="the file"):
    """A released state dict (either layout's "state_dict": "backbone."-prefixed with "neck.*", or the bare
    backbone) → dict(arch, encoder_kwargs, encoder, mask_token, decoder, unused), in our names:
    encoder for models.build_encoder(**encoder_kwargs), mask_token for a2mim.MaskToken ({"token", "gamma"} as
    present), decoder for a2mim.Decoder, unused: the keys of no part (a fine-tuned file's "head.*").
    Every other key lands somewhere; the ViT's relative_position_index is checked equal to ours, then dropped
    (ours is computed, not stored). CheckpointError, one sentence, for a backbone that is none of ours."""
    if any(k.startswith("backbone.") for k in state):
        # the full checkpoint: backbone.*, neck.* (head.* fine-tuned)
        backbone = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
        rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    else:  # extract_backbone_weights.py's: the backbone alone, unprefixed
        backbone, rest = dict(state), {}
    found = openmixup_arch({k: v for k, v in backbone.items() if k not in MASK_TOKEN})
    if found is None:
        first = next(iter(backbone), "none")
        raise CheckpointError(
            f"{path} has OpenMixup's layout, but its backbone is none of the released A²MIM "
            f"encoders ({', '.join(models.ARCHS)}; first key {first!r})"
        )
    if arch is not None and found[0] != arch:
        raise CheckpointError(f"{path} holds a {found[0]} model, but --arch is {arch}")
    arch, kw = found
    encoder, token = _released_backbone(backbone, kw, path)
    decoder = {_rename(k, DECODER): v for k, v in rest.items() if _rename(k, DECODER) is not None}
    unused = [k for k in rest if _rename(k, DECODER) is None]
    _check_fits(encoder, kw, path)
    return dict(
        arch=arch,
        encoder_kwargs=kw,
        encoder=encoder,
        mask_token=token,
        decoder=decoder,
        unused=unused,
    )


def _released_backbone(backbone, kw, path):
    """(encoder, mask_token) state dicts in our names: every key of a released backbone lands in one of them
    (CheckpointError for a key with no place)."""
    arch = kw["arch"]
    family = models.arch_kind(arch)
    encoder, token = {}, {}
    for key, value in backbone.items():
        ours = openmixup_key(family, key)
        if key in MASK_TOKEN:  # ViT: [1, 1, D] → [1, D, 1, 1], as ours for every family
            token[MASK_TOKEN[key]] = value.reshape(1, -1, 1, 1)
        elif key.endswith("attn.relative_position_index"):
            _check_index(value, kw, path, key)
        elif ours is None:
            raise CheckpointError(
                f"{path}: the backbone key {key!r} has no place in our {arch} encoder"
            )
        elif key.endswith(".gamma") and family == "convnext":
            encoder[ours] = value.reshape(-1, 1, 1)  # LayerScale [C] → torchvision's [C, 1, 1]
        else:
            encoder[ours] = value
    return encoder, token


def _check_index(index, kw, path, key):
    """The released index has BEiT's layout, as ours: a different one would map the tables to other offsets."""
    heads = models.VIT_CONFIGS[kw["arch"]][2]
    ours = models.RelativePositionBias(kw["img_size"] // kw["patch_size"], heads).index
    if index.shape != ours.shape or not torch.equal(index, ours):
        raise CheckpointError(
            f"{path}: {key} is not BEiT's relative position index that our {kw['arch']} computes; "
            "its bias tables would be read at other offsets"
        )


def _strict_mismatch(model, state):
    """None if `model` loads `state` with strict=True; else torch's first complaint (missing / unexpected / shape)."""
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:  # torch lists every mismatch; the first says enough
        return (str(e).splitlines()[1:] or [str(e)])[0].strip()[:160]
    return None


def _check_fits(encoder_state, kw, path):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        reference = models.build_encoder(**kw)
    first = _strict_mismatch(reference, encoder_state)
    if first is not None:
        raise CheckpointError(f"{path} does not fit a {kw['arch']} encoder ({first})")


def from_torchvision(state, arch, *, path="the file"):
    """A torchvision state dict of `arch` (`torchvision_state_dict`'s layout) → our names: its classifier goes,
    a ConvNeXt's `classifier.0` is our final norm again."""
    encoder = {
        k.replace("classifier.0.", "norm."): v
        for k, v in state.items()
        if not k.startswith(("fc.", "classifier.2."))
    }
    kw = dict(arch=arch, img_size=224, small_stem=False)  # torchvision's stem at the standard width
    _check_fits(encoder, kw, path)
    return dict(arch=arch, encoder_kwargs=kw, encoder=encoder, mask_token={}, decoder={}, unused=[])


def _is_tensor_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


# A CheckpointError of its own: reconstruct.py tells "an encoder alone" from other bad files by its class.
class PlainStateDictError(CheckpointError):
    """A plain state dict without --arch: an encoder alone, of an arch the file cannot tell."""


def from_checkpoint(ckpt):
    """A train.py checkpoint (runtime.Checkpoint) → dict(arch, encoder_kwargs, encoder, mask_token, decoder,
    unused): A2MIM's state dict split into its three parts."""
    parts = {}
    for part in ("encoder", "mask_token", "decoder"):
        prefix = part + "."
        parts[part] = {
            k.removeprefix(prefix): v for k, v in ckpt.model.items() if k.startswith(prefix)
        }
    return dict(arch=ckpt.arch, encoder_kwargs=ckpt.encoder_kwargs, **parts, unused=[])


def is_released(obj):
    """Whether a loaded file has one of OpenMixup's layouts: {"state_dict": ...} or "backbone.*" keys."""
    if not isinstance(obj, dict):
        return False
    return isinstance(obj.get("state_dict"), dict) or any(
        str(k).startswith("backbone.") for k in obj
    )


def load_pretrained(path, *, arch=None):
    """Any file we take as pre-trained weights → dict(kind, path, arch, encoder_kwargs, encoder, mask_token,
    decoder, config, unused), every state dict in our names, for models.build_encoder(**encoder_kwargs),
    a2mim.MaskToken and a2mim.Decoder (mask_token / decoder are {} where the file has none).
    kind: "checkpoint" (train.py's; config = its config), "openmixup" (a released file, either layout) or
    "torchvision" (a plain state dict, which needs `arch`). CNNs from outside take any image size: their
    encoder_kwargs say the released 224. `arch` given: checked against the file (CheckpointError, one sentence)."""
    obj = runtime.load_tensors(path)
    if runtime.is_checkpoint(obj):
        ckpt = runtime.checkpoint_from(obj, path, arch)
        return dict(kind="checkpoint", path=path, config=ckpt.config, **from_checkpoint(ckpt))
    released = is_released(obj)
    state = obj.get("state_dict", obj) if released else obj
    if not _is_tensor_dict(state):
        raise runtime.not_our_checkpoint(path)
    if released:
        found = from_openmixup(state, arch=arch, path=path)
        return dict(kind="openmixup", path=path, config={}, **found)
    if arch is None:
        raise PlainStateDictError(
            f"{path} is a plain state dict; pass --arch to name its torchvision model"
        )
    found = from_torchvision(state, arch, path=path)
    return dict(kind="torchvision", path=path, config={}, **found)


def load_into(model, found):
    """Copy a `load_pretrained` result into an a2mim.A2MIM (train.py --init-from): the encoder strictly
    (CheckpointError, one sentence, when it does not fit), the mask token and the decoder where the file has them
    and they fit this model (same keys and shapes: not a token for another site or mode, a decoder for another
    stride). Returns the names of the parts copied, e.g. ["encoder", "mask_token", "decoder"]."""
    try:
        model.encoder.load_state_dict(found["encoder"])
    except RuntimeError as e:  # torch lists every mismatch; the first says enough
        first = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:160]
        raise CheckpointError(
            f"{found['path']} does not fit this {model.encoder.arch} encoder ({first})"
        ) from None
    copied = ["encoder"]
    for part in ("mask_token", "decoder"):
        ours = getattr(model, part).state_dict()
        theirs = found[part]
        fits = set(theirs) == set(ours) and all(theirs[k].shape == v.shape for k, v in ours.items())
        if theirs and fits:
            getattr(model, part).load_state_dict(theirs)
            copied.append(part)
    return copied


# --- Out: torchvision and timm. torchvision's models hold a classifier (a fresh one rides along), timm's are
# made without (num_classes=0). The final norm (ConvNeXt, ViT) goes where each can apply it: torchvision's after
# the pool (`classifier.0`), timm's before it (`norm_pre` / `norm`), where it gives exactly our features.
EXPORTS = ("torchvision", "timm")


def check_export(arch, to):
    """ConfigError, one sentence, unless `to` has a model for `arch` (known before any encoder is built)."""
    if to not in EXPORTS:
        raise ConfigError(f"unknown export target {to!r}; choose one of {', '.join(EXPORTS)}")
    if to == "torchvision" and models.arch_kind(arch) == "vit":
        raise ConfigError(
            f"torchvision has no ViT with relative position bias; export {arch} with "
            "--export-to timm (timm's BEiT)"
        )
    if to == "torchvision" and not hasattr(torchvision.models, arch):
        raise ConfigError(f"torchvision has no {arch}; export it with --export-to timm")


def torchvision_state_dict(encoder, num_classes=1000):
    """Encoder weights as a state dict that `torchvision.models.<arch>()` loads with strict=True.
    The encoder holds no classifier, so a freshly initialised one (torchvision's own init) is
    added: fine-tuning recipes replace or re-train it anyway. ResNet and ConvNeXt only (a ViT has
    no torchvision twin with relative position bias)."""
    check_export(encoder.arch, "torchvision")
    if models.arch_kind(encoder.arch) == "resnet":
        head = nn.Linear(encoder.out_channels, num_classes)
        extra = {f"fc.{k}": v for k, v in head.state_dict().items()}
    else:  # ConvNeXt
        # torchvision's head is LayerNorm2d → Flatten → Linear. Our final norm (on the 7×7 map,
        # before pooling) has the same shape as the head's LayerNorm (after pooling): its weights
        # become `classifier.0`, the closest place torchvision has for them.
        c = encoder.out_channels
        linear = nn.Linear(c, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.02)  # torchvision's ConvNeXt head init
        nn.init.zeros_(linear.bias)
        extra = {f"classifier.0.{k}": v for k, v in encoder.norm.state_dict().items()}
        extra |= {f"classifier.2.{k}": v for k, v in linear.state_dict().items()}
    state = encoder.state_dict()
    return {k: v.detach().clone() for k, v in state.items() if not k.startswith("norm.")} | extra


# Ours → timm, whole dotted components (names not listed are the same there).
TIMM_CONVNEXT_BLOCK = {
    "block.0": "conv_dw",
    "block.2": "norm",
    "block.3": "mlp.fc1",
    "block.5": "mlp.fc2",
    "layer_scale": "gamma",
}
BEIT_BLOCK = {
    "qkv": "attn.qkv",
    "proj": "attn.proj",
    "q_bias": "attn.q_bias",
    "v_bias": "attn.v_bias",
    "rel_pos_bias.table": "attn.relative_position_bias_table",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}
# BEiT's names for ours (timm's beit_*_patch16_224 have these dims and init_values 0.1 / 1e-5: loaded over anyway)
BEIT_NAMES = {
    ("vit_base", 224, 16): "beit_base_patch16_224",
    ("vit_large", 224, 16): "beit_large_patch16_224",
}


def timm_key(family, key):
    """Our encoder key → timm's (resnet*, convnext_* with head_norm_first=True, Beit with use_fc_norm=False)."""
    if family == "resnet":  # timm's ResNet keeps torchvision's names
        return key
    if family == "convnext":
        if key.startswith("norm."):  # our final norm, on the map before pooling = timm's norm_pre
            return "norm_pre." + key.removeprefix("norm.")
        i, rest = re.fullmatch(r"features\.(\d)\.(.+)", key).groups()
        if i == "0":
            return "stem." + rest
        if int(i) % 2 == 0:  # LN + 2×2 conv before stage i/2
            return f"stages.{int(i) // 2}.downsample.{rest}"
        block, rest = rest.split(".", 1)
        return f"stages.{int(i) // 2}.blocks.{block}.{_rename(rest, TIMM_CONVNEXT_BLOCK)}"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m:
        return f"blocks.{m[1]}.{_rename(m[2], BEIT_BLOCK) or m[2]}"  # norm1/2, gamma_1/2: the same
    if key.startswith("patch_embed."):
        return "patch_embed.proj." + key.removeprefix("patch_embed.")
    return key  # cls_token, pos_embed, norm: the same


def timm_state_dict(encoder):
    """Encoder weights as a state dict that `timm_model(encoder)` loads with strict=True: no classifier
    (num_classes=0; `reset_classifier(K)` adds one), the final norm before the pool, so that the model's
    forward_features(x) is our encoder's output (a ViT's: with the cls token in front) and its pooled
    output (global_pool "avg", timm's default) the mean of that map, the feature of our linear probe."""
    family = models.arch_kind(encoder.arch)
    state = {}
    for key, value in encoder.state_dict().items():
        value = value.detach().clone()
        # ConvNeXt LayerScale: [C, 1, 1] in torchvision's block (ours), [C] in timm's
        if key.endswith("layer_scale"):
            value = value.flatten()
        state[timm_key(family, key)] = value
    return state


def timm_recipe(encoder):
    """(timm model name or None, keyword arguments) of the timm model that takes `timm_state_dict(encoder)`.
    None: no named model has these dims (our vit_small / vit_tiny, other sizes): build timm.models.beit.Beit."""
    kind = models.arch_kind(encoder.arch)
    if kind == "resnet":
        return encoder.arch, dict(num_classes=0)
    if kind == "convnext":
        return encoder.arch, dict(num_classes=0, head_norm_first=True)
    depth, dim, heads, mlp = models.VIT_CONFIGS[encoder.arch]
    patch = encoder.out_stride
    # use_fc_norm=False: our final norm stays `norm`, on every token before the mean (timm's default for
    # global_pool "avg" would move it after the mean, as the released fine-tuning's fc_norm).
    kw = dict(
        num_classes=0,
        use_abs_pos_emb=True,
        use_rel_pos_bias=True,
        init_values=0.1,
        use_fc_norm=False,
    )
    img_size = encoder.grid * patch
    name = BEIT_NAMES.get((encoder.arch, img_size, patch))
    if name is None:
        kw |= dict(
            img_size=img_size,
            patch_size=patch,
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            mlp_ratio=mlp / dim,
        )
    return name, kw


def timm_model(encoder):
    """The timm model (pretrained=False, on the current default device) that loads timm_state_dict(encoder)."""
    import timm  # only here: an export to timm, or its test

    name, kw = timm_recipe(encoder)
    if name is None:
        return timm.models.beit.Beit(**kw)
    return timm.create_model(name, pretrained=False, **kw)


def export(encoder, path, to="torchvision"):
    """Write the encoder as a plain state dict for `to` ("torchvision" or "timm"), once the library's own model has
    loaded it with strict=True. Returns how to build that model, for the user."""
    check_export(encoder.arch, to)
    if to == "timm":
        state = timm_state_dict(encoder)
        name, kw = timm_recipe(encoder)
        args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        how = f"timm.create_model({name!r}, {args})"
        if name is None:
            how = f"timm.models.beit.Beit({args})"
        with torch.device("meta"):
            reference = timm_model(encoder)
    else:
        state = torchvision_state_dict(encoder)
        how = f"torchvision.models.{encoder.arch}()"
        with torch.device("meta"):
            reference = getattr(torchvision.models, encoder.arch)()
    first = _strict_mismatch(reference, state)
    if first is not None:
        raise ConfigError(
            f"this {encoder.arch} is not {to}'s ({first}); export needs the standard width and "
            "stem, i.e. pre-training at img_size > 64 with --width 64"
        )
    atomic_save(path, state)
    return how
