#!/usr/bin/env python3
"""Tests for llm_proxy: python3 test_llm_proxy.py

Runs every test in tests/ (test_*.py) and ends with a plain "N passed, N failed, N skipped"
line. Everything runs against a fake OpenAI upstream started in a thread on an ephemeral port:
real sockets, real HTTP, real streaming (tests/support.py). Time is driven by an injected
clock, never by sleeping. When the official client packages are importable, real-client tests
drive the proxy with them too; tests that need what is missing are skipped with the reason.

    python3 test_llm_proxy.py                      # everything, the test modules in parallel
    python3 test_llm_proxy.py StreamingTests       # some: classes or Class.test_method
    python3 test_llm_proxy.py -v -j 1              # verbose, one module at a time

The modules run in separate worker processes (-j, default 4): most of the suite's time is spent
waiting on sockets and timeouts, so they overlap well even on two cores.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import json
import os
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class CountingResult(unittest.TextTestResult):
    """Counts passes itself: what testsRun includes differs between Python versions."""

    passed = 0

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1


def test_modules() -> list[str]:
    folder = os.path.join(HERE, "tests")
    return sorted(f"tests.{name[:-3]}" for name in os.listdir(folder)
                  if name.startswith("test_") and name.endswith(".py"))


def run_suite(suite: unittest.TestSuite, verbose: bool) -> tuple[int, int, int]:
    runner = unittest.TextTestRunner(verbosity=2 if verbose else 1, resultclass=CountingResult,
                                     stream=sys.stderr)
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    return result.passed, failed, len(result.skipped)


def find(names: list[str]) -> unittest.TestSuite:
    """The tests named (a class, or Class.method), looked up in every test module."""
    loader = unittest.defaultTestLoader
    suite = unittest.TestSuite()
    for name in names:
        found = False
        for module_name in test_modules():
            module = importlib.import_module(module_name)
            if hasattr(module, name.split(".")[0]):
                suite.addTests(loader.loadTestsFromName(name, module))
                found = True
        if not found:
            raise SystemExit(f"no test named {name}")
    return suite


def worker(module_name: str, verbose: bool) -> int:
    """Run one module and print its counts as the last line (for the parent)."""
    suite = unittest.defaultTestLoader.loadTestsFromName(module_name)
    counts = run_suite(suite, verbose)
    print(json.dumps(counts))
    return 0


def run_module(module_name: str, verbose: bool) -> tuple[str, tuple[int, int, int], float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", module_name]
                          + (["-v"] if verbose else []), capture_output=True, text=True,
                          cwd=HERE)
    lines = proc.stdout.strip().splitlines()
    try:
        counts = tuple(json.loads(lines[-1]))
    except (IndexError, ValueError):  # the worker died: count the module as one failure
        counts = (0, 1, 0)
    return proc.stderr + "".join(line + "\n" for line in lines[:-1]), counts, \
        time.monotonic() - started  # type: ignore[return-value]


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    if "--worker" in argv:
        return worker(argv[argv.index("--worker") + 1], verbose)
    jobs = 4
    if "-j" in argv:
        jobs = int(argv[argv.index("-j") + 1])
    names = [a for i, a in enumerate(argv) if not a.startswith("-")
             and (i == 0 or argv[i - 1] != "-j")]
    started = time.monotonic()
    if names:
        passed, failed, skipped = run_suite(find(names), verbose)
    else:
        passed = failed = skipped = 0
        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
            futures = {pool.submit(run_module, m, verbose): m for m in test_modules()}
            for future in concurrent.futures.as_completed(futures):
                output, (p, f, s), seconds = future.result()
                print(f"== {futures[future]}: {p} passed, {f} failed, {s} skipped "
                      f"({seconds:.1f} s)", file=sys.stderr)
                if f or verbose:
                    print(output, file=sys.stderr)
                passed, failed, skipped = passed + p, failed + f, skipped + s
    print(f"({time.monotonic() - started:.1f} s)", file=sys.stderr)
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
