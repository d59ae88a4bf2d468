"""math_answer: extraction and comparison by value on a table of tricky cases (correct -> 1, wrong -> 0).

The figure against math-verify's own public test suite comes from bench/math_verify_agreement.py
(docs/rewards.md, "Math verifier"); this table is ours.
"""

import threading

import pytest

from lmpo.rewards import math_answer
from lmpo.rewards.math_reward import boxed_answer, clean, make_math_answer, parse_completion

R, W = 1.0, 0.0  # right answer: rewarded; wrong answer: not

# (gold answer column, completion, expected reward, why)
CASES = [
    # --- the wrong answers: never rewarded ---
    ("4", "\\boxed{4\\sqrt{2}}", W, "a coefficient is not the value"),
    ("2", "\\boxed{2\\pi}", W, "2π is not 2"),
    ("5", "\\boxed{5x}", W, "5x is not 5"),
    ("10", "\\boxed{10^{2}}", W, "10² is not 10"),
    ("2", "So $\\frac{1+\\sqrt{5}}{2}$", W, "no last-number fragment out of a fraction"),
    ("2", "The ratio is $\\frac{1+\\sqrt{5}}{2}$.", W, "no last-number fragment out of a fraction"),
    ("\\frac{1+\\sqrt{5}}{2}", "So $\\frac{1+\\sqrt{5}}{2}$", R, "the whole LaTeX answer is read"),
    ("\\frac{10}{9}", "The answer is $\\frac{10}{9}$.", R, "unboxed LaTeX answer is not cut"),
    ("10", "The answer is $\\frac{10}{9}$.", W, "unboxed LaTeX answer is not cut to 10"),
    ("9", "The answer is $\\frac{10}{9}$.", W, "unboxed LaTeX answer is not cut to 9"),
    ("14916", "so $\\boxed{14{,}916}$", R, "LaTeX {,} thousands separator"),
    ("14", "so $\\boxed{14{,}916}$", W, "{,} is not a list separator"),
    ("1000", "\\boxed{1 000}", R, "space as thousands separator in LaTeX"),
    ("0", "\\boxed{1 000}", W, "1 000 is not 1·0"),
    ("1000", "\\boxed{1\\,000}", R, "thin space as thousands separator"),
    ("1000000", "It costs $1\\,000\\,000$ dollars.", R, "several thin-space groups"),
    ("1000", "there are 1 000 of them", R, "space thousands separator in text"),
    ("2.5", "The length is 2,5 m.", R, "decimal comma"),
    ("1.22", "\\boxed{1,22}", W, "in a box 1,22 is the pair 1, 22, not a decimal comma"),
    ("1,22", "it is 1.22", R, "a bare gold 1,22 is a decimal comma"),
    # --- several boxed answers, in the prediction and in the gold ---
    ("\\{1, 2\\}", "so the roots are \\boxed{1} and \\boxed{2}", R, "joined boxes form a set"),
    ("\\{1, 2\\}", "the roots are \\boxed{1}, \\boxed{2}", R, "comma-joined boxes"),
    ("\\{1, 2\\}", "the roots are $x = \\boxed{2}$ or $x=\\boxed{1}$", R, "order of a set does not matter"),
    ("\\{1, 2\\}", "\\boxed{1}", W, "half of the solutions"),
    ("\\boxed{1}, \\boxed{2}", "\\boxed{1, 2}", R, "gold with two boxes keeps both"),
    ("\\boxed{1}, \\boxed{2}", "\\boxed{2}", W, "gold with two boxes: one of them is not enough"),
    ("\\boxed{1}, \\boxed{2}", "\\boxed{1, 2, 3}", W, "an extra solution"),
    ("The roots are \\boxed{1} for the first factor and \\boxed{2} for the second.", "\\boxed{2, 1}", R,
     "gold boxes joined by 'and' within 70 characters: both kept"),
    ("Step one gives \\boxed{12} apples. The rest of the solution goes on for quite a while before the end: \\boxed{7}",
     "\\boxed{7}", R, "an intermediate box far from the final one is not part of the gold"),
    ("x=1 \\text{ and } x=-2", "\\boxed{-2} and \\boxed{1}", R, "solutions given as equations in the gold"),
    ("7", "First I guessed \\boxed{5}. That was a slip in the second step. Redoing the whole computation from the start gives \\boxed{7}.", R,
     "boxes far apart: the last"),
    ("5", "First I guessed \\boxed{5}. That was a slip in the second step. Redoing the whole computation from the start gives \\boxed{7}.", W,
     "a revised box wins"),
    ("7", "I guessed \\boxed{5}, no: \\boxed{7}", W, "close boxes joined (as math-verify): {5, 7} is not 7"),
    ("42", "I think it's 42 but actually \\boxed{43}", W, "the box beats the text"),
    # --- equivalent forms that match ---
    ("42", "So the total is \\boxed{42}.", R, "boxed"),
    ("42", "Adding them up gives 40 + 2.\n#### 42", R, "GSM8K marker"),
    ("42", "The answer is 42.", R, "answer phrase"),
    ("42", "First 6 then 7, so 6*7 = 42", R, "last number of the text"),
    ("0.5", "\\boxed{\\frac{1}{2}}", R, "decimal vs fraction"),
    ("1/2", "The answer is 0.5", R, "fraction vs decimal"),
    ("\\frac{3}{4}", "\\boxed{0.75}", R, "LaTeX fraction vs decimal"),
    ("3", "\\boxed{3.0}", R, "trailing zero"),
    ("10", "\\boxed{10.00}", R, "trailing zeros"),
    ("1000", "\\boxed{1,000}", R, "comma thousands"),
    ("1,000", "so we get 1000 apples in all, i.e. 1000", R, "comma thousands in gold"),
    ("7425000", "That is 7,425,000.", R, "several comma groups"),
    ("-7", "\\boxed{-7}", R, "negative"),
    ("-7", "The temperature fell to $-7$ degrees.", R, "negative in LaTeX"),
    ("18", "She earns $18 a day. #### $18", R, "dollar sign as currency"),
    ("18", "The answer is: \\$18.", R, "escaped dollar"),
    ("25", "\\boxed{25\\%}", R, "percent of the asked percentage"),
    ("25\\%", "The answer is 25 percent.", R, "percent spelled out"),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\sqrt{2}/2}", R, "slash vs frac"),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}", R, "rationalized denominator"),
    ("x+1", "\\boxed{1+x}", R, "commutativity"),
    ("2x+2", "\\boxed{2(x+1)}", R, "factored"),
    ("x^2-1", "\\boxed{(x-1)(x+1)}", R, "factored polynomial"),
    ("\\pi", "\\boxed{\\pi}", R, "constant"),
    ("2\\pi", "\\boxed{\\frac{4\\pi}{2}}", R, "unsimplified"),
    ("\\dfrac{2}{3}", "\\boxed{\\frac{2}{3}}", R, "dfrac"),
    ("\\left(1,2\\right)", "\\boxed{(1,2)}", R, "\\left( \\right)"),
    ("5", "<think>2+3</think><answer>5</answer>", R, "answer tag"),
    ("5", "<answer>The answer is \\boxed{5}</answer>", R, "box inside answer tag"),
    ("18", "<think>so the final answer is 20. No: 2 was double counted.</think> The answer is 18.", R,
     "after </think> only"),
    ("20", "<think>so the final answer is 20. No: 2 was double counted.</think> The answer is 18.", W,
     "a discarded thought is not the answer"),
    ("18", "<think>the sum is \\boxed{18}</think>", R, "nothing after </think>: the whole text"),
    ("12", "\\boxed{\\boxed{12}}", R, "nested box"),
    ("Janet has 3 ducks... 16 - 3 - 4 = 9 eggs, 9 * 2 = 18\n#### 18", "\\boxed{18}", R, "GSM8K gold solution"),
    ("\\boxed{6}", "so it is 6", R, "boxed gold"),
    ("0.25", "\\boxed{\\frac{1}{4}}", R, "quarter"),
    ("2^{10}", "\\boxed{1024}", R, "power evaluated"),
    ("\\sqrt{8}", "\\boxed{2\\sqrt{2}}", R, "simplified radical"),
    (7, "the answer is 7", R, "integer gold cell"),
    (0.5, "\\boxed{1/2}", R, "float gold cell"),
    ("3/2", "\\boxed{1.5}", R, "improper fraction"),
    ("5", "The side is \\boxed{5 \\text{ cm}}.", R, "unit in the box"),
    ("15", "$\\boxed{15\\mbox{ cm}^2}$", R, "squared unit"),
    ("90", "\\boxed{90^\\circ}", R, "degrees"),
    # --- equations, intervals, sets, tuples ---
    ("3", "Solving, \\boxed{x = 3}", R, "equation x = 3 vs value"),
    ("x=3", "\\boxed{3}", R, "value vs equation in the gold"),
    ("x=3", "\\boxed{x=3}", R, "equation vs equation"),
    ("3", "\\boxed{x = 4}", W, "equation with another value"),
    ("x=3", "\\boxed{y=3}", W, "another variable"),
    ("[1,3)", "\\boxed{[1,3)}", R, "half-open interval"),
    ("[1,3)", "\\boxed{[1,3]}", W, "closed vs half-open"),
    ("(-\\infty, 2]", "\\boxed{(-\\infty,2]}", R, "unbounded interval"),
    ("(2, 12) \\cup (12, 102)", "$x \\in \\boxed{(2,12) \\cup (12,102)}$", R, "union of intervals"),
    ("\\{1,2,3\\}", "\\boxed{\\{3,2,1\\}}", R, "set order"),
    ("\\{1,2,3\\}", "\\boxed{\\{1,2\\}}", W, "missing element"),
    ("(1,2)", "\\boxed{(2,1)}", W, "tuple order matters"),
    ("(3, \\frac{\\pi}{2})", "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", R, "polar point"),
    # --- scientific notation ---
    ("1500", "about 1.5e3", R, "e-notation"),
    ("1.5", "about 1.5e3.", W, "e-notation is not its mantissa"),
    ("0.0015", "\\boxed{1.5e-3}", R, "negative exponent in a box"),
    ("1.5", "\\boxed{1.5e3}", W, "e-notation in a box is not 1.5·e·3"),
    ("3.2 \\times 10^{-4}", "\\boxed{0.00032}", R, "LaTeX scientific notation"),
    ("2 \\times 10^{5}", "\\boxed{2e5}", R, "both notations"),
    # --- upright e and i (math-verify drops them as units) ---
    ("5", "\\boxed{2+3\\mathrm{i}}", W, "upright i is not a unit"),
    ("2+3i", "\\boxed{2+3\\mathrm{i}}", R, "upright i"),
    ("2", "\\boxed{2\\mathrm{e}}", W, "upright e is not a unit"),
    ("e^{2}", "\\boxed{\\mathrm{e}^2}", R, "upright e is Euler's number"),
    ("1 - \\frac{1}{e}", "$1 + \\frac{1}{\\mathrm{e}}$", W, "sign under an upright e"),
    # --- text answers ---
    ("\\text{Evelyn}", "Therefore, $\\boxed{\\text{Evelyn}}$ is our answer.", R, "text answer"),
    ("\\text{Evelyn}", "Therefore, $\\boxed{\\text{Carla}}$ is our answer.", W, "another name"),
    ("\\text{(B)}", "\\boxed{\\text{(B)}}", R, "choice letter"),
    ("\\text{(B)}", "\\boxed{\\text{(C)}}", W, "another choice"),
    # --- hedging: several candidates are not one answer ---
    ("2", "\\boxed{2 \\text{ or } 3}", W, "two candidates"),
    ("3", "\\boxed{1, 2, 3, 4, 5}", W, "a list of candidates"),
    ("5", "\\boxed{\\pm 5}", W, "both signs"),
    ("5", "\\boxed{5} or \\boxed{6}", W, "two boxes"),
    ("5", "the answer is $5$ or $6$", W, "two LaTeX candidates"),
    ("5", "\\boxed{x}", W, "a variable"),
    ("5", "\\boxed{4 < x < 6}", W, "a range around it"),
    ("5", "\\boxed{[1, 100]}", W, "an interval around it"),
    ("5", "\\boxed{\\mathbb{R}}", W, "everything"),
    ("A", "\\boxed{A, B, C, D}", W, "every choice"),
    ("0.25", "\\boxed{25\\%}", R, "a percentage is its fraction too"),
    ("0.05", "\\boxed{5}", W, "5 is not 5 %"),
    # --- near misses ---
    ("0.5", "\\boxed{0.05}", W, "decimal place"),
    ("12", "\\boxed{120}", W, "extra digit"),
    ("1/2", "\\boxed{2}", W, "denominator only"),
    ("x+1", "\\boxed{x-1}", W, "sign"),
    ("5", "\\boxed{-5}", W, "negative vs positive"),
    ("-5", "\\boxed{5}", W, "positive vs negative"),
    ("\\pi", "\\boxed{3.14}", W, "rounded π"),
    ("1/3", "\\boxed{0.33}", W, "rounded fraction"),
    ("42", "The answer is 24.", W, "wrong number"),
    ("42", "#### 41", W, "wrong GSM8K marker"),
    ("100", "\\boxed{10}", W, "magnitude"),
    ("2x", "\\boxed{x^2}", W, "power vs product"),
    ("\\sqrt{2}", "\\boxed{2}", W, "radicand"),
    ("7", "<answer>8</answer> and 7", W, "the answer tag decides"),
    ("25", "\\boxed{0.25}", W, "a fraction is not a percentage count"),
    ("2", "\\boxed{\\sqrt{4}+1}", W, "expression evaluated"),
    ("6", "\\boxed{3!}", R, "factorial evaluated"),
    ("120", "\\boxed{5!}", R, "factorial"),
    # --- empty, garbage, truncated ---
    ("42", "", W, "empty completion"),
    ("42", "I don't know.", W, "no answer"),
    ("42", "\\boxed{}", W, "empty box"),
    ("42", "\\boxed{4", W, "truncated box"),
    ("42", "$$$$ \\frac{ }{ } \\boxed{\\boxed{", W, "garbage LaTeX"),
    ("0", "\\boxed{ }", W, "blank box is not zero"),
    ("2", "AZYUK2A", W, "digits inside a word"),
]


def test_table_is_big_enough():
    assert len(CASES) >= 100
    assert sum(1 for c in CASES if c[2] == W) >= 50


@pytest.mark.parametrize("gold,completion,expected,why", CASES, ids=[c[3] for c in CASES])
def test_math_answer_table(gold, completion, expected, why):
    assert math_answer(prompts=["q"], completions=[completion], answer=[gold]) == [expected], why


def test_trl_keywords_chat_messages_and_extra_columns():
    chat = [{"role": "assistant", "content": "so \\boxed{9}"}]
    out = math_answer(prompts=[[{"role": "user", "content": "4+5?"}]] * 2, completions=[chat, "\\boxed{8}"],
                      answer=["9", "9"], completion_ids=[[1, 2], [3]], trainer_state={"global_step": 3},
                      log_metric=lambda *a: None, other_column=["x", "y"])
    assert out == [1.0, 0.0]
    assert math_answer(["a", "b", "c"], ["\\boxed{1}", "\\boxed{2}", "3"], answer=["1", "3", None]) == [1.0, 0.0, None]
    assert math_answer(["a"], ["\\boxed{1}"]) == [None]  # no answer column at all
    assert math_answer(["a"], ["\\boxed{1}"], answer=["  "]) == [None]


def test_an_unreadable_gold_is_a_failure_not_a_zero():
    """A gold cell math-verify cannot read at all is a data error: NaN (counted and named as a
    reward failure by the loop), in-process and through the verifier processes alike."""
    import math

    golds, completions = ["\\boxed{", "$", "3"], ["\\boxed{1}", "\\boxed{1}", "\\boxed{3}"]
    out = math_answer([""] * 3, completions, answer=golds)
    assert math.isnan(out[0]) and math.isnan(out[1]) and out[2] == 1.0
    res = []
    t = threading.Thread(target=lambda: res.append(math_answer([""] * 3, completions, answer=golds)))
    t.start()
    t.join(timeout=300)
    assert math.isnan(res[0][0]) and math.isnan(res[0][1]) and res[0][2] == 1.0


def test_strict_reads_only_the_boxed_answer():
    strict = make_math_answer(strict=True)
    golds = ["42", "42", "42", "\\{1, 2\\}"]
    completions = ["The answer is 42.", "#### 42", "x \\boxed{42}", "so \\boxed{1} and \\boxed{2}"]
    assert strict(prompts=[""] * 4, completions=completions, answer=golds) == [0.0, 0.0, 1.0, 1.0]
    assert math_answer(prompts=[""] * 4, completions=completions, answer=golds) == [1.0, 1.0, 1.0, 1.0]
    # the final answer phrase after a box does not replace the box
    assert strict([""], ["\\boxed{5}. Final answer: the final answer is $6$. I hope it is correct."],
                  answer=["5"]) == [1.0]
    assert boxed_answer("\\boxed{1} is what I first wrote but the second line was wrong \\boxed{2} and \\boxed{3}") \
        == "\\boxed{2,3}"
    assert boxed_answer("no box") is None
    assert boxed_answer("truncated \\boxed{\\frac{1}{2") is None
    assert boxed_answer("\\boxed{a{b}") is None and boxed_answer("} \\boxed{\\frac{1}{2}}") == "\\boxed{\\frac{1}{2}}"
    assert strict([""], ["so \\boxed{42"], answer=["42"]) == [0.0]  # a truncated box is not an answer


def test_precision_rounds_floats_to_the_given_places():
    third = "0.3333"
    assert math_answer([""], [f"\\boxed{{{third}}}"], answer=["1/3"]) == [0.0]  # 6 places by default
    assert make_math_answer(precision=4)([""], [f"\\boxed{{{third}}}"], answer=["1/3"]) == [1.0]
    assert make_math_answer(precision=3)([""], ["\\boxed{3.1416}"], answer=["3.14159"]) == [1.0]
    assert make_math_answer(precision=5)([""], ["\\boxed{3.1416}"], answer=["3.14159"]) == [0.0]
    with pytest.raises(ValueError, match="precision"):
        make_math_answer(precision=-1)
    with pytest.raises(ValueError, match="precision"):
        make_math_answer(precision=2.5)


def test_clean_rewrites_only_misread_notations():
    assert clean("$1\\,000$ and 1 234 567 and 14{,}916") == "$1000$ and 1234567 and 14916"
    assert clean("2.5e3 and 1E-2 and x1e3") == "2500 and 0.01 and x1e3"
    assert clean("\\mathrm{e}^2 + 3\\text{i}") == "e^2 + 3i"
    assert clean("3 4 5 and 12 30 and 1.5 cm") == "3 4 5 and 12 30 and 1.5 cm"  # no 3-digit groups: untouched
    assert parse_completion("\\boxed{1\\,000}")[0] == 1000


def test_runs_in_worker_threads_with_the_same_verdicts():
    """Off the main thread each sample goes to a verifier process (math-verify's SIGALRM timeouts
    need the main thread); the verdicts are the same as in-process."""
    golds = [c[0] for c in CASES[:24]]
    completions = [c[1] for c in CASES[:24]]
    expected = [c[2] for c in CASES[:24]]
    results, errors = [], []

    def work():
        try:
            results.append(math_answer(prompts=[""] * len(golds), completions=completions, answer=golds))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert results == [expected, expected]


def test_a_runaway_sample_in_a_worker_thread_times_out_and_scores_zero():
    """9^(9^9) is one long C computation that no thread-side timeout can interrupt: its verifier
    process is killed at the deadline and the next sample still gets a verdict."""
    quick = make_math_answer(timeout_s=1)
    out = []
    t = threading.Thread(target=lambda: out.append(
        quick(prompts=["", ""], completions=["\\boxed{9^{9^{9}}}", "\\boxed{3}"], answer=["1", "3"])))
    t.start()
    t.join(timeout=300)
    assert out == [[0.0, 1.0]]


def test_a_verifier_process_past_its_deadline_is_killed_and_replaced(monkeypatch):
    """The pool's backstop for a computation that even SIGALRM cannot stop: a stand-in verifier
    that says ready and then never answers is killed at the deadline, the sample scores 0, and the
    slot is free again for a working process."""
    import subprocess
    import sys

    from lmpo.rewards import math_reward as mr

    started = []
    hang = [sys.executable, "-c", "import sys, time; print('ready', flush=True); sys.stdin.readline(); time.sleep(600)"]
    real_start = mr._start_verifier

    def fake_start():
        proc = subprocess.Popen(hang, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"ready\n"
        started.append(proc)
        return proc

    pool = mr._VerifierPool(1)
    monkeypatch.setattr(mr, "_start_verifier", fake_start)
    monkeypatch.setattr(mr, "_deadline", lambda timeout_s: 0.5)
    opts = {"strict": False, "precision": 6, "timeout_s": 1.0}
    assert pool.score("3", "\\boxed{3}", opts) == 0.0
    assert started[0].wait(timeout=30) is not None  # killed, not left running
    monkeypatch.setattr(mr, "_start_verifier", real_start)
    monkeypatch.setattr(mr, "_deadline", lambda timeout_s: 120)
    try:
        assert pool.score("3", "\\boxed{3}", opts) == 1.0  # a fresh process took the slot
    finally:
        pool.close()


def test_number_fast_path_gives_math_verify_verdicts():
    """Plain numbers skip math-verify's final ``simplify``: the verdicts must not change."""
    import itertools

    import math_verify

    from lmpo.rewards.math_reward import _numbers_equal, parse_gold

    values = ["3", "3.0", "-3", "0.5", "1/2", "\\frac{1}{2}", "0.3333333", "\\frac{1}{3}", "0.33", "1000",
              "1,000", "1e3", "2.5", "2,5", "0", "-0.0", "12", "0.0000001", "7"]
    checked = 0
    for g, p in itertools.product(values, values):
        gold, pred = parse_gold(g), parse_completion("\\boxed{%s}" % p)
        fast = _numbers_equal(gold, pred, 6)
        if fast is None:
            continue
        checked += 1
        assert fast == math_verify.verify(list(gold), pred, float_rounding=6), (g, p)
    assert checked >= 300
