"""Invariants of the multi-order interaction strength J^(m) (METHOD.md §9, interaction.py): analytic
values of toy models, the released protocol's defaults, the pairs it draws, eval mode.
"""

import inspect
import math

import pytest
import torch

from interaction import RATIOS, default_grid, interaction_strength, log_odds, sample_pairs
from models import build_encoder
from runtime import ConfigError


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed))


def tiny_resnet18():
    """A CPU-sized ResNet-18 at 32 px (CIFAR stem)."""
    torch.manual_seed(0)
    return build_encoder("resnet18", 32, width=8)


def randomise_norms_(module, seed=0):
    """Move BN away from its init (zero-γ residual branches, running statistics 0 and 1), so that
    train mode and eval mode would give different outputs."""
    g = gen(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith(("bn3.weight", "bn2.weight")):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def _present_bn(x_bchw, grid=8):
    """Which of the grid cells of an all-ones image are kept (1) or set to the 0 baseline."""
    return torch.nn.functional.adaptive_avg_pool2d(x_bchw.mean(1, keepdim=True), grid).flatten(1)


def _toy_model(pair_w_nn, triple_b):
    """v(S) = Σ_{i<j ∈ S} w_ij + b·C(|S|, 3), as the logit of class 0 against a 0 logit, so the
    log-odds is exactly v. Then Δv(i, j, S) = w_ij + b·|S| for every context S, so
    I^(m)(i, j) = w_ij + b·m exactly."""

    def model(x_bchw):
        x_bn = _present_bn(x_bchw)
        pairs_b = 0.5 * ((x_bn @ pair_w_nn) * x_bn).sum(1)  # w symmetric with zero diagonal
        k = x_bn.sum(1)
        v = pairs_b + triple_b * k * (k - 1) * (k - 2) / 6
        return torch.stack([v, torch.zeros_like(v)], dim=1)

    return model


def _symmetric_weights(n, seed):
    w = torch.randn(n, n, generator=gen(seed), dtype=torch.float64).float() * 0.3
    w = (w + w.T) / 2
    return w.fill_diagonal_(0)


def _all_neighbour_pairs(grid, radius):
    cells = [(y, x) for y in range(grid) for x in range(grid)]
    return torch.tensor(
        [
            (a * grid + b, c * grid + d)
            for a, b in cells
            for c, d in cells
            if (a, b) < (c, d) and max(abs(a - c), abs(b - d)) <= radius
        ]
    )


def test_log_odds_of_a_two_class_model_is_the_logit_difference():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    torch.testing.assert_close(log_odds(logits, torch.tensor([0, 1])), torch.tensor([3.0, 0.0]))


def test_interaction_strength_matches_analytic_values_of_a_toy_model():
    n, b = 64, 0.01
    w = _symmetric_weights(n, 0)
    images, labels = torch.ones(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    pairs = _all_neighbour_pairs(8, 2)
    out = interaction_strength(
        _toy_model(w, b), images, labels, grid=8, pairs=pairs, contexts=3, generator=gen(0)
    )
    m = torch.floor(out["orders"] * (n - 2) + 1e-6)
    expected = torch.stack([(w[pairs[:, 0], pairs[:, 1]] + b * mi).abs().mean() for mi in m])
    torch.testing.assert_close(out["I_abs"], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["J"], expected / expected.mean(), rtol=1e-4, atol=1e-4)
    # Per image (for a bootstrap over images): both images are the same, so both rows are the expected values.
    torch.testing.assert_close(out["I_abs_bm"], expected.expand(2, -1), rtol=1e-4, atol=1e-4)


def test_interaction_strength_is_invariant_to_the_order_in_which_players_are_listed():
    model = _toy_model(_symmetric_weights(64, 1), -0.02)
    images, labels = torch.ones(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)
    pairs = torch.tensor([[0, 1], [9, 18], [20, 27], [35, 44], [50, 60]])
    listed = interaction_strength(model, images, labels, pairs=pairs, contexts=4, generator=gen(0))
    # Another order, and (j, i) for (i, j).
    shuffled = pairs[torch.randperm(len(pairs), generator=gen(3))].flip(1)
    relisted = interaction_strength(
        model, images, labels, pairs=shuffled, contexts=4, generator=gen(7)
    )
    torch.testing.assert_close(listed["J"], relisted["J"], rtol=1e-4, atol=1e-5)


def test_interaction_strength_of_a_real_encoder_is_finite_and_normalised():
    encoder = tiny_resnet18()
    head = torch.nn.Linear(encoder.out_channels, 10)

    def model(x_bchw):
        return head(encoder(x_bchw).mean((2, 3)))

    encoder.eval()
    out = interaction_strength(
        model,
        randn(2, 3, 32, 32),
        torch.tensor([1, 2]),
        orders=(0.0, 0.5, 1.0),
        pairs=4,
        contexts=4,
        generator=gen(0),
    )
    assert torch.isfinite(out["J"]).all() and out["J"].mean().item() == pytest.approx(1.0)


def test_interaction_defaults_are_the_released_protocol():
    params = inspect.signature(interaction_strength).parameters
    # The released tool's 13 context ratios r (the order is m = floor((n − 2)·r)).
    released = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
    assert params["orders"].default == RATIOS == released
    assert (params["pairs"].default, params["contexts"].default) == (50, 50)
    assert (default_grid(224), default_grid(32), default_grid(28)) == (14, 8, 14)


def test_order_m_is_floor_of_n_minus_2_times_the_ratio():
    # v(S) = |S|³ gives Δv = (m+2)³ − 2(m+1)³ + m³ = 6m + 6 for every pair and every context of size m.
    def cube_of_kept(x_bchw):
        k = _present_bn(x_bchw).sum(1)
        return torch.stack([k**3, torch.zeros_like(k)], dim=1)

    ratios = (0.0, 0.05, 0.3, 0.95, 1.0)
    out = interaction_strength(
        cube_of_kept,
        torch.ones(1, 3, 32, 32),
        torch.zeros(1, dtype=torch.long),
        grid=8,
        orders=ratios,
        pairs=3,
        contexts=2,
        generator=gen(0),
    )
    m = (out["I_abs"] - 6) / 6
    torch.testing.assert_close(
        m, torch.tensor([math.floor(62 * r + 1e-9) for r in ratios], dtype=m.dtype)
    )


def test_sampled_pairs_are_distinct_neighbours_within_chebyshev_distance_2():
    pairs = sample_pairs(14, 50, generator=gen(0))
    assert pairs.shape == (50, 2)
    yi, xi, yj, xj = pairs[:, 0] // 14, pairs[:, 0] % 14, pairs[:, 1] // 14, pairs[:, 1] % 14
    assert ((yi - yj).abs().maximum((xi - xj).abs()) <= 2).all()
    assert (pairs[:, 0] != pairs[:, 1]).all()
    unordered = {tuple(sorted(p)) for p in pairs.tolist()}
    assert len(unordered) == 50  # no pair twice, in either order
    # corner cells clamp their neighbour to the border instead of leaving the grid
    assert (pairs >= 0).all() and (pairs < 196).all()


@pytest.mark.parametrize("grid, count", [(1, 1), (2, 7)])
def test_more_pairs_than_the_grid_holds_is_refused_instead_of_drawing_forever(grid, count):
    with pytest.raises(ConfigError, match=f"a {grid}×{grid} grid has only"):
        sample_pairs(grid, count, generator=gen(0))
    # All C(9, 2) pairs of a 3×3 grid are within distance 2.
    assert len(sample_pairs(3, 36, generator=gen(0))) == 36


def test_interaction_grid_0_is_refused_not_taken_for_the_default():
    with pytest.raises(ConfigError, match="interaction grid 0"):
        interaction_strength(torch.nn.Flatten(), randn(1, 3, 8, 8), torch.tensor([0]), grid=0)


def test_interaction_strength_is_the_same_in_train_and_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    encoder = tiny_resnet18()
    randomise_norms_(encoder)
    model = torch.nn.Sequential(
        encoder, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)
    )
    model[0].layer1.train(False)  # a mixed state that must survive the call
    args = (randn(1, 3, 32, 32), torch.tensor([3]))
    kw = dict(orders=(0.0, 0.5, 1.0), pairs=3, contexts=3)
    modes = [m.training for m in model.modules()]
    in_train = interaction_strength(model.train(), *args, generator=gen(0), **kw)
    model[0].layer1.train(False)
    in_eval = interaction_strength(model.eval(), *args, generator=gen(0), **kw)
    torch.testing.assert_close(in_train["J"], in_eval["J"])
    model.train()
    model[0].layer1.train(False)
    interaction_strength(model, *args, generator=gen(0), **kw)
    assert [m.training for m in model.modules()] == modes
