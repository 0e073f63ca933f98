"""Prompt datasets: JSONL, or anything `datasets` reads from local files.

Rows are dicts. The prompt column is a string or a list of chat messages `{role, content}`
(rendered with the tokenizer's chat template); every other column reaches the reward functions.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from pathlib import Path

from .configlib import ConfigError, read_text
from .hub import local_or_hub

log = logging.getLogger("advantage")


def load_rows(spec: str, field: str = "data.train") -> list[dict]:
    """Rows of `spec`: a .jsonl file, or a local dataset for `datasets` (folder, .json, .csv,
    .parquet) or a hub dataset id. (Built-in tasks are resolved above the engine, in `tasks`.)"""
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise ConfigError(f"{field}: file {spec!r} does not exist")
        rows = []
        # lines end at "\n" only: JSON strings may hold U+2028, U+0085, ... (`splitlines` splits)
        for n, line in enumerate(_without_bom(read_text(path, f"{field}: ")).split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{field}: {spec} line {n} is not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{field}: {spec} line {n} is not a JSON object")
            rows.append(row)
        return fill_missing_columns(rows, field)
    return _load_with_datasets(spec, path, field)


def _without_bom(text: str) -> str:
    """The text without a leading byte-order mark: Excel's "CSV UTF-8" and older Notepad write
    one, and it is no part of the first column's name or the first row (`.json` files and YAML
    configs are read past it too)."""
    return text[1:] if text.startswith("\ufeff") else text


def fill_missing_columns(rows: list[dict], field: str) -> list[dict]:
    """Every row with every column: a column that some rows lack is None there (as `datasets`
    reads it), with one warning per column naming it and how many rows lack it."""
    counts = Counter(name for row in rows for name in row)
    ragged = [name for name, n in counts.items() if n < len(rows)]
    for name in ragged:
        first = next(i for i, row in enumerate(rows) if name not in row)
        log.warning(
            "%s: column %r is missing from %d of %d rows (first: row %d); reward functions get "
            "None there, and a sample no function scores does not train",
            field,
            name,
            len(rows) - counts[name],
            len(rows),
            first,
        )
    if not ragged:
        return rows
    return [{name: row.get(name) for name in counts} for row in rows]


def _load_with_datasets(spec: str, path: Path, field: str) -> list[dict]:
    import datasets

    if path.is_dir() and (
        (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
    ):
        ds = datasets.load_from_disk(str(path))
    elif path.exists():
        kind = {".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if path.is_file() and kind is None:
            raise ConfigError(
                f"{field}: cannot read {spec!r} (use .jsonl, .json, .csv or .parquet)"
            )
        if kind == "csv":
            ds = _load_csv(path, spec, field)
        elif path.is_file():
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:  # a folder of data files: every split, then the train split (`_train_split`)
            ds = datasets.load_dataset(str(path))
    else:  # a hub dataset id, or a typo: fail at once, before any network retries
        local_or_hub(spec, field, probe="README.md", repo_type="dataset", kind="file or folder")
        ds = datasets.load_dataset(spec, split="train")
    if isinstance(ds, datasets.DatasetDict):
        ds = _train_split(ds, spec, field)
    return [dict(row) for row in ds]


def _train_split(splits, spec: str, field: str):
    """The `train` split of a `DatasetDict`; a ConfigError naming the splits there are."""
    if "train" in splits:
        return splits["train"]
    names = ", ".join(splits) or "none"
    raise ConfigError(
        f"{field}: {spec} has no 'train' split (splits: {names}); the rows are read from its "
        "train split: save the split you want on its own (dataset_dict[NAME].save_to_disk(folder)) "
        "and give that folder"
    )


def _load_csv(path: Path, spec: str, field: str):
    """A CSV file with every column read as the text written in it: no type inference (`012`
    stays `012`, not the number 12) and no missing-value parsing (`NA`, `None`, `null` stay
    text; an empty cell is ""). Typed columns: use .jsonl, .json or .parquet."""
    import csv

    import datasets

    # the whole file is UTF-8 (else an error naming the line and byte), past a leading BOM
    text = _without_bom(read_text(path, f"{field}: "))
    header = next(csv.reader(io.StringIO(text, newline="")), None)
    if not header:
        raise ConfigError(f"{field}: {spec} has no header row (the column names)")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return datasets.load_dataset(
        "csv",
        data_files=str(path),
        split="train",
        features=features,
        keep_default_na=False,
        encoding="utf-8-sig",  # UTF-8 past a BOM: Excel's "CSV UTF-8" writes one
    )


def check_rows(rows: list[dict], prompt_field: str, field: str = "data.train") -> None:
    """Every row has a non-empty prompt; errors name the row."""
    if not rows:
        raise ConfigError(f"{field}: the dataset is empty")
    for i, row in enumerate(rows):
        if prompt_field not in row:
            raise ConfigError(
                f"{field}: row {i} has no prompt field {prompt_field!r} (columns: "
                f"{', '.join(row)}); set data.prompt_field"
            )
        prompt = row[prompt_field]
        if prompt is None:  # null, or a column other rows have (`fill_missing_columns`)
            raise ConfigError(f"{field}: row {i} has no prompt ({prompt_field!r} missing or null)")
        if isinstance(prompt, (str, list)) and len(prompt) == 0:
            raise ConfigError(f"{field}: row {i} has an empty prompt ({prompt_field!r})")
        if not isinstance(prompt, (str, list)):
            raise ConfigError(
                f"{field}: row {i}: the prompt must be a string or a list of messages, "
                f"got {type(prompt).__name__}"
            )
        if isinstance(prompt, list) and not is_conversational(prompt):
            raise ConfigError(
                f"{field}: row {i}: the prompt is a list but not of chat messages "
                f"{{role, content}} (got {str(prompt)[:60]}); give a string or a list of messages"
            )


def check_prompt_lengths(
    tokenizer, rows: list[dict], prompt_field: str, system_prompt: str | None, budget: int
) -> tuple[int, int] | None:
    """(row, length) of the first prompt longer than `budget` tokens, or None. One tokenizer
    pass over the rows, once at setup."""
    for i, row in enumerate(rows):
        n = len(encode_prompt(tokenizer, row[prompt_field], system_prompt))
        if n > budget:
            return i, n
    return None


def check_prompts_fit(
    tokenizer,
    rows: list[dict],
    prompt_field: str,
    system_prompt: str | None,
    *,
    context: int,
    new_tokens: int,
    new_field: str,
    max_prompt_tokens: int | None = None,
    cut_field: str | None = "data.max_prompt_tokens",
    field: str = "data.train",
) -> None:
    """Each prompt, cut from the left to `max_prompt_tokens` as sampling cuts it, and
    `new_tokens` (set by `new_field`) fit in the model's `context` positions; the error names
    the first row that does not and what to change (`cut_field`: the setting that cuts prompts,
    None where there is none). Train's and eval's checks, and `advantage eval`'s."""
    budget = context - new_tokens
    if budget < 1:
        raise ConfigError(
            f"{new_field}={new_tokens} leaves no room for a prompt: the model's "
            f"max_position_embeddings={context}"
        )
    if max_prompt_tokens is not None and max_prompt_tokens <= budget:
        return  # every prompt is cut to fit
    long = check_prompt_lengths(tokenizer, rows, prompt_field, system_prompt, budget)
    if long is None:
        return
    row, n = long
    cut = f" (cut to {cut_field}={max_prompt_tokens})" if max_prompt_tokens is not None else ""
    shown = n if max_prompt_tokens is None else min(n, max_prompt_tokens)
    fixes = [f"set {cut_field}={budget} (cuts prompts from the left)"] if cut_field else []
    fixes.append("shorten it")
    if field != "data.train":  # a held-out set's budget is the evaluation's alone
        fixes.append(f"lower {new_field}")
    advice = fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])} or {fixes[-1]}"
    raise ConfigError(
        f"{field}: row {row}: the prompt has {shown} tokens{cut}; the model's "
        f"max_position_embeddings={context} minus {new_field}={new_tokens} leaves {budget}; "
        f"{advice}"
    )


def check_reward_columns(
    rewards, rows: list[dict], prompt_field: str, field: str, spec: str | None = None
) -> None:
    """`rewards.check_columns` on the columns of `rows`, with a column a reward function needs
    and the rows lack named against `field` (and its file `spec`) and the columns they have,
    the prompt column included."""
    from .rewards import required_arguments

    columns = [name for name in rows[0] if name != prompt_field] if rows else []
    try:
        rewards.check_columns(set(columns), field)
        return
    except ConfigError:
        given = set(columns) | set(rewards.extra) | set(rewards.arguments)
        missing = [  # (function, the columns it needs and the rows lack)
            (source.name, needs)
            for source in rewards.sources
            if (needs := [name for name in required_arguments(source.fn) if name not in given])
        ]
        if not missing:  # another of its errors (a column that would replace an argument, ...)
            raise
    name, needs = missing[0]
    where = f"{field} ({spec})" if spec else field
    has = (
        f"columns: {', '.join(columns)}, and the prompt column {prompt_field!r}"
        if columns
        else f"its only column is the prompt column {prompt_field!r}"
    )
    raise ConfigError(
        f"{field}: reward function '{name}' needs the dataset column(s) {needs}, which {where} "
        f"does not have ({has})"
    )


def is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def encode_prompt(
    tokenizer,
    prompt,
    system_prompt: str | None = None,
    max_tokens: int | None = None,
    tools: list | None = None,
) -> list[int]:
    """Token ids of a prompt: strings with the tokenizer's special tokens, conversations through
    the chat template with the generation prompt (and the `tools`' schemas). Truncated from the
    left to `max_tokens`."""
    if is_conversational(prompt):
        messages = list(prompt)
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "conversational prompts need a tokenizer with a chat template (model.tokenizer)"
            )
        text = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[-max_tokens:]
    return ids


class PromptStream:
    """Endless, seeded, shuffled passes over the rows; its position is saved in checkpoints."""

    def __init__(self, rows: list[dict], seed: int, shuffle: bool = True) -> None:
        self.rows = rows
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._make_order()
            out.append(self.rows[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._make_order()
