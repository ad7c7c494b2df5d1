//! `FeatureWindowExec`: the window stage of the batch job as a DataFusion operator.
//!
//! Its input is the feature's stage columns (keys, event time, aggregate arguments and `FILTER`
//! masks; see [`StageLayout`]) sorted by key, then event time. It walks each key's events once:
//! events update the partial state of their pane (or session), finished panes go to a
//! [`PaneSlider`], and every window the slider emits is evaluated and appended to the output.
//! Memory is one key's live panes plus one output batch; the sort before it spills to disk under
//! the session's memory limit.
//!
//! Keys are spread over the cores in one of two ways ([`Spread`]):
//! - **partitions**: input hash-partitioned by key and sorted in each partition; output rows are
//!   ordered by key, then `window_start`, in each partition (a cluster's stages, and outputs
//!   ordered by time, which are sorted again anyway);
//! - **key runs**: one input stream sorted by key, then event time (a merge of sorted partitions),
//!   cut into runs of whole keys that run concurrently on the session's threads. Their rows come
//!   out in run order, so the output is one stream ordered by key, then `window_start`, without
//!   merging output rows, which outnumber events by the windows each event falls in.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::{RecordBatch, make_comparator};
use arrow::compute::SortOptions;
use arrow::datatypes::SchemaRef;
use arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::common::runtime::SpawnedTask;
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
    /// How keys are spread over the cores.
    pub spread: Spread,
}

/// How the window stage spreads keys over the cores; see the module documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Spread {
    /// Hash partitions by key, each sorted; output ordered by key in each partition.
    #[default]
    Partitions,
    /// One stream sorted by key, cut into runs of whole keys that run concurrently; output is
    /// one stream ordered by key, then `window_start`.
    KeyRuns,
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
            spread: Spread::Partitions,
        }
    }

    /// Whether the stage runs key runs of one sorted stream ([`Spread::KeyRuns`]); only a stage
    /// with keys and over every window can.
    fn runs_keys(&self) -> bool {
        self.spread == Spread::KeyRuns && self.layout.keys > 0 && !self.picks_wanted()
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
        let partitioning = if keys.is_empty() || stage.runs_keys() {
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
        write!(f, "FeatureWindowExec: {}", self.stage.describe())?;
        if self.stage.runs_keys() {
            write!(f, ", in concurrent runs of whole keys")?;
        }
        Ok(())
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
        if self.keys.is_empty() || self.stage.runs_keys() {
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
        if self.stage.runs_keys() {
            let tasks = context.session_config().target_partitions().max(1);
            return Ok(key_runs(self.stage.clone(), input, batch_size, tasks));
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

/// Batches of events per key run, at least (a run ends where a key does). A run's output rows,
/// its events times the windows each falls in, are held until the rows before them are out.
const RUN_BATCHES: usize = 2;

/// Key runs being computed or waiting to be written, per task the session runs at once.
const RUNS_AHEAD_PER_TASK: usize = 2;

/// The window stage over one stream sorted by key, then event time ([`Spread::KeyRuns`]): the
/// stream is cut into runs of whole keys, each computed by a task of its own on a fresh
/// [`StageState`]; their output batches come out in run order.
///
/// Cutting runs (and so merging the sorted input) is a task of its own too, which works ahead
/// of the consumer by up to `RUNS_AHEAD_PER_TASK * tasks` runs: were it driven by the consumer,
/// a consumer waiting on its own output (a writer's full channel) would stop the merge and
/// leave the cores idle.
fn key_runs(
    stage: WindowStage,
    input: SendableRecordBatchStream,
    batch_size: usize,
    tasks: usize,
) -> SendableRecordBatchStream {
    let schema = stage.output_schema.clone();
    let keys = stage.layout.keys;
    let (runs, received) =
        tokio::sync::mpsc::channel::<SpawnedTask<Result<Vec<RecordBatch>>>>(RUNS_AHEAD_PER_TASK * tasks.max(1));
    let cutting = SpawnedTask::spawn(async move {
        let mut input = input;
        let mut cutter = KeyRunCutter { min_rows: RUN_BATCHES * batch_size, pending: Vec::new(), rows: 0 };
        loop {
            let (run, last) = match input.next().await {
                Some(Ok(batch)) => match cutter.push(batch, keys) {
                    Ok(Some(run)) => (Ok(run), false),
                    Ok(None) => continue,
                    Err(e) => (Err(e), true),
                },
                Some(Err(e)) => (Err(e), true),
                None => match cutter.rest() {
                    Some(run) => (Ok(run), true),
                    None => return,
                },
            };
            let stage = stage.clone();
            let task = SpawnedTask::spawn(async move { window_run(&stage, batch_size, &run?) });
            // A send fails only once the consumer is gone: nothing is left to do.
            if runs.send(task).await.is_err() || last {
                return;
            }
        }
    });
    // The consumer holds the cutting task: dropping the stream cancels it, and with it the runs
    // it has not handed over (a `SpawnedTask` aborts when dropped).
    let windows = futures::stream::unfold(Some((cutting, received)), |state| async move {
        let (cutting, mut received) = state?;
        let result = match received.recv().await {
            Some(task) => task.join().await.map_err(|e| DataFusionError::ExecutionJoin(Box::new(e))).and_then(|r| r),
            // The cutting task is done and every run handed over, unless it panicked: join it
            // so that a panic is an error rather than output cut short.
            None => {
                return match cutting.join().await {
                    Ok(()) => None,
                    Err(e) => Some((Err(DataFusionError::ExecutionJoin(Box::new(e))), None)),
                };
            }
        };
        let failed = result.is_err();
        Some((result, (!failed).then_some((cutting, received))))
    })
    .map(|result: Result<Vec<RecordBatch>>| match result {
        Ok(batches) => futures::stream::iter(batches.into_iter().map(Ok)).left_stream(),
        Err(e) => futures::stream::once(async move { Err(e) }).right_stream(),
    })
    .flatten();
    Box::pin(RecordBatchStreamAdapter::new(schema, windows))
}

/// The output batches of one run of whole keys, in order.
fn window_run(stage: &WindowStage, batch_size: usize, run: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
    let mut state = StageState::new(stage, batch_size)?;
    for batch in run {
        state.consume(batch)?;
    }
    state.finish()?;
    // `ready` is popped from the back.
    state.ready.reverse();
    Ok(state.ready)
}

/// Cuts a stream sorted by key into runs of whole keys of at least `min_rows` rows: the rows of
/// the last key seen stay pending, as it may go on in the next batch.
struct KeyRunCutter {
    min_rows: usize,
    pending: Vec<RecordBatch>,
    rows: usize,
}

impl KeyRunCutter {
    /// Takes the next batch; returns a run once enough whole keys are pending.
    fn push(&mut self, batch: RecordBatch, keys: usize) -> Result<Option<Vec<RecordBatch>>> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(None);
        }
        if self.rows + rows < self.min_rows {
            self.rows += rows;
            self.pending.push(batch);
            return Ok(None);
        }
        let cut = last_key_start(&batch, keys)?;
        if cut == 0 {
            // One key fills the batch: it may go on, so the run cannot end here.
            self.rows += rows;
            self.pending.push(batch);
            return Ok(None);
        }
        let mut run = std::mem::take(&mut self.pending);
        run.push(batch.slice(0, cut));
        self.pending.push(batch.slice(cut, rows - cut));
        self.rows = rows - cut;
        Ok(Some(run))
    }

    /// The rows still pending, at the end of the input.
    fn rest(&mut self) -> Option<Vec<RecordBatch>> {
        self.rows = 0;
        Some(std::mem::take(&mut self.pending)).filter(|run| !run.is_empty())
    }
}

/// The first row of `batch` (sorted by its first `keys` columns) whose key is its last row's.
fn last_key_start(batch: &RecordBatch, keys: usize) -> Result<usize> {
    let last = batch.num_rows() - 1;
    let comparators = batch.columns()[..keys]
        .iter()
        .map(|column| Ok(make_comparator(column.as_ref(), column.as_ref(), SortOptions::default())?))
        .collect::<Result<Vec<_>>>()?;
    let before_last = |row: usize| comparators.iter().map(|compare| compare(row, last)).any(|o| o.is_ne());
    // Rows before the last key's first row hold smaller keys: binary search for the boundary.
    let (mut low, mut high) = (0, last);
    while low < high {
        let middle = low + (high - low) / 2;
        if before_last(middle) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    Ok(low)
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
                let row = WindowRow::single(*start, end, WindowStates::Merged(states), false);
                sink.append(row, &feature)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    /// Batches of (key, n) rows sorted by key, cut at arbitrary places.
    fn sorted_batches(keys: &[(Option<&str>, usize)], cuts: &[usize]) -> Vec<RecordBatch> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("key", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
        ]));
        let names: Vec<Option<&str>> = keys.iter().flat_map(|(k, count)| std::iter::repeat_n(*k, *count)).collect();
        let all = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(names.clone())),
                Arc::new(Int64Array::from_iter_values(0..names.len() as i64)),
            ],
        )
        .unwrap();
        let mut bounds: Vec<usize> = cuts.iter().copied().filter(|c| *c < names.len()).collect();
        bounds.extend([0, names.len()]);
        bounds.sort_unstable();
        bounds.dedup();
        bounds.windows(2).map(|w| all.slice(w[0], w[1] - w[0])).collect()
    }

    fn key_at(batch: &RecordBatch, row: usize) -> Option<String> {
        let keys = batch.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        keys.is_valid(row).then(|| keys.value(row).to_string())
    }

    #[test]
    fn key_runs_hold_whole_keys_in_order() {
        // A null key first (nulls sort first), a key spanning several batches, single-row keys.
        let keys = [(None, 3), (Some("a"), 1), (Some("b"), 9), (Some("c"), 1), (Some("d"), 2), (Some("e"), 4)];
        for min_rows in [1, 2, 5, 8, 100] {
            for cuts in [vec![], vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], vec![3, 4, 7, 13]]
            {
                let mut cutter = KeyRunCutter { min_rows, pending: Vec::new(), rows: 0 };
                let mut runs = Vec::new();
                for batch in sorted_batches(&keys, &cuts) {
                    runs.extend(cutter.push(batch, 1).unwrap());
                }
                runs.extend(cutter.rest());
                let ns: Vec<i64> = runs
                    .iter()
                    .flatten()
                    .flat_map(|b| b.column(1).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec())
                    .collect();
                assert_eq!(ns, (0..20).collect::<Vec<_>>(), "every row once, in order ({min_rows}, {cuts:?})");
                for pair in runs.windows(2) {
                    let (before, after) = (pair[0].last().unwrap(), pair[1].first().unwrap());
                    let rows: usize = pair[0].iter().map(RecordBatch::num_rows).sum();
                    assert!(rows >= min_rows, "a run before the last has at least {min_rows} rows");
                    assert_ne!(key_at(before, before.num_rows() - 1), key_at(after, 0), "a key split over runs");
                }
                assert!(runs.iter().flatten().all(|b| b.num_rows() > 0));
            }
        }
    }

    #[test]
    fn the_last_key_starts_where_its_rows_begin() {
        let batch = sorted_batches(&[(None, 2), (Some("x"), 3), (Some("y"), 2)], &[]).remove(0);
        assert_eq!(last_key_start(&batch, 1).unwrap(), 5);
        assert_eq!(last_key_start(&batch.slice(0, 5), 1).unwrap(), 2);
        assert_eq!(last_key_start(&batch.slice(0, 2), 1).unwrap(), 0);
        assert_eq!(last_key_start(&batch.slice(6, 1), 1).unwrap(), 0);
    }
}
