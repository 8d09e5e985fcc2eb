"""files.py: the one first-line helper and the atomic writer, shared without the config depending on checkpoints."""
import os
import subprocess
import sys

import pytest

import checkpoint
from files import atomic_write, first_line, write_text
from tests.runs import ROOT


@pytest.mark.parametrize("err,line", [
    (ValueError("bad value\nmore detail"), "bad value"), (OSError("\n  no space left  \n"), "no space left"),
    (KeyError(), "KeyError"), (RuntimeError(""), "RuntimeError"),
])
def test_first_line_is_the_first_non_empty_line_or_the_type(err, line):
    assert first_line(err) == line
    assert checkpoint.first_line is first_line           # still importable where it used to live


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_text(str(path), "old")

    def fail(f):
        f.write("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        atomic_write(str(path), fail, binary=False)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_the_config_loads_without_the_checkpoint_module():
    code = "import sys, config; config.load_config(None, []); print('checkpoint' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
