"""Backfill and compare benchmark: late data touching about 1% of the windows is repaired by
`lockstep backfill` and timed against a full recompute of the same table; `lockstep compare` is
timed on two ~60M-row tables next to DuckDB computing the same differences.

1. 5M generated events (20k users, 7 days); the events of a 40-minute spot in the middle of the
   week are held back: the rest becomes history version 0 (Delta), and `lockstep batch` writes
   the output Delta table from it.
2. The held-back events land (history version 1). `lockstep backfill` (RUNS times, each on a
   fresh copy of the output) vs `lockstep batch` recomputing the whole table (RUNS times).
3. The backfilled table must equal the full recompute: `lockstep compare` on the two Delta
   tables (~60M rows each), timed, with peak RSS.
4. `lockstep compare` vs DuckDB on the Parquet outputs before and after the late data: both
   must find the same rows only on one side and the same changed rows.

Writes the "## Backfill and compare" section of BENCHMARKS.md. Run through bench/repair.sh.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from batch_vs_peers import measure, replace_section  # noqa: E402

TITLE = "## Backfill and compare"


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.exit(f"failed: {' '.join(command)}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def duckdb_compare(left: str, right: str) -> dict:
    """The differences lockstep's compare reports, computed by DuckDB (a peer run)."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    values = ["window_end", "tx_count", "total_amount", "avg_amount", "max_amount", "unique_merchants", "purchases"]
    # Floats compared by their bits, as lockstep does (NaN equals NaN).
    differs = " OR ".join(
        f"l.{c}::VARCHAR IS DISTINCT FROM r.{c}::VARCHAR" if c in ("total_amount", "avg_amount", "max_amount")
        else f"l.{c} IS DISTINCT FROM r.{c}" for c in values
    )
    row = con.execute(
        f"""
        SELECT
          count(*) FILTER (WHERE r.user_id IS NULL AND r.window_start IS NULL),
          count(*) FILTER (WHERE l.user_id IS NULL AND l.window_start IS NULL),
          count(*) FILTER (WHERE l.window_start IS NOT NULL AND r.window_start IS NOT NULL AND ({differs}))
        FROM read_parquet('{left}') l
        FULL OUTER JOIN read_parquet('{right}') r
          ON l.user_id IS NOT DISTINCT FROM r.user_id AND l.window_start = r.window_start
        """
    ).fetchone()
    return {"only_left": row[0], "only_right": row[1], "changed": row[2]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lockstep", required=True)
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default="/tmp/lockstep-bench-repair")
    parser.add_argument("--report", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bin = args.lockstep
    events = work / "events.parquet"
    run([bin, "generate", "--events", str(args.events), "--users", "20000", "--days", "7", "--seed", "42",
         "--out", str(events), "--quiet"])

    # The late spot: 40 minutes in the middle of the week. Data is prepared by child processes:
    # this one stays small, so that the peak RSS of the processes it starts (inherited at fork)
    # is theirs alone.
    late_rows = int(run([sys.executable, __file__, "--split", str(events), str(work)]).strip())
    history = work / "history"
    run([sys.executable, __file__, "--write-delta", str(history), str(work / "ontime.parquet"), "overwrite"])

    definitions = work / "features.yaml"
    text = (ROOT / "examples/transactions.yaml").read_text()
    text = text.replace("delta: ../demo-out/lake/transactions", f"delta: {history}")
    text = text.replace("delta: ../demo-out/lake/features/user_velocity", f"delta: {work / 'out'}")
    definitions.write_text(text)
    feature = ["--feature", "user_velocity"]
    run([bin, "batch", str(definitions), *feature, "--quiet"])
    run([bin, "batch", str(definitions), *feature, "--out", str(work / "before.parquet"), "--quiet"])
    run([sys.executable, __file__, "--write-delta", str(history), str(work / "late.parquet"), "append"])
    shutil.copytree(work / "out", work / "out.v0")

    # Backfill (each run on a fresh copy of the output written from version 0) vs full recompute.
    backfill, full = [], []
    for i in range(args.runs):
        shutil.rmtree(work / "out")
        shutil.copytree(work / "out.v0", work / "out")
        wall, rss = measure([bin, "backfill", str(definitions), *feature, "--quiet"])
        backfill.append((wall, rss))
        wall, rss = measure([bin, "batch", str(definitions), *feature, "--out", str(work / "full"), "--quiet"])
        full.append((wall, rss))
    # The last backfill's own report: re-run it on a fresh copy to capture the text.
    shutil.rmtree(work / "out")
    shutil.copytree(work / "out.v0", work / "out")
    summary = run([bin, "backfill", str(definitions), *feature, "--quiet"])
    print(summary)

    # The backfilled table equals the full recompute (compare on two Delta tables).
    delta_compare = []
    for _ in range(args.runs):
        delta_compare.append(measure([bin, "compare", str(work / "out"), str(work / "full"), "--quiet",
                                      "--json", str(work / "delta.json")]))
    delta_report = json.loads((work / "delta.json").read_text())
    identical = delta_report["explained"] + delta_report["unexplained"] == 0

    # compare vs DuckDB on the Parquet outputs before and after the late data.
    run([bin, "batch", str(definitions), *feature, "--out", str(work / "after.parquet"), "--quiet"])
    ours, peer = [], []
    for _ in range(args.runs):
        # Exit status 1: the late data makes differences, unexplained without --late.
        ours.append(measure([bin, "compare", str(work / "before.parquet"), str(work / "after.parquet"), "--quiet",
                             "--json", str(work / "parquet.json")], allowed=(1,)))
        peer.append(measure([sys.executable, __file__, "--duckdb-compare", str(work / "before.parquet"),
                             str(work / "after.parquet"), str(work / "duckdb.json")]))
    mine = json.loads((work / "parquet.json").read_text())
    theirs = json.loads((work / "duckdb.json").read_text())
    mine_counts = {"only_left": mine["only_left"]["rows"], "only_right": mine["only_right"]["rows"],
                   "changed": mine["changed_rows"]}
    agree = mine_counts == theirs

    def med(values, i):
        return statistics.median(v[i] for v in values)

    ratio = med(backfill, 0) / med(full, 0)
    replaced = next((l for l in summary.splitlines() if "output rows in them" in l), "").strip().rstrip(":")
    written = next((l for l in summary.splitlines() if "replaced them" in l), "").strip()
    lines = [
        TITLE,
        "",
        f"`user_velocity` (1h windows every 1m; 6 aggregates) over {args.events:,} generated events (20,000 users,"
        f" 7 days). The {late_rows:,} events of a 40-minute spot in mid-week land late in the Delta history;"
        f" `lockstep backfill` repairs the output Delta table written before they landed, against"
        f" `lockstep batch` recomputing the whole table. {args.runs} runs each, run in turn in the same session;"
        f" medians. `bench/repair.sh` reproduces this.",
        "",
        "| job | median wall (s) | peak RSS (MiB) | vs full recompute |",
        "|---|---:|---:|---:|",
        f"| full recompute (`lockstep batch`, Delta out) | {med(full, 0):.2f} | {max(r for _, r in full) / 2**20:.0f} | 1.00× |",
        f"| `lockstep backfill` | {med(backfill, 0):.2f} | {max(r for _, r in backfill) / 2**20:.0f} | {ratio:.3f}× |",
        "",
        f"Backfill: {replaced}; {written}.",
        f"Check: `lockstep compare` of the backfilled table and the full recompute: "
        f"{'identical' if identical else 'DIFFERENT'} ({delta_report['matched']:,} rows matched).",
        "",
        "`lockstep compare` on two tables of about 60M rows (sort-merge join, 1 GiB memory limit, spilling beyond it):",
        "",
        "| comparison | median wall (s) | peak RSS (MiB) | vs lockstep (Parquet) |",
        "|---|---:|---:|---:|",
        f"| lockstep, Delta vs Delta ({delta_report['rows_left']:,} vs {delta_report['rows_right']:,} rows) | "
        f"{med(delta_compare, 0):.2f} | {max(r for _, r in delta_compare) / 2**20:.0f} | {med(delta_compare, 0) / med(ours, 0):.2f}× |",
        f"| lockstep, Parquet before vs after the late data ({mine['rows_left']:,} vs {mine['rows_right']:,}) | "
        f"{med(ours, 0):.2f} | {max(r for _, r in ours) / 2**20:.0f} | 1.00× |",
        f"| DuckDB, the same full outer join and bitwise differences | {med(peer, 0):.2f} | "
        f"{max(r for _, r in peer) / 2**20:.0f} | {med(peer, 0) / med(ours, 0):.2f}× |",
        "",
        f"Agreement: lockstep {mine_counts}, DuckDB {theirs}: {'agree' if agree else 'DISAGREE'}.",
        "",
        f"Runs (s): backfill {[round(w, 2) for w, _ in backfill]}; full {[round(w, 2) for w, _ in full]}; "
        f"compare Delta {[round(w, 2) for w, _ in delta_compare]}; compare Parquet {[round(w, 2) for w, _ in ours]}; "
        f"DuckDB {[round(w, 2) for w, _ in peer]}.",
        "",
        f"Machine: {os.cpu_count()} cores; duckdb {duckdb_version()}.",
    ]
    replace_section(Path(args.report), TITLE, "\n".join(lines))
    print("\n".join(lines))
    if not (identical and agree):
        sys.exit(1)


def duckdb_version() -> str:
    return run([sys.executable, "-c", "import duckdb; print(duckdb.__version__)"]).strip()


def split(events: str, work: str) -> None:
    """Writes the events of a 40-minute spot in mid-week to late.parquet and the rest to
    ontime.parquet; prints the number of late events."""
    import duckdb

    con = duckdb.connect()
    first = con.execute(f"SELECT epoch_ms(min(event_time)) FROM read_parquet('{events}')").fetchone()[0]
    spot_start = (first + int(3.5 * 86_400_000)) // 60_000 * 60_000
    inside = f"epoch_ms(event_time) >= {spot_start} AND epoch_ms(event_time) < {spot_start + 40 * 60_000}"
    for name, where in (("ontime", f"NOT ({inside})"), ("late", inside)):
        con.execute(f"COPY (SELECT * FROM read_parquet('{events}') WHERE {where}) TO '{work}/{name}.parquet'")
    print(con.execute(f"SELECT count(*) FROM read_parquet('{work}/late.parquet')").fetchone()[0])


def write_delta(table: str, parquet: str, mode: str) -> None:
    import pyarrow.parquet as pq
    from deltalake import write_deltalake

    write_deltalake(table, pq.read_table(parquet), mode=mode)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--split":
        split(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "--write-delta":
        write_delta(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 5 and sys.argv[1] == "--duckdb-compare":
        Path(sys.argv[4]).write_text(json.dumps(duckdb_compare(sys.argv[2], sys.argv[3])))
    else:
        main()
