//! `FeatureWindowExec`: the window stage of the batch job as a DataFusion operator.
//!
//! Its input is the feature's stage columns (keys, event time, aggregate arguments and `FILTER`
//! masks; see [`StageLayout`]) hash-partitioned by key and sorted by key, then event time, in each
//! partition. It walks each key's events once: events update the partial state of their pane (or
//! session), finished panes go to a [`PaneSlider`], and every window the slider emits is evaluated
//! and appended to the output. Memory is one key's live panes plus one output batch; the sort
//! before it spills to disk under the session's memory limit.
//!
//! Output rows come out ordered by key, then `window_start`, in each partition.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{
    EquivalenceProperties, LexRequirement, OrderingRequirements, PhysicalExpr, PhysicalSortExpr,
    PhysicalSortRequirement,
};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::expressions::col as physical_col;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties};
use datafusion::physical_plan::{Distribution, Partitioning};
use futures::StreamExt;
use lockstep_features::assemble::{PaneSlider, SessionBuilder, WindowRow, WindowStates};
use lockstep_features::rows::RowSink;
use lockstep_features::{AggregateSpec, CompiledFeature, Partial, StageBatch, StageLayout, Window};

/// Counters shared with the caller for progress and the final summary.
#[derive(Debug, Default)]
pub struct StageCounters {
    /// Events that reached the window stage (they passed the filter).
    pub events: AtomicU64,
    /// Events without an event time (skipped).
    pub null_times: AtomicU64,
    /// Output rows (windows) produced.
    pub windows: AtomicU64,
}

/// What the window stage needs to know about the feature set.
#[derive(Debug, Clone)]
pub struct WindowStage {
    pub feature: String,
    pub window: Window,
    pub specs: Vec<AggregateSpec>,
    pub layout: StageLayout,
    pub key_names: Vec<String>,
    pub output_schema: SchemaRef,
    pub counters: Arc<StageCounters>,
    /// When set, only these windows are written (training sets need few of them).
    pub wanted: Option<Arc<WantedWindows>>,
}

/// The windows a job must write, by key (in the Arrow row format of the key columns) and
/// `window_start`, for a sliding window: the window stage then computes only these
/// ([`WantedState`]).
#[derive(Debug, Default)]
pub struct WantedWindows {
    /// Per key, the wanted `window_start`s, ascending, without repeats.
    pub by_key: datafusion::common::HashMap<Box<[u8]>, Vec<i64>>,
}

impl WantedWindows {
    /// The windows of these (key, `window_start`) pairs, in any order, repeats allowed.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a [u8], i64)>) -> Self {
        let mut by_key: datafusion::common::HashMap<Box<[u8]>, Vec<i64>> = Default::default();
        for (key, start) in pairs {
            match by_key.get_mut(key) {
                Some(starts) => starts.push(start),
                None => {
                    by_key.insert(key.into(), vec![start]);
                }
            }
        }
        for starts in by_key.values_mut() {
            starts.sort_unstable();
            starts.dedup();
        }
        WantedWindows { by_key }
    }
}

impl WindowStage {
    /// The stage of a compiled feature set.
    pub fn new(feature: &CompiledFeature, counters: Arc<StageCounters>) -> Self {
        WindowStage {
            feature: feature.feature.name.clone(),
            window: feature.window(),
            specs: feature.specs(),
            layout: feature.layout(),
            key_names: feature.feature.key.clone(),
            output_schema: feature.output_schema(),
            counters,
            wanted: None,
        }
    }

    /// Whether the stage computes just its wanted windows, straight from unsorted events
    /// ([`WantedState`]), rather than sliding over every pane of sorted input.
    pub fn picks_wanted(&self) -> bool {
        self.wanted.is_some()
    }

    /// One line describing the stage, for plans.
    pub fn describe(&self) -> String {
        let window = match self.window.panes() {
            Some(panes) if panes.per_window > 1 => format!("{} ({} panes per window)", self.window, panes.per_window),
            _ => self.window.to_string(),
        };
        let aggregates: Vec<String> =
            self.specs.iter().map(|s| format!("{}={}", s.name, s.function.sql_name())).collect();
        format!(
            "feature={}, keys=[{}], window={window}, aggregates=[{}]",
            self.feature,
            self.key_names.join(", "),
            aggregates.join(", ")
        )
    }
}

/// The DataFusion operator; see the module documentation.
#[derive(Debug)]
pub struct FeatureWindowExec {
    stage: WindowStage,
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
    /// The key columns of the input: rows are hash-partitioned by them.
    keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Key columns, then event time, ascending (nulls first): the order each partition needs.
    ordering: Vec<PhysicalSortExpr>,
}

impl FeatureWindowExec {
    /// A window stage over `input` (the stage columns). The operator asks DataFusion for input
    /// hash-partitioned by key and sorted by key, then event time, in each partition.
    pub fn try_new(stage: WindowStage, input: Arc<dyn ExecutionPlan>) -> Result<Self> {
        let input_schema = input.schema();
        let keys = (0..stage.layout.keys)
            .map(|i| physical_col(input_schema.field(i).name(), &input_schema))
            .collect::<Result<Vec<_>>>()?;
        let mut input_ordering: Vec<PhysicalSortExpr> =
            keys.iter().cloned().map(PhysicalSortExpr::new_default).collect();
        input_ordering.push(PhysicalSortExpr::new_default(physical_col(
            input_schema.field(stage.layout.time).name(),
            &input_schema,
        )?));
        let schema = stage.output_schema.clone();
        let mut ordering = Vec::new();
        for name in stage.key_names.iter().map(String::as_str).chain(["window_start"]) {
            ordering.push(PhysicalSortExpr::new_default(physical_col(name, &schema)?));
        }
        let mut equivalences = EquivalenceProperties::new(schema);
        if !stage.picks_wanted() {
            equivalences.add_ordering(ordering);
        }
        let partitioning = if keys.is_empty() {
            Partitioning::UnknownPartitioning(1)
        } else {
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count())
        };
        let properties =
            PlanProperties::new(equivalences, partitioning, EmissionType::Incremental, Boundedness::Bounded);
        Ok(FeatureWindowExec { stage, input, properties: Arc::new(properties), keys, ordering: input_ordering })
    }
}

impl FeatureWindowExec {
    /// The window stage it runs.
    pub fn stage(&self) -> &WindowStage {
        &self.stage
    }
}

impl DisplayAs for FeatureWindowExec {
    fn fmt_as(&self, _format: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "FeatureWindowExec: {}", self.stage.describe())
    }
}

impl ExecutionPlan for FeatureWindowExec {
    fn name(&self) -> &'static str {
        "FeatureWindowExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false]
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        if self.keys.is_empty() {
            vec![Distribution::SinglePartition]
        } else {
            vec![Distribution::KeyPartitioned(self.keys.clone())]
        }
    }

    fn required_input_ordering(&self) -> Vec<Option<OrderingRequirements>> {
        if self.stage.picks_wanted() {
            return vec![None];
        }
        let requirement = LexRequirement::new(self.ordering.iter().cloned().map(PhysicalSortRequirement::from));
        vec![requirement.map(OrderingRequirements::new)]
    }

    fn with_new_children(self: Arc<Self>, mut children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        let input =
            children.pop().ok_or_else(|| DataFusionError::Internal("FeatureWindowExec takes one input".into()))?;
        Ok(Arc::new(FeatureWindowExec::try_new(self.stage.clone(), input)?))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context.clone())?;
        let batch_size = context.session_config().batch_size();
        if self.stage.picks_wanted() {
            return WantedState::new(&self.stage, batch_size)?.stream(input);
        }
        let state = StageState::new(&self.stage, batch_size)?;
        let schema = self.stage.output_schema.clone();
        let stream = futures::stream::unfold(Some((input, state)), |current| async move {
            let (mut input, mut state) = current?;
            loop {
                if let Some(batch) = state.ready.pop() {
                    return Some((Ok(batch), Some((input, state))));
                }
                if state.done {
                    return None;
                }
                let step = match input.next().await {
                    Some(Ok(batch)) => state.consume(&batch),
                    Some(Err(e)) => Err(e),
                    None => state.finish(),
                };
                if let Err(e) = step {
                    return Some((Err(e), None));
                }
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// Per-key window assembly for either kind of window.
enum Assembler {
    Panes { slider: PaneSlider, panes: lockstep_features::Panes, open: Option<(i64, Vec<Partial>)> },
    Sessions(SessionBuilder),
}

/// Output rows of one batch in the making.
struct StageState {
    stage: WindowStage,
    converter: RowConverter,
    assembler: Assembler,
    key: Option<OwnedRow>,
    sink: RowSink,
    batch_size: usize,
    ready: Vec<RecordBatch>,
    done: bool,
}

impl StageState {
    fn new(stage: &WindowStage, batch_size: usize) -> Result<Self> {
        let converter = key_converter(stage)?;
        let assembler = match stage.window {
            Window::Session { gap } => Assembler::Sessions(SessionBuilder::new(gap, stage.specs.clone())),
            sliding => {
                let panes =
                    sliding.panes().ok_or_else(|| DataFusionError::Internal("sliding window without panes".into()))?;
                Assembler::Panes { slider: PaneSlider::new(panes, stage.specs.clone()), panes, open: None }
            }
        };
        Ok(StageState {
            stage: stage.clone(),
            converter,
            assembler,
            key: None,
            sink: RowSink::new(&stage.specs, stage.output_schema.clone(), batch_size),
            batch_size,
            ready: Vec::new(),
            done: false,
        })
    }

    fn consume(&mut self, batch: &RecordBatch) -> Result<()> {
        let layout = &self.stage.layout;
        let keys = self.converter.convert_columns(&batch.columns()[..layout.keys])?;
        let stage = StageBatch::new(layout, batch)?;
        let feature = self.stage.feature.clone();
        let specs = &self.stage.specs;
        let counters = &self.stage.counters;
        for (row, time) in timed_rows(&stage, batch.num_rows(), counters) {
            let key = keys.row(row);
            if self.key.as_ref().is_none_or(|k| k.row() != key) {
                if self.key.take().is_some() {
                    finish_key(&mut self.assembler, &mut self.sink, &feature)?;
                }
                let owned = key.owned();
                self.sink.begin_key(&owned);
                self.key = Some(owned);
            }
            let sink = &mut self.sink;
            let states: &mut Vec<Partial> = match &mut self.assembler {
                Assembler::Panes { slider, panes, open } => {
                    let pane = panes.pane_of(time);
                    if open.as_ref().is_some_and(|(p, _)| *p != pane) {
                        let (p, states) = open.take().expect("checked above");
                        slider.push(p, states, &mut |w| sink.append(w, &feature))?;
                    }
                    &mut open.get_or_insert_with(|| (pane, specs.iter().map(Partial::empty).collect())).1
                }
                Assembler::Sessions(builder) => builder.at(time, &mut |w| sink.append(w, &feature))?,
            };
            stage.apply(specs, states, row, time);
            if self.sink.rows >= self.batch_size {
                flush(&mut self.sink, &self.converter, counters, &mut self.ready)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        flush(&mut self.sink, &self.converter, &self.stage.counters, &mut self.ready)
    }

    fn finish(&mut self) -> Result<()> {
        if self.key.take().is_some() {
            let feature = self.stage.feature.clone();
            finish_key(&mut self.assembler, &mut self.sink, &feature)?;
        }
        self.flush()?;
        self.done = true;
        Ok(())
    }
}

/// Converts a stage's key columns to and from Arrow's row format.
fn key_converter(stage: &WindowStage) -> Result<RowConverter> {
    let fields: Vec<SortField> = stage.output_schema.fields()[..stage.layout.keys]
        .iter()
        .map(|f| SortField::new(f.data_type().clone()))
        .collect();
    Ok(RowConverter::new(fields)?)
}

/// Moves the rows made so far into the queue of ready batches.
fn flush(
    sink: &mut RowSink,
    converter: &RowConverter,
    counters: &StageCounters,
    ready: &mut Vec<RecordBatch>,
) -> Result<()> {
    if let Some(batch) = sink.finish(converter)? {
        counters.windows.fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
        // `ready` is popped from the back: keep output order by inserting at the front.
        ready.insert(0, batch);
    }
    Ok(())
}

fn finish_key(assembler: &mut Assembler, sink: &mut RowSink, feature: &str) -> Result<()> {
    let mut emit = |w: WindowRow<'_>| sink.append(w, feature);
    match assembler {
        Assembler::Panes { slider, open, .. } => {
            if let Some((p, states)) = open.take() {
                slider.push(p, states, &mut emit)?;
            }
            slider.finish(&mut emit)
        }
        Assembler::Sessions(builder) => builder.finish(&mut emit),
    }
}

/// The rows of a stage batch of `rows` rows that have an event time, with that time. Counts
/// the batch's events, and the rows without a time (which both window stages skip).
fn timed_rows<'a>(
    stage: &'a StageBatch<'_>,
    rows: usize,
    counters: &'a StageCounters,
) -> impl Iterator<Item = (usize, i64)> + 'a {
    counters.events.fetch_add(rows as u64, Ordering::Relaxed);
    (0..rows).filter_map(move |row| {
        let time = stage.time(row);
        if time.is_none() {
            counters.null_times.fetch_add(1, Ordering::Relaxed);
        }
        Some(row).zip(time)
    })
}

/// The wanted windows of one key in one partition: their starts (ascending) and, once an event
/// falls in one, its partial states.
struct KeyWindows {
    key: OwnedRow,
    starts: Vec<i64>,
    states: Vec<Option<Vec<Partial>>>,
}

/// A window stage that computes only wanted windows of a sliding window (a training set's),
/// without sorting: each event updates the partial states of the wanted windows holding it,
/// found by binary search among its key's wanted starts. The partial states are the shared
/// kernels', which are order-independent and exact, so a window holds the same bits as when
/// slid over sorted panes. Memory is the wanted windows' states of this partition's keys.
struct WantedState {
    stage: WindowStage,
    wanted: Arc<WantedWindows>,
    panes: lockstep_features::Panes,
    converter: RowConverter,
    keys: datafusion::common::HashMap<Box<[u8]>, KeyWindows>,
    batch_size: usize,
}

impl WantedState {
    fn new(stage: &WindowStage, batch_size: usize) -> Result<Self> {
        let internal = |what: &str| DataFusionError::Internal(format!("wanted windows need {what}"));
        Ok(WantedState {
            stage: stage.clone(),
            wanted: stage.wanted.clone().ok_or_else(|| internal("a wanted set"))?,
            panes: stage.window.panes().ok_or_else(|| internal("a sliding window"))?,
            converter: key_converter(stage)?,
            keys: Default::default(),
            batch_size,
        })
    }

    /// Folds every input batch in, then emits the windows.
    fn stream(self, input: SendableRecordBatchStream) -> Result<SendableRecordBatchStream> {
        let schema = self.stage.output_schema.clone();
        let stream = futures::stream::once(async move {
            let mut state = self;
            let mut input = input;
            while let Some(batch) = input.next().await {
                state.consume(&batch?)?;
            }
            state.finish()
        })
        .map(|result: Result<Vec<RecordBatch>>| match result {
            Ok(batches) => futures::stream::iter(batches.into_iter().map(Ok)).left_stream(),
            Err(e) => futures::stream::once(async move { Err(e) }).right_stream(),
        })
        .flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }

    fn consume(&mut self, batch: &RecordBatch) -> Result<()> {
        let layout = &self.stage.layout;
        let keys = self.converter.convert_columns(&batch.columns()[..layout.keys])?;
        let stage = StageBatch::new(layout, batch)?;
        let (specs, panes) = (&self.stage.specs, self.panes);
        for (row, time) in timed_rows(&stage, batch.num_rows(), &self.stage.counters) {
            let key = keys.row(row);
            let windows = match self.keys.get_mut(key.as_ref()) {
                Some(windows) => windows,
                None => {
                    let starts = self.wanted.by_key.get(key.as_ref()).cloned().unwrap_or_default();
                    let states = (0..starts.len()).map(|_| None).collect();
                    self.keys.entry(key.as_ref().into()).or_insert(KeyWindows { key: key.owned(), starts, states })
                }
            };
            let holding = panes.windows_of_pane(panes.pane_of(time));
            let (first, last) = (panes.start_of(*holding.start()), panes.start_of(*holding.end()));
            let mut i = windows.starts.partition_point(|s| *s < first);
            while i < windows.starts.len() && windows.starts[i] <= last {
                let states =
                    windows.states[i].get_or_insert_with(|| specs.iter().map(Partial::empty).collect::<Vec<_>>());
                stage.apply(specs, states, row, time);
                i += 1;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<RecordBatch>> {
        let mut sink = RowSink::new(&self.stage.specs, self.stage.output_schema.clone(), self.batch_size);
        let mut ready = Vec::new();
        let feature = self.stage.feature.clone();
        for windows in self.keys.values() {
            if windows.states.iter().all(Option::is_none) {
                continue;
            }
            sink.begin_key(&windows.key);
            for (start, states) in windows.starts.iter().zip(&windows.states) {
                let Some(states) = states else { continue };
                let end = self.panes.window_end(self.panes.pane_of(*start));
                sink.append(WindowRow { start: *start, end, states: WindowStates::Merged(states) }, &feature)?;
                if sink.rows >= self.batch_size {
                    flush(&mut sink, &self.converter, &self.stage.counters, &mut ready)?;
                }
            }
        }
        flush(&mut sink, &self.converter, &self.stage.counters, &mut ready)?;
        // `flush` queues batches for popping from the back; hand them out in order.
        ready.reverse();
        Ok(ready)
    }
}
