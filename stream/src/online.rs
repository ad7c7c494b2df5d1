//! The online store: recent windows per feature set and key, in Redis, for `lockstep serve`.
//!
//! Layout: one hash per (feature set, key) named `lockstep:<feature set>:<key>`, where `<key>`
//! is the JSON array of the key values (e.g. `lockstep:user_velocity:["u000001"]`). Field
//! `version` holds the version of the last write applied, the input offset of the event that
//! caused it, zero-padded so versions compare as text.
//!
//! Sliding and tumbling windows are stored as **runs**: consecutive windows of a key (starts one
//! `every` apart) fired with equal aggregates share one field `r:<first start>:<last start>`,
//! whose value is the version of its last window (20 digits) followed by the aggregates as a
//! JSON object (the output topic's text for them). A key's neighbouring windows mostly hold the
//! same events — an event alone in its hour is 60 equal windows of a 1 h window sliding by 1 m —
//! so one field stands for many windows. Runs may overlap (a window fired again after a late
//! event, a cycle replayed with other micro-batch boundaries): a window's value is the one of
//! the highest version among the runs holding it. Session windows are one field each,
//! `w:<start>`, holding the session's row (the output topic's JSON); a retraction deletes it.
//!
//! Writes are idempotent and never move a window backwards: a write whose version is lower than
//! the stored one is ignored, so a cycle replayed after a crash rewrites the same values and a
//! stale writer cannot undo a newer one. Each hash expires after `ttl` without writes and is
//! trimmed once it holds more than twice `retain` fields: runs whose last window starts more
//! than `retain - 1` steps before the hash's latest window are deleted (what a read within the
//! serving delay and allowed lateness can pick stays), sessions are cut back to the `retain`
//! latest. Trimming lists the hash's fields, so it runs once per that many fields written, not
//! on every write.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use arrow::array::ArrayRef;
use lockstep_features::{CompiledFeature, Window};
use serde_json::{Map, Value as Json};

use crate::error::StreamError;
use crate::records::{WindowRecords, cell_json};

/// Versioned upserts and deletes of one hash, then trimming and expiry, in one atomic step.
///
/// ARGV: retain, ttl ms, horizon ms (negative for sessions), the number of writes `n`, `1` when
/// any of them is a delete (else `0`), the `n` versions, then per write its field and its value
/// (`''` to delete), all in version order. Writes of one key come from one input partition in
/// offset order, so one version per hash is enough: a write older than the last one applied is
/// a replay, and those are a prefix. The rest go to `HSET` straight from ARGV: the script's cost
/// is per `redis.call` and per Lua value it makes, far more than per field a call carries.
const WRITE: &str = r#"
local retain = tonumber(ARGV[1])
local horizon = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local current = redis.call('HGET', KEYS[1], 'version')
local first = 1
if current then
  while first <= n and ARGV[5 + first] < current do
    first = first + 1
  end
end
if first <= n then
  local base = 5 + n
  if ARGV[5] == '1' then
    for i = first, n do
      local field, value = ARGV[base + 2 * i - 1], ARGV[base + 2 * i]
      if value == '' then
        redis.call('HDEL', KEYS[1], field)
      else
        redis.call('HSET', KEYS[1], field, value)
      end
    end
  else
    for from = first, n, 2000 do
      local to = math.min(n, from + 1999)
      redis.call('HSET', KEYS[1], unpack(ARGV, base + 2 * from - 1, base + 2 * to))
    end
  end
  redis.call('HSET', KEYS[1], 'version', ARGV[5 + n])
end
if redis.call('HLEN', KEYS[1]) > 2 * retain + 1 then
  -- Each field's position: a run's last start (`r:<first>:<last>`), a session's start (`w:<start>`).
  local names, at, count = {}, {}, 0
  for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
    local position = tonumber(string.match(name, '^r:%-?%d+:(%-?%d+)$') or string.match(name, '^w:(%-?%d+)$'))
    if position then
      count = count + 1
      names[count], at[count] = name, position
    end
  end
  local cut
  if count > 0 and horizon >= 0 then
    local newest = at[1]
    for i = 2, count do
      newest = math.max(newest, at[i])
    end
    cut = newest - horizon
  elseif count > 0 then
    local sorted = {unpack(at, 1, count)}
    table.sort(sorted)
    cut = sorted[count - retain + 1]
  end
  local old, size = {}, 0
  for i = 1, cut and count or 0 do
    if at[i] < cut then
      size = size + 1
      old[size] = names[i]
    end
    if size > 0 and (size == 1000 or i == count) then
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
    /// How far (ms) before a hash's latest window runs are kept; negative for sessions.
    horizon_ms: i64,
}

/// Online-store writes not sent yet: a cycle's, gathered while the previous cycle's are sent.
/// Dropping them forgets them (their cycle was aborted).
#[derive(Default)]
pub struct OnlineWrites {
    /// Buffered writes per hash, in version order.
    pending: HashMap<String, Vec<Write>>,
    /// Hashes in first-write order, so flushes are deterministic.
    order: Vec<String>,
    /// The hash name being looked up.
    name: Vec<u8>,
    /// The aggregates of the window being buffered.
    aggregates: Vec<u8>,
}

/// A buffered write: a run of windows (`first..=last` starts, with `last == first` for a
/// session), the version of its last window, and its value (aggregates for a run, the row for
/// a session; empty to delete).
struct Write {
    first: i64,
    last: i64,
    version: u64,
    value: Vec<u8>,
}

/// The hash name of a key of a feature set.
pub fn hash_name(feature: &str, key: &[Json]) -> String {
    let mut name = Vec::new();
    write_hash_prefix(&mut name, feature);
    serde_json::to_writer(&mut name, key).expect("writing to a Vec cannot fail");
    String::from_utf8(name).expect("JSON is text")
}

/// Appends what every hash name of a feature set starts with; the key's JSON array follows.
fn write_hash_prefix(out: &mut Vec<u8>, feature: &str) {
    out.extend_from_slice(b"lockstep:");
    out.extend_from_slice(feature.as_bytes());
    out.push(b':');
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
        let retain = retained_windows(feature);
        let horizon_ms = feature.window().panes().map_or(-1, |panes| (retain as i64 - 1) * panes.width);
        Ok(OnlineStore { url: url.into(), connection, sha, retain, ttl_ms, horizon_ms })
    }

    /// Sends `writes`: one script call per hash, pipelined.
    pub fn send(&mut self, mut writes: OnlineWrites) -> Result<(), StreamError> {
        if writes.order.is_empty() {
            return Ok(());
        }
        let runs = self.horizon_ms >= 0;
        let mut pipeline = redis::pipe();
        let mut value = Vec::new();
        for hash in std::mem::take(&mut writes.order) {
            let writes = writes.pending.remove(&hash).unwrap_or_default();
            let deletes = writes.iter().any(|write| write.value.is_empty());
            let command = pipeline.cmd("EVALSHA").arg(&self.sha).arg(1).arg(hash).arg(self.retain).arg(self.ttl_ms);
            command.arg(self.horizon_ms).arg(writes.len()).arg(if deletes { "1" } else { "0" });
            let versions: Vec<String> = writes.iter().map(|write| format!("{:020}", write.version)).collect();
            for version in &versions {
                command.arg(version);
            }
            for (write, version) in writes.into_iter().zip(versions) {
                if runs {
                    value.clear();
                    value.extend_from_slice(version.as_bytes());
                    value.extend_from_slice(&write.value);
                    command.arg(format!("r:{}:{}", write.first, write.last)).arg(&value[..]);
                } else {
                    command.arg(format!("w:{}", write.first)).arg(write.value);
                }
            }
            command.ignore();
        }
        let result: redis::RedisResult<()> = pipeline.query(&mut self.connection);
        result.map_err(|error| StreamError::Execution(format!("online store {}: {error}", self.url)))
    }
}

impl OnlineWrites {
    /// Buffers a write to the hash named in `self.name`: it extends the hash's last run when
    /// `step` is set, the window follows that run's last one by `step` and the values are equal.
    fn write(&mut self, start: i64, version: u64, value: &[u8], step: Option<i64>) -> Result<(), StreamError> {
        let name = std::str::from_utf8(&self.name).map_err(|e| StreamError::Execution(e.to_string()))?;
        let write = || Write { first: start, last: start, version, value: value.to_vec() };
        match self.pending.get_mut(name) {
            Some(writes) => match writes.last_mut() {
                Some(run)
                    if step.is_some_and(|step| run.last.checked_add(step) == Some(start))
                        && !value.is_empty()
                        && run.value == value =>
                {
                    run.last = start;
                    run.version = version;
                }
                _ => writes.push(write()),
            },
            None => {
                self.order.push(name.to_string());
                self.pending.insert(name.to_string(), vec![write()]);
            }
        }
        Ok(())
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
        self.name.clear();
        write_hash_prefix(&mut self.name, &feature.feature.name);
        records.key_array(&mut self.name, row);
        match feature.window().panes() {
            Some(panes) => {
                let mut aggregates = std::mem::take(&mut self.aggregates);
                aggregates.clear();
                records.aggregates(&mut aggregates, row);
                let written = self.write(records.start(row), version, &aggregates, Some(panes.width));
                self.aggregates = aggregates;
                written
            }
            None => self.write(records.start(row), version, value, None),
        }
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
        self.name.clear();
        self.name.extend_from_slice(hash_name(&feature.feature.name, &key).as_bytes());
        self.write(start, version, &[], None)
    }
}

/// The windows a hash holds (its fields, as `HGETALL` returns them), by start: each window's
/// row as an object with `window_start`, `window_end` and the aggregates (a session's row also
/// holds its key). Where runs overlap, the one of the highest version gives the window's value.
pub fn stored_windows(feature: &CompiledFeature, fields: &HashMap<String, String>) -> BTreeMap<i64, Json> {
    let Some(panes) = feature.window().panes() else {
        return fields
            .iter()
            .filter_map(|(name, row)| Some((name.strip_prefix("w:")?.parse().ok()?, serde_json::from_str(row).ok()?)))
            .collect();
    };
    let width = panes.width.max(1);
    let mut starts = BTreeSet::new();
    for (first, last, _, _) in fields.iter().filter_map(|(name, value)| run_of(name, value)) {
        starts.extend((first..=last).step_by(width as usize));
    }
    starts.into_iter().filter_map(|start| Some((start, stored_window(feature, fields, start)?))).collect()
}

/// The row of the window starting at `start` held in a hash's fields, if the hash holds it.
pub fn stored_window(feature: &CompiledFeature, fields: &HashMap<String, String>, start: i64) -> Option<Json> {
    let Some(panes) = feature.window().panes() else {
        return fields.get(&format!("w:{start}")).and_then(|row| serde_json::from_str(row).ok());
    };
    let width = panes.width.max(1);
    let (_, aggregates) = fields
        .iter()
        .filter_map(|(name, value)| run_of(name, value))
        .filter(|(first, last, _, _)| (*first..=*last).contains(&start) && (start - first) % width == 0)
        .map(|(_, _, version, aggregates)| (version, aggregates))
        .max_by(|a, b| a.0.cmp(b.0))?;
    run_row(aggregates, start, panes.width * panes.per_window)
}

/// A run field's first and last window starts, version and aggregates text.
fn run_of<'a>(name: &str, value: &'a str) -> Option<(i64, i64, &'a str, &'a str)> {
    let (first, last) = name.strip_prefix("r:")?.split_once(':')?;
    let (version, aggregates) = (value.get(..20)?, value.get(20..)?);
    Some((first.parse().ok()?, last.parse().ok()?, version, aggregates))
}

/// The row of the window at `start` of a run: its bounds and the run's aggregates.
fn run_row(aggregates: &str, start: i64, size: i64) -> Option<Json> {
    let values: Map<String, Json> = serde_json::from_str(aggregates).ok()?;
    let mut row = Map::new();
    row.insert("window_start".into(), Json::from(start));
    row.insert("window_end".into(), Json::from(start + size));
    row.extend(values);
    Some(Json::Object(row))
}
