"""A small byte-level BPE tokenizer for the demo pair, built with the ``tokenizers`` library."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from weightpatch.demo.corpus import ASSISTANT_TAG, BOS, CHAT_TEMPLATE, EOS, PAD, USER_TAG

SPECIAL_TOKENS = (PAD, BOS, EOS, USER_TAG, ASSISTANT_TAG)


def build_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; return it as a ``PreTrainedTokenizerFast`` with the chat template.

    Byte level: every string is encodable (no unknown token) and decoding is exact. Like Llama
    tokenizers, encoding with ``add_special_tokens=True`` (the default) prepends the BOS token; the chat
    template writes BOS itself, so chat-rendered text is encoded with ``add_special_tokens=False``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The trained ``tokenizers`` object as a ``PreTrainedTokenizerFast``: BOS post-processor, chat template."""
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
