//! `lockstep skew`: the training/serving skew check (SPEC §7). Every answer `lockstep serve`
//! logged (feature set, key, request time, values) is recomputed offline — the point-in-time
//! value a training set would hold for a label with that key and time — and compared value by
//! value, exactly (floats by their shortest round-trip text, which identifies the bits).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder};
use arrow::datatypes::{Field, Schema};
use lockstep_batch::training::{TrainingOptions, point_in_time};
use lockstep_batch::{BatchError, SessionLimits};
use lockstep_features::{CompiledFeature, Location, ValueType};
use serde::Serialize;
use serde_json::Value as Json;

use crate::records::cell_json;
use crate::topic::{TopicUrl, read_committed};

/// One served value that differs from its offline value.
#[derive(Debug, Clone, Serialize)]
pub struct SkewExample {
    pub key: Json,
    pub request_time: i64,
    pub aggregate: String,
    pub served: Json,
    pub offline: Json,
}

/// Skew of one feature set.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FeatureSkew {
    pub feature_set: String,
    pub answers: u64,
    /// Answers with at least one differing value.
    pub skewed: u64,
    pub rate: f64,
    /// Differing answers per aggregate.
    pub by_aggregate: BTreeMap<String, u64>,
    pub examples: Vec<SkewExample>,
}

/// Checks the answers logged at `served` (a JSON-lines file or `kafka://HOST:PORT/TOPIC`)
/// against the offline values.
pub async fn skew(
    features: &[CompiledFeature],
    served: &str,
    history: Option<Location>,
    limits: SessionLimits,
) -> Result<Vec<FeatureSkew>, BatchError> {
    let mut by_feature: BTreeMap<String, Vec<Json>> = BTreeMap::new();
    for answer in read_answers(served).await? {
        let name = answer.get("feature_set").and_then(Json::as_str).unwrap_or_default().to_string();
        by_feature.entry(name).or_default().push(answer);
    }
    let mut report = Vec::new();
    for (name, answers) in by_feature {
        let feature = features.iter().find(|f| f.feature.name == name).ok_or_else(|| BatchError::Input {
            location: served.into(),
            message: format!("answers of feature set `{name}`, which the definitions file does not define"),
        })?;
        report.push(check(feature, &answers, served, history.clone(), limits.clone()).await?);
    }
    Ok(report)
}

/// The logged answers: JSON lines of a file, or the records of a topic
/// (`kafka://HOST:PORT/TOPIC`, read_committed from the beginning to the end of each partition).
async fn read_answers(served: &str) -> Result<Vec<Json>, BatchError> {
    let failed = |location: String, message: String| BatchError::Input { location, message };
    let Some(url) = TopicUrl::parse(served).map_err(|m| failed(served.into(), m))? else {
        let text = std::fs::read_to_string(served).map_err(|e| failed(served.into(), e.to_string()))?;
        let lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        return lines
            .map(|(n, line)| {
                serde_json::from_str(line)
                    .map_err(|e| failed(format!("{served}:{}", n + 1), format!("not a JSON answer: {e}")))
            })
            .collect();
    };
    let (brokers, topic) = (url.brokers.clone(), url.topic.clone());
    let records = tokio::task::spawn_blocking(move || read_committed(&brokers, &topic))
        .await
        .map_err(|e| failed(served.into(), e.to_string()))?
        .map_err(|m| failed(served.into(), m))?;
    records
        .iter()
        .enumerate()
        .map(|(i, (_, value, _))| {
            serde_json::from_slice(value.as_deref().unwrap_or_default())
                .map_err(|e| failed(served.into(), format!("record {i} is not a JSON answer: {e}")))
        })
        .collect()
}

async fn check(
    feature: &CompiledFeature,
    answers: &[Json],
    served: &str,
    history: Option<Location>,
    limits: SessionLimits,
) -> Result<FeatureSkew, BatchError> {
    // The logged (key, time) pairs as labels.
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (i, (name, value_type)) in feature.feature.key.iter().zip(&feature.key_types).enumerate() {
        let cell = |a: &Json| a.get("key").and_then(|k| k.get(i)).cloned().unwrap_or(Json::Null);
        let column: ArrayRef = match value_type {
            ValueType::String => {
                let mut b = StringBuilder::new();
                answers.iter().for_each(|a| b.append_option(cell(a).as_str()));
                Arc::new(b.finish())
            }
            ValueType::Int64 | ValueType::Timestamp => {
                let mut b = Int64Builder::new();
                answers.iter().for_each(|a| b.append_option(cell(a).as_i64()));
                Arc::new(b.finish())
            }
            ValueType::Float64 => {
                let mut b = Float64Builder::new();
                answers.iter().for_each(|a| b.append_option(cell(a).as_f64()));
                Arc::new(b.finish())
            }
            ValueType::Bool => {
                let mut b = BooleanBuilder::new();
                answers.iter().for_each(|a| b.append_option(cell(a).as_bool()));
                Arc::new(b.finish())
            }
        };
        fields.push(Field::new(name, column.data_type().clone(), true));
        columns.push(column);
    }
    let labels = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let times: Vec<Option<i64>> = answers.iter().map(|a| a.get("request_time").and_then(Json::as_i64)).collect();
    let options = TrainingOptions { labels: served.into(), label_time: None, history, limits };
    let (offline, _) = point_in_time(feature, &labels, &times, &options).await?;
    let mut result = FeatureSkew {
        feature_set: feature.feature.name.clone(),
        answers: answers.len() as u64,
        ..FeatureSkew::default()
    };
    for (row, answer) in answers.iter().enumerate() {
        let mut differs = false;
        for (field, column) in &offline {
            let expected = cell_json(column, row);
            let got = answer.get("values").and_then(|v| v.get(field.name())).cloned().unwrap_or(Json::Null);
            if got != expected {
                differs = true;
                *result.by_aggregate.entry(field.name().clone()).or_default() += 1;
                if result.examples.len() < 10 {
                    result.examples.push(SkewExample {
                        key: answer.get("key").cloned().unwrap_or(Json::Null),
                        request_time: times[row].unwrap_or_default(),
                        aggregate: field.name().clone(),
                        served: got,
                        offline: expected,
                    });
                }
            }
        }
        result.skewed += u64::from(differs);
    }
    result.rate = if result.answers == 0 { 0.0 } else { result.skewed as f64 / result.answers as f64 };
    Ok(result)
}
