//! `lockstep serve`: answers feature reads over HTTP from the online store the streaming job
//! fills, with exactly the window SPEC §6 picks for the request time (SPEC §7).
//!
//! - `GET /v1/features/{feature_set}/{key}[?at=TIME]`: `key` is the key value (one key column)
//!   or a JSON array of the key values; `at` is RFC 3339 or epoch milliseconds (default: now).
//! - `POST /v1/features/{feature_set}` with `{"keys": [key, ...], "at": TIME}`: many keys.
//! - `GET /metrics`: request counts and a latency histogram (Prometheus text).
//!
//! An answer is `{"feature_set", "key", "request_time", "window_start", "window_end",
//! "values": {aggregate: value}}`; a key without that window gets counts 0 and nulls. With a log,
//! every answer is also written as one JSON line to a file, or as one record (keyed by feature
//! set and key) to a Kafka topic, for `lockstep skew`. The topic is written by an idempotent
//! producer in the background; on SIGTERM or Ctrl-C the server stops taking requests and waits
//! for every logged answer to be acknowledged before it exits.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use lockstep_features::window::{serving_cutoff, session_served};
use lockstep_features::{CompiledFeature, Function, ValueType};
use serde_json::{Map, Value as Json, json};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::error::StreamError;
use crate::online::{hash_name, stored_window, stored_windows};
use crate::topic::TopicUrl;

/// Latency histogram bucket bounds, in microseconds.
const BUCKETS_US: [u64; 12] = [100, 200, 300, 500, 750, 1_000, 1_500, 2_000, 5_000, 10_000, 50_000, 250_000];

struct Server {
    features: HashMap<String, CompiledFeature>,
    /// Redis connections, one per concurrent request at most (taken and returned).
    pool: Mutex<Vec<redis::Connection>>,
    client: redis::Client,
    logs: Vec<AnswerLog>,
    requests: AtomicU64,
    errors: AtomicU64,
    latency: Vec<AtomicU64>,
    latency_sum_us: AtomicU64,
}

/// Serves `features` from the online store at `online` on `listen` until the process ends.
pub async fn serve(
    features: Vec<CompiledFeature>,
    online: &str,
    listen: SocketAddr,
    logs: &[String],
) -> Result<(), StreamError> {
    let client = redis::Client::open(online).map_err(|e| StreamError::Config(format!("online store {online}: {e}")))?;
    // Fail early when the store is not there.
    client.get_connection().map_err(|e| StreamError::Config(format!("online store {online}: {e}")))?;
    let logs = logs.iter().map(|target| AnswerLog::open(target)).collect::<Result<Vec<_>, _>>()?;
    let server = Arc::new(Server {
        features: features.into_iter().map(|f| (f.feature.name.clone(), f)).collect(),
        pool: Mutex::new(Vec::new()),
        client,
        logs,
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        latency: BUCKETS_US.iter().map(|_| AtomicU64::new(0)).collect(),
        latency_sum_us: AtomicU64::new(0),
    });
    let app = axum::Router::new()
        .route("/v1/features/{feature_set}/{key}", get(read_one))
        .route("/v1/features/{feature_set}", post(read_many))
        .route("/metrics", get(metrics))
        .with_state(server.clone());
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| StreamError::Config(format!("{listen}: {e}")))?;
    tracing::info!(%listen, "serving features");
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_signal())
        .await
        .map_err(|e| StreamError::Execution(e.to_string()))?;
    tracing::info!("stopped taking requests; flushing the answer logs");
    for log in &server.logs {
        log.flush()?;
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// Where answers are logged: a JSON-lines file or a Kafka topic.
enum AnswerLog {
    File(Mutex<std::io::BufWriter<std::fs::File>>),
    Topic { producer: ThreadedProducer<LogDelivery>, topic: String },
}

/// Counts answers the broker did not take (they are logged with tracing too).
struct LogDelivery {
    failed: Arc<AtomicU64>,
}

impl rdkafka::ClientContext for LogDelivery {}

impl ProducerContext for LogDelivery {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "an answer was not logged");
        }
    }
}

impl AnswerLog {
    /// `kafka://HOST:PORT/TOPIC` (created with one partition if missing) or a file path
    /// (appended to).
    fn open(target: &str) -> Result<AnswerLog, StreamError> {
        if let Some(url) = TopicUrl::parse(target).map_err(StreamError::Config)? {
            crate::topic::create_if_missing(&url.brokers, &url.topic, 1)?;
            let producer = ClientConfig::new()
                .set("bootstrap.servers", &url.brokers)
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .set("compression.type", "lz4")
                .create_with_context(LogDelivery { failed: Arc::new(AtomicU64::new(0)) })?;
            return Ok(AnswerLog::Topic { producer, topic: url.topic });
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(target)
            .map_err(|e| StreamError::Config(format!("cannot open the log {target}: {e}")))?;
        Ok(AnswerLog::File(Mutex::new(std::io::BufWriter::new(file))))
    }

    fn write(&self, answers: &[Json]) {
        match self {
            AnswerLog::File(file) => {
                let mut file = file.lock().expect("not poisoned");
                for answer in answers {
                    let _ = serde_json::to_writer(&mut *file, answer);
                    let _ = file.write_all(b"\n");
                }
                let _ = file.flush();
            }
            AnswerLog::Topic { producer, topic } => {
                for answer in answers {
                    let key = json!([answer["feature_set"], answer["key"]]).to_string();
                    let payload = answer.to_string();
                    let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
                    // A full queue waits for the broker rather than losing the answer.
                    let sent = loop {
                        match producer.send(record) {
                            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                                record = returned;
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            }
                            other => break other,
                        }
                    };
                    if let Err((error, _)) = sent {
                        producer.context().failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(%error, "an answer was not logged");
                    }
                }
            }
        }
    }

    /// Waits until every answer is written (or acknowledged by the broker).
    fn flush(&self) -> Result<(), StreamError> {
        match self {
            AnswerLog::File(file) => file
                .lock()
                .expect("not poisoned")
                .flush()
                .map_err(|e| StreamError::Execution(format!("the answer log: {e}"))),
            AnswerLog::Topic { producer, topic } => {
                producer.flush(std::time::Duration::from_secs(60))?;
                match producer.context().failed.load(Ordering::Relaxed) {
                    0 => Ok(()),
                    n => Err(StreamError::Kafka(format!("{n} answers could not be logged to {topic}"))),
                }
            }
        }
    }

    /// Answers that could not be logged so far.
    fn failed(&self) -> u64 {
        match self {
            AnswerLog::File(_) => 0,
            AnswerLog::Topic { producer, .. } => producer.context().failed.load(Ordering::Relaxed),
        }
    }
}

/// A client error: status and message.
struct Problem(StatusCode, String);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        json_response(self.0, &json!({ "error": self.1 }))
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn request_time(at: Option<&Json>) -> Result<i64, Problem> {
    match at {
        None | Some(Json::Null) => Ok(now_ms()),
        Some(Json::Number(n)) => {
            n.as_i64().ok_or_else(|| Problem(StatusCode::BAD_REQUEST, format!("`at` {n} is not a time")))
        }
        Some(Json::String(s)) => {
            lockstep_features::rows::parse_time(s).map_err(|e| Problem(StatusCode::BAD_REQUEST, e))
        }
        Some(other) => Err(Problem(StatusCode::BAD_REQUEST, format!("`at` {other} is not a time"))),
    }
}

async fn read_one(
    State(server): State<Arc<Server>>,
    Path((feature_set, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let started = Instant::now();
    let result = async {
        let feature = server.feature(&feature_set)?;
        let key = parse_key(feature, &key)?;
        let at = query.as_deref().and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("at=")));
        let at = request_time(at.map(|a| Json::String(percent_decode(a))).as_ref())?;
        let server2 = server.clone();
        let name = feature_set.clone();
        let answers = tokio::task::spawn_blocking(move || server2.answer(&name, &[key], at))
            .await
            .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        Ok::<_, Problem>(answers.into_iter().next().unwrap_or(Json::Null))
    }
    .await;
    server.finish(started, result)
}

async fn read_many(
    State(server): State<Arc<Server>>,
    Path(feature_set): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let started = Instant::now();
    let result = async {
        let feature = server.feature(&feature_set)?;
        let body: Json = serde_json::from_slice(&body)
            .map_err(|e| Problem(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")))?;
        let keys = body
            .get("keys")
            .and_then(Json::as_array)
            .ok_or_else(|| Problem(StatusCode::BAD_REQUEST, "the body needs `keys`: an array of keys".into()))?;
        let keys = keys.iter().map(|k| key_of_json(feature, k)).collect::<Result<Vec<_>, _>>()?;
        let at = request_time(body.get("at"))?;
        let server2 = server.clone();
        let name = feature_set.clone();
        let answers = tokio::task::spawn_blocking(move || server2.answer(&name, &keys, at))
            .await
            .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        Ok::<_, Problem>(Json::Array(answers))
    }
    .await;
    server.finish(started, result)
}

async fn metrics(State(server): State<Arc<Server>>) -> Response {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE lockstep_serve_requests_total counter");
    let _ = writeln!(out, "lockstep_serve_requests_total {}", server.requests.load(Ordering::Relaxed));
    let _ = writeln!(out, "# TYPE lockstep_serve_errors_total counter");
    let _ = writeln!(out, "lockstep_serve_errors_total {}", server.errors.load(Ordering::Relaxed));
    let _ = writeln!(out, "# TYPE lockstep_serve_log_failures_total counter");
    let _ =
        writeln!(out, "lockstep_serve_log_failures_total {}", server.logs.iter().map(AnswerLog::failed).sum::<u64>());
    let _ = writeln!(out, "# TYPE lockstep_serve_latency_seconds histogram");
    let mut cumulative = 0;
    for (bound, count) in BUCKETS_US.iter().zip(&server.latency) {
        cumulative += count.load(Ordering::Relaxed);
        let _ = writeln!(out, "lockstep_serve_latency_seconds_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
    }
    let total = server.requests.load(Ordering::Relaxed);
    let _ = writeln!(out, "lockstep_serve_latency_seconds_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(
        out,
        "lockstep_serve_latency_seconds_sum {}",
        server.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(out, "lockstep_serve_latency_seconds_count {total}");
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

fn json_response(status: StatusCode, value: &Json) -> Response {
    (status, [("content-type", "application/json")], value.to_string()).into_response()
}

/// Decodes `%XX` escapes (and `+` as a space) of a URL query value.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A key from the URL: the value itself (one key column) or a JSON array of the values.
fn parse_key(feature: &CompiledFeature, text: &str) -> Result<Vec<Json>, Problem> {
    if text.starts_with('[') {
        let value: Json = serde_json::from_str(text)
            .map_err(|e| Problem(StatusCode::BAD_REQUEST, format!("key `{text}` is not a JSON array: {e}")))?;
        return key_of_json(feature, &value);
    }
    if feature.key_types.len() != 1 {
        return Err(Problem(
            StatusCode::BAD_REQUEST,
            format!(
                "`{}` has {} key columns: give the key as a JSON array",
                feature.feature.name,
                feature.key_types.len()
            ),
        ));
    }
    let value = match feature.key_types[0] {
        ValueType::String => Json::String(text.to_string()),
        ValueType::Int64 => Json::from(text.parse::<i64>().map_err(|_| {
            Problem(
                StatusCode::BAD_REQUEST,
                format!("key `{text}` is not an integer (`{}` is int64)", feature.feature.key[0]),
            )
        })?),
        other => {
            return Err(Problem(
                StatusCode::BAD_REQUEST,
                format!("keys of type {} are given as a JSON array", other.name()),
            ));
        }
    };
    Ok(vec![value])
}

/// A key from a JSON body: a value (one key column) or an array of values, checked by type.
fn key_of_json(feature: &CompiledFeature, value: &Json) -> Result<Vec<Json>, Problem> {
    let values = match value {
        Json::Array(values) => values.clone(),
        single => vec![single.clone()],
    };
    if values.len() != feature.key_types.len() {
        return Err(Problem(
            StatusCode::BAD_REQUEST,
            format!(
                "key {value} has {} values; `{}` is keyed by {:?}",
                values.len(),
                feature.feature.name,
                feature.feature.key
            ),
        ));
    }
    for (v, t) in values.iter().zip(&feature.key_types) {
        let fits = match t {
            ValueType::String => v.is_string() || v.is_null(),
            ValueType::Int64 => v.as_i64().is_some() || v.is_null(),
            ValueType::Bool => v.is_boolean() || v.is_null(),
            ValueType::Float64 => v.is_number() || v.is_null(),
            ValueType::Timestamp => v.as_i64().is_some() || v.is_null(),
        };
        if !fits {
            return Err(Problem(StatusCode::BAD_REQUEST, format!("key value {v} is not a {}", t.name())));
        }
    }
    Ok(values)
}

impl Server {
    fn feature(&self, name: &str) -> Result<&CompiledFeature, Problem> {
        self.features.get(name).ok_or_else(|| {
            let mut known: Vec<&str> = self.features.keys().map(String::as_str).collect();
            known.sort();
            Problem(StatusCode::NOT_FOUND, format!("no feature set `{name}`; this server has: {}", known.join(", ")))
        })
    }

    fn finish(&self, started: Instant, result: Result<Json, Problem>) -> Response {
        let micros = started.elapsed().as_micros() as u64;
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(micros, Ordering::Relaxed);
        if let Some(i) = BUCKETS_US.iter().position(|b| micros <= *b) {
            self.latency[i].fetch_add(1, Ordering::Relaxed);
        }
        match result {
            Ok(answer) => json_response(StatusCode::OK, &answer),
            Err(problem) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                problem.into_response()
            }
        }
    }

    /// The answers for `keys` at time `at` (blocking: Redis calls).
    fn answer(&self, name: &str, keys: &[Vec<Json>], at: i64) -> Result<Vec<Json>, Problem> {
        let feature = self.feature(name)?;
        let cutoff = serving_cutoff(at, feature.feature.serving_delay)
            .ok_or_else(|| Problem(StatusCode::BAD_REQUEST, format!("`at` {at} is before any servable time")))?;
        let mut connection = match self.pool.lock().expect("not poisoned").pop() {
            Some(c) => c,
            None => {
                self.client.get_connection().map_err(|e| Problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
            }
        };
        let result = (|| {
            let mut answers = Vec::with_capacity(keys.len());
            let mut pipeline = redis::pipe();
            // Sliding: the one window SPEC §6 picks; sessions: chosen among the key's sessions.
            let wanted = feature.window().panes().map(|panes| panes.served_window(cutoff));
            for key in keys {
                pipeline.cmd("HGETALL").arg(hash_name(name, key));
            }
            let replies: Vec<redis::Value> =
                pipeline.query(&mut connection).map_err(|e| Problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
            for (key, reply) in keys.iter().zip(replies) {
                let fields: HashMap<String, String> = redis::from_redis_value(reply).unwrap_or_default();
                let (bounds, row) = match wanted {
                    Some((start, end)) => ((Some(start), Some(end)), stored_window(feature, &fields, start)),
                    None => ((None, None), latest_session(feature, &fields, cutoff)),
                };
                answers.push(self.render(feature, key, at, bounds, row.as_ref()));
            }
            Ok(answers)
        })();
        if result.is_ok() {
            self.pool.lock().expect("not poisoned").push(connection);
        }
        let answers = result?;
        for log in &self.logs {
            log.write(&answers);
        }
        Ok(answers)
    }

    /// One answer: the window's bounds and values, or the defaults.
    fn render(
        &self,
        feature: &CompiledFeature,
        key: &[Json],
        at: i64,
        bounds: (Option<i64>, Option<i64>),
        row: Option<&Json>,
    ) -> Json {
        let mut values = Map::new();
        for aggregate in &feature.aggregates {
            let name = &aggregate.spec.name;
            let value = row.and_then(|r| r.get(name)).cloned();
            let counts =
                matches!(aggregate.spec.function, Function::CountStar | Function::Count | Function::CountDistinct);
            values.insert(name.clone(), value.unwrap_or(if counts { Json::from(0) } else { Json::Null }));
        }
        let bound = |column: &str, fallback: Option<i64>| {
            row.and_then(|r| r.get(column)).cloned().unwrap_or_else(|| fallback.map_or(Json::Null, Json::from))
        };
        json!({
            "feature_set": feature.feature.name,
            "key": key,
            "request_time": at,
            "window_start": bound("window_start", bounds.0),
            "window_end": bound("window_end", bounds.1),
            "values": values,
        })
    }
}

/// The latest session that had ended by `cutoff` among a hash's windows.
fn latest_session(feature: &CompiledFeature, fields: &HashMap<String, String>, cutoff: i64) -> Option<Json> {
    stored_windows(feature, fields)
        .into_values()
        .filter_map(|row| Some((row.get("window_end")?.as_i64()?, row)))
        .filter(|(end, _)| session_served(*end, cutoff))
        .max_by_key(|(end, _)| *end)
        .map(|(_, row)| row)
}
