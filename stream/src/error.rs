//! Errors of the streaming job.

use lockstep_batch::BatchError;
use lockstep_features::DefinitionErrors;

/// Why a streaming run stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Definitions(#[from] DefinitionErrors),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("{0}")]
    Config(String),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("the streaming job failed: {0}")]
    Execution(String),
}

impl From<datafusion::error::DataFusionError> for StreamError {
    fn from(error: datafusion::error::DataFusionError) -> Self {
        StreamError::Execution(error.find_root().message().to_string())
    }
}

impl From<arrow::error::ArrowError> for StreamError {
    fn from(error: arrow::error::ArrowError) -> Self {
        StreamError::Execution(error.to_string())
    }
}

impl From<rdkafka::error::KafkaError> for StreamError {
    fn from(error: rdkafka::error::KafkaError) -> Self {
        StreamError::Kafka(error.to_string())
    }
}
