//! The online store: recent windows per feature set and key, in Redis, for `lockstep serve`.
//!
//! Layout: one hash per (feature set, key) named `lockstep:<feature set>:<key>`, where `<key>`
//! is the JSON array of the key values (e.g. `lockstep:user_velocity:["u000001"]`). Field
//! `w:<window_start>` holds the window's row as JSON (the output topic's value format); field
//! `version` holds the version of the last write applied, the input offset of the event that
//! caused it, zero-padded so versions compare as text.
//!
//! Writes are idempotent and never move a window backwards: a write whose version is lower than
//! the stored one is ignored, so a cycle replayed after a crash rewrites the same values and a
//! stale writer cannot undo a newer one. A retraction deletes the row.
//! Each hash keeps at least the `retain` most recent windows (by start) — enough for the read of
//! SPEC §7 at any time within the serving delay and allowed lateness — and expires after `ttl`
//! without writes. Trimming lists and sorts the hash's fields, so it waits until the hash holds
//! twice `retain` windows and then cuts it back to `retain`: once per `retain` writes of a key,
//! not on every write.

use arrow::array::ArrayRef;
use lockstep_features::{CompiledFeature, Window};
use serde_json::Value as Json;

use crate::error::StreamError;
use crate::records::{WindowRecords, cell_json};

/// Versioned upserts and deletes of one hash, then trimming (beyond twice `retain` windows, back
/// to `retain`) and expiry, in one atomic step.
///
/// ARGV: retain, ttl ms, the number of writes `n`, `1` when any of them is a delete (else `0`),
/// the `n` versions, then per write its field and its row JSON (`''` to delete), all in version
/// order. Writes of one key come from one input partition in offset order, so one version per
/// hash is enough: a write older than the last one applied is a replay, and those are a prefix.
/// The rest go to `HSET` straight from ARGV: the script's cost is per `redis.call` and per Lua
/// value it makes, far more than per field a call carries.
const WRITE: &str = r#"
local retain = tonumber(ARGV[1])
local n = tonumber(ARGV[3])
local current = redis.call('HGET', KEYS[1], 'version')
local first = 1
if current then
  while first <= n and ARGV[4 + first] < current do
    first = first + 1
  end
end
if first <= n then
  local pairs = 4 + n
  if ARGV[4] == '1' then
    for i = first, n do
      local field, value = ARGV[pairs + 2 * i - 1], ARGV[pairs + 2 * i]
      if value == '' then
        redis.call('HDEL', KEYS[1], field)
      else
        redis.call('HSET', KEYS[1], field, value)
      end
    end
  else
    for from = first, n, 2000 do
      local to = math.min(n, from + 1999)
      redis.call('HSET', KEYS[1], unpack(ARGV, pairs + 2 * from - 1, pairs + 2 * to))
    end
  end
  redis.call('HSET', KEYS[1], 'version', ARGV[4 + n])
end
if redis.call('HLEN', KEYS[1]) > 2 * retain + 1 then
  local starts = {}
  local count = 0
  for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
    -- Every field but `version` is `w:<window start>`.
    local start = tonumber(string.sub(name, 3))
    if start then
      count = count + 1
      starts[count] = start
    end
  end
  table.sort(starts)
  local old, size = {}, 0
  for i = 1, count - retain do
    size = size + 1
    old[size] = 'w:' .. starts[i]
    if size == 1000 or i == count - retain then
      redis.call('HDEL', KEYS[1], unpack(old, 1, size))
      size = 0
    end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// A connection to the online store; writes are gathered in [`OnlineWrites`] and sent with
/// [`OnlineStore::send`].
pub struct OnlineStore {
    url: String,
    connection: redis::Connection,
    sha: String,
    retain: usize,
    ttl_ms: u64,
}

/// Online-store writes not sent yet: a cycle's, gathered while the previous cycle's are sent.
/// Dropping them forgets them (their cycle was aborted).
#[derive(Default)]
pub struct OnlineWrites {
    /// Buffered writes per hash, in order: (window start, version, row JSON or empty).
    pending: std::collections::HashMap<String, Vec<(i64, u64, String)>>,
    /// Hashes in first-write order, so flushes are deterministic.
    order: Vec<String>,
}

/// The hash name of a key of a feature set.
pub fn hash_name(feature: &str, key: &[Json]) -> String {
    format!("{}{}", hash_prefix(feature), Json::Array(key.to_vec()))
}

/// What every hash name of a feature set starts with; the key's JSON array follows.
fn hash_prefix(feature: &str) -> String {
    format!("lockstep:{feature}:")
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
        Ok(OnlineStore { url: url.into(), connection, sha, retain: retained_windows(feature), ttl_ms })
    }

    /// Sends `writes`: one script call per hash, pipelined.
    pub fn send(&mut self, mut writes: OnlineWrites) -> Result<(), StreamError> {
        if writes.order.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        for hash in std::mem::take(&mut writes.order) {
            let writes = writes.pending.remove(&hash).unwrap_or_default();
            let deletes = writes.iter().any(|(_, _, value)| value.is_empty());
            let command = pipeline.cmd("EVALSHA").arg(&self.sha).arg(1).arg(hash).arg(self.retain).arg(self.ttl_ms);
            command.arg(writes.len()).arg(if deletes { "1" } else { "0" });
            for (_, version, _) in &writes {
                command.arg(format!("{version:020}"));
            }
            for (start, _, value) in writes {
                command.arg(format!("w:{start}")).arg(value);
            }
            command.ignore();
        }
        let result: redis::RedisResult<()> = pipeline.query(&mut self.connection);
        result.map_err(|error| StreamError::Execution(format!("online store {}: {error}", self.url)))
    }
}

impl OnlineWrites {
    fn write(&mut self, hash: String, start: i64, version: u64, value: String) {
        match self.pending.get_mut(&hash) {
            Some(writes) => writes.push((start, version, value)),
            None => {
                self.order.push(hash.clone());
                self.pending.insert(hash, vec![(start, version, value)]);
            }
        }
    }

    /// Buffers row `row` of `records` (output rows), already encoded as `value` (the output
    /// topic's JSON), with version `version`.
    pub fn upsert(
        &mut self,
        feature: &CompiledFeature,
        records: &WindowRecords<'_>,
        row: usize,
        value: &[u8],
        version: u64,
    ) -> Result<(), StreamError> {
        let mut hash = hash_prefix(&feature.feature.name).into_bytes();
        records.key_array(&mut hash, row);
        let hash = String::from_utf8(hash).map_err(|e| StreamError::Execution(e.to_string()))?;
        let value = String::from_utf8(value.to_vec()).map_err(|e| StreamError::Execution(e.to_string()))?;
        self.write(hash, records.start(row), version, value);
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
        self.write(hash_name(&feature.feature.name, &key), start, version, String::new());
        Ok(())
    }
}
