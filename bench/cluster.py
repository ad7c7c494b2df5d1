"""Batch on a Ballista cluster vs in-process: `lockstep batch` of the SPEC feature set over 5M
generated events (20k users, 7 days), once in this process and once on a local cluster of a
`lockstep scheduler` and two `lockstep executor`s (one task slot each, so both runs have the
machine's two cores), RUNS times each, alternating. The outputs must be identical (`lockstep
compare`, bit for bit). Where the cluster's time goes comes from the scheduler's and executors'
logs of the last run: per stage the tasks, their summed time and the stage's wall span, and the
client's share before the job is queued and after it finishes (fetching the rows and writing
Parquet).

Writes the "## Cluster" section of BENCHMARKS.md. Run through bench/cluster.sh.
"""

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from batch_vs_peers import measure, replace_section  # noqa: E402

TITLE = "## Cluster"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, child: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if child.poll() is not None or time.time() > deadline:
                sys.exit(f"a cluster process did not start (port {port})")
            time.sleep(0.1)


def stamp(line: str) -> float:
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()


def where_time_goes(scheduler_log: Path, executor_logs: list[Path], job_started: float, job_ended: float) -> list[str]:
    """Per stage of the last job: tasks, summed task seconds and wall span; and the client's share."""
    lines = [ANSI.sub("", l) for l in scheduler_log.read_text().splitlines()]
    queued = [l for l in lines if "Job queued" in l]
    finished = [l for l in lines if "Job finished successfully" in l]
    job = re.search(r"\[(\w+)\]", queued[-1]).group(1)
    t_queued, t_finished = stamp(queued[-1]), stamp(finished[-1])
    starts, spans = {}, {}
    for log in executor_logs:
        for line in (ANSI.sub("", l) for l in log.read_text().splitlines()):
            m = re.search(r"(Execute|Finished) task\s*: \[TID (\w+)/(\d+)\.\d+/(\d+)\.\d+\](?: in ([\d.]+)(ms|s))?", line)
            if not m or m.group(2) != job:
                continue
            stage = int(m.group(3))
            if m.group(1) == "Execute":
                starts.setdefault(stage, []).append(stamp(line))
            else:
                took = float(m.group(5)) / (1000 if m.group(6) == "ms" else 1)
                spans.setdefault(stage, []).append((stamp(line), took))
    what = {
        1: "scan, filter, stage projection, hash shuffle write by key",
        2: "shuffle read, sort by key and time, window stage",
        3: "ordered merge into one partition",
    }
    rows = [
        "| part | tasks | task time (summed) | wall |",
        "|---|---:|---:|---:|",
        f"| client: open the history, plan, submit | | | {t_queued - job_started:.2f} s |",
    ]
    for stage in sorted(spans):
        first, last = min(starts.get(stage, [t_queued])), max(t for t, _ in spans[stage])
        total = sum(took for _, took in spans[stage])
        rows.append(
            f"| stage {stage}: {what.get(stage, '')} | {len(spans[stage])} | {total:.2f} s | {last - first:.2f} s |"
        )
    rows.append(f"| client: fetch the rows, check their order, write Parquet | | | {job_ended - t_finished:.2f} s |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lockstep", required=True)
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default="/tmp/lockstep-bench-cluster")
    parser.add_argument("--report", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bin = args.lockstep
    events = str(work / "events.parquet")
    subprocess.run([bin, "generate", "--events", str(args.events), "--users", "20000", "--days", "7", "--seed", "42",
                    "--out", events, "--quiet"], check=True)
    definitions = str(ROOT / "examples" / "transactions.yaml")

    env = dict(os.environ, LOCKSTEP_LOG="info")
    port = free_port()
    processes = []
    scheduler_log = work / "scheduler.log"
    scheduler = subprocess.Popen([bin, "scheduler", "--listen", f"127.0.0.1:{port}"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=scheduler_log.open("w"))
    processes.append(scheduler)
    wait_for(port, scheduler)
    executor_logs = []
    for i in range(2):
        flight, grpc = free_port(), free_port()
        log = work / f"executor-{i}.log"
        executor_logs.append(log)
        executor = subprocess.Popen(
            [bin, "executor", "--scheduler", f"127.0.0.1:{port}", "--port", str(flight), "--grpc-port", str(grpc),
             "--slots", "1", "--memory-limit", "1GiB", "--work-dir", str(work / f"executor-{i}")],
            env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        processes.append(executor)
        wait_for(flight, executor)
    time.sleep(6)  # both executors registered (first heartbeats in)

    try:
        local, remote = str(work / "local.parquet"), str(work / "cluster.parquet")
        batch = [bin, "batch", definitions, "--feature", "user_velocity", "--history", events, "--quiet"]
        in_process, on_cluster = [], []
        for _ in range(args.runs):
            in_process.append(measure(batch + ["--out", local]))
            started = time.time()
            on_cluster.append(measure(batch + ["--out", remote, "--cluster", f"df://127.0.0.1:{port}",
                                               "--partitions", "2"]))
            ended = time.time()
        compared = subprocess.run([bin, "compare", local, remote], capture_output=True, text=True)
        if compared.returncode != 0 or "differences: 0" not in compared.stdout:
            sys.exit(f"the cluster's output differs from the in-process output:\n{compared.stdout}{compared.stderr}")
        matched = re.search(r"matched on .*?: (\d+) rows", compared.stdout).group(1)
        breakdown = where_time_goes(scheduler_log, executor_logs, started, ended)
        executor_peaks = []
        for p in processes[1:]:
            status = Path(f"/proc/{p.pid}/status").read_text()
            executor_peaks.append(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024)
    finally:
        for p in processes:
            p.kill()
            p.wait()

    def med(xs):
        return statistics.median(x[0] for x in xs)

    gib = 1 << 20
    text = "\n".join([
        TITLE,
        "",
        f"`lockstep batch` of `user_velocity` (1h windows every 1m, 6 aggregates) over {args.events:,} generated",
        "events (20,000 users, 7 days) to Parquet: in this process (2 partitions) vs a local cluster of one",
        "`lockstep scheduler` and two `lockstep executor`s with one task slot each (`--partitions 2`), on the",
        f"same 2-core machine, {args.runs} runs each, alternating. Medians; peak RSS of the command itself.",
        "",
        "| run | median wall | runs | client peak RSS |",
        "|---|---:|---|---:|",
        f"| in-process | {med(in_process):.2f} s | {' / '.join(f'{w:.2f}' for w, _ in in_process)} | "
        f"{max(r for _, r in in_process) // gib} MiB |",
        f"| cluster of 2 executors | {med(on_cluster):.2f} s | {' / '.join(f'{w:.2f}' for w, _ in on_cluster)} | "
        f"{max(r for _, r in on_cluster) // gib} MiB |",
        "",
        f"Ratio cluster / in-process: **{med(on_cluster) / med(in_process):.2f}×**. Executors' peak RSS: "
        + ", ".join(f"{p // gib} MiB" for p in executor_peaks) + ".",
        f"Outputs identical bit for bit (`lockstep compare`: {int(matched):,} rows matched, 0 differences).",
        "",
        "Where the cluster's time goes (last run, from the scheduler's and executors' logs):",
        "",
        *breakdown,
        "",
    ])
    replace_section(Path(args.report), TITLE, text)
    print(text)


if __name__ == "__main__":
    main()
