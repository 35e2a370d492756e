"""Synthetic retrieval tasks and user task files (msa_train.eval.tasks)."""
import json
import re

import pytest

from msa_train.data.tokenizer import ByteTokenizer
from msa_train.eval.tasks import (SYNTHETIC_TASKS, load_task_file, synthetic_example,
                                  synthetic_examples, task_name)

TOK = ByteTokenizer()


def count(text):
    return len(TOK.tokenize(text))


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
@pytest.mark.parametrize("length", [300, 1000, 4096])
def test_examples_fit_the_length_and_hold_their_answer(task, length):
    for ex in synthetic_examples(task, length, num=3, seed=7, count_tokens=count):
        total = count(ex.prompt + ex.answer)
        assert total <= length
        assert total >= length - 12  # filled to within a word of the length
        # Every answer token is recoverable from the context (no answer leaks from the filler).
        for number in re.findall(r"\d{6}", ex.answer):
            assert number in ex.prompt
        assert ex.answer.startswith(" ")


def test_examples_are_deterministic_and_differ_by_seed():
    a = synthetic_examples("multikey", 600, 4, seed=3, count_tokens=count)
    b = synthetic_examples("multikey", 600, 4, seed=3, count_tokens=count)
    c = synthetic_examples("multikey", 600, 4, seed=4, count_tokens=count)
    assert a == b and a != c
    assert len({e.answer for e in a}) > 1


def test_multikey_asks_about_one_of_several_distinct_keys():
    ex = synthetic_example("multikey", 800, 0, count)
    keys = re.findall(r"magic number for (\w+) is", ex.prompt)
    asked = re.search(r"magic number for (\w+)\?", ex.prompt).group(1)
    assert len(keys) == len(set(keys)) == 4 and asked in keys
    value = re.search(rf"magic number for {asked} is (\d+)", ex.prompt).group(1)
    assert ex.answer == f" {value}"


def test_vartrack_answer_is_the_chain_holding_the_value():
    ex = synthetic_example("vartrack", 800, 1, count)
    value = re.search(r"assigned the value (\d+)", ex.prompt).group(1)
    assign = dict(re.findall(r"VAR (V\w+) = ((?:VAR )?\w+)\.", ex.prompt))

    def resolve(name):
        target = assign[name]
        return resolve(target[4:]) if target.startswith("VAR ") else target

    holding = sorted(n for n in assign if resolve(n) == value)
    assert sorted(ex.answer.split()) == holding and len(holding) == 3


def test_too_short_length_is_a_clear_error():
    with pytest.raises(ValueError, match="longer --lengths"):
        synthetic_example("multivalue", 50, 0, count)


def test_task_file_round_trip_and_errors(tmp_path):
    good = tmp_path / "capitals.jsonl"
    good.write_text(json.dumps({"context": "Paris is in France. Paris is in", "answer": " France"})
                    + "\n\n" + json.dumps({"context": "x", "answer": "y"}) + "\n")
    examples = load_task_file(str(good))
    assert [e.answer for e in examples] == [" France", "y"] and task_name(str(good)) == "capitals"
    cases = {
        "notjson.jsonl": ("{oops\n", r"notjson.jsonl:1 is not valid JSON"),
        "missing.jsonl": (json.dumps({"context": "a"}) + "\n", r'missing.jsonl:1 must be an object'),
        "empty_answer.jsonl": (json.dumps({"context": "a", "answer": ""}) + "\n", "empty answer"),
        "empty.jsonl": ("\n", "holds no examples"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_task_file(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task_file(str(tmp_path / "nope.jsonl"))
