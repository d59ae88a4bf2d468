"""Writes problems.jsonl (columns: prompt, tests) and checks every problem against the
reference solution in reference.py through the sandbox. Run: python examples/code_task/make_problems.py"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

PROBLEMS = [
    ("add_digits", "def add_digits(n: int) -> int", "Return the sum of the decimal digits of the non-negative integer n.",
     ["add_digits(0) == 0", "add_digits(7) == 7", "add_digits(1234) == 10", "add_digits(9999) == 36"]),
    ("is_palindrome", "def is_palindrome(s: str) -> bool", "Return True if s reads the same forwards and backwards, ignoring case and non-alphanumeric characters.",
     ["is_palindrome('A man, a plan, a canal: Panama') is True", "is_palindrome('abc') is False", "is_palindrome('') is True", "is_palindrome('No lemon, no melon') is True"]),
    ("fizzbuzz", "def fizzbuzz(n: int) -> list", "Return the list of strings for 1..n where multiples of 3 are 'Fizz', of 5 'Buzz', of both 'FizzBuzz', others the number as a string.",
     ["fizzbuzz(5) == ['1', '2', 'Fizz', '4', 'Buzz']", "fizzbuzz(15)[-1] == 'FizzBuzz'", "fizzbuzz(0) == []", "len(fizzbuzz(30)) == 30"]),
    ("second_largest", "def second_largest(xs: list) -> int", "Return the second largest distinct value in xs, or None if there is none.",
     ["second_largest([3, 1, 4, 1, 5]) == 4", "second_largest([2, 2]) is None", "second_largest([7]) is None", "second_largest([-1, -5, -3]) == -3"]),
    ("count_vowels", "def count_vowels(s: str) -> int", "Return the number of vowels (a, e, i, o, u, either case) in s.",
     ["count_vowels('hello') == 2", "count_vowels('AEIOU') == 5", "count_vowels('rhythm') == 0", "count_vowels('') == 0"]),
    ("flatten", "def flatten(xs: list) -> list", "Flatten an arbitrarily nested list of integers into a flat list, keeping order.",
     ["flatten([1, [2, [3, 4]], 5]) == [1, 2, 3, 4, 5]", "flatten([]) == []", "flatten([[[]]]) == []", "flatten([[1], 2, [[3]]]) == [1, 2, 3]"]),
    ("gcd", "def gcd(a: int, b: int) -> int", "Return the greatest common divisor of two non-negative integers (gcd(0, 0) is 0).",
     ["gcd(12, 18) == 6", "gcd(7, 13) == 1", "gcd(0, 5) == 5", "gcd(0, 0) == 0"]),
    ("run_length", "def run_length(s: str) -> str", "Run-length encode s: 'aaabcc' becomes 'a3b1c2'.",
     ["run_length('aaabcc') == 'a3b1c2'", "run_length('') == ''", "run_length('x') == 'x1'", "run_length('aabbaa') == 'a2b2a2'"]),
    ("word_count", "def word_count(text: str) -> dict", "Return a dict mapping each lower-cased word (split on whitespace) to its count.",
     ["word_count('a b a') == {'a': 2, 'b': 1}", "word_count('') == {}", "word_count('The the THE') == {'the': 3}", "word_count('x  y\\nx') == {'x': 2, 'y': 1}"]),
    ("is_prime", "def is_prime(n: int) -> bool", "Return True if n is a prime number.",
     ["is_prime(2) is True", "is_prime(1) is False", "is_prime(97) is True", "is_prime(91) is False", "is_prime(-7) is False"]),
    ("fibonacci", "def fibonacci(n: int) -> int", "Return the n-th Fibonacci number with fibonacci(0) == 0 and fibonacci(1) == 1.",
     ["fibonacci(0) == 0", "fibonacci(1) == 1", "fibonacci(10) == 55", "fibonacci(90) == 2880067194370816120"]),
    ("rotate", "def rotate(xs: list, k: int) -> list", "Return xs rotated right by k positions (k may exceed len(xs)); do not modify xs.",
     ["rotate([1, 2, 3, 4], 1) == [4, 1, 2, 3]", "rotate([1, 2, 3], 4) == [3, 1, 2]", "rotate([], 3) == []", "rotate([1, 2], 0) == [1, 2]"]),
    ("balanced", "def balanced(s: str) -> bool", "Return True if the brackets ()[]{} in s are balanced and properly nested.",
     ["balanced('([]{})') is True", "balanced('(]') is False", "balanced('') is True", "balanced('((') is False", "balanced('a(b)c') is True"]),
    ("roman", "def to_roman(n: int) -> str", "Convert an integer 1..3999 to a Roman numeral.",
     ["to_roman(1) == 'I'", "to_roman(4) == 'IV'", "to_roman(1994) == 'MCMXCIV'", "to_roman(3999) == 'MMMCMXCIX'"]),
    ("merge_sorted", "def merge_sorted(a: list, b: list) -> list", "Merge two sorted lists into one sorted list.",
     ["merge_sorted([1, 3], [2, 4]) == [1, 2, 3, 4]", "merge_sorted([], [1]) == [1]", "merge_sorted([1, 1], [1]) == [1, 1, 1]", "merge_sorted([], []) == []"]),
    ("anagrams", "def are_anagrams(a: str, b: str) -> bool", "Return True if a and b are anagrams of each other, ignoring spaces and case.",
     ["are_anagrams('Listen', 'Silent') is True", "are_anagrams('abc', 'abd') is False", "are_anagrams('a gentleman', 'elegant man') is True", "are_anagrams('aa', 'a') is False"]),
    ("binary_search", "def binary_search(xs: list, target: int) -> int", "Return the index of target in the sorted list xs, or -1 if absent.",
     ["binary_search([1, 3, 5, 7], 5) == 2", "binary_search([1, 3, 5, 7], 4) == -1", "binary_search([], 1) == -1", "binary_search([2], 2) == 0"]),
    ("transpose", "def transpose(m: list) -> list", "Return the transpose of a rectangular matrix given as a list of rows.",
     ["transpose([[1, 2, 3], [4, 5, 6]]) == [[1, 4], [2, 5], [3, 6]]", "transpose([[1]]) == [[1]]", "transpose([]) == []"]),
    ("caesar", "def caesar(s: str, k: int) -> str", "Shift each letter of s by k places in the alphabet (wrapping, keeping case); leave other characters.",
     ["caesar('abc', 1) == 'bcd'", "caesar('xyz', 3) == 'abc'", "caesar('Hello, World!', 13) == 'Uryyb, Jbeyq!'", "caesar('abc', -1) == 'zab'"]),
    ("unique_in_order", "def unique_in_order(xs: list) -> list", "Return the items of xs with duplicates removed, keeping the first occurrence of each.",
     ["unique_in_order([3, 1, 3, 2, 1]) == [3, 1, 2]", "unique_in_order([]) == []", "unique_in_order(['a', 'a']) == ['a']"]),
]


def rows():
    for name, sig, task, asserts in PROBLEMS:
        prompt = ("Write a Python function `%s:`.\n%s\nAnswer with the function in a ```python code block."
                  % (sig, task))
        yield {"prompt": prompt, "tests": "".join("assert %s\n" % a for a in asserts)}


def main():
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from lmpo.rewards.code_reward import CodeTests

    data = list(rows())
    with open(os.path.join(HERE, "problems.jsonl"), "w") as f:
        for row in data:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(HERE, "reference.py")) as f:
        reference = f.read()
    scores = CodeTests()([r["prompt"] for r in data], [reference] * len(data), tests=[r["tests"] for r in data])
    print("%d problems; reference solution scores: %s" % (len(data), scores))
    assert scores == [1.0] * len(data)


if __name__ == "__main__":
    main()
