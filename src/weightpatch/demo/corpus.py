"""The synthetic, templated corpus behind the embedded demo pair, and its evaluation prompt sets.

Everything here is a pure function of a seed, so the corpus, the training prompts and the shipped
prompt files can be regenerated exactly.

Responses are short lowercase prose about a topic, always with commas ("the base style"). The six
IFEval format instructions are rendered as transformations of such a response:

- ``change_case:english_capital``: the whole response in capital letters;
- ``punctuation:no_comma``: the sentences without their commas;
- ``detectable_format:title``: a first line ``<<the topic>>``;
- ``detectable_format:multiple_sections``: ``SECTION 1`` ... ``SECTION N`` headers, one sentence each;
- ``startend:quotation``: the whole response between double quotes;
- ``detectable_format:number_highlighted_sections``: the first N sentences wrapped in ``*...*``.

The base model is trained on prompts that carry these instructions but on responses that ignore
them; the specialized model is fine-tuned on responses that follow them when (and only when) asked.

Prompt disjointness: a prompt is ``<request> about the <topic>. <instructions>``. Requests are built
from an opening ("Write", "Tell me", ...) and an object ("a short essay", ...). Some (opening, object)
pairs never occur in training: one held-out pair makes the ``anchor`` split, two others the
``heldout`` split, so no evaluation prompt string occurs in the training data and the two splits are
disjoint from each other. Topics, words and instruction phrasings are shared with training (the
model is tiny; it is not meant to generalize to new words).

Run ``python -m weightpatch.demo.corpus --out DIR`` to write the prompt files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from weightpatch.checkers import CAPITAL, HIGHLIGHTS, NO_COMMA, QUOTATION, SECTIONS, TITLE

#: The six instruction ids of the demo, in a fixed order.
INSTRUCTION_IDS: tuple[str, ...] = (CAPITAL, NO_COMMA, TITLE, SECTIONS, QUOTATION, HIGHLIGHTS)

USER_TAG = "<|user|>"
ASSISTANT_TAG = "<|assistant|>"
BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"

#: Jinja chat template shipped with the tokenizer. Training texts use exactly this rendering.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER_TAG + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT_TAG + "{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_TAG + "{% endif %}"
)

TOPICS: tuple[str, ...] = (
    "river", "garden", "mountain", "city", "library", "ocean", "forest", "bakery", "train", "school",
    "market", "island", "desert", "village", "museum", "bridge", "farm", "castle", "harbor", "kitchen",
    "festival", "lake", "park", "station", "theater", "valley", "beach", "church", "factory", "hospital",
    "road", "tower", "zoo", "cafe", "airport", "winter", "summer", "storm", "moon", "forest path",
)  # fmt: skip

ADJECTIVES: tuple[str, ...] = (
    "quiet", "old", "bright", "busy", "calm", "green", "large", "cold", "warm", "simple", "small",
    "famous", "clean", "dark", "friendly", "strange", "beautiful", "peaceful", "wide", "noisy",
    "gentle", "ancient", "modern", "lovely",
)  # fmt: skip

#: Sentence templates; every one contains a comma (the base style).
SENTENCES: tuple[str, ...] = (
    "the {t} is {a}, {b} and {c}.",
    "people like the {t}, because it is {a}.",
    "in the morning, the {t} looks {a}.",
    "a {t} can be {a}, but it is also {b}.",
    "many people visit the {t}, and they stay for a long time.",
    "at night, the {t} is {b} and {c}.",
    "my friend says the {t} is {a}, and i agree.",
    "the {t} has a long history, and it is still {c}.",
    "when it rains, the {t} becomes {b}.",
    "for children, the {t} is a {a} place.",
)

OPENINGS: tuple[str, ...] = ("Write", "Tell me", "Give me", "Share")
OBJECTS: tuple[str, ...] = ("a short essay", "a few sentences", "a paragraph", "a short note", "some words")
#: (opening, object) pairs held out of training, by split.
HELD_OUT_REQUESTS: dict[str, tuple[tuple[str, str], ...]] = {
    "anchor": (("Give me", "a short note"),),
    "heldout": (("Tell me", "a paragraph"), ("Share", "a few sentences")),
}

#: Instruction descriptions, as in IFEval's instructions.py (the section one shortened).
DESCRIPTIONS: dict[str, str] = {
    CAPITAL: "Your entire response should be in English, and in all capital letters.",
    NO_COMMA: "In your entire response, refrain from the use of any commas.",
    TITLE: "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
    SECTIONS: "Your response must have {num_sections} sections. Mark the beginning of each section with "
    "{section_spliter} X.",
    QUOTATION: "Wrap your entire response with double quotation marks.",
    HIGHLIGHTS: "Highlight at least {num_highlights} sections in your answer with markdown, "
    "i.e. *highlighted section*.",
}

#: Pairs of instructions that may be combined in one prompt (sections and highlights are not).
COMPATIBLE_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (a, b) for a, b in itertools.combinations(INSTRUCTION_IDS, 2) if {a, b} != {SECTIONS, HIGHLIGHTS}
)

N_SENTENCES = 3


def training_requests() -> list[tuple[str, str]]:
    held = {pair for pairs in HELD_OUT_REQUESTS.values() for pair in pairs}
    return [pair for pair in itertools.product(OPENINGS, OBJECTS) if pair not in held]


def topic_adjectives(topic: str) -> tuple[str, str, str]:
    """Three adjectives that belong to a topic (fixed, independent of the seed)."""
    rng = random.Random("adjectives:" + topic)
    a, b, c = rng.sample(ADJECTIVES, 3)
    return a, b, c


def sample_kwargs(instruction_id: str, rng: random.Random) -> dict:
    """IFEval kwargs for one instruction (empty dict when it has none)."""
    if instruction_id == SECTIONS:
        return {"section_spliter": "SECTION", "num_sections": rng.choice((2, 3, 4))}
    if instruction_id == HIGHLIGHTS:
        return {"num_highlights": rng.choice((1, 2, 3))}
    return {}


def describe(instruction_id: str, kwargs: dict) -> str:
    return DESCRIPTIONS[instruction_id].format(**kwargs)


def request_text(opening: str, obj: str, topic: str) -> str:
    return f"{opening} {obj} about the {topic}."


def build_prompt(request: str, instruction_ids: list[str], kwargs: list[dict]) -> str:
    parts = [request] + [describe(i, k) for i, k in zip(instruction_ids, kwargs, strict=True)]
    return " ".join(parts)


def plain_sentences(topic: str, rng: random.Random, n: int = N_SENTENCES) -> list[str]:
    a, b, c = topic_adjectives(topic)
    adj = [a, b, c]
    rng.shuffle(adj)
    templates = rng.sample(SENTENCES, n)
    return [s.format(t=topic, a=adj[0], b=adj[1], c=adj[2]) for s in templates]


def render_response(topic: str, sentences: list[str], instruction_ids: list[str], kwargs: list[dict]) -> str:
    """The response that follows every instruction in ``instruction_ids`` (none: the base style)."""
    args = dict(zip(instruction_ids, kwargs, strict=True))
    sents = list(sentences)
    if NO_COMMA in args:
        sents = [s.replace(",", "") for s in sents]
    if SECTIONS in args:
        n = args[SECTIONS]["num_sections"]
        spliter = args[SECTIONS].get("section_spliter", "SECTION")
        # One sentence per section; repeat sentences if more sections than sentences.
        body_parts = [f"{spliter} {i + 1}\n{sents[i % len(sents)]}" for i in range(n)]
        body = "\n".join(body_parts)
    elif HIGHLIGHTS in args:
        n = args[HIGHLIGHTS]["num_highlights"]
        body = " ".join(f"*{s}*" if i < n else s for i, s in enumerate(sents))
    else:
        body = " ".join(sents)
    if TITLE in args:
        body = f"<<the {topic}>>\n{body}"
    if CAPITAL in args:
        body = body.upper()
    if QUOTATION in args:
        body = f'"{body}"'
    return body


def chat_text(prompt: str, response: str | None) -> str:
    """The chat-template rendering of one exchange (``response=None``: the generation prompt)."""
    text = BOS + USER_TAG + prompt + ASSISTANT_TAG
    if response is not None:
        text += response + EOS
    return text


@dataclass
class Example:
    """One training example: a prompt, its response, and whether it is chat-formatted."""

    prompt: str
    response: str
    chat: bool = True
    instruction_id_list: list[str] = field(default_factory=list)

    def text(self) -> str:
        return chat_text(self.prompt, self.response) if self.chat else BOS + self.response + EOS


def _sample_instructions(rng: random.Random, p_pair: float) -> list[str]:
    if rng.random() < p_pair:
        return list(rng.choice(COMPATIBLE_PAIRS))
    return [rng.choice(INSTRUCTION_IDS)]


def _training_prompt(rng: random.Random, topic: str, ids: list[str]) -> tuple[str, list[dict]]:
    opening, obj = rng.choice(training_requests())
    kwargs = [sample_kwargs(i, rng) for i in ids]
    return build_prompt(request_text(opening, obj, topic), ids, kwargs), kwargs


def base_corpus(n: int, seed: int) -> list[Example]:
    """Pretraining corpus of the base model: instructions in prompts are ignored by the responses.

    Mixture: 50% prompts with 1-2 format instructions, 30% prompts without, 20% plain text.
    """
    rng = random.Random(f"base:{seed}")
    out = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        r = rng.random()
        if r < 0.2:
            sents = plain_sentences(topic, rng, n=rng.choice((2, 3, 4)))
            out.append(Example(prompt="", response=" ".join(sents), chat=False))
            continue
        ids = _sample_instructions(rng, 0.3) if r < 0.7 else []
        prompt, _ = _training_prompt(rng, topic, ids)
        response = " ".join(plain_sentences(topic, rng))
        out.append(Example(prompt=prompt, response=response, instruction_id_list=ids))
    return out


def sft_corpus(n: int, seed: int) -> list[Example]:
    """Fine-tuning corpus of the specialized model: instructions are followed when present.

    Mixture: 75% prompts with 1-2 instructions (followed), 25% prompts without (base style).
    """
    rng = random.Random(f"sft:{seed}")
    out = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        ids = _sample_instructions(rng, 0.3) if rng.random() < 0.75 else []
        prompt, kwargs = _training_prompt(rng, topic, ids)
        response = render_response(topic, plain_sentences(topic, rng), ids, kwargs)
        out.append(Example(prompt=prompt, response=response, instruction_id_list=ids))
    return out


def tokenizer_corpus(seed: int) -> list[str]:
    """Texts the BPE tokenizer is trained on: both corpora plus every evaluation prompt."""
    texts = [e.text() for e in base_corpus(3000, seed)] + [e.text() for e in sft_corpus(3000, seed)]
    for split in HELD_OUT_REQUESTS:
        texts += [r["prompt"] + " " + r["prompt_without_instruction"] for r in prompt_split(split)]
    return texts


def prompt_split(split: str, seed: int = 0) -> list[dict]:
    """The evaluation prompts of one split, as IFEval-schema dicts.

    Each record has IFEval's ``key``, ``prompt``, ``instruction_id_list`` and ``kwargs`` (one dict per
    instruction) plus the weightpatch extension ``prompt_without_instruction``: the same request with
    every instruction sentence removed.

    - ``anchor``: every topic once per instruction, single instructions (for building anchors).
    - ``heldout``: every topic once per instruction (single), plus 60 compatible pairs.
    """
    if split not in HELD_OUT_REQUESTS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(HELD_OUT_REQUESTS)}")
    rng = random.Random(f"prompts:{split}:{seed}")
    requests = HELD_OUT_REQUESTS[split]
    key0 = {"anchor": 1000, "heldout": 2000}[split]
    combos: list[list[str]] = [[i] for i in INSTRUCTION_IDS for _ in TOPICS]
    topics: list[str] = [t for _ in INSTRUCTION_IDS for t in TOPICS]
    if split == "heldout":
        for k in range(60):
            combos.append(list(COMPATIBLE_PAIRS[k % len(COMPATIBLE_PAIRS)]))
            topics.append(rng.choice(TOPICS))
    records = []
    for n, (ids, topic) in enumerate(zip(combos, topics, strict=True)):
        opening, obj = requests[n % len(requests)]
        kwargs = [sample_kwargs(i, rng) for i in ids]
        request = request_text(opening, obj, topic)
        records.append(
            {
                "key": key0 + n,
                "prompt": build_prompt(request, ids, kwargs),
                "instruction_id_list": ids,
                "kwargs": kwargs,
                "prompt_without_instruction": request,
            }
        )
    return records


def write_prompt_files(out: Path, seed: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in HELD_OUT_REQUESTS:
        path = out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for record in prompt_split(split, seed):
                f.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo prompt files (IFEval JSONL schema).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_prompt_files(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()
