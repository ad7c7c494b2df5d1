"""One peer engine computing the SPEC example feature set (user_velocity) over a Parquet file.

Run as a child process by batch_vs_peers.py so that each engine's wall time and peak memory are
measured the same way. Usage: peers.py polars|duckdb EVENTS.parquet OUT.parquet
"""

import sys


def polars_run(events: str, out: str) -> None:
    import polars as pl

    frame = (
        pl.scan_parquet(events)
        .filter(pl.col("amount") > 0)
        .select("user_id", "merchant_id", "amount", "event_type", "event_time")
        .sort("user_id", "event_time")
        .collect()
    )
    # Windows of 1h every 1m aligned to the epoch: Polars only starts windows at or after the
    # truncated first event, so an offset of -59m also yields the windows that start before it.
    result = (
        frame.group_by_dynamic(
            "event_time",
            every="1m",
            period="1h",
            offset="-59m",
            group_by="user_id",
            closed="left",
            label="left",
            start_by="window",
        )
        .agg(
            pl.len().alias("tx_count"),
            pl.col("amount").sum().alias("total_amount"),
            pl.col("amount").mean().alias("avg_amount"),
            pl.col("amount").nan_max().alias("max_amount"),  # SQL order: NaN above every number
            pl.col("merchant_id").drop_nulls().n_unique().alias("unique_merchants"),
            (pl.col("event_type") == "purchase").sum().cast(pl.Int64).alias("purchases"),
        )
        .rename({"event_time": "window_start"})
        .filter(pl.col("tx_count") > 0)
    )
    result.write_parquet(out)


def duckdb_run(events: str, out: str) -> None:
    import duckdb

    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET enable_progress_bar = false")
    con.execute(
        f"""
        COPY (
          WITH ev AS (
            SELECT user_id, merchant_id, amount, event_type, epoch_ms(event_time) AS t
            FROM read_parquet('{events}') WHERE amount > 0
          ),
          win AS (
            SELECT *, unnest(range(((t // 60000) - 59) * 60000, (t // 60000) * 60000 + 1, 60000)) AS ws
            FROM ev
          )
          SELECT user_id, make_timestamp(ws * 1000) AS window_start,
                 count(*) AS tx_count, sum(amount) AS total_amount, avg(amount) AS avg_amount,
                 max(amount) AS max_amount, count(DISTINCT merchant_id) AS unique_merchants,
                 count(*) FILTER (WHERE event_type = 'purchase') AS purchases
          FROM win GROUP BY user_id, ws
        ) TO '{out}' (FORMAT parquet)
        """
    )


if __name__ == "__main__":
    engine, events, out = sys.argv[1:4]
    {"polars": polars_run, "duckdb": duckdb_run}[engine](events, out)
