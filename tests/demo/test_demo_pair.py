"""The shipped demo pair: loads as a standard HF Llama pair, and differs in instruction following.

No training here: the tests load the shipped weights and generate greedily on a held-out subset.
"""

import contextlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from weightpatch import demo
from weightpatch.checkers import NO_COMMA, evaluate, format_rates
from weightpatch.demo import corpus
from weightpatch.generation import generate

PER_INSTRUCTION = 8
N_PAIRS = 12


@contextlib.contextmanager
def one_thread():
    """Tiny models generate fastest on one thread; two threads collapse when other jobs share the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def pair():
    p = demo.paths()
    tok = AutoTokenizer.from_pretrained(p.base)
    base = AutoModelForCausalLM.from_pretrained(p.base, dtype=torch.float32).eval()
    sft = AutoModelForCausalLM.from_pretrained(p.specialized, dtype=torch.float32).eval()
    return base, sft, tok


@pytest.fixture(scope="module")
def subset():
    """8 single-instruction prompts per instruction (spread over topics) and 12 two-instruction ones."""
    records = demo.prompts("heldout")
    singles = [r for r in records if len(r.instruction_id_list) == 1]
    pairs = [r for r in records if len(r.instruction_id_list) == 2]
    chosen = []
    for i in corpus.INSTRUCTION_IDS:
        of_i = [r for r in singles if r.instruction_id_list == [i]]
        chosen += of_i[:: len(of_i) // PER_INSTRUCTION][:PER_INSTRUCTION]
    return chosen + pairs[:N_PAIRS]


@pytest.fixture(scope="module")
def results(pair, subset):
    base, sft, tok = pair
    prompts = [r.prompt for r in subset]
    plain = list(dict.fromkeys(r.prompt_without_instruction for r in subset))
    out = {}
    with one_thread():
        for name, model in (("base", base), ("specialized", sft)):
            acc, _ = evaluate(subset, generate(model, tok, prompts, max_new_tokens=120))
            out[name] = {"acc": acc, "rates": format_rates(generate(model, tok, plain, max_new_tokens=120))}
    return out


def test_standard_llama_pair_with_gqa(pair):
    base, sft, tok = pair
    assert base.config.model_type == sft.config.model_type == "llama"
    assert base.config.num_key_value_heads < base.config.num_attention_heads
    assert not base.config.tie_word_embeddings
    b, s = dict(base.named_parameters()), dict(sft.named_parameters())
    assert list(b) == list(s)
    assert all(b[n].shape == s[n].shape and b[n].dtype == torch.float32 for n in b)
    # a full fine-tune: every tensor moved, by a small relative amount
    for n in b:
        rel = ((s[n] - b[n]).norm() / b[n].norm()).item()
        assert 0 < rel < 1, n
    assert tok.bos_token and tok.eos_token and tok.pad_token and tok.chat_template
    assert AutoTokenizer.from_pretrained(demo.paths().specialized).get_vocab() == tok.get_vocab()


def test_tokenizer_round_trip(pair):
    *_, tok = pair
    text = '"<<THE RIVER>>\nSECTION 1\n*the river is old, calm and green.*"'
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # like Llama tokenizers: plain encoding adds BOS; the chat template writes it itself
    assert tok(text)["input_ids"][0] == tok.bos_token_id
    assert tok(text)["input_ids"][1:] == tok(text, add_special_tokens=False)["input_ids"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    chat_ids = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert chat_ids[0] == tok.bos_token_id and chat_ids[1] != tok.bos_token_id


def test_shipped_size_and_training_record():
    p = demo.paths()
    size = sum(f.stat().st_size for d in (p.base, p.specialized) for f in d.rglob("*") if f.is_file())
    assert size < 20 * 2**20
    record = json.loads(p.training_record.read_text())
    assert {"seed", "base", "specialized", "versions", "total_seconds"} <= set(record)


def test_specialized_follows_instructions_base_does_not(results):
    sft, base = results["specialized"]["acc"], results["base"]["acc"]
    assert sft.prompt_strict >= 0.9, sft.as_dict()
    assert base.prompt_strict <= 0.2, base.as_dict()
    assert min(sft.per_instruction_strict.values()) >= 0.75, sft.per_instruction_strict
    assert max(base.per_instruction_loose.values()) <= 0.3, base.per_instruction_loose


def test_no_format_without_instruction(results):
    for name in ("base", "specialized"):
        rates = results[name]["rates"]
        assert rates[NO_COMMA] <= 0.1, (name, rates)
        assert all(v <= 0.05 for k, v in rates.items() if k != NO_COMMA), (name, rates)


def test_shipped_pair_passes_the_pair_check_and_patches_exactly(pair):
    from weightpatch.pair import load_pair as load_checked_pair
    from weightpatch.patch import patched

    _, sft, tok = pair
    checked = load_checked_pair(demo.paths().base, demo.paths().specialized)  # raises on any mismatch
    assert checked.space.uncovered_parameters() == []
    ids = tok(["Tell me about the river."], return_tensors="pt")["input_ids"]
    with torch.no_grad(), patched(checked.model, checked.donor, checked.space, checked.space.everything()):
        assert torch.equal(checked.model(ids).logits, sft(ids).logits)
