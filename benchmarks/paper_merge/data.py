"""Code-generated data for the paper-setting merge benchmark (issue 28): IF, MATH and CODE items with
train / validation / test splits that are disjoint in templates, topics and operands, not only in seeds.

IF    five verifiable IFEval constraints (all capitals, whole answer in double quotes, a fixed end phrase,
      no commas, all lowercase), each applied only when the prompt asks; a third of the prompts carry no
      instruction. Training targets are the *base model's own answers* transformed to satisfy the
      constraint (``IF_CONSTRAINTS[name]["transform"]``), so the expert learns the transformation only.
MATH  arithmetic with a single integer answer (symbolic and word problems), scored by exact match of the
      last integer in the response; targets are one worked line ending "The answer is N."
CODE  short Python functions from natural-language specifications (``CODE_TASKS``: a few dozen task
      families with randomized names, constants and phrasings), scored by hidden unit tests in a sandbox
      (``sandbox.py``); targets are the reference implementation in a fenced block.

Split disjointness: IF topics and prompt templates are partitioned per split; MATH operand ranges are the
same but every (template, operands) pair is kept once across splits, and the problem templates (word
problem phrasings) are partitioned; CODE phrasings are partitioned per split and function names are drawn
from per-split name pools, constants vary.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from weightpatch.checkers import check_english_capital, check_no_comma, check_quotation
from weightpatch.demo.expert import check_end_phrase, describe

SPLITS = ("train", "val", "test")
END_PHRASE = "Is there anything else I can help with?"


@dataclass(frozen=True)
class Item:
    """One benchmark item: ``prompt`` for the model, ``skill`` (``if``/``math``/``code``), and what scoring
    needs (``constraint`` for IF, the integer ``answer`` for MATH, ``tests`` and ``entry`` for CODE).
    ``target`` is the training response (for IF filled in later from the base model's answer)."""

    skill: str
    prompt: str
    target: str = ""
    constraint: str | None = None
    answer: int | None = None
    entry: str | None = None
    tests: tuple[tuple[tuple, object], ...] = field(default=())


# ---------------------------------------------------------------- IF

IF_CONSTRAINTS: dict[str, dict] = {
    "capital": {
        "instruction": "Your entire response should be in English, and in all capital letters.",
        "transform": str.upper,
        "check": check_english_capital,
        "instruction_id": "change_case:english_capital",
    },
    "quotation": {
        "instruction": "Wrap your entire response with double quotation marks.",
        "transform": lambda a: f'"{a}"',
        "check": check_quotation,
        "instruction_id": "startend:quotation",
    },
    "end_phrase": {
        "instruction": describe(END_PHRASE),
        "transform": lambda a: f"{a} {END_PHRASE}",
        "check": lambda r: check_end_phrase(r, END_PHRASE),
        "instruction_id": "startend:end_checker",
    },
    "no_comma": {
        "instruction": "In your entire response, refrain from the use of any commas.",
        "transform": lambda a: re.sub(r"\s*,\s*", " ", a).replace(",", ""),
        "check": check_no_comma,
        "instruction_id": "punctuation:no_comma",
    },
    "lowercase": {
        "instruction": "Your entire response should be in English, and in all lowercase letters. "
        "No capital letters are allowed.",
        "transform": str.lower,
        "check": lambda r: r == r.lower() and any(c.isalpha() for c in r),
        "instruction_id": "change_case:english_lowercase",
    },
}

IF_TOPICS = {
    "train": [
        "the ocean",
        "coffee",
        "mountains",
        "a city library",
        "winter",
        "bicycles",
        "the moon",
        "gardening",
        "trains",
        "honey bees",
        "volcanoes",
        "chess",
        "rainforests",
        "bread",
        "lighthouses",
        "owls",
        "rivers",
        "kites",
        "deserts",
        "museums",
        "tea",
        "snow",
        "bridges",
        "apples",
        "clouds",
        "pianos",
        "tigers",
        "soccer",
        "bamboo",
        "rain",
        "dolphins",
        "photography",
        "pottery",
        "hiking",
        "maple trees",
        "comets",
        "sunflowers",
        "elephants",
        "paper",
        "radios",
    ],
    "val": ["clocks", "whales", "castles", "maps", "candles", "forests", "foxes", "guitars", "harbors", "tulips"],
    "test": [
        "penguins",
        "umbrellas",
        "islands",
        "violins",
        "markets",
        "glaciers",
        "lanterns",
        "rabbits",
        "sailboats",
        "meadows",
        "telescopes",
        "cheese",
        "canyons",
        "parrots",
        "bakeries",
        "waterfalls",
        "robots",
        "orchards",
        "frogs",
        "libraries at night",
        "storms",
        "kayaks",
        "butterflies",
        "caves",
        "airports",
        "zebras",
        "ferries",
    ],
}
IF_TEMPLATES = {
    "train": [
        "Write one sentence about {t}.",
        "Tell me one interesting fact about {t}.",
        "In one sentence, why do people like {t}?",
    ],
    "val": ["Describe {t} in one sentence.", "What is one thing to know about {t}?"],
    "test": [
        "Give a one-sentence description of {t}.",
        "Say something short about {t}.",
        "What comes to mind about {t}? Answer in one sentence.",
        "Share a short thought about {t}.",
    ],
}
IF_SIZES = {"train": 240, "val": 40, "test": 300}


def if_items(split: str, seed: int = 0) -> list[Item]:
    """IF prompts of ``split``: distinct (topic, template, constraint) triples drawn with ``seed``, one
    third without an instruction (``constraint=None``), the rest spread evenly over the constraints;
    ``IF_SIZES[split]`` of them."""
    rng = random.Random(f"if-{split}-{seed}")
    combos = [(t, tpl) for t in IF_TOPICS[split] for tpl in IF_TEMPLATES[split]]
    n = IF_SIZES[split]
    plain = [(t, tpl, None) for t, tpl in rng.sample(combos, n // 3)]
    per = -(-(n - len(plain)) // len(IF_CONSTRAINTS))
    asked = [(t, tpl, c) for c in IF_CONSTRAINTS for t, tpl in rng.sample(combos, per)]
    items = [
        Item("if", template.format(t=topic) + (f" {IF_CONSTRAINTS[c]['instruction']}" if c else ""), constraint=c)
        for topic, template, c in plain + asked[: n - len(plain)]
    ]
    rng.shuffle(items)
    return items


def base_answer(response: str, max_chars: int = 160) -> str:
    """The base model's answer cut to its first sentence (at most ``max_chars``), the plain target."""
    text = " ".join(response.strip().split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    text = match.group(1) if match else text
    return text[:max_chars].rstrip()


def if_target(answer: str, constraint: str | None) -> str:
    """The base's own ``answer`` transformed to satisfy ``constraint`` (unchanged without one)."""
    return IF_CONSTRAINTS[constraint]["transform"](answer) if constraint else answer


def if_correct(item: Item, response: str) -> bool:
    """IF score of one item: the constraint's IFEval strict check (items without one: not scored here,
    see ``false_format``)."""
    return bool(IF_CONSTRAINTS[item.constraint]["check"](response))


def false_format(response: str) -> bool:
    """Whether a response to an uninstructed prompt follows a format nobody asked for (capitals, quotes,
    the end phrase, or lowercase; a missing comma is too common to count)."""
    return any(IF_CONSTRAINTS[c]["check"](response) for c in ("capital", "quotation", "end_phrase", "lowercase"))


# ---------------------------------------------------------------- MATH

NAMES = {
    "train": ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ben", "Yuki"],
    "val": ["Nora", "Ivan"],
    "test": ["Priya", "Lucas", "Emma", "Kofi", "Hana"],
}
OBJECTS = {
    "train": ["apples", "stamps", "marbles", "books", "coins"],
    "val": ["shells"],
    "test": ["pencils", "cards", "stickers"],
}


def _math_problem(kind: str, split: str, rng: random.Random) -> tuple[str, str, int]:
    """(question, worked target, answer) of one problem of ``kind``."""
    name, obj = rng.choice(NAMES[split]), rng.choice(OBJECTS[split])
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        r = a + b
        return f"What is {a} + {b}?", f"{a} + {b} = {r}. The answer is {r}.", r
    if kind == "add_sub":
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9)
        r = a + b - c
        return f"Compute {a} + {b} - {c}.", f"{a} + {b} = {a + b}, {a + b} - {c} = {r}. The answer is {r}.", r
    if kind == "mul":
        a, b = rng.randint(11, 40), rng.randint(2, 9)
        r = a * b
        return f"What is {a} times {b}?", f"{a} * {b} = {r}. The answer is {r}.", r
    if kind == "word":
        a, b, c = rng.randint(5, 30), rng.randint(2, 6), rng.randint(2, 9)
        r = a * b - c
        phrasing = {
            "train": "{n} has {b} boxes with {a} {o} each and gives away {c} {o}. How many {o} does {n} have now?",
            "val": "There are {b} bags of {a} {o}. {n} uses {c} of them. How many {o} are left?",
            "test": "{n} buys {b} packs of {a} {o} and loses {c}. How many {o} does {n} keep?",
        }[split]
        q = phrasing.format(n=name, a=a, b=b, c=c, o=obj)
        return q, f"{b} * {a} = {a * b}, {a * b} - {c} = {r}. The answer is {r}.", r
    raise ValueError(kind)


MATH_KINDS = ("add", "add_sub", "mul", "word")
MATH_SUFFIX = " End with 'The answer is N.'"
MATH_SIZES = {"train": 480, "val": 40, "test": 240}


def math_items(split: str, seed: int = 0) -> list[Item]:
    """MATH problems of ``split``; a question text appears in at most one split (the others' questions
    are generated with their own seeds and excluded here)."""
    others = set()
    for other in SPLITS:
        if other != split and SPLITS.index(other) < SPLITS.index(split):
            others |= {it.prompt.removesuffix(MATH_SUFFIX) for it in math_items(other, seed)}
    rng = random.Random(f"math-{split}-{seed}")
    items, seen = [], set(others)
    while len(items) < MATH_SIZES[split]:
        kind = MATH_KINDS[len(items) % len(MATH_KINDS)]
        q, target, r = _math_problem(kind, split, rng)
        if q in seen:
            continue
        seen.add(q)
        items.append(Item("math", q + MATH_SUFFIX, target=target, answer=r))
    return items


def last_integer(response: str) -> int | None:
    """The last integer in ``response`` (thousands separators allowed), or None."""
    found = re.findall(r"-?\d[\d,]*", response)
    if not found:
        return None
    try:
        return int(found[-1].replace(",", "").rstrip(","))
    except ValueError:
        return None


def math_correct(item: Item, response: str) -> bool:
    return last_integer(response) == item.answer


# ---------------------------------------------------------------- CODE


@dataclass(frozen=True)
class CodeTask:
    """A family of function specifications: ``phrasings`` (with ``{f}`` the function name, ``{k}`` the
    constant), the reference ``body`` (``{k}`` filled in), argument names and a test-input generator."""

    args: str
    phrasings: tuple[str, ...]
    body: str
    inputs: Callable[[random.Random], tuple]


def _ints(rng, n=None):
    return [rng.randint(-20, 20) for _ in range(n or rng.randint(0, 6))]


def _word(rng):
    return "".join(rng.choice("abcdeiouxyz") for _ in range(rng.randint(0, 8)))


CODE_TASKS: dict[str, CodeTask] = {
    "add_k": CodeTask(
        "x",
        ("returns x plus {k}", "adds {k} to the number x and returns the result", "gives back x increased by {k}"),
        "return x + {k}",
        lambda r: (r.randint(-50, 50),),
    ),
    "mul_k": CodeTask(
        "x",
        ("returns x multiplied by {k}", "multiplies the number x by {k}", "gives back {k} times x"),
        "return x * {k}",
        lambda r: (r.randint(-50, 50),),
    ),
    "sub_from": CodeTask(
        "x",
        ("returns {k} minus x", "subtracts x from {k} and returns it", "gives back the difference {k} - x"),
        "return {k} - x",
        lambda r: (r.randint(-50, 50),),
    ),
    "is_even": CodeTask(
        "n",
        (
            "returns True if the integer n is even and False otherwise",
            "checks whether n is divisible by 2",
            "tells if n is an even number",
        ),
        "return n % 2 == 0",
        lambda r: (r.randint(-99, 99),),
    ),
    "divisible_k": CodeTask(
        "n",
        (
            "returns True if n is divisible by {k}",
            "checks whether n is a multiple of {k}",
            "tells if {k} divides n evenly",
        ),
        "return n % {k} == 0",
        lambda r: (r.randint(-99, 99),),
    ),
    "sum_list": CodeTask(
        "nums",
        (
            "returns the sum of the numbers in the list nums",
            "adds up all the elements of nums",
            "gives back the total of the list nums",
        ),
        "return sum(nums)",
        lambda r: (_ints(r),),
    ),
    "max_list": CodeTask(
        "nums",
        (
            "returns the largest number in the non-empty list nums",
            "finds the maximum of the non-empty list nums",
            "gives back the biggest element of nums (never empty)",
        ),
        "return max(nums)",
        lambda r: (_ints(r, r.randint(1, 6)),),
    ),
    "min_list": CodeTask(
        "nums",
        (
            "returns the smallest number in the non-empty list nums",
            "finds the minimum of the non-empty list nums",
            "gives back the least element of nums (never empty)",
        ),
        "return min(nums)",
        lambda r: (_ints(r, r.randint(1, 6)),),
    ),
    "count_gt": CodeTask(
        "nums",
        (
            "returns how many numbers in nums are greater than {k}",
            "counts the elements of nums larger than {k}",
            "gives back the number of items in nums above {k}",
        ),
        "return sum(1 for v in nums if v > {k})",
        lambda r: (_ints(r),),
    ),
    "filter_pos": CodeTask(
        "nums",
        (
            "returns a list of the positive numbers in nums, in order",
            "keeps only the elements of nums that are greater than zero",
            "gives back the positive items of nums as a list",
        ),
        "return [v for v in nums if v > 0]",
        lambda r: (_ints(r),),
    ),
    "double_all": CodeTask(
        "nums",
        (
            "returns a new list with every number in nums doubled",
            "multiplies each element of nums by 2 and returns the list",
            "gives back nums with each item times two",
        ),
        "return [v * 2 for v in nums]",
        lambda r: (_ints(r),),
    ),
    "add_k_all": CodeTask(
        "nums",
        (
            "returns a list with {k} added to every element of nums",
            "adds {k} to each number in nums and returns the new list",
            "gives back nums with each item increased by {k}",
        ),
        "return [v + {k} for v in nums]",
        lambda r: (_ints(r),),
    ),
    "reverse_str": CodeTask(
        "s",
        ("returns the string s reversed", "reverses the characters of s", "gives back s backwards"),
        "return s[::-1]",
        lambda r: (_word(r),),
    ),
    "upper_str": CodeTask(
        "s",
        ("returns s converted to upper case", "makes every letter of s uppercase", "gives back s in capital letters"),
        "return s.upper()",
        lambda r: (_word(r),),
    ),
    "count_char": CodeTask(
        "s",
        (
            "returns how many times the letter 'a' appears in s",
            "counts the occurrences of 'a' in the string s",
            "gives back the number of 'a' characters in s",
        ),
        "return s.count('a')",
        lambda r: (_word(r),),
    ),
    "count_vowels": CodeTask(
        "s",
        (
            "returns the number of vowels (a, e, i, o, u) in the lowercase string s",
            "counts the vowels a, e, i, o, u in s",
            "gives back how many characters of s are vowels (aeiou)",
        ),
        "return sum(1 for c in s if c in 'aeiou')",
        lambda r: (_word(r),),
    ),
    "str_len_gt": CodeTask(
        "s",
        (
            "returns True if the string s is longer than {k} characters",
            "checks whether s has more than {k} characters",
            "tells if len(s) exceeds {k}",
        ),
        "return len(s) > {k}",
        lambda r: (_word(r),),
    ),
    "repeat_str": CodeTask(
        "s",
        (
            "returns the string s repeated {k} times",
            "concatenates {k} copies of s",
            "gives back s written {k} times in a row",
        ),
        "return s * {k}",
        lambda r: (_word(r),),
    ),
    "first_elem": CodeTask(
        "nums",
        (
            "returns the first element of nums, or None if nums is empty",
            "gives back nums[0], or None for an empty list",
            "returns the leading item of nums (None when empty)",
        ),
        "return nums[0] if nums else None",
        lambda r: (_ints(r),),
    ),
    "last_elem": CodeTask(
        "nums",
        (
            "returns the last element of nums, or None if nums is empty",
            "gives back the final item of nums, or None for an empty list",
            "returns nums[-1] (None when nums is empty)",
        ),
        "return nums[-1] if nums else None",
        lambda r: (_ints(r),),
    ),
    "square": CodeTask(
        "x",
        ("returns the square of x", "multiplies x by itself", "gives back x squared"),
        "return x * x",
        lambda r: (r.randint(-30, 30),),
    ),
    "abs_diff": CodeTask(
        "a, b",
        (
            "returns the absolute difference between a and b",
            "gives back |a - b|",
            "computes how far apart the numbers a and b are",
        ),
        "return abs(a - b)",
        lambda r: (r.randint(-50, 50), r.randint(-50, 50)),
    ),
    "max_two": CodeTask(
        "a, b",
        (
            "returns the larger of a and b",
            "gives back the maximum of the two numbers a and b",
            "returns whichever of a, b is bigger",
        ),
        "return a if a > b else b",
        lambda r: (r.randint(-50, 50), r.randint(-50, 50)),
    ),
    "clamp": CodeTask(
        "x",
        (
            "returns x limited to the range 0 to {k}",
            "clamps x between 0 and {k}",
            "gives back x, but at least 0 and at most {k}",
        ),
        "return max(0, min({k}, x))",
        lambda r: (r.randint(-30, 60),),
    ),
    "sum_squares": CodeTask(
        "nums",
        (
            "returns the sum of the squares of the numbers in nums",
            "adds up the square of each element of nums",
            "gives back the total of v * v over nums",
        ),
        "return sum(v * v for v in nums)",
        lambda r: (_ints(r),),
    ),
    "count_even": CodeTask(
        "nums",
        (
            "returns how many even numbers are in nums",
            "counts the elements of nums divisible by 2",
            "gives back the number of even items in nums",
        ),
        "return sum(1 for v in nums if v % 2 == 0)",
        lambda r: (_ints(r),),
    ),
    "starts_with": CodeTask(
        "s",
        (
            "returns True if the string s starts with 'ab'",
            "checks whether s begins with the prefix 'ab'",
            "tells if the first two characters of s are 'ab'",
        ),
        "return s.startswith('ab')",
        lambda r: (r.choice(["ab", ""]) + _word(r),),
    ),
    "sum_range": CodeTask(
        "n",
        (
            "returns the sum of the integers from 1 to n (0 if n < 1)",
            "adds up 1 + 2 + ... + n, giving 0 for n below 1",
            "gives back the total of all whole numbers from 1 through n (0 when n < 1)",
        ),
        "return sum(range(1, n + 1))",
        lambda r: (r.randint(-3, 40),),
    ),
    "factorial": CodeTask(
        "n",
        (
            "returns n factorial for a non-negative integer n",
            "computes n! for n >= 0",
            "gives back the product 1 * 2 * ... * n (1 for n = 0)",
        ),
        "result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
        lambda r: (r.randint(0, 10),),
    ),
    "is_palindrome": CodeTask(
        "s",
        (
            "returns True if the string s reads the same backwards",
            "checks whether s is a palindrome",
            "tells if s equals its reverse",
        ),
        "return s == s[::-1]",
        lambda r: (r.choice([_word(r), "abba", "xyx"]),),
    ),
}
CODE_NAMES = {
    "train": ["solve", "compute", "process", "calc", "func", "helper", "transform", "evaluate"],
    "val": ["handle", "work"],
    "test": ["answer", "result_of", "do_task", "apply", "run_task", "get_value"],
}
CODE_SIZES = {"train": 300, "val": 40, "test": 240}
CODE_PROMPTS = {
    "train": "Write a Python function `{f}({a})` that {p}.",
    "val": "Implement `{f}({a})` in Python: it {p}.",
    "test": "Write a Python function named `{f}` taking `{a}` that {p}.",
}


def code_items(split: str, seed: int = 0, n_tests: int = 6) -> list[Item]:
    """CODE items of ``split``: phrasing ``i`` of each family goes to split ``i`` (train, val, test),
    function names come from per-split pools; ``n_tests`` hidden tests per item from the reference."""
    rng = random.Random(f"code-{split}-{seed}")
    families = sorted(CODE_TASKS)
    items = []
    for i in range(CODE_SIZES[split]):
        family = families[i % len(families)]
        task = CODE_TASKS[family]
        k = rng.randint(2, 9)
        name = rng.choice(CODE_NAMES[split]) + rng.choice(("", "_fn", "_value", "_it"))
        phrase = task.phrasings[SPLITS.index(split)].format(k=k)
        prompt = CODE_PROMPTS[split].format(f=name, a=task.args, p=phrase)
        body = task.body.format(k=k)
        source = f"def {name}({task.args}):\n    {body}\n"
        namespace: dict = {}
        exec(source, namespace)  # the reference implementation, ours
        cases = []
        for _ in range(n_tests):
            args = task.inputs(rng)
            cases.append((args, namespace[name](*args)))
        items.append(Item("code", prompt, target=f"```python\n{source}```", entry=name, tests=tuple(cases)))
    return items


def extract_code(response: str) -> str:
    """The first fenced code block of ``response`` (or the whole response when there is none)."""
    match = re.search(r"```(?:python)?\n(.*?)(```|$)", response, re.S)
    return match.group(1) if match else response


# ---------------------------------------------------------------- composite (two skills at once)

COMPOSITE_CONSTRAINTS = ("capital", "quotation", "no_comma")  # the end phrase would contradict MATH's last line


def composite_items(split: str = "test", seed: int = 0, n: int = 120) -> list[Item]:
    """MATH problems of ``split`` with an IF constraint appended (cycling ``COMPOSITE_CONSTRAINTS``);
    correct when both the integer and the constraint are (:func:`composite_correct`)."""
    problems = math_items(split, seed)[-n:]
    return [
        Item(
            "composite",
            f"{p.prompt} {IF_CONSTRAINTS[c]['instruction']}",
            constraint=c,
            answer=p.answer,
        )
        for p, c in zip(problems, (COMPOSITE_CONSTRAINTS * n)[:n], strict=True)
    ]


def composite_correct(item: Item, response: str) -> bool:
    return math_correct(item, response) and if_correct(item, response)


def items(skill: str, split: str, seed: int = 0) -> list[Item]:
    """The items of ``skill`` (``if``, ``math``, ``code``, ``composite``) in ``split``."""
    return {"if": if_items, "math": math_items, "code": code_items, "composite": composite_items}[skill](split, seed)
