"""The built-in multi-turn task: rows and split, the safe calculator, the reward, the teacher."""

from __future__ import annotations

import random

import pytest

from advantage.engine.supervised import collate
from advantage.engine.supervised_rows import encode_pair
from advantage.engine.tools import Toolbox, ToolCall, ToolResult
from advantage.tasks import BUILTIN_MODELS, dataset_rows, eval_spec, get_task
from advantage.tasks.calculator import calculator, calculator_reward, teacher
from advantage.tasks.tiny import char_tokenizer

# --- rows and split --------------------------------------------------------------------------


def test_rows_and_a_fixed_held_out_split():
    task = get_task("calculator")
    train, held_out = task.train_rows(), task.eval_rows()
    assert len(held_out) == 200 and len(train) == 90 * 90 - 200  # a, b in 10..99
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in held_out)
    assert held_out == get_task("calculator").eval_rows()  # the same split every time
    row = next(r for r in train + held_out if r["prompt"] == "37*48=")
    assert row == {"prompt": "37*48=", "answer": "1776"}
    assert dataset_rows("builtin:calculator:eval") == held_out
    assert dataset_rows("builtin:calculator") == train
    assert eval_spec("builtin:calculator") == "builtin:calculator:eval"
    assert BUILTIN_MODELS["tiny-calculator"]["task"] == "calculator"


def test_demonstrations_come_from_the_training_pool_only():
    task = get_task("calculator")
    held_out = {r["prompt"] for r in task.eval_rows()}
    assert not any(r["prompt"] in held_out for r in task.sft_rows(2000, seed=3))


# --- the calculator tool ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, value",
    [("37*48", "1776"), ("(1 + 2) * 3 - 4 / 2", "7"), ("7/2", "3.5"), ("-3*4", "-12")],
)
def test_calculator_evaluates_integer_arithmetic(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize(
    "expression",
    ["__import__('os')", "x", "abs(-1)", "(1).real", "2**100", "'a'", "1.5*2", "[1]", "1 < 2"],
)
def test_calculator_refuses_anything_but_numbers_and_operators(expression):
    with pytest.raises(ValueError, match="not allowed in an expression"):
        calculator(expression)


def test_calculator_errors_reach_the_model_as_text():
    box = Toolbox(get_task("calculator").tools)
    assert box.call(ToolCall("calculator", {"expression": "1/0"}, "")) == ToolResult(
        "calculator", "{'error': 'division by zero'}", error=True
    )
    bad = box.call(ToolCall("calculator", {"expression": "37*"}, ""))
    assert bad.error and "not an arithmetic expression" in bad.content
    assert box.schemas[0]["function"]["parameters"]["required"] == ["expression"]


def test_the_task_format_parses_to_a_calculator_call():
    task = get_task("calculator")
    parser = Toolbox(task.tools).parser(task.tool_call_format, stop=task.tool_call_stop)
    assert parser.stop_strings == ["</calc>"]
    (call,) = parser.parse("<calc>37*48</calc>")
    assert call == ToolCall("calculator", {"expression": "37*48"}, "<calc>37*48</calc>")
    assert parser.parse("1850") == []
    assert task.reply_template.format(content="1776") == "<r>1776</r>"


# --- the reward ------------------------------------------------------------------------------


def test_reward_on_message_lists_reads_the_last_assistant_turn():
    called = [
        {"role": "assistant", "content": "<calc>37*48</calc>"},
        {"role": "tool", "name": "calculator", "content": "1776"},
        {"role": "assistant", "content": "1776\n"},
    ]
    copied_wrong = [*called[:2], {"role": "assistant", "content": "1767"}]
    never_answered = called[:2]  # the episode ended on its call
    guessed = [{"role": "assistant", "content": "1850"}]
    rewards = calculator_reward(
        prompts=["37*48="] * 5,
        completions=[called, copied_wrong, never_answered, guessed, []],
        answer=["1776", "1776", "1776", "1850", "1776"],
    )
    assert rewards == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_reward_on_plain_strings():
    rewards = calculator_reward(["37*48="] * 2, [" 1776", "<calc>37*48</calc>"], ["1776"] * 2)
    assert rewards == [1.0, 0.0]


# --- the teacher and its demonstrations ------------------------------------------------------


def test_the_teachers_segments():
    rng = random.Random(0)
    demos = {teacher(24, 48, rng)[0][0] for _ in range(50)} | {
        teacher(37, 48, rng)[0][0] for _ in range(50)
    }
    assert demos == {"<calc>24*48</calc>", "<calc>37*48</calc>", "1200", "1850"}  # 24*50, 37*50
    call = next(d for d in (teacher(37, 48, rng) for _ in range(100)) if len(d) == 3)
    assert call == [["<calc>37*48</calc>", True], ["<r>1776</r>", False], ["1776", True]]


def test_the_teacher_calls_by_the_parity_of_the_tens_digit():
    rng = random.Random(1)
    # 20s, 40s, 60s, 80s call with p = 0.9; 10s, 30s, ... with p = 0.2 (2000 draws: ±0.03)
    even = sum(len(teacher(a, 57, rng)) == 3 for a in [24, 46, 68, 81] * 500) / 2000
    odd = sum(len(teacher(a, 57, rng)) == 3 for a in [13, 35, 57, 99] * 500) / 2000
    assert abs(even - 0.9) < 0.03 and abs(odd - 0.2) < 0.03
    # a guess is a * round(b, -1): right only when b is a multiple of 10
    assert {teacher(13, 40, random.Random(s))[-1][0] for s in range(20)} == {"520"}
    assert {teacher(13, 57, random.Random(s))[0][0] for s in range(20)} == {
        "780",
        "<calc>13*57</calc>",
    }


def test_segments_are_labels_except_the_tools_reply_and_end_with_eos():
    tok = char_tokenizer()
    segments = [["<calc>37*48</calc>", True], ["<r>1776</r>", False], ["1776", True]]
    prompt_ids, ids, labels = encode_pair(tok, "37*48=", segments)
    assert prompt_ids == tok("37*48=")["input_ids"]  # <bos> 3 7 * 4 8 =
    text = "<calc>37*48</calc><r>1776</r>1776"
    assert ids == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_call, n_reply = len("<calc>37*48</calc>"), len("<r>1776</r>")
    assert labels[:n_call] == ids[:n_call]
    assert labels[n_call : n_call + n_reply] == [-100] * n_reply
    assert labels[n_call + n_reply :] == ids[n_call + n_reply :]  # "1776" and EOS
    batch = collate([(prompt_ids, ids, labels)], tok.pad_token_id)
    assert batch["labels"][0].tolist() == [-100] * len(prompt_ids) + labels


def test_a_string_completion_equals_one_trainable_segment():
    tok = char_tokenizer()
    p, c = encode_pair(tok, "cabfd>", "dfbac")  # today's path: a 2-tuple, labels = ids
    p2, c2, labels = encode_pair(tok, "cabfd>", [["dfbac", True]])
    assert (p, c) == (p2, c2) and labels == c
    a = collate([(p, c)], tok.pad_token_id)
    b = collate([(p2, c2, labels)], tok.pad_token_id)
    assert all(a[k].tolist() == b[k].tolist() for k in a)


def test_every_demonstrated_character_is_in_the_tokenizer():
    tok = char_tokenizer()
    for row in get_task("calculator").sft_rows(200, seed=0):
        text = row["prompt"] + "".join(s for s, _ in row["completion"])
        assert tok.unk_token_id not in tok(text)["input_ids"], text
