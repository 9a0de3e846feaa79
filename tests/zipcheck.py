"""Open an archive with every independent reader we have: zipfile, Info-ZIP unzip, 7-Zip, bsdtar."""

from __future__ import annotations

import io
import shutil
import subprocess
import unicodedata
import zipfile
import zlib
from pathlib import Path


def seven_zip() -> str:
    found = shutil.which("7z") or shutil.which("7zz")
    assert found, "7-Zip is missing: `make tools` installs it"
    return found


def check_with_zipfile(data: bytes, expected: dict[str, bytes]) -> None:
    """Names (in order), bytes, CRCs and the UTF-8 flag of every entry."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == list(expected)
        assert archive.testzip() is None
        for info in archive.infolist():
            body = archive.read(info)
            assert body == expected[info.filename], info.filename
            assert zlib.crc32(expected[info.filename]) == info.CRC
            assert info.flag_bits & 0x800, f"{info.filename}: UTF-8 flag not set"


def check_with_tools(path: Path, expected_names: list[str]) -> None:
    """`unzip -t`, `7z t` and `bsdtar -tf` each accept the archive and list the same entries."""
    unzip = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True, check=False)
    assert unzip.returncode == 0, unzip.stdout + unzip.stderr
    assert "No errors detected" in unzip.stdout
    seven = subprocess.run(
        [seven_zip(), "t", str(path)], capture_output=True, text=True, check=False, env={"LANG": "C.UTF-8"}
    )
    assert seven.returncode == 0, seven.stdout + seven.stderr
    assert "Everything is Ok" in seven.stdout
    bsdtar = subprocess.run(
        ["bsdtar", "-tf", str(path)], capture_output=True, check=False, env={"LC_ALL": "C.UTF-8"}
    )
    assert bsdtar.returncode == 0, bsdtar.stderr
    # libarchive lists a decomposed (NFD) name composed: the archive's own bytes are zipfile's to check.
    listed = [unicodedata.normalize("NFC", name) for name in bsdtar.stdout.decode("utf-8").splitlines()]
    assert sorted(listed) == sorted(unicodedata.normalize("NFC", name) for name in expected_names)


def check_archive(data: bytes, expected: dict[str, bytes], tmp_path: Path) -> None:
    check_with_zipfile(data, expected)
    path = tmp_path / "archive.zip"
    path.write_bytes(data)
    check_with_tools(path, list(expected))
