//! Errors of the batch job.

use lockstep_features::DefinitionErrors;

/// Why a batch job did not complete. No output is left behind in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Definitions(#[from] DefinitionErrors),
    #[error("{location}: {message}")]
    Input { location: String, message: String },
    #[error("cannot write {location}: {message}")]
    Output { location: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error("the batch job failed: {0}")]
    Execution(String),
}

impl From<datafusion::error::DataFusionError> for BatchError {
    fn from(error: datafusion::error::DataFusionError) -> Self {
        let root = error.find_root();
        let message = root.message().to_string();
        if matches!(root, datafusion::error::DataFusionError::ResourcesExhausted(_)) {
            return BatchError::Execution(format!(
                "{message}; raise --memory-limit (sorts spill to disk beyond it, but the final merge needs about 128MiB)"
            ));
        }
        BatchError::Execution(message)
    }
}

impl From<arrow::error::ArrowError> for BatchError {
    fn from(error: arrow::error::ArrowError) -> Self {
        BatchError::Execution(error.to_string())
    }
}
