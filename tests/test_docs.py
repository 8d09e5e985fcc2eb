"""The documentation: README.md and docs/*.md link only to files and headings that exist, the README keeps CI's test
command, and docs/configuration.md is today's output of scripts/config_reference.py (the schema behind --help)."""
import dataclasses
import glob
import importlib.util
import os
import re

import pytest

from methods import Method, register_method, unregister_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
CONFIGURATION = os.path.join(ROOT, "docs", "configuration.md")


def _reference():
    spec = importlib.util.spec_from_file_location("config_reference", os.path.join(ROOT, "scripts",
                                                                                   "config_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _prose(text):
    """The text outside fenced code blocks and inline code, where a link is a link."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def links(path):
    """The relative links of a markdown file: ``(target path or '', anchor or '')`` per link."""
    with open(path, encoding="utf-8") as f:
        text = _prose(f.read())
    out = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        out.append((file, anchor))
    return out


def anchors(path):
    """The anchors GitHub makes for a markdown file's headings (a repeated one gets -1, -2, ...)."""
    slug = _reference().github_anchor
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", f.read(), flags=re.M | re.S)
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*#*$", text, flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    broken = []
    for file, anchor in links(page):
        target = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        if not os.path.exists(target):
            broken.append(f"{file}#{anchor}" if anchor else file)
        elif anchor and target.endswith(".md") and anchor not in anchors(target):
            broken.append(f"{file}#{anchor} (no such heading)")
    assert not broken, f"{os.path.relpath(page, ROOT)}: broken links {broken}"


def test_link_check_sees_a_broken_file_and_a_broken_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n## A `b:` (c)\n\n[ok](#a-b-c) [ok](#top) [gone](#nowhere) [file](missing.md)\n"
                    "`[not a link](missing.md)`\n\n```\n[also not](missing.md)\n```\n[web](https://example.com)\n")
    assert links(str(page)) == [("", "a-b-c"), ("", "top"), ("", "nowhere"), ("missing.md", "")]
    assert anchors(str(page)) == {"top", "a-b-c"}


def test_the_readme_links_every_docs_page():
    linked = {os.path.normpath(os.path.join(ROOT, f)) for f, _ in links(README) if f}
    pages = set(PAGES[1:]) | {os.path.join(ROOT, "docs", "adding_a_method.md")}
    assert pages <= linked, sorted(os.path.relpath(p, ROOT) for p in pages - linked)


def test_the_readme_gives_the_command_ci_runs():
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("\n## Run the tests\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert block == ci[-1] == ".venv/bin/python -m pytest -q"


# ------------------------------------------------------------------------------------------- the configuration page
def test_the_configuration_page_is_generated_from_the_schema():
    message = _reference().stale_message(CONFIGURATION)
    assert message is None, message


@dataclasses.dataclass
class _DocConfig:
    """The section of a method registered by this test only."""
    strength: float = 0.5                      # how hard the documented method pushes
    mode: str = dataclasses.field(default="soft", metadata={"choices": ("soft", "hard")})


class _DocMethod(Method):
    name, label, Config = "docmethod", "DocMethod", _DocConfig


def test_a_new_method_section_appears_in_the_reference_and_makes_the_page_stale(tmp_path):
    ref = _reference()
    current = tmp_path / "configuration.md"
    current.write_text(ref.reference_page(), encoding="utf-8")
    assert ref.stale_message(str(current)) is None
    register_method(_DocMethod)
    try:
        page = ref.reference_page()
        message = ref.stale_message(str(current))
    finally:
        unregister_method("docmethod")
    assert "### `docmethod:`" in page and "The section of a method registered by this test only." in page
    assert "| `docmethod.strength` | float | `0.5` | how hard the documented method pushes |" in page
    assert "| `docmethod.mode` | str | `soft` | soft \\| hard |" in page
    assert message and "python scripts/config_reference.py --write docs/configuration.md" in message
