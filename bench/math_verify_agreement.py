"""Agreement of ``math_answer`` with math-verify's own public test suite.

    pip download math-verify==0.9.0 --no-binary :all: --no-deps -d /tmp/mv && tar xzf /tmp/mv/*.tar.gz -C /tmp/mv
    python bench/math_verify_agreement.py /tmp/mv/math_verify-0.9.0/tests     # the installed version's tests
    git clone https://github.com/huggingface/Math-Verify /tmp/Math-Verify    # or the repository's
    python bench/math_verify_agreement.py /tmp/Math-Verify/tests
    python bench/math_verify_agreement.py /tmp/Math-Verify/tests --reward path/to/file.py:func
    python bench/math_verify_agreement.py /tmp/Math-Verify/tests --show all   # every case

Reads (never runs, never copies) the test files: every ``pytest.mark.parametrize`` table whose
arguments name a gold, a prediction and an expected verdict (``gold, pred, expected`` /
``result``) becomes cases; the test body's call (``compare_strings(..., match_types=...,
precision=..., strict=..., allow_set_relation_comp=...)`` or ``verify(parse(gold), parse(pred))``)
gives each case's options. Each case is scored as training would score it:
``reward(prompts=[""], completions=[pred], answer=[gold])`` with ``precision`` passed to
``make_math_answer`` when the case sets it.

Counted as "not applicable" (listed, and left out of the second figure only): cases that switch
on a math-verify option ``math_answer`` does not have (``strict=False``: variables renamed by
position; ``allow_set_relation_comp=True``), and cases run with only the LaTeX or only the
expression extractor whose expected verdict math-verify itself does not give when it reads with
both extractors, as ``math_answer`` does (e.g. a test that latex-only extraction skips
``$ \n 9 \n $``: with the expression extractor the 9 is read, and 9 is the right answer).
Tests that call math-verify's internals (timeouts, ``raise_on_error``, ``sympy_expr_eq``,
string-extraction and extraction-config checks) have no gold/prediction/verdict and are not cases.

Reported: agreement = cases whose 0/1 verdict equals the expected one; "wrong rewarded" = expected
0 but rewarded 1; "missed" = expected 1 but scored 0; and the same figures for math-verify itself
run as the test does (the reference's own pass rate with the installed version).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXPECTED_NAMES = ("expected", "result")
OPTION_KEYS = ("match_types", "precision", "strict", "allow_set_relation_comp")


def _value(node):
    """A literal from the test file; f-strings may use ``math`` only (e.g. f"{math.sqrt(17):.15f}")."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        if isinstance(node, ast.JoinedStr):
            return eval(compile(ast.Expression(node), "<case>", "eval"), {"__builtins__": {}, "math": math})
        raise


def _parametrize(dec):
    if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "parametrize"
            and len(dec.args) >= 2 and isinstance(dec.args[0], ast.Constant)):
        return [a.strip() for a in dec.args[0].value.split(",")], dec.args[1]
    return None


def _call_options(func: ast.FunctionDef) -> dict:
    """Keyword options of the comparison call in the test body (values or parameter names)."""
    for node in ast.walk(func):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "compare_strings":
                opts = {"match_types": ["latex", "expr"]}
                for kw in node.keywords:
                    if kw.arg in OPTION_KEYS:
                        opts[kw.arg] = ("param", kw.value.id) if isinstance(kw.value, ast.Name) else _value(kw.value)
                return opts
            if node.func.id == "verify":
                return {"match_types": ["default"]}
    return {}


def read_cases(tests_dir: Path) -> list[dict]:
    cases = []
    for path in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for dec in func.decorator_list:
                p = _parametrize(dec)
                if p is None:
                    continue
                names, table = p
                exp = next((n for n in EXPECTED_NAMES if n in names), None)
                if "gold" not in names or "pred" not in names or exp is None:
                    continue
                opts_template = _call_options(func)
                for i, row in enumerate(table.elts):
                    values = dict(zip(names, (_value(e) for e in row.elts)))
                    opts = {k: (values[v[1]] if isinstance(v, tuple) and v[0] == "param" else v)
                            for k, v in opts_template.items()}
                    cases.append(dict(where="%s::%s[%d]" % (path.name, func.name, i), gold=values["gold"],
                                      pred=values["pred"], expected=int(values[exp]), **opts))
    return cases


def not_applicable(case) -> str | None:
    """Why a case measures something math_answer does not do, or None."""
    if case.get("strict", True) is False:
        return "strict=False"
    if case.get("allow_set_relation_comp", False):
        return "allow_set_relation_comp=True"
    if case.get("match_types") in (["latex"], ["expr"]):
        both = dict(case, match_types=["latex", "expr"])
        if reference_verdict(both) != case["expected"]:
            return "only with match_types=%s" % case["match_types"]
    return None


def load_reward(spec: str | None):
    from lmpo.rewards.math_reward import make_math_answer

    if spec is None:
        return lambda precision: make_math_answer(precision=precision)
    path, _, name = spec.rpartition(":")
    mod_spec = importlib.util.spec_from_file_location("reward_under_test", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    func = getattr(mod, name)
    return lambda precision: func


def reference_verdict(case) -> int:
    """math-verify itself, configured as the test configures it."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    types = case.get("match_types", ["latex", "expr"])
    if types == ["default"]:
        return int(verify(parse(case["gold"]), parse(case["pred"])))
    cfg = [LatexExtractionConfig(boxed_match_priority=0) if t == "latex" else ExprExtractionConfig() for t in types]
    return int(verify(parse(case["gold"], cfg), parse(case["pred"], cfg), float_rounding=case.get("precision", 6),
                      strict=case.get("strict", True),
                      allow_set_relation_comp=case.get("allow_set_relation_comp", False)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tests_dir", type=Path, help="the tests/ directory of a Math-Verify checkout")
    ap.add_argument("--reward", help="file.py:function to measure instead of lmpo's math_answer")
    ap.add_argument("--show", choices=["disagreements", "all"], default="disagreements")
    ap.add_argument("--no-reference", action="store_true", help="skip running math-verify itself")
    args = ap.parse_args(argv)
    logging.disable(logging.CRITICAL)
    if not args.tests_dir.is_dir():
        ap.error("%s is not a directory (clone https://github.com/huggingface/Math-Verify, pass its tests/)"
                 % args.tests_dir)
    cases = read_cases(args.tests_dir)
    if not cases:
        ap.error("no (gold, pred, expected) cases found under %s" % args.tests_dir)
    make = load_reward(args.reward)
    make(6)(prompts=[""], completions=["\\boxed{1}"], answer=["1"])  # imports, outside the timing
    t0 = time.perf_counter()
    for c in cases:
        reward = make(c.get("precision", 6))
        c["ours"] = int(reward(prompts=[""], completions=[c["pred"]], answer=[c["gold"]])[0] == 1.0)
    seconds = time.perf_counter() - t0
    if not args.no_reference:
        for c in cases:
            c["ref"] = reference_verdict(c)

    def figures(rows, key):
        agree = sum(r[key] == r["expected"] for r in rows)
        wrong = sum(r[key] == 1 and r["expected"] == 0 for r in rows)
        missed = sum(r[key] == 0 and r["expected"] == 1 for r in rows)
        return "%d/%d agree (%.1f %%), wrong answers rewarded %d, correct answers missed %d" % (
            agree, len(rows), 100.0 * agree / max(1, len(rows)), wrong, missed)

    for c in cases:
        c["na"] = not_applicable(c)
    app = [c for c in cases if c["na"] is None]
    na = [c for c in cases if c["na"] is not None]
    name = args.reward or "lmpo math_answer"
    from importlib.metadata import version

    print("cases: %d from %s (%d applicable, %d not applicable); math-verify %s installed; %.1f ms per case"
          % (len(cases), args.tests_dir, len(app), len(na), version("math-verify"), 1000 * seconds / len(cases)))
    print("%s, all cases:        %s" % (name, figures(cases, "ours")))
    print("%s, applicable cases: %s" % (name, figures(app, "ours")))
    if not args.no_reference:
        print("math-verify as the tests call it, applicable cases: %s" % figures(app, "ref"))
    if na:
        print("not applicable:\n%s" % "\n".join("- %s: %s (expected %d, ours %d)"
                                                % (c["where"], c["na"], c["expected"], c["ours"]) for c in na))
    rows = cases if args.show == "all" else [c for c in app if c["ours"] != c["expected"]]
    if rows:
        print("\n%s:" % ("all cases" if args.show == "all" else "disagreements"))
    for c in rows:
        print("- %s expected %d, ours %d%s\n    gold: %s\n    pred: %s" % (
            c["where"], c["expected"], c["ours"], "" if args.no_reference else ", math-verify %d" % c["ref"],
            _short(c["gold"]), _short(c["pred"])))
    return 0


def _short(s, n=160):
    s = str(s).replace("\n", "\\n")
    return s if len(s) <= n else s[:n // 2] + " ... " + s[-n // 2:]


if __name__ == "__main__":
    sys.exit(main())
