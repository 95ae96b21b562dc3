"""Each baseline equals a direct computation of its formula."""

from __future__ import annotations

import pytest
import torch

from weightpatch.errors import WeightPatchError
from weightpatch.merging.methods import (
    MergeConfig,
    dare_drop,
    dare_linear,
    dare_seed,
    dare_ties,
    elect_sign,
    localize_stitch,
    magnitude_trim,
    task_arithmetic,
    ties,
)


def _tensors(n=3, shape=(16, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) for _ in range(n)]


def test_task_arithmetic_formula():
    base, experts = _tensors()
    w = [0.5, 1.0, -0.25]
    expected = base + 0.7 * sum(wi * (e - base) for wi, e in zip(w, experts, strict=True))
    torch.testing.assert_close(task_arithmetic(base, experts, w, lam=0.7), expected)
    normalized = base + 0.7 * sum(wi * (e - base) for wi, e in zip(w, experts, strict=True)) / sum(w)
    torch.testing.assert_close(task_arithmetic(base, experts, w, lam=0.7, normalize=True), normalized)
    # default: unit weights, lam 1
    torch.testing.assert_close(task_arithmetic(base, experts), base + sum(e - base for e in experts))


def test_task_arithmetic_keeps_dtype_and_checks_shapes():
    base, experts = _tensors()
    out = task_arithmetic(base.bfloat16(), [e.bfloat16() for e in experts])
    assert out.dtype == torch.bfloat16
    with pytest.raises(WeightPatchError, match="shape"):
        task_arithmetic(base, [experts[0][:3]])


def test_magnitude_trim_keeps_top_fraction():
    d = torch.randn(10, 10)
    t = magnitude_trim(d, 0.2)
    kept = t != 0
    assert int(kept.sum()) == 20
    assert d.abs()[kept].min() >= d.abs()[~kept].max()
    torch.testing.assert_close(t[kept], d[kept])
    assert torch.equal(magnitude_trim(d, 1.0), d)
    assert int((magnitude_trim(d, 0.001) != 0).sum()) == 1  # mergekit: at least one entry
    assert int((magnitude_trim(d, 0.0) != 0).sum()) == 0


def _ties_by_hand(base, experts, w, density, lam):
    """Independent entry-by-entry TIES: trim, elect sign, disjoint (weighted) mean."""
    flat_base = base.reshape(-1)
    deltas = []
    for e in experts:
        d = (e - base).reshape(-1)
        k = max(1, int(density * d.numel()))
        thresh = d.abs().sort(descending=True).values[k - 1]
        deltas.append(torch.where(d.abs() >= thresh, d, torch.zeros_like(d)))
    out = flat_base.clone()
    for j in range(flat_base.numel()):
        total = sum(wi * d[j] for wi, d in zip(w, deltas, strict=True))
        sign = 1.0 if total >= 0 else -1.0
        num, den = 0.0, 0.0
        for wi, d in zip(w, deltas, strict=True):
            if torch.sign(wi * d[j]) == sign:
                num += wi * d[j]
                den += wi
        out[j] = flat_base[j] + lam * (num / den if den != 0 else 0.0)
    return out.reshape(base.shape)


def test_ties_formula_sign_election_and_disjoint_mean():
    base, experts = _tensors(shape=(6, 7))
    w = [1.0, 0.5, 2.0]
    expected = _ties_by_hand(base, experts, w, 0.4, 0.8)
    torch.testing.assert_close(ties(base, experts, w, density=0.4, lam=0.8), expected)


def test_ties_small_example():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 3.0, 0.0])
    b = torch.tensor([3.0, 1.0, -1.0, 0.0])
    # entry 0: both +, mean 2; entry 1: sum -1 -> elect -, only a agrees: -2;
    # entry 2: sum +2 -> only a: 3; entry 3: no delta
    torch.testing.assert_close(ties(base, [a, b]), torch.tensor([2.0, -2.0, 3.0, 0.0]))
    # without normalize the agreeing deltas are summed (mergekit normalize: false)
    torch.testing.assert_close(ties(base, [a, b], normalize=False), torch.tensor([4.0, -2.0, 3.0, 0.0]))
    assert torch.equal(elect_sign([torch.tensor([0.0, -1.0])]), torch.tensor([1.0, -1.0]))


def test_dare_drop_fraction_and_rescale():
    d = torch.randn(200, 500)
    g = torch.Generator().manual_seed(123)
    out = dare_drop(d, 0.7, g)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(out[kept], d[kept] / 0.3)
    # L1 rescale (mergekit's rescale: true) restores the L1 norm
    l1 = dare_drop(d, 0.7, torch.Generator().manual_seed(123), rescale="l1")
    torch.testing.assert_close(l1.abs().sum(), d.abs().sum())
    assert torch.equal(l1 != 0, kept)


def test_dare_is_deterministic_per_seed_and_name():
    base, experts = _tensors()
    x1 = dare_linear(base, experts, p=0.5, seed=3, name="w")
    x2 = dare_linear(base, experts, p=0.5, seed=3, name="w")
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, dare_linear(base, experts, p=0.5, seed=3, name="v"))
    assert not torch.equal(x1, dare_linear(base, experts, p=0.5, seed=4, name="w"))


def _dare_deltas(base, experts, p, seed, name):
    """DARE by hand (not via dare_drop): expert i's entry survives where its seeded float64
    uniform is >= p, and survivors are scaled by 1 / (1 - p)."""
    deltas = []
    for i, e in enumerate(experts):
        u = torch.rand(e.shape, generator=torch.Generator().manual_seed(dare_seed(seed, name, i)), dtype=torch.float64)
        deltas.append(torch.where(u >= p, (e - base) / (1 - p), torch.zeros_like(e)))
    return deltas


def test_dare_linear_and_dare_ties_formulas():
    base, experts = _tensors()
    w = [1.0, 0.5, 0.75]
    deltas = _dare_deltas(base, experts, 0.3, 7, "t")
    expected = base + 0.9 * sum(wi * d for wi, d in zip(w, deltas, strict=True))
    torch.testing.assert_close(dare_linear(base, experts, w, p=0.3, lam=0.9, seed=7, name="t"), expected)
    # DARE-TIES: TIES sign election over the DARE deltas (density 1 = no trimming), summed
    dt = dare_ties(base, experts, w, p=0.3, lam=0.9, seed=7, name="t")
    by_hand = _ties_by_hand(base, [base + d for d in deltas], w, 1.0, 0.9)  # normalized variant
    wd = torch.stack([wi * d for wi, d in zip(w, deltas, strict=True)])
    sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = wd.sign() == sign
    summed = base + 0.9 * (wd * agree).sum(0)
    torch.testing.assert_close(dt, summed)
    normalized = dare_ties(base, experts, w, p=0.3, lam=0.9, seed=7, name="t", normalize=True)
    torch.testing.assert_close(normalized, by_hand)


def test_merge_config_dispatch_and_defaults():
    base, experts = _tensors()
    assert MergeConfig("ties").normalize_value is True
    assert MergeConfig("dare_ties").normalize_value is False
    cfg = MergeConfig("ties", weights=(1.0, 2.0, 0.5), density=0.5, lam=0.5)
    torch.testing.assert_close(cfg.merge_tensor("x", base, experts), ties(base, experts, [1.0, 2.0, 0.5], 0.5, 0.5))
    cfg = MergeConfig("dare_linear", drop_rate=0.2, seed=1)
    torch.testing.assert_close(
        cfg.merge_tensor("x", base, experts), dare_linear(base, experts, p=0.2, seed=1, name="x")
    )
    with pytest.raises(WeightPatchError, match="unknown merge method"):
        MergeConfig("slerp")  # type: ignore[arg-type]


def test_tensor_weights_are_per_entry():
    base, experts = _tensors(n=2, shape=(4, 5))
    mask = torch.zeros(4, 5)
    mask[1] = 1.0
    out = task_arithmetic(base, experts, [mask, 1.0])
    torch.testing.assert_close(out[1], experts[0][1] + experts[1][1] - base[1])
    torch.testing.assert_close(out[0], experts[1][0])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_row_block_mixing_equals_whole_tensor_mixing(monkeypatch, method):
    """Large tensors are mixed in row blocks; the result must not depend on the block size."""
    from weightpatch.merging import methods

    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 11, generator=g)
    experts = [base + torch.randn(37, 11, generator=g) for _ in range(3)]
    weights = [torch.rand(37, 11, generator=g), 0.5, 2.0]
    config = methods.MergeConfig(method, density=0.6, drop_rate=0.3, seed=1)
    whole = config.merge_tensor("w", base, experts, weights)
    monkeypatch.setattr(methods, "_CHUNK_ENTRIES", 30)  # blocks of 2 rows
    blocked = config.merge_tensor("w", base, experts, weights)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=0)


def test_localize_stitch_formula():
    base = torch.zeros(2, 3)
    a = torch.tensor([[5.0, -1.0, 0.2], [0.1, 4.0, 0.0]])  # top 2 of 6: 5 and 4
    b = torch.tensor([[2.0, 0.0, 0.0], [0.0, -3.0, 6.0]])  # top 2 of 6: 6 and -3
    out = localize_stitch(base, [a, b], weights=[1.0, 0.5], density=2 / 6, lam=0.8)
    # (0,0): only a kept; (1,1): both kept -> averaged over 2; (1,2): only b kept
    expected = torch.tensor([[0.8 * 5.0, 0.0, 0.0], [0.0, 0.8 * (4.0 + 0.5 * -3.0) / 2, 0.8 * 0.5 * 6.0]])
    torch.testing.assert_close(out, expected)
    base, experts = _tensors()
    torch.testing.assert_close(
        MergeConfig("localize_stitch", density=1.0).merge_tensor("x", base, experts),
        base + sum(e - base for e in experts) / 3,  # everything kept everywhere: the mean delta
    )
