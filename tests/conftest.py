"""Shared pytest hooks: report which reference fixture files the run checked against (also without ``-s``)."""
from tests.reference import USED


def pytest_terminal_summary(terminalreporter):
    if USED:
        terminalreporter.write_sep("-", "reference fixtures used")
        for name, path in sorted(USED.items()):
            terminalreporter.write_line(f"{name}: {path}")
