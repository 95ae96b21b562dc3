"""The inputs users hold, through the CLI: .gguf files, LoRA adapters, hub-id-shaped names offline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cli_testutil import assert_user_error, invoke
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_pair
from weightpatch import demo

pytest.importorskip("gguf")
from gguf_writer import write_llama_gguf


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_check_takes_gguf_file_paths(tmp_path):
    dirs = make_pair("llama", tmp_path)
    files = [
        write_llama_gguf(
            AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d), tmp_path / f"{d.name}.gguf"
        )
        for d in dirs
    ]
    result = invoke("check", *files, "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output


def test_check_takes_a_lora_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = AutoModelForCausalLM.from_pretrained(demo.paths().base)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    wrapped.save_pretrained(tmp_path / "adapter")
    result = invoke("check", demo.paths().base, tmp_path / "adapter", "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "LoRA adapter: rank 2" in result.stdout and "q_proj" in result.stdout  # rank, targets, norms per layer


def test_merge_with_hub_shaped_names_offline_is_one_line_at_once(tmp_path, offline):
    start = time.monotonic()
    # --no-progress: the merge bar is drawn before the inputs are opened and would prefix the error line
    result = invoke("merge", demo.paths().base, "some-org/some-expert", "-o", tmp_path / "out", "--no-progress")
    assert time.monotonic() - start < 2
    assert_user_error(result, "'some-org/some-expert' is not a local directory")


def test_anchor_on_ifevals_own_schema_with_model_diff(tmp_path):
    """IFEval lines (no prompt_without_instruction, instruction types outside the built-in six):
    model_diff anchor and its steering check run; unchecked instructions are skipped, not fatal."""
    sample = Path(__file__).parents[1] / "data" / "ifeval_sample.jsonl"
    paths = demo.paths()
    result = invoke(
        "anchor", paths.base, paths.specialized, "--prompts", sample, "--heldout", sample, "--method", "model_diff",
        "--layer", "2", "--alphas", "0,1", "--steering-prompts", "6", "--max-new-tokens", "8",
        "--run-dir", tmp_path / "run", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "anchor.json").is_file()
    result = invoke("anchor", paths.base, paths.specialized, "--prompts", sample, "--run-dir", tmp_path / "other")
    assert_user_error(result, "'prompt_without_instruction'", "--method model_diff")


@pytest.mark.slow
def test_lora_adapter_through_every_subcommand(tmp_path):
    """anchor, screen (exact and first-order), trace and merge with a PEFT adapter as the specialized model."""
    peft = pytest.importorskip("peft")
    base = demo.paths().base
    model = AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    adapter, prompts = tmp_path / "adapter", demo.paths().data / "anchor.jsonl"
    args = ("--run-dir", tmp_path / "run", "--no-progress")
    steps = [
        ("anchor", base, adapter, "--prompts", prompts, "--layer", "2", "--steering-prompts", "0", *args),
        ("screen", base, adapter, "--prompts", prompts, "--kinds", "head,module", "--top-k", "3", *args),
        ("trace", base, adapter, "--prompts", prompts, "--targets", "L2.attn.head1", *args),
        ("merge", base, adapter, "--output", tmp_path / "merged", "--method", "ties", "--no-progress"),
    ]
    for step in steps:
        result = invoke(*step)
        assert result.exit_code == 0, (step[0], result.output)
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()


def test_merge_takes_gguf_files_like_the_other_commands(tmp_path):
    """`wpatch merge` takes .gguf files (base, expert, or both; issue 30: it refused them in one line):
    the merge of the GGUF pair is the merge of the safetensors pair it was written from, tensor for
    tensor, with a loadable config and tokenizer; the record names and hashes the GGUF files; the
    output may sit beside them, but not replace the directory that holds them."""
    import json

    import torch
    from safetensors.torch import load_file

    dirs = make_pair("llama", tmp_path)
    files = [
        write_llama_gguf(
            AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d), tmp_path / f"{d.name}.gguf"
        )
        for d in dirs
    ]

    def merged(*inputs, out):
        flags = ("--method", "task_arithmetic", "--lam", "0.5", "--no-progress", "--max-shard-size", "20KB")
        result = invoke("merge", *inputs, "-o", out, *flags)
        assert result.exit_code == 0, result.output
        return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}

    reference = merged(*dirs, out=tmp_path / "from-dirs")
    out = tmp_path / "from-gguf"
    got = merged(*files, out=out)
    assert sorted(got) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(got[name], tensor), name
    assert len(list(out.glob("*.safetensors"))) > 1  # --max-shard-size reached the writer
    model = AutoModelForCausalLM.from_pretrained(out)
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=files[0].name)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == from_gguf.get_vocab()
    assert model.config.num_hidden_layers == AutoModelForCausalLM.from_pretrained(dirs[0]).config.num_hidden_layers
    from weightpatch.merging import component_space_for_checkpoint  # mechanism-aware merges read the base so

    assert component_space_for_checkpoint(files[0]).shapes == component_space_for_checkpoint(dirs[0]).shapes
    record = json.loads((out / "weightpatch_merge.json").read_text())
    assert record["base"]["path"] == str(files[0]) and record["experts"][0]["path"] == str(files[1])
    assert record["base"]["weights_sha256"] != record["experts"][0]["weights_sha256"]
    # a GGUF expert is checked against a safetensors base like any expert: transformers' GGUF tokenizer
    # adds <|endoftext|> to this tiny vocabulary, and the refusal names the .gguf file
    result = invoke("merge", dirs[0], files[1], "-o", tmp_path / "mixed", "--no-progress")
    assert_user_error(result, f"expert {files[1]} cannot be merged", "'<|endoftext|>' only in specialized")
    result = invoke("merge", *files, "-o", tmp_path, "--overwrite", "--no-progress")
    assert_user_error(result, "overlaps the input")
    result = invoke("merge", files[0], tmp_path / "missing.gguf", "-o", tmp_path / "x", "--no-progress")
    assert_user_error(result, "missing.gguf' does not exist")
