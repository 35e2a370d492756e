"""Long-context tasks: RULER-style synthetic retrieval, generated offline from a seed, and user task
files ({"context": ..., "answer": ...} per line).

Every example is a (prompt, answer) pair of strings rendered with the checkpoint's tokenizer to a
target length in tokens. Synthetic tasks:
  needle       one key-value "needle" hidden in filler; ask for its value
  multikey     several needles with distinct keys (distractors); ask for one of them
  multivalue   one key given several values at different depths; ask for all, in order
  vartrack     a chain of variable assignments (X1 = number, X2 = X1, ...) among distractor chains;
               ask which variables hold the number
The filler is deterministic prose-like text from a fixed word list, so a model can only answer by
retrieving from the context, never from the filler.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable, List, Sequence

SYNTHETIC_TASKS = ("needle", "multikey", "multivalue", "vartrack")

_WORDS = ("the river moves slowly past old stone walls while birds circle above green hills and "
          "a quiet market opens near the bridge where merchants sell bread cloth and copper pots "
          "under a pale morning sky that promises rain before the evening bells ring").split()


class TooShort(ValueError):
    """The target length cannot hold the task's facts and question."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def _filler_sentence(rng: random.Random) -> str:
    n = rng.randint(8, 16)
    words = [rng.choice(_WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + ". "


def _key(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))


def _number(rng: random.Random) -> str:
    return str(rng.randint(100000, 999999))


def _needles(task: str, rng: random.Random):
    """-> (facts to hide, question, answer)."""
    if task == "needle":
        key, value = _key(rng), _number(rng)
        return ([f"The special magic number for {key} is {value}. "],
                f"What is the special magic number for {key}? Answer:", f" {value}")
    if task == "multikey":
        keys = []
        while len(keys) < 4:  # distinct keys: the question must have one answer
            k = _key(rng)
            if k not in keys:
                keys.append(k)
        values = [_number(rng) for _ in keys]
        facts = [f"The special magic number for {k} is {v}. " for k, v in zip(keys, values)]
        target = rng.randrange(len(keys))
        return facts, f"What is the special magic number for {keys[target]}? Answer:", f" {values[target]}"
    if task == "multivalue":
        key = _key(rng)
        values = [_number(rng) for _ in range(3)]
        facts = [f"One of the special magic numbers for {key} is {v}. " for v in values]
        return (facts, f"List all the special magic numbers for {key} in order. Answer:",
                " " + ", ".join(values))
    if task == "vartrack":
        value, other = _number(rng), _number(rng)
        while other == value:
            other = _number(rng)
        names = []
        while len(names) < 6:
            n = "V" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3))
            if n not in names:
                names.append(n)
        chain, decoy = names[:3], names[3:]
        facts = [f"VAR {chain[0]} = {value}. ", f"VAR {decoy[0]} = {other}. "]
        facts += [f"VAR {chain[i]} = VAR {chain[i - 1]}. " for i in range(1, 3)]
        facts += [f"VAR {decoy[i]} = VAR {decoy[i - 1]}. " for i in range(1, 3)]
        # Assignment order matters (each refers to an earlier one); interleave the two chains.
        order = [facts[0], facts[1], facts[2], facts[4], facts[3], facts[5]]
        return (order, f"Which variables are assigned the value {value}? Answer:",
                " " + " ".join(chain))
    raise ValueError(f"unknown synthetic task {task!r}; choose from {SYNTHETIC_TASKS}")


def synthetic_example(task: str, length: int, seed: int, count_tokens: Callable[[str], int]) -> Example:
    """One example whose prompt + answer is at most `length` tokens (as close as the filler allows).

    Facts are placed at seeded depths in the filler, in their given order.
    """
    rng = random.Random(f"{task}:{length}:{seed}")
    facts, question, answer = _needles(task, rng)
    fixed = count_tokens("".join(facts) + "\n" + question + answer)
    if fixed >= length:
        raise TooShort(f"task {task} needs more than {length} tokens; use a longer --lengths value")
    filler: List[str] = []
    used = 0
    budget = length - fixed
    while True:  # sentence lengths are tokenizer-dependent: grow until the next one does not fit
        sentence = _filler_sentence(rng)
        cost = count_tokens(sentence)
        if used + cost > budget:
            break
        filler.append(sentence)
        used += cost
    tail = []
    for word in (rng.choice(_WORDS) for _ in range(10 * len(_WORDS))):
        # Top up with single words, so the prompt lands within a word of the target length.
        cost = count_tokens(" ".join(tail + [word]) + ". ")
        if used + cost > budget:
            break
        tail.append(word)
    if tail:
        filler.append(" ".join(tail).capitalize() + ". ")
    depths = sorted(rng.randint(0, len(filler)) for _ in facts)
    parts: List[str] = []
    prev = 0
    for depth, fact in zip(depths, facts):
        parts.extend(filler[prev:depth])
        parts.append(fact)
        prev = depth
    parts.extend(filler[prev:])
    return Example(prompt="".join(parts) + "\n" + question, answer=answer)


def synthetic_examples(task: str, length: int, num: int, seed: int,
                       count_tokens: Callable[[str], int]) -> List[Example]:
    return [synthetic_example(task, length, seed * 100003 + i, count_tokens) for i in range(num)]


def load_task_file(path: str) -> List[Example]:
    """A user's task file: one JSON object per line with string fields "context" and "answer"."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--jsonl {path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"--jsonl {path}:{lineno} is not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("context"), str) \
                    or not isinstance(obj.get("answer"), str):
                raise ValueError(f'--jsonl {path}:{lineno} must be an object with string fields '
                                 f'"context" and "answer"')
            if not obj["answer"]:
                raise ValueError(f"--jsonl {path}:{lineno} has an empty answer")
            examples.append(Example(prompt=obj["context"], answer=obj["answer"]))
    if not examples:
        raise ValueError(f"--jsonl {path} holds no examples")
    return examples


def task_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def check_tasks(tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if unknown:
        raise ValueError(f"unknown retrieval task(s) {unknown}; choose from {list(SYNTHETIC_TASKS)}")

