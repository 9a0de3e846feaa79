"""The documentation holds together when text moves: every "§N" in the repository's files names a section of
docs/contract.md about what the text around it is about, every relative markdown link reaches a file and a
heading that exist, and the README stays short enough to read first."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parent.parent
CONTRACT = REPO / "docs" / "contract.md"
# The section sign, a number, maybe subsections; right after "RFC 9110 " it is another document's.
REFERENCE = re.compile(r"(?<!\w)§(\d+)(?:\.\d+)*")
OTHER_DOCUMENT = re.compile(r"RFC \d+ $")
# Text either side of a reference in which a word of the section's title must appear: a docstring's
# first line, a table row, a sentence.
BEFORE, AFTER = 200, 60


def contract_sections() -> dict[int, str]:
    """Section number → title, from the `## N. Title` headings."""
    headings = re.findall(r"^## (\d+)\. (.+)$", CONTRACT.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {int(number): title for number, title in headings}


def title_stems(title: str) -> set[str]:
    """Five-letter stems of the title's words of four letters or more: "Settings" matches "setting"."""
    return {word[:5] for word in re.findall(r"[a-z]+", title.lower()) if len(word) >= 4}


def repository_files(*patterns: str) -> list[Path]:
    """Files git tracks or would add (untracked, not ignored), so a page not yet committed is checked too."""
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *patterns]
    names = subprocess.run(command, cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sorted({REPO / name.decode() for name in filter(None, names)})


def tracked_text_files() -> list[Path]:
    files = []
    for path in repository_files():
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        files.append(path)
    return files


def test_the_contract_numbers_its_sections_in_order() -> None:
    """The headings are 1..N, so a reference's number is a position a reader can find."""
    sections = contract_sections()
    assert list(sections) == list(range(1, len(sections) + 1))


def test_every_section_reference_names_a_section_about_that() -> None:
    """Each "§N" outside an RFC citation points at a contract heading whose title shares a word with
    the text around the reference (contract §6 next to "settings", not next to "command line")."""
    sections = contract_sections()
    checked = 0
    wrong = []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8")
        for match in REFERENCE.finditer(text):
            before = text[max(0, match.start() - BEFORE) : match.start()]
            if OTHER_DOCUMENT.search(before):
                continue
            checked += 1
            where = f"{path.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}"
            number = int(match.group(1))
            if number not in sections:
                wrong.append(f"{where}: §{number} is not a section of docs/contract.md")
                continue
            around = before + text[match.end() : match.end() + AFTER]
            words = {word[:5] for word in re.findall(r"[a-z]+", around.lower())}
            if not words & title_stems(sections[number]):
                wrong.append(
                    f"{where}: §{number} is '{sections[number]}', which the text around it is not about"
                )
    assert checked > 20, "the scan found too few references to be looking in the right place"
    # A right reference whose neighbourhood happens not to say the topic: name it, "§3, archive".
    assert wrong == [], "\n".join(wrong)


# The README is what a newcomer reads first; detail goes in docs/ (issue 22). 15 KiB leaves room for the
# module table to grow.
README_MAX_BYTES = 15 * 1024
# A fenced block (its fence may be indented, inside a list item) and an inline code span hold no links.
FENCED = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?^[ \t]*\1[ \t]*$", flags=re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)[^`].*?\1", flags=re.DOTALL)
LINK = re.compile(r"\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:", flags=re.IGNORECASE)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", flags=re.MULTILINE)


def without_code_blocks(text: str) -> str:
    """The text with fenced blocks blanked, their newlines kept so line numbers stay right."""
    return FENCED.sub(lambda block: "\n" * block.group(0).count("\n"), text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: a link in it counts by its text; lowercase; punctuation other than
    `-` dropped; each space a `-` (so "Fan-out: `--scenarios fanout`" is `fan-out---scenarios-fanout`)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor; a repeated heading gets `-1`, `-2`, ... as GitHub numbers them."""
    seen: Counter[str] = Counter()
    found = set()
    for heading in HEADING.findall(without_code_blocks(path.read_text(encoding="utf-8"))):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link in a markdown file that is not a URL, outside code."""
    text = without_code_blocks(path.read_text(encoding="utf-8"))
    text = INLINE_CODE.sub(lambda span: "\n" * span.group(0).count("\n"), text)
    return [
        (text.count("\n", 0, match.start()) + 1, match.group(1))
        for match in LINK.finditer(text)
        if not SCHEME.match(match.group(1))
    ]


def broken_link(source: Path, target: str) -> str | None:
    """Why a link from `source` does not reach its file or heading, or None if it does."""
    location, _, anchor = target.partition("#")
    destination = (source.parent / unquote(location)).resolve() if location else source
    if not destination.is_relative_to(REPO) or not destination.exists():
        return f"no file {location}"
    # Only markdown headings are checked: other files' anchors are GitHub's line numbers (#L10).
    if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
        return f"no heading #{anchor} in {destination.relative_to(REPO)}"
    return None


def test_every_relative_link_reaches_a_file_and_heading() -> None:
    """Every relative markdown link names a file that exists and, with `#anchor`, one of its headings."""
    pages = repository_files("*.md")
    wrong = []
    checked = 0
    for page in filter(Path.exists, pages):
        for line, target in relative_links(page):
            checked += 1
            reason = broken_link(page, target)
            if reason:
                wrong.append(f"{page.relative_to(REPO)}:{line}: ({target}): {reason}")
    assert checked > 30, "the scan found too few links to be looking in the right place"
    assert wrong == [], "\n".join(wrong)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    """Every page under docs/ is linked from the README, so detail moved there stays one click away."""
    readme = REPO / "README.md"
    linked = {(REPO / unquote(target.partition("#")[0])).resolve() for _, target in relative_links(readme)}
    unlinked = [page.name for page in repository_files("docs/*.md") if page.exists() and page not in linked]
    assert unlinked == []


def test_the_readme_is_at_most_15_kib() -> None:
    """README.md is at most 15 KiB: what a newcomer needs first, with the detail in docs/."""
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail to a page under docs/"
