"""Each baseline equals a direct computation of its formula."""

from __future__ import annotations

import pytest
import torch

from weightpatch.errors import WeightPatchError
from weightpatch.merging.methods import (
    METHODS,
    MergeConfig,
    dare_drop,
    dare_linear,
    dare_seed,
    dare_ties,
    elect_sign,
    localize_stitch,
    magnitude_trim,
    task_arithmetic,
    task_vectors,
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


def _per_expert_by_hand(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _top_fraction_by_hand(d, density):
    """``d`` with all but its ``k = max(1, int(density * n))`` largest magnitudes zeroed (threshold
    from a full sort; ``density >= 1`` keeps everything)."""
    if density >= 1:
        return d.clone()
    k = max(1, int(density * d.numel()))
    thresh = d.abs().reshape(-1).sort(descending=True).values[k - 1]
    return torch.where(d.abs() >= thresh, d, torch.zeros_like(d))


def _ties_mix_by_hand(deltas, w, normalize=True):
    """Entry by entry: elect the sign of the weighted sum (ties count as +), add the weighted deltas
    agreeing with it and, with ``normalize``, divide by their weights (a zero divisor counts as 1)."""
    flat = [d.reshape(-1) for d in deltas]
    out = torch.zeros_like(flat[0])
    for j in range(out.numel()):
        total = sum(wi * d[j] for wi, d in zip(w, flat, strict=True))
        sign = 1.0 if total >= 0 else -1.0
        num, den = 0.0, 0.0
        for wi, d in zip(w, flat, strict=True):
            if torch.sign(wi * d[j]) == sign:
                num += wi * d[j]
                den += wi
        out[j] = num / (den if den != 0 else 1.0) if normalize else num
    return out.reshape(deltas[0].shape)


def _ties_by_hand(base, experts, w, density, lam, normalize=True):
    """Independent entry-by-entry TIES: trim, elect sign, disjoint (weighted) mean."""
    dens = _per_expert_by_hand(density, len(experts))
    deltas = [_top_fraction_by_hand(e - base, k) for e, k in zip(experts, dens, strict=True)]
    return base + lam * _ties_mix_by_hand(deltas, w, normalize)


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


def _dare_deltas(base, experts, p, seed, name, rescale="inverse"):
    """DARE by hand (not via dare_drop): expert i's entry survives where its seeded float64
    uniform is >= p_i, and survivors are scaled by 1 / (1 - p_i) ("inverse") or so that the L1
    norm of the delta is restored ("l1")."""
    deltas = []
    for i, (e, pi) in enumerate(zip(experts, _per_expert_by_hand(p, len(experts)), strict=True)):
        u = torch.rand(e.shape, generator=torch.Generator().manual_seed(dare_seed(seed, name, i)), dtype=torch.float64)
        d = e - base
        kept = torch.where(u >= pi, d, torch.zeros_like(d))
        if rescale == "inverse":
            kept = kept / (1 - pi)
        elif rescale == "l1":
            kept = kept * (d.abs().sum() / kept.abs().sum())
        deltas.append(kept)
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
    config = methods.MergeConfig(method, density=0.6, drop_rate=0.3, seed=1, layer_owners=(0,))
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


def _localize_stitch_by_hand(base, experts, w, density, lam):
    """Each delta cut to its top fraction; where kept entries of several experts overlap, their
    weighted sum is divided by how many overlap."""
    dens = _per_expert_by_hand(density, len(experts))
    kept = [_top_fraction_by_hand(e - base, k) for e, k in zip(experts, dens, strict=True)]
    count = sum((t != 0).to(base.dtype) for t in kept)
    total = sum(wi * t for wi, t in zip(w, kept, strict=True))
    return base + lam * total / torch.where(count > 0, count, torch.ones_like(count))


def test_work_dtype_is_float32_unless_the_base_is_float64():
    base = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    (d,) = task_vectors(base, [torch.tensor([1.5, 1.0], dtype=torch.bfloat16)])
    assert d.dtype == torch.float32
    # a float64 expert over a float32 base is brought to float32 too
    (d,) = task_vectors(torch.tensor([1.0, 2.0]), [torch.tensor([1.0 + 1e-12, 3.0], dtype=torch.float64)])
    assert d.dtype == torch.float32
    assert d.tolist() == [0.0, 1.0]
    # float64 stays float64: a 1e-12 difference survives, and so does the exact weight 0.1
    base64 = torch.ones(3, dtype=torch.float64)
    expert64 = base64 + torch.tensor([1e-12, 1.0, -2.0], dtype=torch.float64)
    (d,) = task_vectors(base64, [expert64])
    assert d.dtype == torch.float64 and d[0] > 0
    out = task_arithmetic(base64, [expert64], [0.1])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, base64 + 0.1 * (expert64 - base64), rtol=1e-15, atol=0)


def test_argument_count_errors_name_what_is_wrong():
    base, experts = _tensors()
    with pytest.raises(WeightPatchError, match=r"^a merge needs at least one expert tensor$"):
        task_arithmetic(base, [])
    with pytest.raises(WeightPatchError, match="2 weights given for 3 experts"):
        task_arithmetic(base, experts, [1.0, 1.0])
    with pytest.raises(WeightPatchError, match="2 density values given for 3 experts"):
        ties(base, experts, density=[0.5, 0.5])
    with pytest.raises(WeightPatchError, match="2 density values given for 3 experts"):
        localize_stitch(base, experts, density=[0.5, 0.5])
    with pytest.raises(WeightPatchError, match="4 drop rate values given for 3 experts"):
        dare_ties(base, experts, p=[0.5] * 4)
    choices = "task_arithmetic, ties, dare_linear, dare_ties, localize_stitch, consensus, layer_swap"
    with pytest.raises(WeightPatchError, match=f"unknown merge method 'slerp'; choose one of {choices}$"):
        MergeConfig("slerp")  # type: ignore[arg-type]


def test_per_expert_densities_and_drop_rates():
    base, experts = _tensors(shape=(5, 6), seed=4)
    w = [1.0, 0.5, 2.0]
    dens = [0.2, 0.5, 1.0]
    torch.testing.assert_close(
        ties(base, experts, w, density=dens, lam=0.8), _ties_by_hand(base, experts, w, dens, 0.8)
    )
    torch.testing.assert_close(
        localize_stitch(base, experts, w, density=dens, lam=0.8),
        _localize_stitch_by_hand(base, experts, w, dens, 0.8),
    )
    ps = [0.1, 0.5, 0.8]
    deltas = _dare_deltas(base, experts, ps, 2, "t")
    expected = base + sum(wi * d for wi, d in zip(w, deltas, strict=True))
    torch.testing.assert_close(dare_linear(base, experts, w, p=ps, seed=2, name="t"), expected)


def test_magnitude_trim_edges():
    d = torch.randn(3, 4)
    assert torch.equal(magnitude_trim(d, 1.5), d)  # any density >= 1 keeps everything
    one = torch.tensor([-3.0])
    assert torch.equal(magnitude_trim(one, 0.5), one)  # k = max(1, int(0.5)) = 1
    assert magnitude_trim(torch.zeros(0, 4), 0.5).shape == (0, 4)


def test_dare_drop_rate_bounds():
    d = torch.randn(50)
    assert torch.equal(dare_drop(d, 0.0), d)  # p = 0 drops nothing
    for p in (1.0, 1.5, -0.1):
        with pytest.raises(WeightPatchError, match=rf"DARE drop rate must be in \[0, 1\), got {p}"):
            dare_drop(d, p)


def test_dare_entry_survives_when_its_uniform_equals_p():
    u = torch.rand(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    p = float(u.sort().values[3])  # three uniforms below p, one equal to it
    d = torch.arange(1.0, 9.0, dtype=torch.float64)
    out = dare_drop(d, p, torch.Generator().manual_seed(5), rescale="none")
    assert torch.equal(out, torch.where(u >= p, d, torch.zeros_like(d)))
    assert int((out != 0).sum()) == 5


def _seeded_uniforms(n, seed):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_dare_l1_rescale_of_small_deltas_and_its_zero_guard():
    # an L1 norm below 1 is restored too
    d = 1e-3 * torch.randn(20, 30, generator=torch.Generator().manual_seed(0))
    assert d.abs().sum() < 1
    out = dare_drop(d, 0.5, torch.Generator().manual_seed(1), rescale="l1")
    torch.testing.assert_close(out.abs().sum(), d.abs().sum())
    # every entry dropped: zeros (no 0/0)
    u = _seeded_uniforms(3, 2)
    p = (float(u.max()) + 1) / 2
    assert torch.equal(
        dare_drop(torch.ones(3, dtype=torch.float64), p, torch.Generator().manual_seed(2), "l1"),
        torch.zeros(3, dtype=torch.float64),
    )
    # a kept L1 norm of exactly 1e-7 (the guard) is still rescaled
    u = _seeded_uniforms(2, 3)
    keep = int(u.argmax())
    d = torch.ones(2, dtype=torch.float64)
    d[keep] = 1e-7
    out = dare_drop(d, float(u.mean()), torch.Generator().manual_seed(3), "l1")
    expected = torch.zeros(2, dtype=torch.float64)
    expected[keep] = 1 + 1e-7
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)


def test_elect_sign_is_plus_or_minus_one_in_the_deltas_dtype():
    for dtype in (torch.float32, torch.float64):
        sign = elect_sign([torch.tensor([0.0, -1.0, 2.0], dtype=dtype), torch.tensor([0.0, 0.5, -3.0], dtype=dtype)])
        assert sign.dtype == dtype
        assert sign.tolist() == [1.0, -1.0, -1.0]


def test_one_expert_and_scalar_merges():
    base, (e,) = _tensors(n=1, shape=(4, 5))
    d = e - base
    torch.testing.assert_close(task_arithmetic(base, [e], [0.5], lam=0.8), base + 0.4 * d)
    torch.testing.assert_close(ties(base, [e], [0.5], lam=0.8), base + 0.8 * d)  # the mean of one delta
    torch.testing.assert_close(localize_stitch(base, [e], [0.5], density=1.0, lam=0.8), base + 0.4 * d)
    (dropped,) = _dare_deltas(base, [e], 0.3, 1, "w")
    torch.testing.assert_close(dare_linear(base, [e], [0.5], p=0.3, lam=0.8, seed=1, name="w"), base + 0.4 * dropped)
    # 0-dim tensors: 1 + 0.5 * 2 + 0.25 * -1; TIES keeps only the elected + delta
    scalars = [torch.tensor(3.0), torch.tensor(0.0)]
    assert task_arithmetic(torch.tensor(1.0), scalars, [0.5, 0.25]).item() == 1.75
    assert ties(torch.tensor(1.0), scalars).item() == 3.0


def test_row_block_mixing_of_a_vector(monkeypatch):
    from weightpatch.merging import methods

    base, experts = _tensors(shape=(23,), seed=6)
    monkeypatch.setattr(methods, "_CHUNK_ENTRIES", 5)  # blocks of 5 entries
    w = [0.5, 1.0, 2.0]
    expected = base + sum(wi * (e - base) for wi, e in zip(w, experts, strict=True))
    torch.testing.assert_close(task_arithmetic(base, experts, w), expected)


def test_normalize_divisors_and_their_zero_guards():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([-1.0, 2.0])
    # task arithmetic: weights summing to 0.5 divide, weights summing to 0 do not
    torch.testing.assert_close(task_arithmetic(base, [a, b], [0.2, 0.3], normalize=True), (0.2 * a + 0.3 * b) / 0.5)
    torch.testing.assert_close(task_arithmetic(base, [a, b], [1.0, -1.0], normalize=True), a - b)
    # a weight of exactly the 1e-8 guard still divides: the weighted mean of one expert is itself
    torch.testing.assert_close(task_arithmetic(base, [a], [1e-8], normalize=True), a)
    # TIES: entry 0 has both weighted deltas +1 (both agree) but their weights sum to 0 -> undivided
    torch.testing.assert_close(ties(base, [a, b], [1.0, -1.0]), _ties_by_hand(base, [a, b], [1.0, -1.0], 1.0, 1.0))
    assert ties(base, [a, b], [1.0, -1.0])[0].item() == 2.0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_a_bfloat16_dtype(method):
    base, experts = _tensors(shape=(6, 8))
    base16, experts16 = base.bfloat16(), [e.bfloat16() for e in experts]
    config = MergeConfig(method, density=0.5, drop_rate=0.3, layer_owners=(0,))
    out = config.merge_tensor("w", base16, experts16)
    assert out.dtype == torch.bfloat16
    # computed in float32 from the same (bf16-exact) values, rounded once
    assert torch.equal(out, config.merge_tensor("w", base16.float(), [e.float() for e in experts16]).bfloat16())


def test_defaults_of_dare_and_localize_stitch():
    base, experts = _tensors(seed=8)
    deltas = _dare_deltas(base, experts, 0.5, 0, "")  # p 0.5, seed 0, no name
    torch.testing.assert_close(dare_linear(base, experts), base + sum(deltas))
    torch.testing.assert_close(dare_ties(base, experts, [1.0, 1.0, 1.0]), dare_ties(base, experts))
    wd = torch.stack(deltas)
    agree = wd.sign() == torch.where(wd.sum(0) >= 0, 1.0, -1.0)
    torch.testing.assert_close(dare_ties(base, experts), base + (wd * agree).sum(0))  # lam 1, summed
    torch.testing.assert_close(
        localize_stitch(base, experts), _localize_stitch_by_hand(base, experts, [1.0] * 3, 0.1, 1.0)
    )


def test_dare_linear_normalized_with_l1_rescale():
    base, experts = _tensors(seed=9)
    w = [0.5, 1.0, 2.0]
    deltas = _dare_deltas(base, experts, 0.4, 2, "n", rescale="l1")
    expected = base + 0.7 * sum(wi * d for wi, d in zip(w, deltas, strict=True)) / sum(w)
    out = dare_linear(base, experts, w, p=0.4, lam=0.7, normalize=True, seed=2, name="n", rescale="l1")
    torch.testing.assert_close(out, expected)


def test_merge_config_passes_every_setting_on():
    base, experts = _tensors(shape=(5, 6), seed=10)
    w = (0.5, 1.0, 2.0)

    def merge(method, **kw):
        return MergeConfig(method, weights=w, **kw).merge_tensor("x", base, experts)

    expected = base + 0.7 * sum(wi * (e - base) for wi, e in zip(w, experts, strict=True)) / sum(w)
    torch.testing.assert_close(merge("task_arithmetic", lam=0.7, normalize=True), expected)
    torch.testing.assert_close(
        merge("ties", density=0.5, lam=0.6, normalize=False), _ties_by_hand(base, experts, w, 0.5, 0.6, normalize=False)
    )
    torch.testing.assert_close(
        merge("localize_stitch", density=0.3, lam=0.6), _localize_stitch_by_hand(base, experts, w, 0.3, 0.6)
    )
    deltas = _dare_deltas(base, experts, 0.3, 7, "x", rescale="l1")
    expected = base + 0.9 * sum(wi * d for wi, d in zip(w, deltas, strict=True)) / sum(w)
    dare = {"drop_rate": 0.3, "lam": 0.9, "normalize": True, "seed": 7, "rescale": "l1"}
    torch.testing.assert_close(merge("dare_linear", **dare), expected)
    torch.testing.assert_close(merge("dare_ties", **dare), base + 0.9 * _ties_mix_by_hand(deltas, w, normalize=True))


def test_merge_config_describe_resolves_normalize():
    assert MergeConfig("ties", weights=(1.0, 2.0), density=0.4).describe() == {
        "method": "ties",
        "weights": (1.0, 2.0),
        "lam": 1.0,
        "density": 0.4,
        "drop_rate": 0.5,
        "normalize": True,
        "seed": 0,
        "rescale": "inverse",
        "tall_lambda": 0.6,
        "min_agree": 2,
        "layer_owners": None,
    }
    assert MergeConfig("dare_ties").describe()["normalize"] is False
    # an unset density is the method's registered default
    assert MergeConfig("localize_stitch").describe()["density"] == 0.1
    assert MergeConfig("ties").describe()["density"] == 1.0
    assert MergeConfig("task_arithmetic", normalize=True).describe()["normalize"] is True


NON_FINITE = [{"lam": float("nan")}, {"weights": (1.0, float("inf"))}, {"density": float("nan")}]


@pytest.mark.parametrize("setting", NON_FINITE)
def test_non_finite_settings_are_refused_by_name(setting):
    """A NaN lam once reached the merge and was reported as an overflow of the output dtype."""
    name = next(iter(setting))
    with pytest.raises(WeightPatchError, match=rf"merge setting {name}=.* is not finite"):
        MergeConfig("ties", **setting)
