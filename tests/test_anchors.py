import functools
import re

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_pair, tiny_texts
from weightpatch.anchors import (
    Anchor,
    build_anchor,
    cohens_d,
    last_token_residuals,
    prompts_sha256,
    roc_auc,
    search_anchor_layer,
    steering_curve,
)
from weightpatch.errors import WeightPatchError
from weightpatch.pair import load_pair


def test_search_picks_a_separating_layer_and_round_trips(llama_pair_dirs, tmp_path):
    pair = load_pair(*llama_pair_dirs)
    anchor, table = search_anchor_layer(pair, tiny_texts(12, 1), None, tiny_texts(12, 2), None, method="model_diff")
    assert list(table["layer"]) == [1, 2]  # range(max(1, 3 // 5), 3, 2) plus the last layer
    assert anchor.layer in (1, 2) and torch.isclose(anchor.vector.norm(), torch.tensor(1.0))
    assert table.set_index("layer").loc[anchor.layer, "auc"] == table["auc"].max()
    anchor.save(tmp_path / "anchor")
    loaded = Anchor.load(tmp_path / "anchor", pair)
    assert torch.equal(loaded.vector, anchor.vector) and loaded.layer == anchor.layer
    assert loaded.models == anchor.models and loaded.prompts_sha256 == anchor.prompts_sha256


def test_anchor_from_another_model_is_refused(llama_pair_dirs, tmp_path):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(4), None, layer=1, method="model_diff")
    other = load_pair(*make_pair("llama", tmp_path, scale=0.07))
    with pytest.raises(WeightPatchError, match="different specialized model"):
        anchor.check_compatible(other)
    wrong = Anchor(torch.ones(7), 1, "model_diff", anchor.models, anchor.prompts_sha256)
    with pytest.raises(WeightPatchError, match="hidden size is 32"):
        wrong.check_compatible(pair)
    with pytest.raises(WeightPatchError, match="out of range"):
        build_anchor(pair, tiny_texts(4), None, layer=5, method="model_diff")


def test_instruction_anchor_needs_paired_prompts(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    with pytest.raises(WeightPatchError, match="without its instruction"):
        build_anchor(pair, tiny_texts(4), None, layer=1, method="instruction")


def test_steering_adds_along_the_anchor(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    from weightpatch.scoring import AnchorScorer

    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 3))
    curve = steering_curve(pair, anchor, [0.0, 1.0, 2.0], lambda m: float(scorer.anchor_scores(m).mean()))
    steps = curve["metric"].diff().dropna()
    assert torch.allclose(torch.tensor(steps.values), torch.tensor(1.0, dtype=torch.float64), atol=1e-4)


def test_anchor_from_a_vector_scores_like_the_built_one(llama_pair_dirs):
    from weightpatch.scoring import AnchorScorer

    pair = load_pair(*llama_pair_dirs)
    built = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    bare = Anchor(built.vector * 3.0, 2, "model_diff", models={}, prompts_sha256="")
    with pytest.raises(WeightPatchError, match=r"records no base model.*Anchor\.from_vector"):
        AnchorScorer(pair, bare, tiny_texts(4, 3))
    mine = Anchor.from_vector(built.vector * 3.0, 2, pair)
    assert torch.allclose(mine.vector, built.vector, atol=1e-6) and mine.models == pair.identities()
    a, b = AnchorScorer(pair, mine, tiny_texts(4, 3)), AnchorScorer(pair, built, tiny_texts(4, 3))
    assert torch.allclose(a.gap, b.gap, atol=1e-5)
    with pytest.raises(WeightPatchError, match=r"norm 0\.0"):
        Anchor.from_vector(torch.zeros(32), 2, pair)


# ---- values against references computed another way (transformers' own hidden states) -----------
@functools.cache
def _reference_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()


def _hidden_after(directory, tokenizer, texts, layer: int) -> torch.Tensor:
    """(prompt, hidden) residual stream leaving decoder block ``layer`` at the last token, one unpadded
    prompt at a time, from the Llama checkpoint loaded by transformers itself (a hook on the block's
    output: ``hidden_states[-1]`` would be after the final norm)."""
    model = _reference_model(directory)
    rows = []

    def keep(module, args, out) -> None:
        rows.append((out[0] if isinstance(out, tuple) else out)[0, -1])

    hook = model.model.layers[layer].register_forward_hook(keep)
    with torch.no_grad():
        for text in texts:
            model(tokenizer(text, return_tensors="pt").input_ids)
    hook.remove()
    return torch.stack(rows)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def test_last_token_residuals_are_transformers_hidden_states_at_each_layer(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    texts = tiny_texts(5, 7)  # different lengths: batches of 2 are left-padded
    got = last_token_residuals(pair, texts, [0, 2, 1], "specialized", batch_size=2)
    assert got.shape == (5, 3, 32) and got.dtype == torch.float32
    for i, layer in enumerate([0, 2, 1]):
        want = _hidden_after(llama_pair_dirs[1], pair.tokenizer, texts, layer)
        assert torch.allclose(got[:, i], want, atol=1e-5), layer
    base = last_token_residuals(pair, texts, [1], "base", batch_size=16)
    assert torch.allclose(base[:, 0], _hidden_after(llama_pair_dirs[0], pair.tokenizer, texts, 1), atol=1e-5)


def test_built_anchors_are_the_normalized_mean_differences_of_their_method(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    base_dir, sft_dir = llama_pair_dirs
    asked, plain = tiny_texts(5, 1), tiny_texts(5, 2)
    model_diff = build_anchor(pair, asked, None, layer=2, method="model_diff", batch_size=2)
    want = _unit(
        (_hidden_after(sft_dir, pair.tokenizer, asked, 2) - _hidden_after(base_dir, pair.tokenizer, asked, 2)).mean(0)
    )
    assert torch.allclose(model_diff.vector, want, atol=1e-5)
    assert model_diff.layer == 2 and model_diff.method == "model_diff" and model_diff.models == pair.identities()
    assert model_diff.prompts_sha256 == prompts_sha256(asked, [])
    instruction = build_anchor(pair, asked, plain, layer=1, method="instruction", batch_size=2)
    sft = _hidden_after(sft_dir, pair.tokenizer, asked, 1) - _hidden_after(sft_dir, pair.tokenizer, plain, 1)
    assert torch.allclose(instruction.vector, _unit(sft.mean(0)), atol=1e-5)
    assert instruction.method == "instruction" and instruction.prompts_sha256 == prompts_sha256(asked, plain)
    with pytest.raises(WeightPatchError, match=r"^unknown anchor method 'mean'; use 'instruction' or 'model_diff'$"):
        build_anchor(pair, asked, plain, layer=1, method="mean")
    with pytest.raises(WeightPatchError, match="without its instruction"):  # unequal counts are refused too
        build_anchor(pair, asked, plain[:4], layer=1, method="instruction")
    for layer in (-1, 3):
        with pytest.raises(
            WeightPatchError, match=rf"^anchor layer {layer} is out of range \(the model has layers 0\.\.2\)$"
        ):
            build_anchor(pair, asked, None, layer=layer, method="model_diff")
    assert build_anchor(pair, asked, None, layer=0, method="model_diff").layer == 0


def test_prompts_sha256_is_the_sha256_of_the_groups_with_separators():
    import hashlib

    assert prompts_sha256(["ab", "c"], []) == hashlib.sha256(b"ab\0c\0\1\1").hexdigest()
    assert prompts_sha256(["ab"]) != prompts_sha256(["a", "b"])  # where a prompt ends counts
    assert prompts_sha256(["a"], ["b"]) != prompts_sha256(["a", "b"], [])  # and which group it is in


def test_search_table_is_the_held_out_separation_of_each_layers_training_direction(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    base_dir, sft_dir = llama_pair_dirs
    train, held = tiny_texts(6, 1), tiny_texts(7, 2)
    anchor, table = search_anchor_layer(pair, train, None, held, None, method="model_diff", layers=[2, 0], batch_size=3)
    assert table["layer"].tolist() == [0, 2]
    for layer, row in table.set_index("layer").iterrows():
        direction = (
            _hidden_after(sft_dir, pair.tokenizer, train, layer) - _hidden_after(base_dir, pair.tokenizer, train, layer)
        ).mean(0)
        u = _unit(direction)
        pos = (_hidden_after(sft_dir, pair.tokenizer, held, layer) @ u).numpy()
        neg = (_hidden_after(base_dir, pair.tokenizer, held, layer) @ u).numpy()
        assert row["direction_norm"] == pytest.approx(float(direction.norm()), rel=1e-4)
        assert row["cohen_d"] == pytest.approx(cohens_d(pos, neg), rel=1e-3)
        assert row["auc"] == pytest.approx(roc_auc(pos, neg), abs=1e-9)
        assert row["mean_gap"] == pytest.approx(float(pos.mean() - neg.mean()), rel=1e-4)
        if layer == anchor.layer:
            assert torch.allclose(anchor.vector, u, atol=1e-5)
    assert anchor.metrics == {k: float(v) for k, v in table.set_index("layer").loc[anchor.layer].items()}
    assert anchor.prompts_sha256 == prompts_sha256(train, [], held, [])
    with pytest.raises(WeightPatchError, match=r"^anchor layer 3 is out of range \(the model has layers 0\.\.2\)$"):
        search_anchor_layer(pair, train, None, held, None, method="model_diff", layers=[1, 3])


@pytest.mark.parametrize(("layers", "expected"), [(1, [0]), (2, [1]), (4, [1, 3]), (10, [2, 4, 6, 8, 9])])
def test_default_search_layers_skip_the_first_fifth_and_step_by_two(tmp_path, layers, expected):
    pair = load_pair(*make_pair("llama", tmp_path, num_layers=layers))
    _, table = search_anchor_layer(pair, tiny_texts(3, 1), None, tiny_texts(3, 2), None, method="model_diff")
    assert table["layer"].tolist() == expected


def test_steering_pushes_every_direction_by_alpha_times_scale(llama_pair_dirs):
    """The metric reads the push itself: the change of the base model's residual leaving the anchor
    block (last token, one prompt), so the anchor and each random direction must move it by exactly
    |alpha| * scale, the random rows being seeded unit draws scaled the same way."""
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    ids = pair.tokenizer(tiny_texts(1, 9)[0], return_tensors="pt").input_ids

    def residual(model) -> torch.Tensor:  # block 1's output at the last token, read after the steering hook
        seen = []
        hook = model.model.layers[1].register_forward_hook(
            lambda module, args, out: seen.append((out[0] if isinstance(out, tuple) else out)[0, -1])
        )
        with torch.no_grad():
            model(ids)
        hook.remove()
        return seen[0]

    before = residual(pair.model)

    def push(model) -> float:
        return float((residual(model) - before).norm())

    curve = steering_curve(pair, anchor, [0.0, -1.0, 2.5], push, random_directions=3, seed=4)
    assert curve.columns.tolist() == ["alpha", "metric", "direction", "draw"]
    anchor_rows = curve[curve["direction"] == "anchor"]
    assert anchor_rows["alpha"].tolist() == [0.0, -1.0, 2.5] and (anchor_rows["draw"] == 0).all()
    np.testing.assert_allclose(anchor_rows["metric"], [0.0, 1.0, 2.5], atol=1e-4)  # default scale: 1 unit
    random_rows = curve[curve["direction"] == "random"]
    expected_rows = [[draw, alpha] for draw in range(3) for alpha in (-1.0, 2.5)]  # alpha 0 is not repeated
    assert random_rows[["draw", "alpha"]].values.tolist() == expected_rows
    np.testing.assert_allclose(random_rows["metric"], [1.0, 2.5] * 3, atol=1e-4)
    scaled = steering_curve(pair, anchor, [2.0], push, scale=0.5, random_directions=2, seed=4)
    np.testing.assert_allclose(scaled["metric"], [1.0, 1.0, 1.0], atol=1e-4)

    def pushes(seed: int) -> list[torch.Tensor]:
        got = []
        steering_curve(
            pair, anchor, [1.0], lambda m: got.append(residual(m) - before) or 0.0, random_directions=2, seed=seed
        )
        return got

    seen, again, other = pushes(4), pushes(4), pushes(5)
    default = []
    steering_curve(pair, anchor, [1.0], lambda m: default.append(residual(m) - before) or 0.0, random_directions=2)
    assert all(torch.allclose(a, b) for a, b in zip(default, pushes(0), strict=True))  # the default seed is 0
    assert torch.allclose(seen[0], anchor.vector, atol=1e-4)  # the anchor row pushes along u
    assert all(torch.allclose(a, b) for a, b in zip(seen, again, strict=True))  # seeded
    assert not torch.allclose(seen[1], seen[2], atol=1e-2) and not torch.allclose(seen[1], other[1], atol=1e-2)
    assert not torch.allclose(seen[1], seen[0], atol=1e-2)


def test_saved_anchor_files_hold_the_vector_and_its_metadata(llama_pair_dirs, tmp_path):
    import json

    from safetensors.torch import load_file

    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(4), None, layer=2, method="model_diff")
    anchor.metrics = {"auc": 0.75}
    written = anchor.save(tmp_path / "deep" / "er" / "a.json")  # any suffix: the two files share the stem
    assert written == tmp_path / "deep" / "er" / "a"
    assert torch.equal(load_file(str(tmp_path / "deep" / "er" / "a.safetensors"))["anchor"], anchor.vector)
    text = (tmp_path / "deep" / "er" / "a.json").read_text()
    assert text.startswith('{\n  "layer": 2,')  # indented: readable by hand
    meta = json.loads(text)
    assert meta == {
        "layer": 2,
        "method": "model_diff",
        "models": json.loads(json.dumps(pair.identities())),
        "prompts_sha256": anchor.prompts_sha256,
        "metrics": {"auc": 0.75},
    }
    loaded = Anchor.load(tmp_path / "deep" / "er" / "a.safetensors")
    assert loaded.metrics == {"auc": 0.75} and loaded.method == "model_diff" and loaded.layer == 2
    assert sorted(p.name for p in (tmp_path / "deep" / "er").iterdir()) == ["a.json", "a.safetensors"]  # no temp left
    other = load_pair(*make_pair("llama", tmp_path / "other", scale=0.07))
    with pytest.raises(WeightPatchError, match="different specialized model"):
        Anchor.load(written, other)
    with pytest.raises(WeightPatchError, match=r"^cannot read anchor .*missing\(\.json/\.safetensors\): "):
        Anchor.load(tmp_path / "missing")
    (tmp_path / "deep" / "er" / "a.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(WeightPatchError, match="cannot read anchor"):
        Anchor.load(tmp_path / "deep" / "er" / "a")


def test_anchor_checks_name_the_problem(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    good = Anchor.from_vector(torch.ones(32), 2, pair)
    nan_message = (
        r"^the layer-1 anchor vector holds NaN/inf: the residual streams it was built from are not finite "
        r"\(check the models' weights with `wpatch check`, or use float32\); nothing was saved$"
    )
    with pytest.raises(WeightPatchError, match=nan_message):
        Anchor(torch.full((32,), float("nan")), 1, "model_diff", good.models, "")
    with pytest.raises(WeightPatchError, match=r"^anchor vector has norm inf; give a finite, non-zero vector$"):
        Anchor.from_vector(torch.full((32,), float("inf")), 1, pair)
    for layer in (-1, 3):
        with pytest.raises(WeightPatchError, match=rf"^anchor layer {layer} is out of range for a 3-layer model$"):
            Anchor(good.vector, layer, "model_diff", good.models, "").check_compatible(pair)
    Anchor(good.vector, 0, "model_diff", good.models, "").check_compatible(pair)  # layer 0 is fine
    only_base = {"base": good.models["base"]}
    with pytest.raises(WeightPatchError, match="records no specialized model"):
        Anchor(good.vector, 1, "model_diff", only_base, "").check_compatible(pair)
    other_base = {**good.models, "base": {**good.models["base"], "weights_sha256": "0" * 64}}
    ours = pair.identities()["base"]
    loaded_as = rf"\({re.escape(ours['source'])}, {ours['weights_sha256'][:12]}\); rebuild it for this pair$"
    with pytest.raises(
        WeightPatchError, match=r"different base model \(.*, sha256 000000000000\) than the one loaded " + loaded_as
    ):
        Anchor(good.vector, 1, "model_diff", other_base, "").check_compatible(pair)
    vector = torch.arange(32, dtype=torch.float64)
    mine = Anchor.from_vector(vector.reshape(4, 8), 1, pair, method="instruction")
    assert mine.vector.dtype == torch.float32 and mine.vector.shape == (32,) and mine.method == "instruction"
    assert good.method == "model_diff" and good.prompts_sha256 == ""  # the defaults: no prompts behind it
    assert torch.allclose(mine.vector, (vector / vector.norm()).float())


def test_midpoint_accuracy_counts_the_negative_condition_at_the_midpoint_as_right():
    from weightpatch.anchors import _separation

    # means 3.5 and 1.5: midpoint 2.5, where one negative value sits
    sep = _separation(np.array([4.0, 3.0]), np.array([2.5, 0.5]))
    assert sep["accuracy"] == 1.0
    # midpoint 2.0: the positive 1.0 and the negative 2.5 are on the wrong side
    assert _separation(np.array([4.0, 1.0]), np.array([2.5, 0.5]))["accuracy"] == 0.5
    # means 2.75 and 0.25: midpoint 1.5, where one positive value sits (it is not above it)
    assert _separation(np.array([4.0, 1.5]), np.array([1.0, -0.5]))["accuracy"] == 0.75
    assert set(sep) == {"cohen_d", "auc", "accuracy", "mean_gap"}


def test_non_finite_residuals_name_their_layers_and_prompts(llama_pair_dirs, monkeypatch):
    from weightpatch import anchors

    pair = load_pair(*llama_pair_dirs)

    def designed(pair, texts, layers, role, batch_size, truncate_prompts):  # prompts 1 and 2, second layer
        out = torch.zeros(len(texts), len(layers), 32)
        if role == "base":
            out[1, 1, 7] = float("inf")
            out[2, 1, 0] = float("nan")
        return out

    monkeypatch.setattr(anchors, "last_token_residuals", designed)
    message = (
        r"^the residual stream is NaN/inf at layers \[2\] on 2 of 3 prompts: the models' weights are not "
        r"finite or overflow in this dtype \(check them with `wpatch check`, or use float32\); no anchor was built$"
    )
    with pytest.raises(WeightPatchError, match=message):
        search_anchor_layer(pair, tiny_texts(3), None, tiny_texts(3, 1), None, method="model_diff", layers=[0, 2])


def test_prompts_longer_than_the_context_are_cut_only_when_asked(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    long = [" ".join("ab" * 40), *tiny_texts(2)]  # 80 characters: more than the 64 positions
    with pytest.raises(WeightPatchError, match="longer than"):
        build_anchor(pair, long, None, layer=1, method="model_diff")
    kept = " " + " ".join(("ab" * 40)[-32:])  # the last 64 tokens of the long prompt, as text
    assert pair.tokenizer(kept).input_ids == pair.tokenizer(long[0]).input_ids[-64:]
    cut = build_anchor(pair, long, None, layer=1, method="model_diff", truncate_prompts=True)
    by_hand = build_anchor(pair, [kept, *long[1:]], None, layer=1, method="model_diff")
    assert torch.allclose(cut.vector, by_hand.vector, atol=1e-5)
    search_anchor_layer(pair, long, None, long, None, method="model_diff", truncate_prompts=True)  # both sets cut
    plain = [long[0], *tiny_texts(2, 5)]  # the long prompt also without its (here: any) instruction
    instruction = build_anchor(pair, long, plain, layer=1, method="instruction", truncate_prompts=True)
    by_hand = build_anchor(pair, [kept, *long[1:]], [kept, *plain[1:]], layer=1, method="instruction")
    assert torch.allclose(instruction.vector, by_hand.vector, atol=1e-5)
    with pytest.raises(WeightPatchError, match="longer than"):
        last_token_residuals(pair, long, [1], "base")
    with pytest.raises(WeightPatchError, match="longer than"):
        search_anchor_layer(pair, tiny_texts(3), None, long, None, method="model_diff")


def test_instruction_anchor_refusal_is_the_whole_message(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    message = (
        r"^the 'instruction' anchor needs each prompt also without its instruction \(the "
        r"'prompt_without_instruction' field\) to contrast the two; use method 'model_diff' for plain prompts$"
    )
    with pytest.raises(WeightPatchError, match=message):
        build_anchor(pair, tiny_texts(4), None, layer=1, method="instruction")


def test_cohens_d_with_one_constant_sample_is_finite():
    # pos [0, 2]: mean 1, squared deviations 2; neg constant 5: pooled variance 2 / 2 = 1, so d = -4
    assert cohens_d(np.array([0.0, 2.0]), np.array([5.0, 5.0])) == pytest.approx(-4.0)
    assert cohens_d(np.array([5.0, 5.0]), np.array([0.0, 2.0])) == pytest.approx(4.0)


def test_search_defaults_to_the_instruction_method_and_keeps_ties_at_the_auc_margin(llama_pair_dirs, monkeypatch):
    from weightpatch import anchors

    pair = load_pair(*llama_pair_dirs)
    asked, plain = tiny_texts(4, 1), tiny_texts(4, 2)
    default, _ = search_anchor_layer(pair, asked, plain, asked, plain, layers=[1])
    assert default.method == "instruction"
    explicit, _ = search_anchor_layer(pair, asked, plain, asked, plain, method="instruction", layers=[1])
    assert torch.equal(default.vector, explicit.vector)
    assert build_anchor(pair, asked, plain, layer=1).method == "instruction"
    # AUC 0.98 is exactly 0.02 below the best: still in the running, and its larger d wins
    designed = iter([{"cohen_d": 1.0, "auc": 1.0}, {"cohen_d": 5.0, "auc": 1.0 - 0.02}])
    monkeypatch.setattr(anchors, "_separation", lambda pos, neg: next(designed))
    chosen, _ = search_anchor_layer(pair, asked, None, asked, None, method="model_diff", layers=[1, 2])
    assert chosen.layer == 2


def test_steering_reference_rows_are_the_unmodified_models(llama_pair_dirs):
    from weightpatch.scoring import AnchorScorer

    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 3))
    curve = steering_curve(
        pair, anchor, [1.0], lambda m: float(scorer.anchor_scores(m).mean()), references=True, random_directions=1
    )
    rows = curve.set_index("direction")
    assert rows.loc["base", "metric"] == pytest.approx(float(scorer.f_receiver.mean()), abs=1e-5)
    assert rows.loc["specialized", "metric"] == pytest.approx(float(scorer.f_donor.mean()), abs=1e-5)
    assert curve["draw"].tolist() == [0, 0, 0, 0]  # base, anchor, random draw 0, specialized
    empty = steering_curve(pair, anchor, [], lambda m: 0.0)
    assert empty.empty and empty.columns.tolist() == ["alpha", "metric", "direction", "draw"]


def test_conditions_that_do_not_differ_are_refused_by_name(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    texts = tiny_texts(3)
    message = (
        r"^the two conditions have the same mean residual after block 1 \(the anchor direction has norm .*\): the "
        r"prompts with and without the instruction do not differ; check the 'prompt_without_instruction' field$"
    )
    with pytest.raises(WeightPatchError, match=message):
        build_anchor(pair, texts, texts[::-1], layer=1, method="instruction")
    with pytest.raises(WeightPatchError, match=message):
        search_anchor_layer(pair, texts, texts, texts, texts, method="instruction", layers=[1])
    same_models = load_pair(llama_pair_dirs[0], llama_pair_dirs[0])
    with pytest.raises(WeightPatchError, match=r"the two models do not differ on these prompts"):
        build_anchor(same_models, texts, None, layer=1, method="model_diff")


def test_records_are_rendered_as_the_stage_renders_and_raw_strings_are_flagged(caplog):
    """docs/patterns.md passed raw `record.prompt` strings: no chat template, another anchor layer (1
    instead of the stage's 3 on the demo pair), no warning. Records are now rendered like the stage;
    unrendered strings are named in a warning; render='raw' takes them as they are, silently."""
    from weightpatch import demo
    from weightpatch.prompts import without_instruction
    from weightpatch.runner import render_prompts

    pair = load_pair(demo.paths().base, demo.paths().specialized)
    train, held = demo.prompts("anchor")[:12], demo.prompts("heldout")[:12]
    layers = [1, 3]
    raw = [[r.prompt for r in s] for s in (train, without_instruction(train), held, without_instruction(held))]
    with caplog.at_level("WARNING", logger="weightpatch"):
        search_anchor_layer(pair, *raw, layers=layers)  # the recipe's call: it gave another layer silently
    assert "12 texts without the chat template the pipeline applies" in caplog.text
    caplog.clear()
    _, from_records = search_anchor_layer(pair, train, None, held, None, layers=layers)

    def rendered(records):
        return render_prompts(pair.tokenizer, [r.prompt for r in records], "auto")

    sets = (rendered(train), rendered(without_instruction(train)), rendered(held), rendered(without_instruction(held)))
    with caplog.at_level("WARNING", logger="weightpatch"):
        _, by_hand = search_anchor_layer(pair, *sets, layers=layers)
    assert caplog.records == []  # rendered texts: nothing to say
    pd.testing.assert_frame_equal(from_records, by_hand)
    with caplog.at_level("WARNING", logger="weightpatch"):
        search_anchor_layer(pair, *raw, layers=layers, render="raw")
    assert caplog.records == []
