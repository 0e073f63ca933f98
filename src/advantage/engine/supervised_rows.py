"""The rows of the supervised stages read and checked (SFT's {prompt, completion} and
{messages} rows, each row in its own format; the reward model's texts): errors name the row and
the field. `encode_rows` leaves out the rows that `max_length` leaves nothing to learn."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .configlib import ConfigError
from .data import encode_prompt
from .reward_helpers import completion_text

log = logging.getLogger("advantage")


@dataclass
class PairColumns:
    """Where a supervised dataset keeps its prompts and completions."""

    prompt_field: str = "prompt"
    """Prompt column (string or chat messages)."""
    completion_field: str = "completion"
    """Completion column (string or an assistant message list)."""
    messages_field: str = "messages"
    """Conversation column, used when a row has no prompt: the last message is learned."""


def is_segments(completion) -> bool:
    """A completion given as (text, trainable) segments, e.g. a demonstrated episode
    `[["<calc>37*48</calc>", True], ["<r>1776</r>", False], ["1776", True]]`."""
    return (
        isinstance(completion, (list, tuple))
        and bool(completion)
        and all(
            isinstance(s, (list, tuple))
            and len(s) == 2
            and isinstance(s[0], str)
            and isinstance(s[1], bool)
            for s in completion
        )
    )


def encode_pair(tokenizer, prompt, completion, max_length: int | None = None) -> tuple:
    """(prompt ids, completion ids + EOS); prompts go through `encode_prompt` (chat templates).

    A segment completion (`is_segments`) gives a third list, the completion's labels: each
    segment is tokenized on its own (as an episode appends them), its ids are labels when it is
    trainable and -100 when not (an environment's reply); the EOS after the last is trainable.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    if is_segments(completion):
        completion_ids, labels = [], []
        for text, trainable in completion:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            completion_ids += ids
            labels += ids if trainable else [-100] * len(ids)
        completion_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
        if max_length is not None:
            keep = max(0, max_length - len(prompt_ids))
            completion_ids, labels = completion_ids[:keep], labels[:keep]
        return prompt_ids, completion_ids, labels
    completion_ids = tokenizer(completion_text(completion), add_special_tokens=False)["input_ids"]
    completion_ids = [*completion_ids, tokenizer.eos_token_id]
    if max_length is not None:
        completion_ids = completion_ids[: max(0, max_length - len(prompt_ids))]
    return prompt_ids, completion_ids


def message_problem(value, what: str) -> str | None:
    """Why `value` is not a conversation (a non-empty list of {"role", "content": str}
    messages), or None when it is one; `what` names the value in the message."""
    if not isinstance(value, list) or not value:
        return f"{what} must be a non-empty list of messages, not {_shown(value)}"
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            return (
                f'{what}: message {j} must be an object {{"role", "content"}}, not '
                f"{_shown(message)}"
            )
        if not isinstance(message.get("role"), str):
            return f"{what}: message {j} has no 'role' string"
        if not isinstance(message.get("content"), str):
            return f"{what}: message {j} ({message['role']}) has no 'content' string"
    return None


def text_problem(value, what: str) -> str | None:
    """Why `value` is neither a string nor a conversation (`message_problem`), or None."""
    if isinstance(value, str):
        return None
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return message_problem(value, what)
    return f"{what} must be a string or a list of messages, not {_shown(value)}"


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _present(row: dict, name: str) -> bool:
    """A column the row has (a file mixing formats reads as None where a row lacks one)."""
    return row.get(name) is not None


def rows_to_pairs(
    rows: list[dict], data: PairColumns, field_name: str = "data.train"
) -> list[tuple]:
    """(prompt, completion) of every row, each row read in its own format ({prompt, completion}
    or {messages}); errors name the row and the field."""
    pairs = []
    for i, row in enumerate(rows):
        where = f"{field_name}: row {i}"
        if _present(row, data.prompt_field) and _present(row, data.completion_field):
            prompt, completion = row[data.prompt_field], row[data.completion_field]
            problem = text_problem(prompt, f"'{data.prompt_field}'")
            if problem is None and isinstance(completion, dict):
                completion = [completion]  # one assistant message
            if problem is None and not is_segments(completion):
                problem = text_problem(completion, f"'{data.completion_field}'")
                if problem is not None and "must be a string" in problem:
                    problem = (
                        f"'{data.completion_field}' must be a string, a list of messages or "
                        f"[text, trainable] segments, not {_shown(completion)}"
                    )
            if problem is not None:
                raise ConfigError(f"{where}: {problem}")
        elif _present(row, data.messages_field):
            messages = row[data.messages_field]
            problem = message_problem(messages, f"'{data.messages_field}'")
            if problem is not None:
                raise ConfigError(f"{where}: {problem}")
            if messages[-1]["role"] != "assistant":
                raise ConfigError(f"{where}: the conversation must end with an assistant message")
            prompt, completion = messages[:-1], messages[-1]["content"]
        else:
            present = [name for name, value in row.items() if value is not None]
            raise ConfigError(
                f"{where} needs '{data.prompt_field}' and '{data.completion_field}', "
                f"or '{data.messages_field}' (columns: {', '.join(present) or 'none'})"
            )
        if not completion or (not is_segments(completion) and not completion_text(completion)):
            raise ConfigError(f"{where} has an empty completion")
        pairs.append((prompt, completion))
    return pairs


def trainable_tokens(pair: tuple) -> int:
    """Completion tokens of an encoded pair (`encode_pair`) that the loss sees: labels that are
    not -100, less the first when the prompt is empty (no token predicts it)."""
    prompt_ids, completion_ids, *labels = pair
    kept = [t != -100 for t in (labels[0] if labels else completion_ids)]
    if not prompt_ids and kept:
        kept = kept[1:]
    return sum(kept)


def encode_rows(
    tokenizer, rows: list[dict], max_length: int | None, field_name: str = "data.train"
) -> list[tuple]:
    """`encode_pair` of every {prompt, completion} row, without the rows that `max_length`
    leaves no completion token to learn (one warning with their count); when that is every row,
    a ConfigError naming the first (nothing would train)."""
    pairs = [encode_pair(tokenizer, r["prompt"], r["completion"], max_length) for r in rows]
    empty = [i for i, pair in enumerate(pairs) if trainable_tokens(pair) == 0]
    if not empty:
        return pairs
    i = empty[0]
    first = (
        f"row {i}'s completion is cut away entirely by train.max_length={max_length} (its "
        f"prompt is {len(pairs[i][0])} tokens)"
        if max_length is not None
        else f"row {i} has no completion token to learn"
    )
    if len(empty) == len(pairs):
        raise ConfigError(
            f"{field_name}: {first}, and so is every other row's: nothing would train; raise "
            "train.max_length or shorten the prompts"
            if len(pairs) > 1
            else f"{field_name}: {first}: nothing would train; raise train.max_length"
        )
    log.warning(
        f"{field_name}: {len(empty)} of {len(pairs)} rows keep no completion token (first: "
        f"{first}); they are left out"
    )
    skip = set(empty)
    return [pair for j, pair in enumerate(pairs) if j not in skip]
