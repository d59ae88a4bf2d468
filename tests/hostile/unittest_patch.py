# tries: monkeypatch unittest (assertions, TestCase.run, main), sys.excepthook, sys.settrace and builtins.__import__ to swallow failures
# expect: 0.0
# stopped by: patches change only the server's interpreter
import builtins
import sys
import unittest

for name in dir(unittest.TestCase):
    if name.startswith("assert") or name == "fail":
        setattr(unittest.TestCase, name, lambda *a, **k: None)
unittest.TestCase.run = lambda self, result=None: result
unittest.main = lambda *a, **k: None
sys.excepthook = lambda *a: None
sys.settrace(lambda *a: None)
_real_import = builtins.__import__
builtins.__import__ = lambda name, *a, **k: unittest if name == "_harness" else _real_import(name, *a, **k)


def add(a, b):
    return 42
