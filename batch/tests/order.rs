//! Order independence: the same events, shuffled and split over several Parquet files, or stored
//! in a Delta table, give bit-identical output, whatever the number of partitions.

mod common;

use arrow::array::RecordBatch;
use arrow::compute::{concat_batches, take};
use common::{Row, rows_of};
use lockstep_batch::{BatchJob, SessionLimits};
use lockstep_features::{Definitions, Location, compile_feature};
use lockstep_fixtures::{EventGenerator, GenerateOptions, OutputFormat, transactions_schema, write_events};

const DEFINITIONS: &str = r#"
sources:
  transactions:
    schema: { user_id: string, merchant_id: string, amount: float64, event_type: string, event_time: timestamp, ingest_time: timestamp }
    event_time: event_time
features:
  velocity:
    source: transactions
    key: [user_id]
    filter: "amount > 0"
    window: { sliding: 1h, every: 5m, offset: 1m }
    aggregations:
      tx_count: count(*)
      total_amount: sum(amount)
      avg_amount: avg(amount)
      max_amount: max(amount)
      unique_merchants: count(distinct merchant_id)
      purchases: count(*) FILTER (WHERE event_type = 'purchase')
      sd: stddev(amount)
      first_merchant: first(merchant_id)
      last_merchant: last(merchant_id)
  sessions:
    source: transactions
    key: [user_id]
    window: { session: 20m }
    aggregations:
      n: count(*)
      total: sum(amount)
      var_amount: var(amount)
      low: min(amount)
      last_seen: max(event_time)
"#;

fn options() -> GenerateOptions {
    GenerateOptions { events: 30_000, users: 300, days: 2, seed: 7, late_rate: 0.05, ..GenerateOptions::default() }
}

/// All generated events in one batch.
fn all_events() -> RecordBatch {
    let batches: Vec<RecordBatch> = EventGenerator::new(options()).collect();
    concat_batches(&transactions_schema(), &batches).unwrap()
}

fn write(path: &std::path::Path, batch: &RecordBatch) {
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(batch).unwrap();
    writer.close().unwrap();
}

/// The events in a scrambled order, split into three files.
fn write_shuffled(dir: &std::path::Path, batch: &RecordBatch) {
    let n = batch.num_rows() as u64;
    // A fixed permutation: i ↦ i·p mod n with p coprime to n.
    let p = (1..n).rev().find(|p| gcd(*p, n) == 1 && *p > n / 2).unwrap_or(1);
    let order: Vec<u64> = (0..n).map(|i| (i * p) % n).collect();
    let indices = arrow::array::UInt64Array::from(order);
    let columns = batch.columns().iter().map(|c| take(c, &indices, None).unwrap()).collect();
    let shuffled = RecordBatch::try_new(batch.schema(), columns).unwrap();
    let third = shuffled.num_rows() / 3;
    for (i, (offset, len)) in
        [(0, third), (third, third), (2 * third, shuffled.num_rows() - 2 * third)].into_iter().enumerate()
    {
        write(&dir.join(format!("part-{i}.parquet")), &shuffled.slice(offset, len));
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

async fn run(feature: &str, history: Location, partitions: usize) -> Vec<Row> {
    let definitions = Definitions::parse("order.yaml", DEFINITIONS, std::path::Path::new(".")).unwrap();
    let compiled = compile_feature(&definitions, definitions.feature(feature).unwrap()).unwrap();
    let job = BatchJob::new(compiled, Some(history)).unwrap().with_limits(SessionLimits {
        memory_limit: 256 << 20,
        partitions,
        cluster: None,
        // Batches far smaller than the events: keys and key runs cross many batch edges.
        batch_size: 1000,
    });
    rows_of(&job.collect().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuffled_split_and_delta_inputs_give_identical_output() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single.parquet");
    let split = dir.path().join("split");
    std::fs::create_dir(&split).unwrap();
    let delta = dir.path().join("delta");
    let events = all_events();
    write(&single, &events);
    write_shuffled(&split, &events);
    write_events(&options(), delta.to_str().unwrap(), OutputFormat::Delta, |_| {}).await.unwrap();

    for feature in ["velocity", "sessions"] {
        let baseline = run(feature, Location::Parquet(single.display().to_string()), 1).await;
        assert!(baseline.len() > 1_000, "{feature}: too few windows ({}) for a meaningful check", baseline.len());
        for partitions in [1, 3] {
            let shuffled = run(feature, Location::Parquet(split.display().to_string()), partitions).await;
            assert!(shuffled == baseline, "{feature}: shuffled split input with {partitions} partitions differs");
            let from_delta = run(feature, Location::Delta(delta.display().to_string()), partitions).await;
            assert!(from_delta == baseline, "{feature}: Delta input with {partitions} partitions differs");
        }
    }
}
