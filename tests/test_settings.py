"""Settings from the environment (contract §6): defaults, parsing, and a clear exit on a bad one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from archiver.errors import SettingsError
from archiver.settings import load_settings

REQUIRED = {
    "SQS_SOURCE_QUEUE": "input-queue",
    "SQS_DESTINATION_QUEUE": "output-queue",
    "S3_SOURCE_BUCKET": "source-images",
    "S3_DESTINATION_BUCKET": "zip-storage",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(("SQS_", "S3_", "ARCHIVE_", "MAX_", "ALLOWED_", "APP_", "DEV_", "PART_")):
            monkeypatch.delenv(name)
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_defaults_match_the_contract(env: pytest.MonkeyPatch) -> None:
    """Unset settings take the contract's defaults; the source bucket alone is allowed."""
    settings = load_settings()
    assert settings.s3_file_prefix == "download"
    assert settings.archive_base_url is None
    assert settings.archive_link_endpoint is None
    assert settings.app_debug is False and settings.dev_mode is False
    assert settings.source_buckets == frozenset({"source-images"})
    assert settings.archive_url_expires == 604_800
    assert settings.max_files == 50_000
    assert settings.max_archive_bytes == 100 * 1024**3
    assert settings.part_size == 8 * 1024**2
    assert settings.prefetch_bytes == 12 * 1024**2
    assert settings.upload_concurrency == 4
    assert settings.visibility_timeout == 120
    assert settings.job_timeout == 21_600
    assert settings.shutdown_grace == 25
    assert settings.archive_checksum == "CRC32"


def test_values_are_parsed_from_the_environment(env: pytest.MonkeyPatch) -> None:
    """Comma lists, booleans, numbers and prefixes are read as operators write them."""
    env.setenv("ALLOWED_SOURCE_BUCKETS", " partner-a, partner-b ,")
    env.setenv("APP_DEBUG", "1")
    env.setenv("S3_FILE_PREFIX", "/exports/zips/")
    env.setenv("ARCHIVE_BASE_URL", "https://cdn.example.com/")
    env.setenv("ARCHIVE_LINK_ENDPOINT", "http://localhost:4566/")
    settings = load_settings()
    assert settings.source_buckets == frozenset({"partner-a", "partner-b", "source-images"})
    assert settings.app_debug is True
    assert settings.s3_file_prefix == "exports/zips"
    assert settings.archive_base_url == "https://cdn.example.com"
    assert settings.archive_link_endpoint == "http://localhost:4566"


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("PART_SIZE", "1024", "PART_SIZE"),
        ("ARCHIVE_URL_EXPIRES", "999999", "ARCHIVE_URL_EXPIRES"),
        ("UPLOAD_CONCURRENCY", "many", "UPLOAD_CONCURRENCY"),
        ("JOB_TIMEOUT", "50000", "JOB_TIMEOUT"),
        ("ARCHIVE_BASE_URL", "cdn.example.com", "ARCHIVE_BASE_URL"),
        ("ARCHIVE_LINK_ENDPOINT", "localhost:4566", "ARCHIVE_LINK_ENDPOINT"),
        ("EXPECTED_BUCKET_OWNER", "me", "EXPECTED_BUCKET_OWNER"),
        ("S3_FILE_PREFIX", "a/../b", "S3_FILE_PREFIX"),
        ("ARCHIVE_CHECKSUM", "CRC32C", "ARCHIVE_CHECKSUM"),
    ],
)
def test_wrong_values_name_the_setting(env: pytest.MonkeyPatch, name: str, value: str, said: str) -> None:
    """A wrong value raises SettingsError whose one line names the setting."""
    env.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert said in str(caught.value) and "\n" not in str(caught.value)


def test_missing_setting_exits_2_with_one_line(env: pytest.MonkeyPatch) -> None:
    """`archiver worker` without a required setting exits 2 at once with one line naming it."""
    env.delenv("SQS_SOURCE_QUEUE")
    done = subprocess.run(
        [sys.executable, "-m", "archiver", "worker"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "SQS_SOURCE_QUEUE is required" in done.stderr


def test_queue_url_is_used_as_given(stack: object) -> None:
    """A queue setting may be a name or a URL; a URL is used without a lookup."""
    from archiver.queue import resolve_queue_url
    from tests.conftest import Stack

    assert isinstance(stack, Stack)
    sqs = stack.clients.sqs
    assert resolve_queue_url(sqs, stack.source_queue) == stack.source_url
    assert (
        resolve_queue_url(sqs, "https://sqs.eu-west-1.amazonaws.com/1/q")
        == "https://sqs.eu-west-1.amazonaws.com/1/q"
    )


def test_empty_variables_mean_unset(env: pytest.MonkeyPatch) -> None:
    """`EXPECTED_BUCKET_OWNER=` (empty, as env files write it) is the default, not an invalid value."""
    env.setenv("EXPECTED_BUCKET_OWNER", "")
    env.setenv("ARCHIVE_BASE_URL", "")
    settings = load_settings()
    assert settings.expected_bucket_owner is None
    assert settings.archive_base_url is None


def test_crc64nvme_without_awscrt_names_the_extra_it_needs(env: pytest.MonkeyPatch) -> None:
    """ARCHIVE_CHECKSUM=CRC64NVME on an install without the crc64nvme extra: a wrong setting at start,
    naming what to install, not a failure at the first archive."""
    env.setitem(sys.modules, "awscrt", None)  # as if not installed
    env.setenv("ARCHIVE_CHECKSUM", "CRC64NVME")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "ARCHIVE_CHECKSUM" in str(caught.value) and "archiver[crc64nvme]" in str(caught.value)
    env.delitem(sys.modules, "awscrt")
    assert load_settings().archive_checksum == "CRC64NVME"
