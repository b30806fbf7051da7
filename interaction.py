"""Multi-order interaction strength J^(m) (METHOD.md §9; Deng et al., ICLR 2022): the analysis behind
A²MIM's idea, in its own module because it measures any trained classifier after training and is no
part of the method that a2mim.py pre-trains.

    RATIOS                the released tool's 13 context ratios r; the order is m = floor((n − 2)·r)
    default_grid          the players: 14×14 cells where they tile the image (8×8 at 32 px)
    sample_pairs          the (i, j) player pairs, drawn as the released tool draws them
    interaction_strength  J^(m) of a classifier over images, with the released protocol's defaults
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

from runtime import ConfigError

# The released tool's 13 context ratios r; the order is m = floor((n − 2)·r).
RATIOS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def log_odds(logits_bk, labels_b):
    """log p_y − log(1 − p_y) of the true class y, from logits [B, K] → [B]."""
    true_b = logits_bk.gather(1, labels_b[:, None])[:, 0]
    others_bk = logits_bk.scatter(1, labels_b[:, None], float("-inf"))
    return true_b - torch.logsumexp(others_bk, dim=1)


def default_grid(img_size):
    """14 cells a side where it tiles the image (224 px → 16-px cells, the released tool), else the
    largest grid ≤ 14 that does (32 px → 8, i.e. 4-px cells, the size of our small ViT patches)."""
    return next(g for g in range(14, 0, -1) if img_size % g == 0)


def sample_pairs(grid, count, *, radius=2, generator=None):
    """(i, j) player pairs as the released tool draws them → LongTensor [count, 2] (row-major cells):
    i uniform; j = i + one of the (2r+1)² − 1 offsets within Chebyshev distance r, clamped to the
    border; pairs with j = i or already drawn (in either order) are rejected and redrawn."""
    offsets = [
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if dy or dx
    ]
    # Every pair drawn is within distance r; without enough of them the loop below would never end.
    possible = sum(max(0, grid - abs(dy)) * max(0, grid - abs(dx)) for dy, dx in offsets) // 2
    if count > possible:
        raise ConfigError(
            f"a {grid}×{grid} grid has only {possible} distinct pairs of cells within distance "
            f"{radius}, but {count} were asked for; use fewer pairs or a finer grid"
        )
    chosen = []
    while len(chosen) < count:
        y, x = torch.randint(grid, (2,), generator=generator).tolist()
        dy, dx = offsets[torch.randint(len(offsets), (1,), generator=generator).item()]
        # The neighbour, clamped to the border.
        ny, nx = min(max(y + dy, 0), grid - 1), min(max(x + dx, 0), grid - 1)
        i, j = y * grid + x, ny * grid + nx
        if i != j and (i, j) not in chosen and (j, i) not in chosen:
            chosen.append((i, j))
    return torch.tensor(chosen, dtype=torch.long).view(-1, 2)


@torch.no_grad()
def interaction_strength(
    model,
    images_bchw,
    labels_b,
    *,
    grid=None,
    orders=RATIOS,
    pairs=50,
    contexts=50,
    baseline=None,
    generator=None,
    chunk=1024,
):
    """Multi-order interaction strength J^(m) of a classifier (§9; Deng et al., ICLR 2022).
    The image is cut into n = grid² patches (the players; default `default_grid`). v(S) = log-odds
    of the true class when only the patches in S are kept and the rest set to `baseline` (the
    mean colour: a tensor broadcastable to [3, H, W]; default 0, the dataset mean once normalised).
        Δv(i, j, S) = v(S ∪ {i, j}) − v(S ∪ {i}) − v(S ∪ {j}) + v(S)
        I^(m)(i, j) = E_{S ⊆ N∖{i,j}, |S| = m} Δv(i, j, S)
        J^(m)       = E_x E_{(i,j)} |I^(m)(i, j)|,  then divided by its mean over the orders.
    Defaults are the released protocol: the 13 ratios, 50 pairs × 50 contexts per image and order.
    `pairs`: an int (drawn per image by `sample_pairs`) or a LongTensor [P, 2] of cell indices.
    The model runs in eval mode (BatchNorm with its running statistics) and is put back after.
    Returns {"orders": [M] ratios, "J": [M] normalised, "I_abs": [M] un-normalised,
    "I_abs_bm": [B, M] per image}."""
    B, _, H, _ = images_bchw.shape
    if grid is None:
        grid = default_grid(H)
    if grid < 1 or H % grid:
        raise ConfigError(f"the interaction grid {grid} must tile the {H}-px image")
    n = grid * grid
    if baseline is None:
        baseline = torch.zeros(3, 1, 1)
    baseline = baseline.to(images_bchw.device)

    # BatchNorm on its running statistics: v(S) must not depend on the other coalitions.
    modes = []
    if isinstance(model, nn.Module):
        modes = [(module, module.training) for module in model.modules()]
    for module, _ in modes:
        module.eval()
    try:
        I_abs_bm = torch.zeros(B, len(orders))
        for b in range(B):
            chosen_p2 = pairs
            if not torch.is_tensor(pairs):
                chosen_p2 = sample_pairs(grid, pairs, generator=generator)
            for o, ratio in enumerate(orders):
                m = math.floor(round((n - 2) * ratio, 6))
                S_pcn = _contexts(chosen_p2, n, m, contexts, generator)
                delta_pc = _delta_v(
                    model, images_bchw[b], labels_b[b], chosen_p2, S_pcn, grid, baseline, chunk
                )
                # E_S inside |·|, E_pairs outside.
                I_abs_bm[b, o] = delta_pc.mean(dim=1).abs().mean()
    finally:
        # Every submodule back in the mode it came in.
        for module, training in modes:
            module.train(training)

    I_abs = I_abs_bm.mean(dim=0)  # E_x
    return {
        "orders": torch.tensor(orders),
        "J": I_abs / I_abs.mean(),
        "I_abs": I_abs,
        "I_abs_bm": I_abs_bm,
    }


def _contexts(pairs_p2, n, m, contexts, generator):
    """`contexts` random subsets S of size m of the n players minus {i, j}, per pair → bool [P, C, n]."""
    noise_pcn = torch.rand(len(pairs_p2), contexts, n, generator=generator)
    p = torch.arange(len(pairs_p2))
    noise_pcn[p, :, pairs_p2[:, 0]] = 2.0  # i and j rank last, so they are never drawn into S
    noise_pcn[p, :, pairs_p2[:, 1]] = 2.0
    rank_pcn = noise_pcn.argsort(dim=-1).argsort(dim=-1)
    return rank_pcn < m


def _delta_v(model, img_chw, label, pairs_p2, S_pcn, grid, baseline, chunk):
    """Δv(i, j, S) = v(S ∪ {i, j}) − v(S ∪ {i}) − v(S ∪ {j}) + v(S) for every pair and context
    → [P, C]."""
    n = grid * grid
    with_i_pn = F.one_hot(pairs_p2[:, 0], n).bool()
    with_j_pn = F.one_hot(pairs_p2[:, 1], n).bool()
    # The four coalitions of Δv, as keep-masks [P, C, 4, n].
    coalitions_pc4n = torch.stack(
        [
            S_pcn,
            S_pcn | with_i_pn[:, None],
            S_pcn | with_j_pn[:, None],
            S_pcn | (with_i_pn | with_j_pn)[:, None],
        ],
        dim=2,
    )
    keep_kn = coalitions_pc4n.flatten(0, 2)
    v_k = _coalition_values(model, img_chw, label, keep_kn, grid, baseline, chunk)
    v_S, v_Si, v_Sj, v_Sij = rearrange(v_k, "(p c four) -> four p c", p=len(pairs_p2), four=4)
    return v_Sij - v_Si - v_Sj + v_S


def _coalition_values(model, img_chw, label, keep_kn, grid, baseline, chunk):
    """v(S) for K coalitions: patches outside S set to the baseline, log-odds of `label` → [K]."""
    cell = img_chw.shape[-1] // grid
    out = []
    for keep in keep_kn.split(chunk):
        keep_k1hw = repeat(
            keep.to(img_chw.dtype), "k (h w) -> k 1 (h c1) (w c2)", h=grid, c1=cell, c2=cell
        )
        x_kchw = torch.lerp(
            baseline.expand_as(img_chw)[None], img_chw[None], keep_k1hw.to(img_chw.device)
        )
        labels = torch.full((len(keep),), int(label), device=img_chw.device)
        out.append(log_odds(model(x_kchw).float(), labels).cpu())
    return torch.cat(out)
