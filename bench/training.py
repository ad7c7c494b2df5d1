"""Training-set benchmark: `lockstep training-set` vs DuckDB building the same point-in-time
table (SPEC §6) for 1M labels over 5M generated events, with row-for-row agreement checked.

Labels: random users (a few never seen) at random times over the week (a few before the first
event and after the last). The feature set is `user_velocity` of examples/transactions.yaml (1h
windows every 1m, serving delay 30 s): a label at `t` takes the window ending at
`E = floor((t − 30 s) / 1m) · 1m`. DuckDB gets the same definition as a range join.

Writes the "## Training sets" section of BENCHMARKS.md. Run through bench/training.sh.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from batch_vs_peers import measure, replace_section  # noqa: E402

TITLE = "## Training sets"


def duckdb_run(events: str, labels: str, out: str) -> None:
    import duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    con.execute("SET preserve_insertion_order = true")
    con.execute(
        f"""
        COPY (
          WITH l AS (
            SELECT *, (floor((epoch_ms(label_time) - 30000) / 60000) * 60000)::BIGINT AS e
            FROM read_parquet('{labels}')
          ),
          ev AS (
            SELECT user_id, merchant_id, amount, event_type, epoch_ms(event_time) AS t
            FROM read_parquet('{events}') WHERE amount > 0
          )
          SELECT l.label_id, l.user_id, l.label_time, l.is_fraud,
                 count(ev.t) AS user_velocity__tx_count,
                 sum(ev.amount) AS user_velocity__total_amount,
                 avg(ev.amount) AS user_velocity__avg_amount,
                 max(ev.amount) AS user_velocity__max_amount,
                 count(DISTINCT ev.merchant_id) AS user_velocity__unique_merchants,
                 count(ev.t) FILTER (WHERE ev.event_type = 'purchase') AS user_velocity__purchases
          FROM l LEFT JOIN ev ON ev.user_id = l.user_id AND ev.t >= l.e - 3600000 AND ev.t < l.e
          GROUP BY ALL
          ORDER BY l.label_id
        ) TO '{out}' (FORMAT parquet)
        """
    )


def agreement(ours: str, theirs: str) -> tuple[str, bool]:
    import duckdb

    con = duckdb.connect()
    row = con.execute(
        f"""
        SELECT count(*),
          count(*) FILTER (WHERE a.label_id IS NULL OR b.label_id IS NULL),
          count(*) FILTER (WHERE a.user_velocity__tx_count <> b.user_velocity__tx_count
                            OR a.user_velocity__purchases <> b.user_velocity__purchases
                            OR a.user_velocity__unique_merchants <> b.user_velocity__unique_merchants
                            OR a.user_velocity__max_amount IS DISTINCT FROM b.user_velocity__max_amount),
          count(*) FILTER (WHERE abs(a.user_velocity__total_amount - b.user_velocity__total_amount)
                                 > 1e-9 * greatest(1, abs(b.user_velocity__total_amount))
                            OR (a.user_velocity__total_amount IS NULL) <> (b.user_velocity__total_amount IS NULL)),
          count(*) FILTER (WHERE a.user_velocity__total_amount <> b.user_velocity__total_amount),
          count(*) FILTER (WHERE a.user_velocity__tx_count > 0)
        FROM read_parquet('{ours}') a FULL JOIN read_parquet('{theirs}') b ON a.label_id = b.label_id
        """
    ).fetchone()
    total, missing, exact_mismatch, sum_mismatch, last_bits, with_window = row
    ok = missing == 0 and exact_mismatch == 0 and sum_mismatch == 0
    text = (
        f"{total:,} labels, {with_window:,} with a window; {missing} missing on either side, "
        f"{exact_mismatch} count/max/distinct mismatches, {sum_mismatch} sums beyond 1e-9; "
        f"{last_bits:,} sums differ in the last bits (DuckDB does not round sums exactly)"
    )
    return text, ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lockstep", required=True)
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--labels", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default="/tmp/lockstep-bench-training")
    parser.add_argument("--report", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    events, labels = work / "events.parquet", work / "labels.parquet"
    subprocess.run([args.lockstep, "generate", "--events", str(args.events), "--users", "20000", "--days", "7",
                    "--seed", "42", "--out", str(events), "--quiet"], check=True)
    subprocess.run([sys.executable, __file__, "--labels", str(labels), str(args.labels)], check=True)

    ours, peer = [], []
    for _ in range(args.runs):
        ours.append(measure([args.lockstep, "training-set", str(ROOT / "examples/transactions.yaml"),
                             "--labels", str(labels), "--features", "user_velocity", "--history", str(events),
                             "--out", str(work / "lockstep.parquet"), "--quiet"]))
        peer.append(measure([sys.executable, __file__, "--duckdb", str(events), str(labels),
                             str(work / "duckdb.parquet")]))
    text, ok = agreement(str(work / "lockstep.parquet"), str(work / "duckdb.parquet"))
    import duckdb

    wall = statistics.median(w for w, _ in ours)
    peer_wall = statistics.median(w for w, _ in peer)
    lines = [
        TITLE,
        "",
        f"`lockstep training-set` for {args.labels:,} labels (random users, a few never seen; random times over"
        f" the week, a few before the first event and after the last) over {args.events:,} generated events"
        f" (20,000 users, 7 days), feature set `user_velocity` (1h windows every 1m, serving delay 30 s), next to"
        f" DuckDB computing the same table as a range join. {args.runs} runs each, in turn, same session;"
        f" medians, peak RSS the largest. `bench/training.sh` reproduces this.",
        "",
        "| engine | median wall (s) | peak RSS (MiB) | wall vs lockstep |",
        "|---|---:|---:|---:|",
        f"| lockstep | {wall:.2f} | {max(r for _, r in ours) / 2**20:.0f} | 1.00× |",
        f"| duckdb | {peer_wall:.2f} | {max(r for _, r in peer) / 2**20:.0f} | {peer_wall / wall:.2f}× |",
        "",
        f"Agreement (row for row on the label): {'agree' if ok else 'DISAGREE'} — {text}.",
        "",
        f"Runs (s): lockstep {[round(w, 2) for w, _ in ours]}; DuckDB {[round(w, 2) for w, _ in peer]}.",
        "",
        f"Machine: {os.cpu_count()} cores; duckdb {duckdb.__version__}.",
    ]
    replace_section(Path(args.report), TITLE, "\n".join(lines))
    print("\n".join(lines))
    if not ok:
        sys.exit(1)


def make_labels(path: str, n: int) -> None:
    import duckdb

    con = duckdb.connect()
    con.execute(
        f"""
        COPY (
          SELECT i AS label_id,
                 CASE WHEN hash(i, 1) % 100 = 0 THEN 'never-seen' ELSE printf('u%06d', 1 + hash(i, 2) % 20000) END
                   AS user_id,
                 make_timestamp((1767571200000 - 3600000 + (hash(i, 3) % (7 * 86400000 + 7200000))::BIGINT) * 1000)
                   AS label_time,
                 (hash(i, 4) % 100 < 2)::INTEGER AS is_fraud
          FROM range({n}) t(i) ORDER BY hash(i, 5)
        ) TO '{path}' (FORMAT parquet)
        """
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--labels":
        make_labels(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "--duckdb":
        duckdb_run(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
