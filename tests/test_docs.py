"""References into docs/contract.md stay true when its sections move: every "§N" in the repository's files
names a section that exists and is about what the text around the reference is about."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

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


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(
        b"\0"
    )
    files = []
    for name in filter(None, names):
        path = REPO / name.decode()
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
