//! A float column whose only number is repeated, next to NaN: Parquet min/max statistics leave
//! NaN out (min = max = the number), and a reader trusting them as "constant column" would
//! return the number in place of NaN. The batch job must read the NaN, from Parquet and Delta.

mod common;

use common::{Cell, Event, batch, definitions, run_batch, write_parquet};
use lockstep_features::Location;

fn events() -> Vec<Event> {
    [(1.5, 0), (f64::NAN, 1_000), (1.5, 2_000)]
        .into_iter()
        .map(|(amount, time)| Event {
            user: Some("u".into()),
            merchant: Some("m".into()),
            amount: Some(amount),
            qty: Some(1),
            kind: "purchase".into(),
            time: Some(time),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_survives_min_max_statistics_in_parquet_and_delta() {
    let dir = tempfile::tempdir().unwrap();
    let parquet = dir.path().join("events.parquet");
    write_parquet(&parquet, &events());
    let delta = dir.path().join("delta");
    std::fs::create_dir_all(&delta).unwrap();
    let table = deltalake::DeltaTable::try_from_url(url::Url::from_directory_path(&delta).unwrap()).await.unwrap();
    table.write(vec![batch(&events())]).await.unwrap();
    let definitions = definitions("{ tumbling: 1h }", None);
    for history in [Location::Parquet(parquet.display().to_string()), Location::Delta(delta.display().to_string())] {
        let rows = run_batch(&definitions, history.clone(), 1).await.unwrap();
        assert_eq!(rows.len(), 1);
        // total, mean, low, high: NaN propagates through sum/avg and is the largest for max.
        let values = &rows[0].values;
        let nan = Cell::float(f64::NAN);
        assert_eq!((&values[2], &values[3], &values[5]), (&nan, &nan, &nan), "{history:?}: {values:?}");
        assert_eq!(values[4], Cell::float(1.5), "{history:?}: min skips NaN");
    }
}
