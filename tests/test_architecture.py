"""Architecture descriptions: validation at load time (file, key, fix), the dimension vocabulary,
fused-tensor offsets (Phi-3), and the one tied-embedding rule."""

import json
from pathlib import Path

import pytest
import transformers

from conftest import FAMILIES, make_pair, tiny_model
from weightpatch.architecture import architecture_for, available_architectures, load_architecture
from weightpatch.components import Component, ComponentSpace, ParamSlice
from weightpatch.errors import ArchitectureDescriptionError, ComponentError, UnknownArchitectureError
from weightpatch.merging.mechanism import component_space_for_checkpoint

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "weightpatch" / "architectures"


def test_every_family_file_loads_and_extends_merge():
    specs = available_architectures()
    for model_type in ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox"]:
        assert model_type in specs
    assert {"phi3", "olmo2"} <= set(specs)
    assert "attn.q_norm" in specs["qwen3"].modules and "mlp.gate" in specs["qwen3"].modules
    assert specs["gemma3_text"].modules["norm.pre_mlp"] == ["pre_feedforward_layernorm."]
    assert specs["phi3"].sites == specs["llama"].sites  # inherited through "extends"
    assert specs["llama"].layers_path == "model.layers" and specs["gpt2"].layer_path(3) == "transformer.h.3"


def test_unknown_architecture_says_how_to_add_one():
    config = transformers.BertConfig()
    with pytest.raises(UnknownArchitectureError, match=r"no architecture description.*'bert'.*Add one"):
        architecture_for(config)


def _write(tmp_path: Path, name: str, edit) -> Path:
    raw = json.loads((SHIPPED / "llama.json").read_text())
    edit(raw)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


def _refused(path: Path, pattern: str) -> str:
    with pytest.raises(ArchitectureDescriptionError, match=pattern) as info:
        load_architecture(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(path.name)
    return message


def test_misspelt_keys_are_refused_naming_the_file_the_key_and_the_fix(tmp_path):
    top = _write(tmp_path, "top", lambda r: r.update(modles=r.pop("modules")))
    _refused(top, r"top\.json: modles: unknown key 'modles'.*did you mean 'modules'")
    rule = _write(tmp_path, "rule", lambda r: r["neuron"][2].update(dimm=r["neuron"][2].pop("dim")))
    _refused(rule, r"rule\.json: neuron\[2\]\.dimm: unknown key 'dimm'.*did you mean 'dim'")
    nested = _write(tmp_path, "nested", lambda r: r["config"].update(num_layer=["n_layer"]))
    _refused(nested, r"config\.num_layer: unknown key 'num_layer'.*did you mean 'num_layers'")
    site = _write(tmp_path, "site", lambda r: r["sites"].update(neuron=r["sites"].pop("neuron_activation")))
    _refused(site, r"sites\.neuron: unknown key")
    missing = _write(tmp_path, "missing", lambda r: r.pop("sites"))
    _refused(missing, r"missing\.json: sites: required key missing")


def test_a_child_description_is_checked_and_its_own_file_named(tmp_path):
    _write(tmp_path, "parent", lambda r: None)
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"family": "child", "extends": "parent", "model_types": ["c"], "head": {"qury": []}}))
    _refused(child, r"child\.json: head\.qury: unknown key 'qury'.*did you mean 'query'")
    child.write_text(json.dumps({"family": "child", "extends": "nowhere", "model_types": ["c"]}))
    _refused(child, r"extends: no description 'nowhere'")


def test_every_expression_is_checked_against_the_dimension_vocabulary(tmp_path):
    typo = _write(tmp_path, "typo", lambda r: r["neuron"][0].update(offset="2*hiden_size"))
    _refused(typo, r"neuron\[0\]\.offset: 'hiden_size' is not a dimension; did you mean 'hidden_size'")
    syntax = _write(tmp_path, "syntax", lambda r: r["neuron"][0].update(size="2*(hidden_size)"))
    _refused(syntax, r"neuron\[0\]\.size: .* is not a sum of products")
    unit = _write(tmp_path, "unit", lambda r: r["neuron"][0].update(unit="layer"))
    _refused(unit, r"neuron\[0\]\.unit")


def test_a_rule_naming_a_dimension_the_config_cannot_give_is_refused(tmp_path):
    def edit(raw):
        raw["config"].pop("intermediate_size")
        raw["modules"]["mlp.gate"] = [{"param": "mlp.gate_proj.weight", "dim": 0, "size": "intermediate_size"}]

    message = _refused(_write(tmp_path, "nodim", edit), r"modules\.mlp\.gate\[0\]\.size: uses dimension")
    assert "'intermediate_size'" in message and 'add "intermediate_size": ["<config attribute>"] to "config"' in message


def test_sites_must_match_the_rules_they_read_out(tmp_path):
    wrong = _write(tmp_path, "wrongsite", lambda r: r["sites"].update(neuron_activation="mlp.act_fn"))
    _refused(wrong, r"sites\.neuron_activation: no neuron rule slices 'mlp\.act_fn\.weight'")
    head = _write(tmp_path, "headsite", lambda r: r["sites"].update(head_output="self_attn.v_proj"))
    _refused(head, r"sites\.head_output: 'self_attn\.v_proj' is not the module of any head\.output rule")


def test_a_parameter_owned_by_no_module_is_reported_when_the_space_is_built(tmp_path):
    spec = load_architecture(_write(tmp_path, "gap", lambda r: r["modules"].pop("norm.pre_mlp")))
    model = tiny_model("llama")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    with pytest.raises(ArchitectureDescriptionError, match=r"no module owns the parameters") as info:
        ComponentSpace(spec, spec.dims(model.config), shapes)
    assert "model.layers.0.post_attention_layernorm.weight" in str(info.value)
    assert "model.layers.2.post_attention_layernorm.weight" in str(info.value)


def test_phi3_fused_projections_are_sliced_by_offsets():
    """gate_up_proj is [gate | up] (2 x 48 rows) and qkv_proj [Q 32 | K 16 | V 16] rows: a neuron
    owns one gate row, one up row and one down column, and is counted once."""
    space = ComponentSpace.from_model(tiny_model("phi3"), include_kv=True)
    assert space.num_neurons(1) == 48  # not the 96 rows of the fused gate_up_proj
    assert space.resolve("L1.mlp.neuron5") == [
        ParamSlice("model.layers.1.mlp.gate_up_proj.weight", 0, ((5, 6), (53, 54))),
        ParamSlice("model.layers.1.mlp.down_proj.weight", 1, ((5, 6),)),
    ]
    assert space.resolve("L1.mlp.up") == [ParamSlice("model.layers.1.mlp.gate_up_proj.weight", 0, ((48, 96),))]
    qkv, o = space.resolve("L1.attn.head2")  # KV group 1 of 2 (head_dim 8)
    assert qkv == ParamSlice("model.layers.1.self_attn.qkv_proj.weight", 0, ((16, 24), (40, 48), (56, 64)))
    assert o == ParamSlice("model.layers.1.self_attn.o_proj.weight", 1, ((16, 24),))
    with pytest.raises(ComponentError, match=r"neuron 48 is out of range \(layer 1 has 48 neurons\)"):
        space.resolve("L1.mlp.neuron48")


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_tied_embeddings_alias_the_same_way_for_models_and_checkpoints(family, tmp_path):
    base_dir, _ = make_pair(family, tmp_path)
    from_model = ComponentSpace.from_model(tiny_model(family))
    from_checkpoint = component_space_for_checkpoint(base_dir)
    assert from_model.aliases == from_checkpoint.aliases
    tied = tiny_model(family).config.tie_word_embeddings
    assert from_model.aliases == ({"lm_head.weight": "model.embed_tokens.weight"} if tied else {})
    assert from_model.resolve("unembed") == from_checkpoint.resolve("unembed")


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_sites_exist_and_a_kind_without_a_site_is_refused(family):
    model = tiny_model(family)
    space = ComponentSpace.from_model(model)
    for name in ("L1", "embed", "L1.attn", "L1.mlp", "L1.attn.head3", "L1.mlp.neuron2"):
        model.get_submodule(space.site(name).module)  # every declared path is a real submodule
    with pytest.raises(ComponentError, match="kind 'bogus' have no activation site"):
        space.site(Component("bogus", 1, "mlp", 0))  # type: ignore[arg-type]
