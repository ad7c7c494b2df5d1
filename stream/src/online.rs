//! The online store: recent windows per feature set and key, in Redis, for `lockstep serve`.
//!
//! Layout: one hash per (feature set, key) named `lockstep:<feature set>:<key>`, where `<key>`
//! is the JSON array of the key values (e.g. `lockstep:user_velocity:["u000001"]`). Field
//! `w:<window_start>` holds the window's row as JSON (the output topic's value format); field
//! `v:<window_start>` holds the version of the last write, the input offset of the event that
//! caused it, zero-padded so versions compare as text.
//!
//! Writes are idempotent and never move a window backwards: a write whose version is lower than
//! the stored one is ignored, so a cycle replayed after a crash rewrites the same values and a
//! stale writer cannot undo a newer one. A retraction deletes the row but keeps its version.
//! Each hash keeps the `retain` most recent windows (by start) — enough for the read of SPEC §7
//! at any time within the serving delay and allowed lateness — and expires after `ttl` without
//! writes.

use arrow::array::{ArrayRef, RecordBatch};
use lockstep_features::{CompiledFeature, Window};
use serde_json::Value as Json;

use crate::error::StreamError;
use crate::records::{cell_json, window_value};

/// Versioned upsert or delete, then trimming and expiry, in one atomic step.
const WRITE: &str = r#"
local field = ARGV[1]
local version = ARGV[2]
local current = redis.call('HGET', KEYS[1], 'v:' .. field)
if current and current > version then
  return 0
end
redis.call('HSET', KEYS[1], 'v:' .. field, version)
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'w:' .. field)
else
  redis.call('HSET', KEYS[1], 'w:' .. field, ARGV[3])
end
local retain = tonumber(ARGV[4])
local starts = {}
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(name, 1, 2) == 'v:' then
    table.insert(starts, tonumber(string.sub(name, 3)))
  end
end
if #starts > retain then
  table.sort(starts)
  for i = 1, #starts - retain do
    redis.call('HDEL', KEYS[1], 'v:' .. starts[i], 'w:' .. starts[i])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"#;

/// A connection to the online store, buffering writes until [`OnlineStore::flush`].
pub struct OnlineStore {
    url: String,
    connection: redis::Connection,
    sha: String,
    pipeline: redis::Pipeline,
    pending: usize,
    retain: usize,
    ttl_ms: u64,
}

/// The hash name of a key of a feature set.
pub fn hash_name(feature: &str, key: &[Json]) -> String {
    format!("lockstep:{feature}:{}", Json::Array(key.to_vec()))
}

/// How many recent windows per key the store keeps for `feature`.
pub fn retained_windows(feature: &CompiledFeature) -> usize {
    let slack = feature.feature.serving_delay.millis() + feature.source.allowed_lateness.millis();
    match feature.window() {
        Window::Session { .. } => 16,
        window => {
            let panes = window.panes().expect("sliding windows have panes");
            let every = panes.width.max(1);
            (panes.per_window + slack / every + 2).clamp(2, 10_000) as usize
        }
    }
}

impl OnlineStore {
    /// Connects to `url` (`redis://host:port`) for `feature`.
    pub fn connect(url: &str, feature: &CompiledFeature) -> Result<Self, StreamError> {
        let failed = |e: redis::RedisError| StreamError::Config(format!("online store {url}: {e}"));
        let client = redis::Client::open(url).map_err(failed)?;
        let mut connection = client.get_connection().map_err(failed)?;
        let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(WRITE).query(&mut connection).map_err(failed)?;
        let ttl_ms = (7 * 86_400_000u64).max(feature.window().span().millis() as u64 * 2);
        Ok(OnlineStore {
            url: url.into(),
            connection,
            sha,
            pipeline: redis::pipe(),
            pending: 0,
            retain: retained_windows(feature),
            ttl_ms,
        })
    }

    fn write(&mut self, hash: String, start: i64, version: u64, value: &str) {
        self.pipeline
            .cmd("EVALSHA")
            .arg(&self.sha)
            .arg(1)
            .arg(hash)
            .arg(start)
            .arg(format!("{version:020}"))
            .arg(value)
            .arg(self.retain)
            .arg(self.ttl_ms)
            .ignore();
        self.pending += 1;
    }

    /// Buffers the row `row` of `rows` (output schema) with version `version`.
    pub fn upsert(
        &mut self,
        feature: &CompiledFeature,
        rows: &RecordBatch,
        row: usize,
        version: u64,
    ) -> Result<(), StreamError> {
        let keys = feature.key_types.len();
        let key: Vec<Json> = (0..keys).map(|i| cell_json(rows.column(i), row)).collect();
        let start = match cell_json(rows.column(keys), row) {
            Json::Number(n) => n.as_i64().unwrap_or_default(),
            _ => 0,
        };
        let value = String::from_utf8(window_value(rows, row)).expect("JSON is UTF-8");
        self.write(hash_name(&feature.feature.name, &key), start, version, &value);
        Ok(())
    }

    /// Buffers the deletion of the window starting at `start` of key row `row` of `key_columns`.
    pub fn delete(
        &mut self,
        feature: &CompiledFeature,
        key_columns: &[ArrayRef],
        row: usize,
        start: i64,
        version: u64,
    ) -> Result<(), StreamError> {
        let key: Vec<Json> = key_columns.iter().map(|c| cell_json(c, row)).collect();
        self.write(hash_name(&feature.feature.name, &key), start, version, "");
        Ok(())
    }

    /// Sends the buffered writes.
    pub fn flush(&mut self) -> Result<(), StreamError> {
        if self.pending == 0 {
            return Ok(());
        }
        let result: redis::RedisResult<()> = self.pipeline.query(&mut self.connection);
        if let Err(error) = result {
            return Err(StreamError::Execution(format!("online store {}: {error}", self.url)));
        }
        self.pipeline.clear();
        self.pending = 0;
        Ok(())
    }
}
