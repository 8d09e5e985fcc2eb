"""Shared pytest hooks: report which reference fixture files the run checked against (also without ``-s``)."""
import pytest

from tests.reference import USED


def pytest_terminal_summary(terminalreporter):
    if USED:
        terminalreporter.write_sep("-", "reference fixtures used")
        for name, path in sorted(USED.items()):
            terminalreporter.write_line(f"{name}: {path}")


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The embedded digits as an ImageFolder tree, written once for the whole session."""
    from datasets import prepare_digits
    root = str(tmp_path_factory.mktemp("data") / "digits")
    prepare_digits(root)
    return root
