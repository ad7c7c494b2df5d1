"""Batch benchmark: lockstep vs Polars (group_by_dynamic) vs DuckDB on the SPEC example feature
set (user_velocity: 1h windows every 1m) over generated transactions.

Measures each engine's wall time and peak memory (max RSS of the child process, via wait4) over
several runs in the same session, checks that the three outputs agree row for row, and writes
BENCHMARKS.md. Run through bench/run.sh, which prepares the Python environment and the binary.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH_TITLE = "## Batch"
ROOT = HERE.parent


def measure(command: list[str], allowed: tuple[int, ...] = (0,)) -> tuple[float, int]:
    """Runs a command; returns (wall seconds, peak RSS bytes) of that child alone. Exit codes
    outside `allowed` stop the benchmark. The previous run's output is flushed to disk first, so
    its writeback is not charged to this one."""
    os.sync()
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    stderr = child.stderr.read().decode() if child.stderr else ""
    if os.waitstatus_to_exitcode(status) not in allowed:
        sys.exit(f"failed: {' '.join(command)}\n{stderr}")
    return wall, usage.ru_maxrss * 1024


def replace_section(report: Path, title: str, text: str) -> None:
    """Replaces (or appends) the section of BENCHMARKS.md starting with `title`, keeping every
    other section (each benchmark script writes its own)."""
    previous = report.read_text() if report.exists() else "# Benchmarks\n"
    parts = previous.split("\n## ")
    head, sections = parts[0], ["## " + p for p in parts[1:]]
    kept = [s.rstrip("\n") + "\n" for s in sections if not s.startswith(title)]
    if title == BATCH_TITLE:
        kept.insert(0, text.rstrip("\n") + "\n")
    else:
        kept.append(text.rstrip("\n") + "\n")
    report.write_text("\n".join([head.rstrip("\n") + "\n"] + kept))


def agreement(lockstep_out: str, peer_out: str, peer: str) -> str:
    """Row-for-row comparison on (user_id, window_start); counts exact, floats to 1e-9."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    row = con.execute(
        f"""
        WITH l AS (SELECT user_id, epoch_ms(window_start) AS ws, * EXCLUDE (user_id, window_start) FROM read_parquet('{lockstep_out}')),
             p AS (SELECT user_id, epoch_ms(window_start) AS ws, * EXCLUDE (user_id, window_start) FROM read_parquet('{peer_out}'))
        SELECT
          (SELECT count(*) FROM l) AS left_rows,
          (SELECT count(*) FROM p) AS right_rows,
          count(*) FILTER (WHERE l.ws IS NULL) AS only_peer,
          count(*) FILTER (WHERE p.ws IS NULL) AS only_lockstep,
          count(*) FILTER (WHERE l.tx_count <> p.tx_count OR l.unique_merchants <> p.unique_merchants
                                 OR l.purchases <> p.purchases OR l.max_amount <> p.max_amount) AS exact_mismatch,
          count(*) FILTER (WHERE abs(l.total_amount - p.total_amount) > 1e-9 * abs(p.total_amount) + 1e-9
                                 OR abs(l.avg_amount - p.avg_amount) > 1e-9 * abs(p.avg_amount) + 1e-9) AS float_mismatch,
          count(*) FILTER (WHERE l.total_amount <> p.total_amount) AS sum_bits_differ,
          max(abs(l.total_amount - p.total_amount)) FILTER (WHERE NOT isnan(l.total_amount)) AS max_sum_diff
        FROM l FULL OUTER JOIN p ON l.user_id = p.user_id AND l.ws = p.ws
        """
    ).fetchone()
    left, right, only_peer, only_lockstep, exact_bad, float_bad, bits, max_diff = row
    ok = left == right and only_peer == 0 and only_lockstep == 0 and exact_bad == 0 and float_bad == 0
    verdict = "agree" if ok else "DISAGREE"
    return (
        f"{peer}: {verdict} — {left} lockstep rows, {right} {peer} rows, {only_lockstep} only in lockstep, "
        f"{only_peer} only in {peer}, {exact_bad} count/max mismatches, {float_bad} sum/avg beyond 1e-9; "
        f"{bits} sums differ in the last bits (largest {max_diff:.3g}: {peer} does not round sums exactly)"
    ), ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lockstep", required=True, help="path to the release lockstep binary")
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--report", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    events = work / f"events-{args.events}-{args.users}-{args.days}.parquet"
    if not events.exists():
        print(f"generating {events.name} …", flush=True)
        subprocess.run([args.lockstep, "generate", "--events", str(args.events), "--users", str(args.users),
                        "--days", str(args.days), "--seed", "1", "--out", str(events), "--quiet"], check=True)

    definitions = ROOT / "examples" / "transactions.yaml"
    commands = {
        "lockstep": [args.lockstep, "batch", str(definitions), "--feature", "user_velocity", "--history", str(events),
                     "--out", str(work / "lockstep.parquet"), "--quiet"],
        "polars": [sys.executable, str(HERE / "peers.py"), "polars", str(events), str(work / "polars.parquet")],
        "duckdb": [sys.executable, str(HERE / "peers.py"), "duckdb", str(events), str(work / "duckdb.parquet")],
    }
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for run in range(args.runs):
        for name, command in commands.items():
            wall, rss = measure(command)
            results[name].append((wall, rss))
            print(f"run {run + 1}: {name:8s} {wall:7.2f} s  {rss / 2**20:7.0f} MiB", flush=True)

    checks = [agreement(str(work / "lockstep.parquet"), str(work / f"{peer}.parquet"), peer) for peer in ("polars", "duckdb")]
    median = {name: (statistics.median(w for w, _ in runs), max(r for _, r in runs)) for name, runs in results.items()}
    base_wall = median["lockstep"][0]
    lines = [
        "# Benchmarks",
        "",
        "## Batch: the SPEC example feature set vs Polars and DuckDB",
        "",
        f"`user_velocity` (filter `amount > 0`; 1h windows every 1m; count, exact sum, avg, max, count distinct,"
        f" filtered count) over {args.events:,} generated events, {args.users:,} users, {args.days} days,"
        f" one Parquet file. Same machine, same session, {args.runs} runs each, run in turn;"
        f" wall time is the median, memory the largest peak RSS. `bench/run.sh` reproduces this.",
        "",
        "| engine | median wall (s) | peak RSS (MiB) | wall vs lockstep |",
        "|---|---:|---:|---:|",
    ]
    for name, (wall, rss) in median.items():
        lines.append(f"| {name} | {wall:.2f} | {rss / 2**20:.0f} | {wall / base_wall:.2f}× |")
    lines += ["", "Agreement (row for row on user_id + window_start):", ""]
    lines += [f"- {text}" for text, _ in checks]
    lines += ["", f"Machine: {os.cpu_count()} cores; Python {sys.version.split()[0]}; "
              f"polars {__import__('polars').__version__}; duckdb {__import__('duckdb').__version__}.", ""]
    # The title line and the section (other sections, e.g. from bench/stream.sh, are kept).
    replace_section(Path(args.report), BATCH_TITLE, "\n".join(lines[2:]))
    print("\n".join(lines))
    if not all(ok for _, ok in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
