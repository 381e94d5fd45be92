"""The README and docs/: every link resolves (files and heading anchors), the README stays a five-minute page, and the
set-up commands it shows are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _without_code(text: str) -> str:
    """The page without fenced code blocks and inline code (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page: lower case, punctuation but '-' and '_' dropped, spaces to '-', a repeated
    heading suffixed -1, -2, ..."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.*)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_of_the_readme_and_docs_resolves(page):
    broken = []
    for target in _LINK.findall(_without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_readme_is_a_five_minute_page_for_users():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 10_240
    for internal in ("this issue", "../shared", "work_dirs/bench"):
        assert internal not in text, internal


def _setup_block(text: str) -> list[str]:
    """The command lines of the README's set-up block (the one that installs the test extra)."""
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
        if any('".[test]"' in line for line in lines):
            return lines
    raise AssertionError("README.md shows no set-up block installing the test extra")


def test_the_readme_set_up_commands_are_the_ones_ci_runs():
    install, tests = _setup_block((ROOT / "README.md").read_text(encoding="utf-8"))
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert install.endswith(" && kd-plugin demo")  # the main job, which CI runs in tests/test_demo.py
    assert install.removesuffix(" && kd-plugin demo").replace("pip install ", "pip install --quiet ", 1) in ci
    assert tests in ci
