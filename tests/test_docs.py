"""The README is the front door and docs/ the manual (issue 22 item 4): the README stays short, every
page is reachable from it, and no relative link in either points at a file or a heading that is not
there (a page renamed or a heading reworded breaks a link silently on GitHub)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 250

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a ``# comment`` in a code block is not a heading)."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (no code ticks, emphasis or link targets),
    lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in _HEADING.findall(_prose(path.read_text())):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", _prose(path.read_text()))  # a link in a code span is text
    return [t for t in _LINK.findall(text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not checked here


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target} (no file {_name(dest)})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading with anchor #{anchor} in {_name(dest)})")
    return bad


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert not broken_links(path), f"{path.relative_to(ROOT)}: broken links: {broken_links(path)}"


def test_the_readme_is_short_and_reaches_every_page():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move text to docs/"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    assert not [p.name for p in PAGES if p.resolve() not in linked], "pages in docs/ the README does not link"


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Latency verdicts\n\n```\n# not a heading\n```\n")
    page.write_text("[ok](other.md#latency-verdicts) [gone](missing.md) [no anchor](other.md#not-a-heading)\n"
                    "[web](https://example.com) `[code](nowhere.md)` is prose\n\n```\n[in code](nowhere.md)\n```\n")
    bad = broken_links(page)
    assert [b.split(" ")[0] for b in bad] == ["missing.md", "other.md#not-a-heading"], bad


def test_github_slugs():
    assert slug("NVIDIA ModelOpt and the `fp8` mode") == "nvidia-modelopt-and-the-fp8-mode"
    assert slug("Q/DQ placement rules and the Q/DQ lint") == "qdq-placement-rules-and-the-qdq-lint"
    assert slug("Parallel runs (pytest-xdist)") == "parallel-runs-pytest-xdist"
    assert slug("Localize: where does the damage enter?") == "localize-where-does-the-damage-enter"
