"""The scenarios, their sources (generated deterministically, so two runs move the same bytes) and the
buckets they live in.

Incompressible sources are named like media (`.mp4`, `.jpg`) because that is what large incompressible
objects are in practice, and it is what makes archiver's `compression: auto` skip deflate for them; the
in-memory design is given the same courtesy (ZIP_STORED). The text scenario is deflated by both.
"""

from __future__ import annotations

import hashlib
import io
import random
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from boto3.s3.transfer import TransferConfig

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

KiB = 1024
MiB = 1024 * KiB
# Sources of at least this size go up as multipart (like any big object uploaded with an SDK). On
# SeaweedFS, as on S3 with boto3's defaults, they then carry a COMPOSITE CRC-32, not a full-object one:
# when archiver streams them it cannot write them STORED with a known CRC and uses deflate level 0
# instead, and when it copies them server-side (SERVER_SIDE_COPY_MIN_BYTES and up) it takes the CRC from
# the copied parts' checksums. Small sources (single PUTs) get a full-object CRC-32 and are STORED.
MULTIPART_SOURCE_THRESHOLD = 8 * MiB
QUICK_FACTOR = 16
# The methods a scenario runs unless --methods names others (bench/__main__.py lists them all).
DEFAULT_METHODS = ("raw", "inmemory", "archiver")
# Both of archiver's paths, next to the copy and the download they are compared with.
SERVER_SIDE_METHODS = ("raw", "archiver", "archiver-stream", "download")
# Issue #15 (bench/fanout.py): one worker with fan-out off; two, four and eight with it on (issue #23's
# curve); four with one SIGKILLed.
FANOUT_METHODS = ("fanout-1", "fanout-2", "fanout-4", "fanout-8", "fanout-4-kill")

Kind = Literal["random", "text"]
# Where requests, not bytes, set the pace: measured with and without S3-like latency.
REQUEST_BOUND_LATENCIES = (0.0, 20.0)


@dataclass(frozen=True)
class Source:
    key: str
    size: int
    crc32: int

    @property
    def entry_name(self) -> str:
        """The entry's name in every archive: the key's last segment, archiver's default."""
        return self.key.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    count: int
    size: int
    kind: Kind
    extension: str
    content_type: str
    methods: tuple[str, ...] = DEFAULT_METHODS
    # Delays added to the first byte of every S3 response (bench/latency.py), each a run of every method:
    # request-bound scenarios are measured as AWS users see them (S3 answers in tens of milliseconds).
    latencies_ms: tuple[float, ...] = (0,)

    @property
    def total_bytes(self) -> int:
        return self.count * self.size

    @property
    def compressible(self) -> bool:
        return self.kind == "text"

    @property
    def source_bucket(self) -> str:
        return f"bench-src-{self.name}"

    @property
    def destination_bucket(self) -> str:
        return f"bench-dst-{self.name}"

    def key(self, index: int) -> str:
        return f"{self.name}/{index:05d}.{self.extension}"

    def quick(self) -> Scenario:
        """A 1/16 smoke version. Big objects shrink (keeping their count, hence the shape of the run);
        many small ones become fewer (keeping their size, since per-object cost is what they measure)."""
        if self.size >= QUICK_FACTOR * MiB:
            return replace(self, size=self.size // QUICK_FACTOR, description=f"{self.description}, 1/16")
        return replace(
            self, count=max(1, self.count // QUICK_FACTOR), description=f"{self.description}, 1/16"
        )


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            "large",
            "4 × 256 MiB incompressible (.mp4), 1 GiB",
            4,
            256 * MiB,
            "random",
            "mp4",
            "video/mp4",
            methods=("raw", "inmemory", "archiver", "archiver-stream", "download"),
        ),
        Scenario(
            "small",
            "2,000 × 100 KiB incompressible images (.jpg)",
            2000,
            100 * KiB,
            "random",
            "jpg",
            "image/jpeg",
            latencies_ms=REQUEST_BOUND_LATENCIES,
        ),
        Scenario(
            "medium",
            "400 × 3 MiB incompressible photos (.jpg)",
            400,
            3 * MiB,
            "random",
            "jpg",
            "image/jpeg",
            latencies_ms=REQUEST_BOUND_LATENCIES,
        ),
        Scenario("text", "1 × 512 MiB pseudo-English text (.txt)", 1, 512 * MiB, "text", "txt", "text/plain"),
        Scenario(
            "huge", "12 × 256 MiB incompressible (.mp4), 3 GiB", 12, 256 * MiB, "random", "mp4", "video/mp4"
        ),
        # Issue #6's measurement of server-side assembly. No in-memory zip: it would hold 4 GiB, twice.
        Scenario(
            "xlarge",
            "4 × 1 GiB incompressible (.mp4), 4 GiB",
            4,
            1024 * MiB,
            "random",
            "mp4",
            "video/mp4",
            methods=SERVER_SIDE_METHODS,
        ),
        # Issue #15's measure of fan-out: each worker behind its own +20 ms, 12 MB/s-each-way proxy.
        Scenario(
            "fanout",
            "256 × 2 MiB incompressible photos (.jpg), 512 MiB, each worker via its own 12 MB/s +20 ms proxy",
            256,
            2 * MiB,
            "random",
            "jpg",
            "image/jpeg",
            methods=FANOUT_METHODS,
        ),
    )
}
# The pair whose archiver peak RSS must agree within 10%: 1 GiB against 3 GiB of the same kind of objects.
FLAT_MEMORY_PAIR = ("large", "huge")


# ------------------------------------------------------------------------------------------- generators


def random_bytes(seed: str, size: int) -> bytes:
    """Incompressible and reproducible: SHAKE-128 runs at ~330 MB/s here, as fast as os.urandom, and
    `random.randbytes` cannot make 256 MiB in one call."""
    return hashlib.shake_128(seed.encode()).digest(size)


# ~600 common English words. With Zipf-like weights (exponent 1.2) and sentences made of them, zlib
# level 1 reaches ~0.31 of the size and level 6 ~0.25: like real prose, not like one line repeated,
# which deflate would shrink to nothing and make compression look free.
_WORD_TEXT = """
the of and to a in is it you that he was for on are with as i his they be at one have this from or had by
hot word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down side
been now find any new work part take get place made live where after back little only round man year came
show every good me give our under name very through just form sentence great think say help low line differ
turn cause much mean before move right boy old too same tell does set three want air well also play small
end put home read hand port large spell add even land here must big high such follow act why ask men change
went light kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food sun four
between state keep eye never last let thought city tree cross farm hard start might story saw far sea draw
left late run while press close night real life few north open seem together next white children begin got
walk example ease paper group always music those both mark often letter until mile river car feet care second
book carry took science eat room friend began idea fish mountain stop once base hear horse cut sure watch
color face wood main enough plain girl usual young ready above ever red list though feel talk bird soon body
dog family direct pose leave song measure door product black short numeral class wind question happen
complete ship area half rock order fire south problem piece told knew pass since top whole king space heard
best hour better true during hundred five remember step early hold west ground interest reach fast verb sing
listen six table travel less morning ten simple several vowel toward war lay against pattern slow center love
person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly
fall lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty
drive stood contain front teach week final gave green oh quick develop ocean warm free minute strong special
mind behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry wonder
laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill east paint
language among
"""
WORDS = _WORD_TEXT.split()
_SENTENCES = 20_000
_SENTENCES_PER_DRAW = 10_000


def text_bytes(seed: str, size: int) -> bytes:
    """Pseudo-English lines from a seeded RNG: a pool of sentences drawn from the word list, then the
    text drawn from the pool (a 512 MiB text takes ~5 s rather than a minute word by word). The pool
    (~1.4 MB) is far larger than deflate's 32 KiB window, so repeats do not flatter the ratio."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** 1.2 for rank in range(len(WORDS))]
    rng.shuffle(weights)
    pool = []
    for _ in range(_SENTENCES):
        words = rng.choices(WORDS, weights, k=rng.randint(6, 16))
        pool.append((" ".join(words).capitalize() + rng.choice(".....?!,") + "\n").encode())
    out = bytearray()
    while len(out) < size:
        out += b"".join(rng.choices(pool, k=_SENTENCES_PER_DRAW))
    del out[size:]
    return bytes(out)


def generate(scenario: Scenario, index: int) -> bytes:
    seed = f"archiver-bench/{scenario.kind}/{scenario.size}/{index}"
    if scenario.kind == "text":
        return text_bytes(seed, scenario.size)
    return random_bytes(seed, scenario.size)


# ------------------------------------------------------------------------------------------- S3 side


def upload_sources(s3: S3Client, scenario: Scenario, *, part_size: int) -> list[Source]:
    """Create the scenario's buckets and upload its sources; returns them in request order with their
    sizes and CRC-32s, which the archive checks compare against."""
    for bucket in (scenario.source_bucket, scenario.destination_bucket):
        s3.create_bucket(Bucket=bucket)

    def upload(index: int) -> Source:
        data = generate(scenario, index)
        key = scenario.key(index)
        if len(data) >= MULTIPART_SOURCE_THRESHOLD:
            s3.upload_fileobj(
                io.BytesIO(data),
                scenario.source_bucket,
                key,
                ExtraArgs={"ContentType": scenario.content_type},
                Config=TransferConfig(
                    multipart_threshold=MULTIPART_SOURCE_THRESHOLD,
                    multipart_chunksize=part_size,
                    max_concurrency=4,
                ),
            )
        else:
            s3.put_object(
                Bucket=scenario.source_bucket, Key=key, Body=data, ContentType=scenario.content_type
            )
        return Source(key=key, size=len(data), crc32=zlib.crc32(data))

    if scenario.size >= MULTIPART_SOURCE_THRESHOLD:
        # One big object in memory at a time; its parts already go up in parallel.
        return [upload(index) for index in range(scenario.count)]
    # Small objects are bound by request latency: overlap them.
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(upload, range(scenario.count)))


def _keys(s3: S3Client, bucket: str) -> Iterator[str]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            yield item["Key"]


def drop_buckets(s3: S3Client, scenario: Scenario) -> None:
    """Delete every object, unfinished upload and both buckets of a scenario, so the next one starts on a
    clean server and the disk holds one scenario at a time."""
    for bucket in (scenario.source_bucket, scenario.destination_bucket):
        try:
            uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        except s3.exceptions.NoSuchBucket:
            continue
        for upload in uploads:
            s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        batch: list[str] = []
        for key in _keys(s3, bucket):
            batch.append(key)
            if len(batch) == 1000:
                _delete_batch(s3, bucket, batch)
                batch = []
        if batch:
            _delete_batch(s3, bucket, batch)
        s3.delete_bucket(Bucket=bucket)


def _delete_batch(s3: S3Client, bucket: str, keys: list[str]) -> None:
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True})
