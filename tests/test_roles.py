"""Roles on a pair with planted differences, and the threshold rule on synthetic scores.

The planted pair (``planted_pair``, also used by the tracing tests): a tiny Llama whose
specialized copy differs from the base ONLY in
- two neurons of layer 0 (gate/up rows and down columns): dormant in the base (down columns 0),
  in the specialized model they fire on a direction ``e`` every token carries and write a
  direction ``v`` into the residual stream;
- head 1 of layer 2 (its Q rows and O columns). In both models that head's value rows read ``v``
  and its O columns write a direction ``y``; so in the specialized model it routes what the
  neurons wrote, while its own weight change matters little.
Expected: neurons = source (weights matter, their activation read by the base's zero down
columns does not), head = router (its output matters, its weights hardly).
"""

from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM

from conftest import save, tiny_model, tiny_texts
from weightpatch.activation import activation_scores
from weightpatch.anchors import build_anchor
from weightpatch.components import Component
from weightpatch.pair import load_pair
from weightpatch.results import ScoreTable, score_row
from weightpatch.roles import ROLES, assign_roles, role_of, role_summary
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen

NEURONS, NEURON_LAYER, HEAD, HEAD_LAYER = (3, 7), 0, 1, 2
PLANTED_NEURONS = [f"L{NEURON_LAYER}.mlp.neuron{j}" for j in NEURONS]
PLANTED_HEAD = f"L{HEAD_LAYER}.attn.head{HEAD}"


def planted_pair(root: Path) -> tuple[Path, Path]:
    base = tiny_model("llama", seed=0, num_key_value_heads=4)  # one KV group per head
    g = torch.Generator().manual_seed(5)
    hidden = base.config.hidden_size
    hd = hidden // base.config.num_attention_heads

    def unit(n):
        x = torch.randn(n, generator=g)
        return x / x.norm()

    e, v, y, r = unit(hidden), unit(hidden), unit(hidden), unit(hd)
    rows = slice(HEAD * hd, (HEAD + 1) * hd)
    with torch.no_grad():
        base.model.embed_tokens.weight.add_(0.1 * e)  # every token carries e
        for j in NEURONS:
            base.model.layers[NEURON_LAYER].mlp.down_proj.weight[:, j] = 0.0  # dormant in the base
        attn = base.model.layers[HEAD_LAYER].self_attn
        attn.v_proj.weight[rows] = torch.outer(r, v)  # the head's values read v
        attn.o_proj.weight[:, rows] = 0.5 * torch.outer(y, r)  # and its output writes y
    sft = AutoModelForCausalLM.from_config(base.config)
    sft.load_state_dict(base.state_dict())
    with torch.no_grad():
        mlp = sft.model.layers[NEURON_LAYER].mlp
        for scale, j in zip((0.5, 0.4), NEURONS, strict=True):
            mlp.gate_proj.weight[j] = e
            mlp.up_proj.weight[j] = e
            mlp.down_proj.weight[:, j] = scale * v
        attn = sft.model.layers[HEAD_LAYER].self_attn
        attn.q_proj.weight[rows] += 0.3 * torch.randn(hd, hidden, generator=g)
        attn.o_proj.weight[:, rows] += 0.1 * torch.outer(unit(hidden), r)
    return save(base.eval(), root / "base"), save(sft.eval(), root / "sft")


def planted_scorer(root: Path) -> AnchorScorer:
    pair = load_pair(*planted_pair(root))
    anchor = build_anchor(pair, tiny_texts(8), None, layer=pair.space.num_layers - 1, method="model_diff")
    return AnchorScorer(pair, anchor, tiny_texts(12, 5))


def test_planted_neurons_are_sources_and_the_planted_head_is_a_router(tmp_path):
    scorer = planted_scorer(tmp_path)
    components = list(scorer.pair.space.components(kinds=("head", "neuron")))
    activation = activation_scores(scorer, components)
    weight = ExactScreen(scorer).run(components, progress=False)
    roles = assign_roles(activation, weight)
    assert len(roles) == len(components)
    for name in PLANTED_NEURONS:
        assert role_of(roles, name) == "source"
    assert role_of(roles, PLANTED_HEAD) in ("router", "both")
    others = roles[~roles["component"].isin([*PLANTED_NEURONS, PLANTED_HEAD])]
    assert (others.loc[others["kind"] == "neuron", "role"] == "neither").all()
    assert (others["weight"] == 0).all()  # nothing else differs between the two models
    summary = role_summary(roles)
    assert list(summary.columns) == ["layer", "kind", *ROLES]
    layer0 = summary[(summary["layer"] == 0) & (summary["kind"] == "neuron")].iloc[0]
    assert layer0["source"] == 2 and layer0[list(ROLES)].sum() == 48
    # one combined table works too
    both = ScoreTable.concat([activation, weight])
    assert assign_roles(both, both)["role"].tolist() == roles["role"].tolist()


def _table(method, scores):
    rows = [score_row(Component.parse(name), method, s, 0.0, 4) for name, s in scores.items()]
    return ScoreTable.from_rows(rows)


def test_thresholds_are_relative_per_kind_with_an_absolute_floor():
    act = _table("activation", {"L0.attn.head0": 0.10, "L0.attn.head1": 0.02, "L0": 0.9, "L0.mlp.neuron0": 0.01})
    w = _table("exact", {"L0.attn.head0": 0.0, "L0.attn.head1": 0.3, "L0": 0.9, "L0.mlp.neuron0": 0.015})
    roles = assign_roles(act, w, relative=0.25, absolute=0.02).set_index("component")["role"]
    # head0 is high among heads although the whole layer scores far more
    assert roles["L0.attn.head0"] == "router" and roles["L0.attn.head1"] == "source"
    assert roles["L0"] == "both"
    assert roles["L0.mlp.neuron0"] == "neither"  # the top of its kind but under the absolute floor
    loose = assign_roles(act, w, relative=0.25, absolute=0.0).set_index("component")["role"]
    assert loose["L0.mlp.neuron0"] == "both"
    assert isinstance(role_summary(assign_roles(act, w)), pd.DataFrame)


def test_assign_roles_says_how_many_components_it_leaves_out(caplog):
    """24 activation rows against 11 exact ones became 11 roles without a word."""
    names = ["L0.attn", "L0.mlp", "L1.attn", "L1.mlp"]
    act = ScoreTable.from_rows(score_row(Component.parse(n), "activation", 0.5, 0.0, 4) for n in names)
    weight = ScoreTable.from_rows(score_row(Component.parse(n), "exact", 0.5, 0.0, 4) for n in names[:3])
    with caplog.at_level("WARNING", logger="weightpatch"):
        roles = assign_roles(act, weight)
    assert len(roles) == 3
    assert "roles: 1 of 4 components with activation scores have no exact score and get no role" in caplog.text
