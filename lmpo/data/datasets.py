"""Loading prompt datasets (jsonl, json, parquet, csv, a saved HF dataset directory, or a built-in
task name) into plain row dicts, and rendering prompts (strings or chat messages)."""

from __future__ import annotations

import json
from pathlib import Path


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and, where it applies, the row."""


def load_rows(source, *, required=("prompt",), split: str = "train", what: str = "dataset") -> list[dict]:
    """Rows of ``source`` as a list of dicts.

    ``source`` is a built-in task name (``addition``), a list of dicts, or a path to a ``.jsonl``,
    ``.json``, ``.parquet`` or ``.csv`` file or a directory written by ``Dataset.save_to_disk``
    (a ``DatasetDict`` uses ``split``). Every row must have the ``required`` columns."""
    from .tasks import ADDITION, addition_rows

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
    for col in required:
        missing = [i for i, r in enumerate(rows) if col not in r or r[col] is None]
        if missing:
            have = sorted(rows[missing[0]].keys())
            raise DatasetError(
                f"{what} '{name}' row {missing[0]} has no '{col}' column"
                + (f" ({len(missing)} rows in all)" if len(missing) > 1 else "")
                + f"; its columns are {have}. Rename the column or point to another file.")
    return rows


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
            return data if isinstance(data, list) else data.get(split, data.get("data", []))
        if suffix in (".parquet", ".csv"):
            import datasets

            kind = "parquet" if suffix == ".parquet" else "csv"
            return datasets.load_dataset(kind, data_files=str(path), split="train").to_list()
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
