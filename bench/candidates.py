"""`python -m bench.candidates [--latency-ms 0,20] [--clients boto3:8,obstore-async:64,...] [--repeat N]`:
how fast can one process GET many small (or, `--scenario medium`, 3 MiB) objects, and at what CPU per
request? The measurement behind
archiver's choice of reader for small sources (issue 14), kept so the choice can be re-checked.

It starts SeaweedFS (and moto, unused), uploads the `small` scenario's sources (2,000 x 100 KiB), and
for every latency and client runs bench/getters.py in its own subprocess: every key GET, bodies read
whole. Printed: seconds, GETs/s, and the client process's CPU per GET (user + system, the GET loop only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import scenarios, servers
from bench.scenarios import SCENARIOS

DEFAULT_CLIENTS = (
    "boto3:8,boto3:32,boto3:64,obstore-threads:8,obstore-threads:64,"
    "obstore-async:8,obstore-async:32,obstore-async:64,obstore-async:128"
)


REPO = Path(__file__).resolve().parent.parent


def measure(
    endpoints: servers.Endpoints, s3_url: str, client: str, in_flight: int, spec: Path, python: str
) -> dict:
    result = spec.with_suffix(f".{client}-{in_flight}.json")
    env = servers.child_env({**endpoints.aws_env(), "AWS_ENDPOINT_URL_S3": s3_url})
    done = subprocess.run(
        [python, "-m", "bench.getters", client, str(in_flight), str(spec), str(result)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode:
        return {"error": done.returncode, "stderr": done.stderr.strip()[-2000:]}
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.candidates")
    parser.add_argument("--latency-ms", default="0,20")
    parser.add_argument("--clients", default=DEFAULT_CLIENTS)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--scenario", default="small", choices=("small", "medium"), help="whose sources")
    parser.add_argument("--count", type=int, help="how many of them (default: all)")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter of the clients (aiobotocore needs its own venv)"
    )
    args = parser.parse_args(argv)
    latencies = [float(value) for value in args.latency_ms.split(",")]
    clients = [(name, int(n)) for name, _, n in (item.partition(":") for item in args.clients.split(","))]
    scenario = SCENARIOS[args.scenario]
    scenario = type(scenario)(**{**scenario.__dict__, "count": args.count or scenario.count})
    rows: dict[tuple[float, str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="archiver-candidates-") as tmp:
        workdir = Path(tmp)
        with servers.stack(workdir) as endpoints:
            s3 = endpoints.s3_client(max_connections=16)
            sources = scenarios.upload_sources(s3, scenario, part_size=8 * 1024 * 1024)
            spec = workdir / "spec.json"
            spec.write_text(json.dumps({"bucket": scenario.source_bucket, "keys": [s.key for s in sources]}))
            for latency in latencies:
                with servers.latency_proxy(endpoints.s3, latency, workdir) as s3_url:
                    for _ in range(args.repeat):
                        for name, in_flight in clients:
                            outcome = measure(endpoints, s3_url, name, in_flight, spec, args.python)
                            rows.setdefault((latency, name, in_flight), []).append(outcome)
                            print(f"bench: {latency:g} ms {name}:{in_flight} {outcome}", file=sys.stderr)
    print(f"\n{'latency':>8} {'client':<18} {'in flight':>9} {'seconds':>8} {'GETs/s':>8} {'CPU ms/GET':>10}")
    for (latency, name, in_flight), outcomes in rows.items():
        good = [o for o in outcomes if "seconds" in o]
        if not good:
            print(f"{latency:>6g} ms {name:<18} {in_flight:>9} failed: {outcomes[0].get('error')}")
            continue
        seconds = statistics.median(o["seconds"] for o in good)
        cpu = statistics.median(o["cpu_seconds"] / o["gets"] for o in good)
        print(
            f"{latency:>6g} ms {name:<18} {in_flight:>9} {seconds:>8.2f} {good[0]['gets'] / seconds:>8.0f} "
            f"{cpu * 1000:>10.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
