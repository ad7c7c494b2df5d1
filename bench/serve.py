"""Serving benchmark: `lockstep serve` read latency with two concurrent clients.

The online store is filled by a real streaming run (`lockstep stream --online`, from the Kafka
and Redis that scripts/services.sh starts) over generated events; then `lockstep serve` answers
GET requests for random users at the time of the latest windows, from two client threads with
keep-alive connections, for SECONDS seconds. Latency is measured by the clients (request written
to response read). Writes the "## Serving" section of BENCHMARKS.md. Run through bench/serve.sh.
"""

import argparse
import http.client
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from batch_vs_peers import replace_section  # noqa: E402

TITLE = "## Serving"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(port: int, users: list[str], at: int, until: float, out: list[float]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    rng = random.Random(len(out))
    while time.perf_counter() < until:
        user = rng.choice(users)
        started = time.perf_counter()
        connection.request("GET", f"/v1/features/user_velocity/{user}?at={at}")
        response = connection.getresponse()
        response.read()
        out.append(time.perf_counter() - started)
        if response.status != 200:
            sys.exit(f"status {response.status}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lockstep", required=True)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--work", default="/tmp/lockstep-bench-serve")
    parser.add_argument("--report", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    brokers, redis = os.environ["KAFKA_BROKERS"], os.environ["REDIS_URL"]
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tag = str(int(time.time()))
    topic = f"serve-bench-{tag}"
    definitions = work / "features.yaml"
    text = (ROOT / "examples/transactions.yaml").read_text()
    definitions.write_text(text.replace("topic: transactions", f"topic: {topic}")
                           .replace("topic: feature_updates", f"topic: {topic}.windows"))
    events = work / "events.jsonl"
    subprocess.run([args.lockstep, "generate", "--events", str(args.events), "--users", "2000", "--days", "1",
                    "--out", str(events), "--quiet"], check=True)
    subprocess.run([args.lockstep, "produce", str(events), "--brokers", brokers, "--topic", topic, "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run([args.lockstep, "stream", str(definitions), "--feature", "user_velocity", "--brokers", brokers,
                    "--group", f"g-{topic}", "--until-idle", "3s", "--online", redis, "--quiet"], check=True,
                   stdout=subprocess.DEVNULL)
    # Read at the end of the day: every user's latest hour is in the store.
    at = 1767571200000 + 86_400_000 + 30_000
    users = [f"u{i:06d}" for i in range(1, 2001)]
    port = free_port()
    server = subprocess.Popen([args.lockstep, "serve", str(definitions), "--listen", f"127.0.0.1:{port}",
                               "--online", redis], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                http.client.HTTPConnection("127.0.0.1", port).request("GET", "/metrics")
                break
            except OSError:
                time.sleep(0.1)
        # Warm up, then two clients at once.
        warm: list[float] = []
        client(port, users, at, time.perf_counter() + 2, warm)
        samples: list[list[float]] = [[], []]
        until = time.perf_counter() + args.seconds
        threads = [threading.Thread(target=client, args=(port, users, at, until, s)) for s in samples]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait()
    latencies = sorted(x for s in samples for x in s)
    p50 = latencies[len(latencies) // 2] * 1e3
    p99 = latencies[int(len(latencies) * 0.99)] * 1e3
    rate = len(latencies) / args.seconds
    lines = [
        TITLE,
        "",
        f"`lockstep serve` answering `GET /v1/features/user_velocity/{{user}}?at=...` for random users (2,000 keys"
        f" whose windows a real streaming run over {args.events:,} events wrote to Redis), two client threads with"
        f" keep-alive connections for {args.seconds:.0f} s, latency measured by the clients (Python http.client,"
        f" request written to response read). `bench/serve.sh` reproduces this.",
        "",
        "| requests | requests/s | p50 (ms) | p99 (ms) | max (ms) |",
        "|---:|---:|---:|---:|---:|",
        f"| {len(latencies):,} | {rate:,.0f} | {p50:.3f} | {p99:.3f} | {latencies[-1] * 1e3:.3f} |",
        "",
        f"Machine: {os.cpu_count()} cores; Redis on the same machine; the clients share the cores with the server.",
    ]
    replace_section(Path(args.report), TITLE, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
