//! lockstep's feature definitions and the one shared implementation of windows, aggregates and
//! expression evaluation. The batch job (DataFusion over history) and the streaming job (Kafka)
//! both compile a feature set through this crate, so they cannot disagree on a rule.
//!
//! Nothing here knows about Kafka, Delta or Redis.

pub mod aggregate;
pub mod assemble;
pub mod codec;
pub mod compile;
pub mod definitions;
pub mod duration;
pub mod exact;
pub mod rows;
pub mod stage;
pub mod value;
pub mod window;

pub use aggregate::{AggregateError, AggregateSpec, Function, Partial, Sliding, ValueSink};
pub use compile::{CompiledAggregate, CompiledFeature, StageLayout, compile_all, compile_feature};
pub use definitions::{DefinitionError, DefinitionErrors, Definitions, FeatureSet, Location, Source};
pub use duration::Duration;
pub use exact::ExactSum;
pub use stage::{StageBatch, StageEvaluator};
pub use value::{ArgColumn, Output, OutputColumn, Value, ValueType};
pub use window::{Panes, Window};
