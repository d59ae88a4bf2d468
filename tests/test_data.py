"""Prompt datasets in every supported format, chat prompts, errors, and the addition task."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from lmpo.data import ADDITION, DatasetError, addition_heldout, addition_rows, load_rows, render_prompt
from lmpo.data.datasets import check_prompt_lengths
from lmpo.models.tiny import build_tokenizer

ROWS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "10+20=", "answer": "30"}, {"prompt": "5+5=", "answer": "10"}]
CHAT = [{"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="}], "answer": "3"},
        {"prompt": [{"role": "user", "content": "4+4="}], "answer": "8"}]
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


def _prompts(rows):
    return [r["prompt"] for r in rows]


def test_jsonl_json_csv_parquet(tmp_path):
    import datasets

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "split.json").write_text(json.dumps({"train": ROWS, "test": ROWS[:1]}))
    (tmp_path / "cols.json").write_text(json.dumps({"prompt": _prompts(ROWS), "answer": [r["answer"] for r in ROWS]}))
    (tmp_path / "d.csv").write_text("prompt,answer\n" + "".join(f"{r['prompt']},{r['answer']}\n" for r in ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.jsonl", "d.json", "split.json", "cols.json", "d.csv", "d.parquet"):
        rows = load_rows(tmp_path / name)
        assert _prompts(rows) == _prompts(ROWS), name
        assert [str(r["answer"]) for r in rows] == [r["answer"] for r in ROWS], name
    assert _prompts(load_rows(tmp_path / "split.json", split="test")) == ["1+2="]


def test_saved_hf_dataset_and_datasetdict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(tmp_path / "dd"))
    assert _prompts(load_rows(tmp_path / "ds")) == _prompts(ROWS)
    assert _prompts(load_rows(tmp_path / "dd")) == _prompts(ROWS)
    assert _prompts(load_rows(tmp_path / "dd", split="test")) == _prompts(ROWS[:2])
    with pytest.raises(DatasetError, match=r"dd.*splits.*'validation'"):
        load_rows(tmp_path / "dd", split="validation")


def test_chat_prompts_in_parquet_render_with_the_template(tmp_path):
    import datasets

    datasets.Dataset.from_list(CHAT).to_parquet(str(tmp_path / "chat.parquet"))
    rows = load_rows(tmp_path / "chat.parquet")
    tok = build_tokenizer()
    tok.chat_template = TEMPLATE
    assert render_prompt(rows[0]["prompt"], tok, 0) == "[system]add\n[user]1+2=\n[assistant]"
    assert render_prompt(rows[1]["prompt"], tok, 1) == "[user]4+4=\n[assistant]"
    assert render_prompt("3+3=", tok) == "3+3="
    plain = build_tokenizer()
    with pytest.raises(DatasetError, match="row 1.*chat template"):
        render_prompt(rows[1]["prompt"], plain, 1)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.jsonl' does not exist"):
        load_rows(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name,text", [("e.jsonl", ""), ("blank.jsonl", "\n\n"), ("e.csv", "prompt,answer\n"),
                                       ("e.json", "[]")])
def test_empty_dataset_names_the_file(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match=rf"{name.replace('.', '[.]')}' is empty"):
        load_rows(tmp_path / name)


def test_no_prompt_column_names_file_row_and_columns(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"question": "1+2=", "answer": "3"}] * 3)
    with pytest.raises(DatasetError, match=r"q\.jsonl' row 0 has no 'prompt' column \(3 rows in all\).*'answer', 'question'"):
        load_rows(tmp_path / "q.jsonl")
    write_jsonl(tmp_path / "r.jsonl", ROWS[:2] + [{"answer": "1"}])
    with pytest.raises(DatasetError, match=r"r\.jsonl' row 2 has no 'prompt'"):
        load_rows(tmp_path / "r.jsonl")


def test_bad_rows_name_file_and_row(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": "2+2="\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl' line 2 is not valid JSON"):
        load_rows(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "num.jsonl", [{"prompt": "1+1="}, {"prompt": 7}])
    with pytest.raises(DatasetError, match=r"num\.jsonl' row 1: 'prompt' must be a string or a list of chat messages"):
        load_rows(tmp_path / "num.jsonl")
    write_jsonl(tmp_path / "list.jsonl", [["1+1="]])
    with pytest.raises(DatasetError, match=r"list\.jsonl' row 0 is a list"):
        load_rows(tmp_path / "list.jsonl")
    (tmp_path / "holes.csv").write_text("prompt,answer\n1+1=,2\n,4\n")
    with pytest.raises(DatasetError, match=r"holes\.csv' row 1 has an empty 'prompt'"):
        load_rows(tmp_path / "holes.csv")
    (tmp_path / "d.txt").write_text("1+1=\n")
    with pytest.raises(DatasetError, match=r"d\.txt' has an unknown format '\.txt'"):
        load_rows(tmp_path / "d.txt")


def test_prompt_length_check_names_the_row():
    tok = build_tokenizer()
    check_prompt_lengths(["1+2=", "11+22="], tok, 7, name="d.jsonl")
    with pytest.raises(DatasetError, match=r"d\.jsonl' row 1: the prompt is 9 tokens, longer than the 7"):
        check_prompt_lengths(["1+2=", "111+222="], tok, 7, name="d.jsonl")


def test_heldout_is_fixed_and_disjoint_from_training():
    held = addition_heldout()
    assert held == addition_heldout() and len(held) == 200
    assert len({r["prompt"] for r in held}) == 200
    assert addition_heldout(10) == held[:10]
    for r in held:
        a, b = r["prompt"].rstrip("=").split("+")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99 and int(a) + int(b) == int(r["answer"])
    held_prompts = {r["prompt"] for r in held}
    train = load_rows(ADDITION)
    assert len(train) == 20000 and not held_prompts & {r["prompt"] for r in train}
    assert not held_prompts & {r["prompt"] for r in addition_rows(5000, seed=7)}
    assert train[:50] == load_rows(ADDITION)[:50], "the training rows are seeded"
    assert all(r["completion"] == r["answer"] == str(eval(r["prompt"][:-1])) for r in train[:500])


def test_addition_exact_verifier():
    from lmpo.rewards import addition_exact

    rows = addition_heldout(3)
    answers = [r["answer"] for r in rows]
    comps = [answers[0], " " + answers[1] + " \n", answers[2] + "0"]
    assert addition_exact([r["prompt"] for r in rows], comps, answer=answers) == [1.0, 1.0, 0.0]
    assert addition_exact(["1+2="], ["3 and more"], answer=["3"]) == [0.0]
