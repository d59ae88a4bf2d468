"""math_answer: answer extraction and comparison by value, on a table of tricky cases."""

import pytest

from lmpo.rewards import math_answer
from lmpo.rewards.math_reward import answers_match, extract_answer, gold_answer

# (gold answer column, completion, expected reward)
CASES = [
    # --- equivalent forms that must match ---
    ("42", "So the total is \\boxed{42}.", 1.0),
    ("42", "Adding them up gives 40 + 2.\n#### 42", 1.0),
    ("42", "The answer is 42.", 1.0),
    ("42", "First 6 then 7, so 6*7 = 42", 1.0),
    ("0.5", "\\boxed{\\frac{1}{2}}", 1.0),
    ("1/2", "The answer is 0.5", 1.0),
    ("\\frac{3}{4}", "\\boxed{0.75}", 1.0),
    ("3", "\\boxed{3.0}", 1.0),
    ("1000", "\\boxed{1,000}", 1.0),
    ("1,000", "so we get 1000 apples in all, i.e. 1000", 1.0),
    ("-7", "\\boxed{-7}", 1.0),
    ("18", "She earns $18 a day. #### $18", 1.0),
    ("18", "The answer is: \\$18.", 1.0),
    ("25", "\\boxed{25\\%}", 1.0),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\sqrt{2}/2}", 1.0),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}", 1.0),
    ("x+1", "\\boxed{1+x}", 1.0),
    ("2x+2", "\\boxed{2(x+1)}", 1.0),
    ("x^2-1", "\\boxed{(x-1)(x+1)}", 1.0),
    ("\\pi", "\\boxed{\\pi}", 1.0),
    ("2\\pi", "\\boxed{\\frac{4\\pi}{2}}", 1.0),
    ("\\dfrac{2}{3}", "\\boxed{\\frac{2}{3}}", 1.0),
    ("\\left(1,2\\right)", "\\boxed{(1,2)}", 1.0),
    ("5", "<think>2+3</think><answer>5</answer>", 1.0),
    ("5", "<answer>The answer is \\boxed{5}</answer>", 1.0),
    ("12", "\\boxed{\\boxed{12}}", 1.0),
    ("Janet has 3 ducks... 16 - 3 - 4 = 9 eggs, 9 * 2 = 18\n#### 18", "\\boxed{18}", 1.0),
    ("\\boxed{6}", "so it is 6", 1.0),
    ("10", "\\boxed{10.00}", 1.0),
    ("0.25", "\\boxed{\\frac{1}{4}}", 1.0),
    ("2^{10}", "\\boxed{1024}", 1.0),
    ("\\sqrt{8}", "\\boxed{2\\sqrt{2}}", 1.0),
    (7, "the answer is 7", 1.0),
    ("3/2", "\\boxed{1.5}", 1.0),
    # --- near misses that must not match ---
    ("0.5", "\\boxed{0.05}", 0.0),
    ("12", "\\boxed{120}", 0.0),
    ("1/2", "\\boxed{2}", 0.0),
    ("x+1", "\\boxed{x-1}", 0.0),
    ("5", "\\boxed{-5}", 0.0),
    ("\\pi", "\\boxed{3.14}", 0.0),
    ("1/3", "\\boxed{0.33}", 0.0),
    ("42", "The answer is 24.", 0.0),
    ("42", "I think it's 42 but actually \\boxed{43}", 0.0),
    ("42", "#### 41", 0.0),
    ("42", "I don't know.", 0.0),
    ("42", "", 0.0),
    ("100", "\\boxed{10}", 0.0),
    ("2x", "\\boxed{x^2}", 0.0),
    ("\\sqrt{2}", "\\boxed{2}", 0.0),
    ("(1,2)", "\\boxed{(2,1)}", 0.0),
    ("7", "<answer>8</answer> and 7", 0.0),
    ("3", "The answer is 3 4 5", 0.0),
]


def test_table_is_big_enough():
    assert len(CASES) >= 40
    assert sum(1 for c in CASES if c[2] == 0.0) >= 15


@pytest.mark.parametrize("gold,completion,expected", CASES)
def test_math_answer_table(gold, completion, expected):
    assert math_answer(["q"], [completion], answer=[gold]) == [expected]


def test_batch_and_not_applicable():
    out = math_answer(["a", "b", "c"], ["\\boxed{1}", "\\boxed{2}", "3"], answer=["1", "3", None])
    assert out == [1.0, 0.0, None]
    assert math_answer(["a"], ["\\boxed{1}"]) == [None]  # no answer column at all


def test_extraction_order():
    assert extract_answer("x = 3, y = 4, \\boxed{7}. Check: 3+4") == "7"
    assert extract_answer("#### 12\nextra 13") == "12"
    assert extract_answer("The final answer is $\\frac{1}{2}$.") == "$\\frac{1}{2}$"
    assert extract_answer("no digits here") is None
    assert extract_answer("truncated \\boxed{\\frac{1}{2") == "\\frac{1}{2"
    assert gold_answer("work\n#### 1,234") == "1,234"


def test_chat_format_completion():
    msgs = [{"role": "assistant", "content": "\\boxed{9}"}]
    assert math_answer(["q"], [msgs], answer=["9"]) == [1.0]


def test_runs_in_a_worker_thread():
    # math-verify's own timeouts need the main thread; ours must work from a thread pool.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        assert pool.submit(answers_match, "\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}").result()
