"""Loading prompt datasets (jsonl, json, parquet, csv, a saved HF dataset directory, or a built-in
task name) into plain row dicts, and rendering prompts (strings or chat messages)."""

from __future__ import annotations

import json
from pathlib import Path
from lmpo.errors import DatasetError  # noqa: F401 (its home is lmpo.errors; imported from here too)
from lmpo.data.tasks import ADDITION, addition_rows


def load_rows(source, *, required=("prompt",), split: str = "train", what: str = "dataset") -> list[dict]:
    """Rows of ``source`` as a list of dicts.

    ``source`` is a built-in task name (``addition``), a list of dicts, or a path to a ``.jsonl``,
    ``.json``, ``.parquet`` or ``.csv`` file or a directory written by ``Dataset.save_to_disk``
    (a ``DatasetDict`` uses ``split``). Every row must have the ``required`` columns."""
    if isinstance(source, list):
        rows, name = source, "<rows>"
    elif source == ADDITION:
        rows, name = addition_rows(20000, seed=0), ADDITION
    else:
        path = Path(str(source)).expanduser()
        name = str(path)
        if not path.exists():
            raise DatasetError(f"{what} '{source}' does not exist: give a .jsonl, .json, .parquet or "
                               f".csv file, a directory saved with datasets' save_to_disk, or '{ADDITION}'.")
        rows = _read(path, split, what)
    if not rows:
        raise DatasetError(f"{what} '{name}' is empty: it has no rows to train on.")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DatasetError(f"{what} '{name}' row {i} is a {type(r).__name__} ({str(r)[:60]!r}), not an object "
                               "with named columns such as {\"prompt\": ...}.")
    for col in required:
        absent = [i for i, r in enumerate(rows) if col not in r]
        empty = [i for i, r in enumerate(rows) if col in r and r[col] is None]
        if absent:
            have = sorted(rows[absent[0]].keys())
            raise DatasetError(
                f"{what} '{name}' row {absent[0]} has no '{col}' column"
                + (f" ({len(absent)} rows in all)" if len(absent) > 1 else "")
                + f"; its columns are {have}. Rename the column or point to another file.")
        if empty:
            raise DatasetError(
                f"{what} '{name}' row {empty[0]} has an empty '{col}'"
                + (f" ({len(empty)} rows in all)" if len(empty) > 1 else "") + "; fill it in or drop the row.")
    if "prompt" in required:
        for i, r in enumerate(rows):
            if not _is_prompt(r["prompt"]):
                raise DatasetError(f"{what} '{name}' row {i}: 'prompt' must be a string or a list of chat messages "
                                   f"({{'role': ..., 'content': ...}}), got {type(r['prompt']).__name__} "
                                   f"{str(r['prompt'])[:60]!r}.")
    return rows


def _is_prompt(p) -> bool:
    if isinstance(p, str):
        return True
    return (isinstance(p, list) and len(p) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in p))


def check_prompt_lengths(prompts: list, tokenizer, max_len: int, *, name: str = "dataset", what: str = "dataset"):
    """A ``DatasetError`` naming the first row whose rendered prompt is longer than ``max_len``
    tokens (the model's context minus max_new_tokens). ``prompts``: rendered prompt strings."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]] if prompts else []
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        if n > max_len:
            raise DatasetError(f"{what} '{name}' row {i}: the prompt is {n} tokens, longer than the {max_len} tokens "
                               f"the model's context leaves after max_new_tokens ({p[:60]!r}...). Shorten it, drop "
                               "the row, or lower max_new_tokens.")


def _read(path: Path, split: str, what: str) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DatasetError(f"{what} '{path}' has splits {list(ds)}, not '{split}'.")
                ds = ds[split]
            return ds.to_list()
        if suffix == ".jsonl":
            rows = []
            with open(path) as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DatasetError(f"{what} '{path}' line {lineno} is not valid JSON: {e}.") from None
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                data = data.get(split, data.get("data", data))
            if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
                keys = list(data)                                   # column-oriented {"prompt": [...], ...}
                data = [dict(zip(keys, vals)) for vals in zip(*data.values())]
            if not isinstance(data, list):
                raise DatasetError(f"{what} '{path}' must hold a list of rows (or {{'{split}': [rows]}}), "
                                   f"got a {type(data).__name__}.")
            return data
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(str(path)).to_pylist()
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            if not path.read_text().strip():
                return []
            # an empty cell is a missing value (None), not an empty prompt
            return pcsv.read_csv(str(path), convert_options=pcsv.ConvertOptions(strings_can_be_null=True)).to_pylist()
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - reported with the file name
        raise DatasetError(f"{what} '{path}' could not be read: {type(e).__name__}: {e}") from None
    raise DatasetError(f"{what} '{path}' has an unknown format '{suffix}': use .jsonl, .json, .parquet, "
                       ".csv or a saved HF dataset directory.")


def render_prompt(prompt, tokenizer, row_index: int | None = None) -> str:
    """A prompt as text: strings pass through; chat messages (a list of {role, content}) are
    rendered with the tokenizer's chat template and the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise DatasetError(f"dataset row {row_index}: the prompt is a list of chat messages but the "
                               "tokenizer has no chat template; give plain-text prompts or a tokenizer with one.")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    raise DatasetError(f"dataset row {row_index}: 'prompt' must be a string or a list of chat messages "
                       f"({{'role', 'content'}}), got {type(prompt).__name__}.")
