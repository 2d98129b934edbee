"""The documentation stays in step with the code: links resolve, and the CLI reference covers the parser.

README.md keeps what a user needs first and links the reference pages in docs/; these tests fail when a
relative link or ``#anchor`` points nowhere, when a command is missing from the README's command table,
or when an option of any command (or sub-action) is missing from docs/cli.md.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from medseg.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = CODE_BLOCK.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE)}


def _links(page: Path) -> list[str]:
    text = CODE_BLOCK.sub("", page.read_text(encoding="utf-8"))
    return [m.group(1) for m in LINK.finditer(text)]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    """``"medseg"``, ``"medseg train"``, ``"medseg bundle run"``, ... mapped to their parsers."""
    found = {"medseg": build_parser()}
    pending = ["medseg"]
    while pending:
        name = pending.pop()
        for sub_name, sub in _subparsers(found[name]).items():
            found[f"{name} {sub_name}"] = sub
            pending.append(f"{name} {sub_name}")
    return found


def test_pages_exist():
    names = {p.name for p in PAGES}
    assert {"README.md", "cli.md", "bundles.md", "pacs.md", "benchmarks.md", "safe_mode.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_resolve(page: Path):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_lists_every_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = {m.group(1) for m in re.finditer(r"^\| `([a-z][a-z-]*)` \|", readme, re.MULTILINE)}
    assert set(_subparsers(build_parser())) <= table


def _sections(page: Path) -> dict[str, str]:
    """Heading text (as written) -> the text up to the next heading, code blocks left out."""
    text = CODE_BLOCK.sub("", page.read_text(encoding="utf-8"))
    parts = re.split(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_cli_reference_documents_every_command_and_option():
    """Each command and sub-action has its own ``medseg ...`` heading in docs/cli.md, and each of its
    options (``--help`` aside) is named in that section; the global options in "Global options"."""
    sections = _sections(ROOT / "docs" / "cli.md")
    missing = []
    for name, parser in _all_parsers().items():
        heading = "Global options" if name == "medseg" else f"`{name}`"
        if heading not in sections:
            missing.append(f"heading {heading}")
            continue
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help") and not re.search(rf"`{re.escape(option)}[` ]", sections[heading]):
                    missing.append(f"{name} {option}")
    assert not missing, "docs/cli.md does not document: " + ", ".join(missing)
