"""`python -m bench`: archiver's throughput and peak memory against a disk-backed S3 (SeaweedFS) and SQS
(moto's server), next to a plain copy and the original service's in-memory design.

Every measured method runs in its own subprocess, so its peak RSS is its own and nothing else's.

| module | owns |
|---|---|
| `bench/tuning.py` | part size, upload concurrency, prefetch in one place; archiver's defaults by default |
| `bench/servers.py` | SeaweedFS and moto as subprocesses on free loopback ports; readiness; clean stop |
| `bench/scenarios.py` | the scenarios, their generated sources, uploading them and clearing buckets |
| `bench/methods.py` | the methods (raw, inmemory, download, archiver, archiver-stream), each a subprocess |
| `bench/fanout.py` | the fan-out scenario's runs: several long-running workers, each behind its own proxy |
| `bench/latency.py` | the proxy in front of S3: +N ms to every first byte of a response, a bandwidth cap |
| `bench/children.py` | the raw copy, in-memory zip and download as they run inside their subprocess |
| `bench/meter.py` | counting the bytes a measured process's sockets receive and send |
| `bench/verify.py` | downloading an archive and checking entries, sizes and CRCs |
| `bench/profile.py` | an extra, unmeasured archiver run under py-spy, summarised as top frames |
| `bench/report.py` | the tables, ratios, target checks and the JSON file in `bench/results/` |
| `bench/planning.py` | `python -m bench.planning`: reading and planning each hostile or huge request shape |
"""
