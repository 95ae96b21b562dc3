"""Numbers checked against references computed another way: scipy for AUC and Cohen's d, the KL
formula written out by value, the interaction formula from patched anchor scores, the anchor-layer
choice on designed metrics, the tiny-gap rule at its real default (median, 0.1) and the NaN refusal."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import perturbed_copy, save, tiny_model, tiny_texts
from weightpatch import anchors
from weightpatch.anchors import Anchor, _separation, build_anchor, search_anchor_layer
from weightpatch.errors import WeightPatchError
from weightpatch.pair import load_pair
from weightpatch.patch import patched
from weightpatch.runner import Batch
from weightpatch.scoring import AnchorScorer
from weightpatch.validation import interaction_matrix, output_kl


# ---- separation metrics ------------------------------------------------------------------------
def test_auc_and_cohens_d_match_scipy():
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(1.0, 1.0, 40), 1)  # rounded: ties between the groups count 1/2
    neg = np.round(rng.normal(0.0, 1.5, 40), 1)
    assert np.isin(pos, neg).any()
    sep = _separation(pos, neg)
    u = stats.mannwhitneyu(pos, neg, alternative="greater").statistic
    assert sep["auc"] == pytest.approx(u / (len(pos) * len(neg)), rel=1e-12)
    # equal group sizes: the pooled-variance t statistic is d * sqrt(2 / n)
    t = stats.ttest_ind(pos, neg, equal_var=True).statistic
    assert sep["cohen_d"] == pytest.approx(t * np.sqrt(2 / len(pos)), rel=1e-12)
    assert sep["mean_gap"] == pytest.approx(pos.mean() - neg.mean())
    # the larger condition is the positive one: swapping the groups flips d and mirrors the AUC
    swapped = _separation(neg, pos)
    assert swapped["cohen_d"] == pytest.approx(-sep["cohen_d"]) and swapped["auc"] == pytest.approx(1 - sep["auc"])


def test_anchor_layer_is_the_largest_cohens_d_among_layers_within_0_02_of_the_best_auc(llama_pair_dirs, monkeypatch):
    pair = load_pair(*llama_pair_dirs)
    designed = iter(
        [
            {"cohen_d": 9.0, "auc": 0.90, "accuracy": 0.9, "mean_gap": 1.0},  # layer 0: best d, AUC too low
            {"cohen_d": 1.0, "auc": 1.00, "accuracy": 1.0, "mean_gap": 1.0},  # layer 1: best AUC
            {"cohen_d": 3.0, "auc": 0.985, "accuracy": 1.0, "mean_gap": 1.0},  # layer 2: within 0.02, larger d
        ]
    )
    monkeypatch.setattr(anchors, "_separation", lambda pos, neg: next(designed))
    anchor, table = search_anchor_layer(
        pair, tiny_texts(4, 1), None, tiny_texts(4, 2), None, method="model_diff", layers=[0, 1, 2]
    )
    assert list(table["layer"]) == [0, 1, 2]
    assert anchor.layer == 2 and anchor.metrics["cohen_d"] == 3.0


# ---- output KL ---------------------------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    """A "model" whose next-token logits are a fixed tensor (batch, seq, vocab)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, **_inputs) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def test_output_kl_is_kl_of_the_reference_from_the_model_by_value():
    p_last = torch.tensor([0.98, 0.01, 0.01])  # reference (specialized) at the last token
    q_last = torch.tensor([0.34, 0.33, 0.33])  # patched model: KL(p || q) = 0.97, KL(q || p) = 1.95
    p_first, q_first = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.25, 0.5])
    reference = torch.stack([p_first, p_last]).log()[None]  # (1, 2, 3)
    model = FixedLogits(torch.stack([q_first, q_last]).log()[None])
    batch = Batch(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), torch.arange(2)[None])
    kl_pq = float(stats.entropy(p_last.numpy(), q_last.numpy()))  # sum p log(p / q)
    assert kl_pq != pytest.approx(float(stats.entropy(q_last.numpy(), p_last.numpy())), rel=0.5)
    assert output_kl(model, [batch], [reference], "last") == pytest.approx(kl_pq, rel=1e-5)
    both = (kl_pq + float(stats.entropy(p_first.numpy(), q_first.numpy()))) / 2
    assert output_kl(model, [batch], [reference], "all") == pytest.approx(both, rel=1e-5)
    # "all" skips padding: mask out the first position and only the last one counts
    padded = Batch(batch.input_ids, torch.tensor([[0, 1]]), batch.position_ids)
    assert output_kl(model, [padded], [reference], "all") == pytest.approx(kl_pq, rel=1e-5)


# ---- interactions ------------------------------------------------------------------------------
def test_interaction_is_joint_effect_minus_the_two_single_effects(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(8, 5))
    names = ["L0.mlp", "L1.attn", "L2.mlp"]

    def fraction(group: list[str]) -> float:
        """Mean over kept prompts of (F_patched - F_base) / (F_sft - F_base)."""
        with torch.no_grad(), patched(pair.model, pair.donor, pair.space, group):
            f = scorer.anchor_scores(pair.model)
        return float(((f - scorer.f_receiver) / scorer.gap)[scorer.valid].double().mean())

    matrix = interaction_matrix(scorer, names)
    for i, a in enumerate(names):
        assert matrix.attrs["single"][a] == pytest.approx(fraction([a]), abs=1e-9)
        for b in names[i + 1 :]:
            expected = fraction([a, b]) - fraction([a]) - fraction([b])
            assert matrix.loc[a, b] == pytest.approx(expected, abs=1e-9)
            assert matrix.loc[b, a] == matrix.loc[a, b]
    assert matrix.abs().max().max() > 1e-3  # the pair really is non-additive somewhere


# ---- tiny-gap rule at its default ----------------------------------------------------------------
class DesignedGaps(AnchorScorer):
    """A scorer whose receiver scores are 0 and donor scores are ``gaps`` (the two model runs of
    the constructor, in order), so the gap of each prompt is set by the test."""

    def __init__(self, pair, anchor, gaps: list[float], **kwargs) -> None:
        self._runs = iter([torch.zeros(len(gaps)), torch.tensor(gaps)])
        super().__init__(pair, anchor, [f"p {i}" for i in range(len(gaps))], **kwargs)

    def values(self, model):
        return next(self._runs)


def test_tiny_gap_threshold_is_a_tenth_of_the_median_absolute_gap_by_default(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(4), None, layer=1, method="model_diff")
    # |gap| median 1 (threshold 0.1); mean 7.7 (a mean rule would drop 0.2 and -0.5 too)
    gaps = [0.05, 0.2, -0.5, 1.0, 1.0, -1.0, 1.5, 50.0, -0.09]
    scorer = DesignedGaps(pair, anchor, gaps)
    assert scorer.valid.tolist() == [False, True, True, True, True, True, True, True, False]
    assert scorer.n_excluded == 2
    effect = scorer.effect(torch.tensor(gaps) * 0.5)  # half of every gap recovered
    assert effect.mean == pytest.approx(0.5) and effect.n_prompts == 7
    assert effect.stderr == pytest.approx(0.0, abs=1e-12)
    # the threshold is strict: |gap| equal to 0.1 * median is excluded
    assert DesignedGaps(pair, anchor, [0.1, 1.0, 1.0]).valid.tolist() == [False, True, True]


def test_effect_is_the_mean_ratio_with_its_standard_error(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(4), None, layer=1, method="model_diff")
    scorer = DesignedGaps(pair, anchor, [2.0, -4.0, 0.01])  # the third prompt is excluded
    effect = scorer.effect(torch.tensor([1.0, -1.0, 5.0]))  # ratios 0.5, 0.25
    assert effect.mean == pytest.approx(0.375) and effect.n_prompts == 2
    assert effect.stderr == pytest.approx(stats.sem([0.5, 0.25]))  # std (ddof 1) / sqrt(n)
    one = DesignedGaps(pair, anchor, [2.0, 0.0, 0.0]).effect(torch.tensor([1.0, 0.0, 0.0]))  # median 0
    assert one.mean == 0.5 and one.n_prompts == 1 and np.isnan(one.stderr)


def test_anchor_score_is_the_last_token_residual_after_the_anchor_block_along_u(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(4), None, layer=1, method="model_diff")
    texts = tiny_texts(5, 5)
    scorer = AnchorScorer(pair, anchor, texts, batch_size=16)
    for i, text in enumerate(texts):  # one prompt at a time: no padding, the last position is the last token
        ids = pair.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = pair.model(ids, output_hidden_states=True).hidden_states[anchor.layer + 1]
        assert float(scorer.f_receiver[i]) == pytest.approx(float(hidden[0, -1] @ anchor.vector), abs=1e-5)


def test_nan_weights_are_refused_with_a_clear_message(tmp_path):
    base = tiny_model("llama")
    broken = perturbed_copy(base)
    with torch.no_grad():
        broken.get_parameter("model.layers.0.mlp.down_proj.weight")[3, 5] = float("nan")
    pair = load_pair(save(base, tmp_path / "base"), save(broken, tmp_path / "sft"))
    with pytest.raises(WeightPatchError, match="residual stream is NaN/inf"):  # no NaN anchor is built
        build_anchor(pair, tiny_texts(4), None, layer=1, method="model_diff")
    anchor = Anchor.from_vector(torch.ones(32), 1, pair)
    message = r"^anchor scores contain NaN/inf: check the model weights and dtype \(try float32\)$"
    with pytest.raises(WeightPatchError, match=message):
        AnchorScorer(pair, anchor, tiny_texts(4, 3))
