//! The window engine of one input partition: events in, fired windows, retractions and too-late
//! events out, by the rules of [`crate::rules`].
//!
//! The engine holds, per key, the partial states of its live panes (sliding and tumbling
//! windows) or sessions, and one timer: the end of its next window to fire, or the time its
//! oldest state may be released. Events are applied in arrival order, each judged against the
//! watermark before it; after each event the watermark advances and every window it passed
//! fires, earliest end first.
//!
//! A window fires through a [`Sliding`] state per key that panes enter and leave in order — the
//! same kernels the batch job slides over panes. A late update to a pane already inside that
//! state invalidates it; the windows that fire again after a late update are one slider merged
//! afresh from its panes and moved over them, which then stays as the key's slider. Both give
//! the same bits, because partial states are exact.
//!
//! Every state change can be tracked ([`Engine::take_changes`]) as records of a changelog keyed
//! by (key, pane or session start), from which [`Engine::restore`] rebuilds an engine that
//! continues exactly where the first one stopped.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::{Bound, RangeBounds};

use arrow::array::{Array, BooleanArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::common::{DataFusionError, Result};
use lockstep_features::assemble::{WindowRow, WindowStates};
use lockstep_features::codec::{decode_partial, encode_partial, take, take_i64, take_u8, take_u32};
use lockstep_features::rows::{RowSink, format_time};
use lockstep_features::window::continues_session;
use lockstep_features::{AggregateSpec, CompiledFeature, Panes, Partial, Sliding, StageBatch, StageLayout, Window};

use crate::rules::{Verdict, Watermark, judge, releasable, session_too_late};

/// The hasher of the engine's maps (key ids, encoded keys): foldhash, seeded per map, as for
/// `count(distinct)` sets.
type Fast = foldhash::fast::RandomState;

/// What a fired window is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The window's watermark passed its end: its first value.
    Fire,
    /// A late event within allowed lateness updated a window that had fired.
    Refire,
    /// A late event merged this session into another: the row no longer exists.
    Retract,
}

/// One output change, in the order the engine made them.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: ChangeKind,
    /// The key, in the engine's row format ([`Engine::key_columns`] turns it into columns).
    pub key: OwnedRow,
    pub start: i64,
    pub end: i64,
    /// The row of [`Effects::rows`] holding the values (`None` for a retraction).
    pub row: Option<usize>,
    /// The sequence number (input position) of the event that caused the change.
    pub seq: u64,
}

/// An event that was too late for some or all of its windows.
#[derive(Debug, Clone)]
pub struct LateEvent {
    /// Index of the event in the batch given to [`Engine::process`].
    pub row: usize,
    pub seq: u64,
    pub key: OwnedRow,
    pub event_time: i64,
    pub watermark: i64,
    /// The windows it was not applied to, as (start, end); empty for a session event.
    pub windows: Vec<(i64, i64)>,
    pub reason: String,
}

/// What one call to the engine produced.
pub struct Effects {
    /// Values of fired windows, in the output schema of SPEC §2.
    pub rows: Option<RecordBatch>,
    pub changes: Vec<Change>,
    pub late: Vec<LateEvent>,
}

/// Running totals of one engine.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EngineCounters {
    pub events: u64,
    pub filtered_out: u64,
    pub null_times: u64,
    pub late_applied: u64,
    pub too_late: u64,
    pub fired: u64,
    pub refired: u64,
    pub retracted: u64,
}

/// One live session of a key.
#[derive(Debug, Clone)]
struct Session {
    last: i64,
    /// It fired with its current events.
    fired: bool,
    /// A row with this start was emitted before (a later one replaces it).
    emitted: bool,
    states: Vec<Partial>,
}

/// A key's live panes by pane number, in order: a deque sorted by pane. Events mostly add to the
/// back and releases take from the front, and the engine looks panes up and walks ranges of them
/// for every event and window. A binary search over pane numbers held in one block of memory
/// does that with far fewer instructions than walking a B-tree's nodes (written here: a sorted
/// deque is a few lines over `VecDeque`). A pane added in the middle (a late event) shifts the
/// panes after it: at most a window, the allowed lateness and the watermark delay of them.
#[derive(Default)]
struct PaneStates(VecDeque<(i64, Vec<Partial>)>);

impl PaneStates {
    /// The position of pane `pane`, or where it would go.
    fn find(&self, pane: i64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&pane, |(p, _)| *p)
    }

    fn get(&self, pane: i64) -> Option<&Vec<Partial>> {
        self.find(pane).ok().map(|at| &self.0[at].1)
    }

    /// Pane `pane`'s states, made by `empty` if the pane is new (then also `true`).
    fn get_or_insert_with(&mut self, pane: i64, empty: impl FnOnce() -> Vec<Partial>) -> (&mut Vec<Partial>, bool) {
        match self.find(pane) {
            Ok(at) => (&mut self.0[at].1, false),
            Err(at) => {
                self.0.insert(at, (pane, empty()));
                (&mut self.0[at].1, true)
            }
        }
    }

    fn insert(&mut self, pane: i64, states: Vec<Partial>) {
        match self.find(pane) {
            Ok(at) => self.0[at].1 = states,
            Err(at) => self.0.insert(at, (pane, states)),
        }
    }

    /// The panes in `panes`, in order.
    fn range(&self, panes: impl RangeBounds<i64>) -> impl Iterator<Item = (i64, &Vec<Partial>)> {
        let start = match panes.start_bound() {
            Bound::Included(from) => self.0.partition_point(|(p, _)| p < from),
            Bound::Excluded(from) => self.0.partition_point(|(p, _)| p <= from),
            Bound::Unbounded => 0,
        };
        let end = match panes.end_bound() {
            Bound::Included(to) => self.0.partition_point(|(p, _)| p <= to),
            Bound::Excluded(to) => self.0.partition_point(|(p, _)| p < to),
            Bound::Unbounded => self.0.len(),
        };
        self.0.range(start..end.max(start)).map(|(p, states)| (*p, states))
    }

    /// The first pane after `pane`.
    fn first_after(&self, pane: i64) -> Option<i64> {
        let at = self.0.partition_point(|(p, _)| *p <= pane);
        self.0.get(at).map(|(p, _)| *p)
    }

    fn first(&self) -> Option<i64> {
        self.0.front().map(|(p, _)| *p)
    }

    fn pop_first(&mut self) -> Option<Vec<Partial>> {
        self.0.pop_front().map(|(_, states)| states)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The slider of one key: `window` holds exactly the key's panes in `[cursor, cursor + per - 1]`.
struct Slider {
    window: Vec<Sliding>,
    cursor: i64,
    /// The output row (sink batch number, row) where `window` was last emitted.
    emitted: Option<(u64, usize)>,
}

enum KeyState {
    Panes {
        panes: PaneStates,
        /// The start pane of the last window that fired; every window holding a pane and starting
        /// at or before it has fired.
        fired_through: Option<i64>,
        slider: Option<Slider>,
    },
    Sessions(BTreeMap<i64, Session>),
}

struct KeyEntry {
    key: OwnedRow,
    timer: Option<i64>,
    state: KeyState,
}

#[derive(Clone, Copy)]
enum Shape {
    Panes(Panes),
    Sessions { gap: i64 },
}

/// Moves a key's slider to the window starting at pane `start` (`per` panes): panes outside it
/// leave and panes inside it enter. Forward, the slider's FIFO order holds for every aggregate.
/// Backward (late refires start at earlier windows), invertible aggregates move the same way and
/// min/max/first/last are merged again from the panes. Without a slider, or one with no pane in
/// common, a new one is merged from the key's panes `held`.
fn slide_to<'a>(
    slider: &'a mut Option<Slider>,
    held: &PaneStates,
    specs: &[AggregateSpec],
    start: i64,
    per: i64,
) -> &'a mut Slider {
    if slider.as_ref().is_none_or(|s| s.cursor.abs_diff(start) >= per as u64) {
        let mut window: Vec<Sliding> = specs.iter().map(Sliding::new).collect();
        for (p, states) in held.range(start..=start.saturating_add(per - 1)) {
            for (i, sliding) in window.iter_mut().enumerate() {
                sliding.push(specs[i].function, p, &states[i]);
            }
        }
        return slider.insert(Slider { window, cursor: start, emitted: None });
    }
    let s = slider.as_mut().expect("a slider near the window");
    let last = start.saturating_add(per - 1);
    let old_last = s.cursor.saturating_add(per - 1);
    let (leaving, entering) = if s.cursor <= start {
        (s.cursor..start, old_last.saturating_add(1)..last.saturating_add(1))
    } else {
        (last.saturating_add(1)..old_last.saturating_add(1), start..s.cursor)
    };
    let backward = s.cursor > start;
    let mut changed = false;
    for (p, states) in held.range(leaving) {
        for (i, sliding) in s.window.iter_mut().enumerate() {
            if !(backward && sliding.is_monotonic()) {
                sliding.pop(p, &states[i]);
            }
        }
        changed = true;
    }
    for (p, states) in held.range(entering) {
        for (i, sliding) in s.window.iter_mut().enumerate() {
            if !(backward && sliding.is_monotonic()) {
                sliding.push(specs[i].function, p, &states[i]);
            }
        }
        changed = true;
    }
    if backward && changed {
        remerge_monotonic(s, held, specs, start, per);
    }
    s.cursor = start;
    if changed {
        s.emitted = None;
    }
    s
}

/// Merges the slider's min/max/first/last again from the panes of the window at pane `start`
/// (their deques only take panes in order).
fn remerge_monotonic(s: &mut Slider, held: &PaneStates, specs: &[AggregateSpec], start: i64, per: i64) {
    for (i, sliding) in s.window.iter_mut().enumerate() {
        if sliding.is_monotonic() {
            *sliding = Sliding::new(&specs[i]);
            for (p, states) in held.range(start..=start.saturating_add(per - 1)) {
                sliding.push(specs[i].function, p, &states[i]);
            }
        }
    }
}

/// Pane `pane` of the slider's window changed from `before` to its state in `held` (a late
/// event): invertible aggregates take the difference, min/max/first/last are merged again.
fn refresh_pane(s: &mut Slider, held: &PaneStates, specs: &[AggregateSpec], pane: i64, before: &[Partial], per: i64) {
    let after = held.get(pane).expect("the changed pane is held");
    for (i, sliding) in s.window.iter_mut().enumerate() {
        if !sliding.is_monotonic() {
            sliding.pop(pane, &before[i]);
            sliding.push(specs[i].function, pane, &after[i]);
        }
    }
    remerge_monotonic(s, held, specs, s.cursor, per);
    s.emitted = None;
}

/// Changelog record kinds (the second byte of a record key).
const RECORD_WATERMARK: u8 = 0;
const RECORD_FIRED_THROUGH: u8 = 1;
const RECORD_SLOT: u8 = 2;
/// The first byte of every record key and value; bumped when the format changes.
const FORMAT: u8 = 1;

/// The engine of one partition; see the module documentation.
pub struct Engine {
    specs: Vec<AggregateSpec>,
    layout: StageLayout,
    output_schema: SchemaRef,
    shape: Shape,
    lateness: i64,
    watermark: Watermark,
    converter: RowConverter,
    /// Key ids by the key's row bytes.
    ids: HashMap<Box<[u8]>, u32, Fast>,
    keys: Vec<Option<KeyEntry>>,
    free: Vec<u32>,
    timers: BTreeSet<(i64, u32)>,
    /// Changelog tracking: touched (key id, slot) pairs, keys whose `fired_through` moved, and
    /// deleted slots. `None` when the caller does not keep a changelog.
    tracking: Option<Tracking>,
    counters: EngineCounters,
    out: Output,
    late: Vec<LateEvent>,
    /// States of released panes, emptied when a new pane takes them: a pane made for every key
    /// and slide then allocates nothing (exact sums keep their limbs, distinct sets their table).
    spare: Vec<Vec<Partial>>,
}

/// Most released pane states an engine keeps for new panes.
const SPARE_PANES: usize = 4096;

/// Output rows under construction, and their changes.
struct Output {
    feature: String,
    sink: RowSink,
    /// Number of the batch `sink` is building.
    batch: u64,
    changes: Vec<Change>,
}

impl Output {
    /// Appends a window of `key`; with `copy`, its values are those of that row of this batch.
    fn push(
        &mut self,
        key: OwnedRow,
        row: WindowRow<'_>,
        copy: Option<usize>,
        kind: ChangeKind,
        seq: u64,
    ) -> Result<()> {
        let (start, end) = (row.start, row.end);
        self.sink.begin_key(&key);
        match copy {
            Some(from) => self.sink.append_copy(row, from)?,
            None => self.sink.append(row, &self.feature)?,
        }
        self.changes.push(Change { kind, key, start, end, row: Some(self.sink.rows - 1), seq });
        Ok(())
    }
}

#[derive(Default)]
struct Tracking {
    slots: HashSet<(u32, i64), Fast>,
    fired_through: HashSet<u32, Fast>,
    deleted: Vec<(OwnedRow, i64)>,
    /// Ids freed since the last [`Engine::take_changes`]; reusable only after it.
    freed: Vec<u32>,
    watermark_moved: bool,
}

impl Engine {
    /// An engine for `feature`, with the source's watermark delay and allowed lateness.
    /// `track_changes` keeps what [`Engine::take_changes`] returns.
    pub fn new(feature: &CompiledFeature, track_changes: bool) -> Result<Self> {
        let shape = match feature.window() {
            Window::Session { gap } => Shape::Sessions { gap: gap.millis() },
            sliding => Shape::Panes(
                sliding.panes().ok_or_else(|| DataFusionError::Internal("sliding window without panes".into()))?,
            ),
        };
        let output_schema = feature.output_schema();
        let key_fields: Vec<SortField> = output_schema.fields()[..feature.key_types.len()]
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        let specs = feature.specs();
        Ok(Engine {
            out: Output {
                feature: feature.feature.name.clone(),
                sink: RowSink::new(&specs, output_schema.clone(), 1024),
                batch: 0,
                changes: Vec::new(),
            },
            specs,
            layout: feature.layout(),
            output_schema,
            shape,
            lateness: feature.source.allowed_lateness.millis(),
            watermark: Watermark::new(feature.source.watermark.millis()),
            converter: RowConverter::new(key_fields)?,
            ids: HashMap::default(),
            keys: Vec::new(),
            free: Vec::new(),
            timers: BTreeSet::new(),
            tracking: track_changes.then(Tracking::default),
            counters: EngineCounters::default(),
            late: Vec::new(),
            spare: Vec::new(),
        })
    }

    pub fn counters(&self) -> EngineCounters {
        self.counters
    }

    /// The current watermark, if any event has arrived.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark.current()
    }

    /// The output schema (SPEC §2).
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// The key columns of encoded keys.
    pub fn key_columns(&self, keys: &[&OwnedRow]) -> Result<Vec<arrow::array::ArrayRef>> {
        Ok(self.converter.convert_rows(keys.iter().map(|k| k.row()))?)
    }

    /// Number of keys holding state.
    pub fn live_keys(&self) -> usize {
        self.ids.len()
    }

    /// Applies a batch of stage columns in arrival order. `passes` says which rows pass the
    /// feature's filter (the others still move the watermark); `seqs` gives each row's position
    /// in the input.
    pub fn process(&mut self, stage: &RecordBatch, passes: &BooleanArray, seqs: &[u64]) -> Result<Effects> {
        let keys = self.converter.convert_columns(&stage.columns()[..self.layout.keys])?;
        let columns = StageBatch::new(&self.layout, stage)?;
        if seqs.len() != stage.num_rows() {
            return Err(DataFusionError::Internal("one sequence number per row is required".into()));
        }
        for (row, &seq) in seqs.iter().enumerate() {
            self.counters.events += 1;
            let Some(time) = columns.time(row) else {
                self.counters.null_times += 1;
                continue;
            };
            if passes.is_valid(row) && passes.value(row) {
                let key = keys.row(row);
                self.apply(key, &columns, row, time, seq)?;
            } else {
                self.counters.filtered_out += 1;
            }
            let before = self.watermark.current();
            self.watermark.advance(time);
            let after = self.watermark.current();
            if after != before {
                if let Some(t) = self.tracking.as_mut() {
                    t.watermark_moved = true;
                }
                self.run_timers(seq)?;
            }
        }
        self.take_effects()
    }

    /// The end of input: the watermark moves to the end of time, every open window fires and
    /// all state is released.
    pub fn finish(&mut self, seq: u64) -> Result<Effects> {
        self.watermark.finish();
        if let Some(t) = self.tracking.as_mut() {
            t.watermark_moved = true;
        }
        self.run_timers(seq)?;
        self.take_effects()
    }

    /// The time of the earliest pending timer (a window end or a release), if any.
    pub fn next_timer(&self) -> Option<i64> {
        self.timers.first().map(|(time, _)| *time)
    }

    /// The source's watermark delay in milliseconds.
    pub fn watermark_delay(&self) -> i64 {
        self.watermark.delay()
    }

    /// Processing-time progress for a silent partition (`idle_timeout`): the watermark moves as
    /// if an event at `now_ms` had arrived, and the windows it passes fire.
    pub fn advance_idle(&mut self, now_ms: i64, seq: u64) -> Result<Effects> {
        let before = self.watermark.current();
        self.watermark.advance(now_ms);
        if self.watermark.current() != before {
            if let Some(t) = self.tracking.as_mut() {
                t.watermark_moved = true;
            }
            self.run_timers(seq)?;
        }
        self.take_effects()
    }

    fn take_effects(&mut self) -> Result<Effects> {
        let out = &mut self.out;
        let rows = out.sink.finish(&self.converter)?;
        out.batch += 1;
        Ok(Effects { rows, changes: std::mem::take(&mut out.changes), late: std::mem::take(&mut self.late) })
    }

    fn id_of(&mut self, key: arrow::row::Row<'_>) -> u32 {
        if let Some(id) = self.ids.get(key.as_ref()) {
            return *id;
        }
        self.insert_key(key.owned())
    }

    fn insert_key(&mut self, key: OwnedRow) -> u32 {
        let state = match self.shape {
            Shape::Panes(_) => KeyState::Panes { panes: PaneStates::default(), fired_through: None, slider: None },
            Shape::Sessions { .. } => KeyState::Sessions(BTreeMap::new()),
        };
        let entry = KeyEntry { key: key.clone(), timer: None, state };
        let id = match self.free.pop() {
            Some(id) => {
                self.keys[id as usize] = Some(entry);
                id
            }
            None => {
                self.keys.push(Some(entry));
                (self.keys.len() - 1) as u32
            }
        };
        self.ids.insert(key.row().as_ref().into(), id);
        id
    }

    /// Judges one event that passed the filter and applies it where it is not too late.
    fn apply(
        &mut self,
        key: arrow::row::Row<'_>,
        columns: &StageBatch<'_>,
        row: usize,
        time: i64,
        seq: u64,
    ) -> Result<()> {
        let watermark = self.watermark.current();
        match self.shape {
            Shape::Panes(panes) => {
                let pane = panes.pane_of(time);
                let windows = panes.windows_of_pane(pane);
                let mut too_late = Vec::new();
                let mut refire = Vec::new();
                // Window ends grow with their start: when the pane's earliest window is still
                // open, every window of the pane is, and none needs judging (most events).
                if !matches!(judge(watermark, panes.window_end(*windows.start()), self.lateness), Verdict::Update) {
                    for start in windows {
                        match judge(watermark, panes.window_end(start), self.lateness) {
                            Verdict::Update => {}
                            Verdict::UpdateAndRefire => refire.push(start),
                            Verdict::TooLate => too_late.push(start),
                        }
                    }
                }
                if !too_late.is_empty() {
                    let all = too_late.len() as i64 == panes.per_window;
                    let windows = too_late.iter().map(|s| (panes.start_of(*s), panes.window_end(*s))).collect();
                    let reason = format!(
                        "event at {} is behind the watermark {} by more than the allowed lateness for {} of its {} \
                         windows",
                        format_time(time),
                        format_time(watermark.unwrap_or(i64::MIN)),
                        too_late.len(),
                        panes.per_window
                    );
                    self.too_late(key, row, seq, time, windows, reason);
                    if all {
                        return Ok(());
                    }
                }
                if !refire.is_empty() {
                    self.counters.late_applied += 1;
                }
                let id = self.id_of(key);
                let entry = self.keys[id as usize].as_mut().expect("live key");
                let KeyState::Panes { panes: held, fired_through, slider } = &mut entry.state else {
                    unreachable!("pane engine holds pane state")
                };
                let (spare, specs) = (&mut self.spare, &self.specs);
                let (states, created) = held.get_or_insert_with(pane, || match spare.pop() {
                    Some(mut states) => {
                        states.iter_mut().for_each(Partial::clear);
                        states
                    }
                    None => specs.iter().map(Partial::empty).collect(),
                });
                // A pane inside the slider's window changes only with a late event: the slider
                // takes the change rather than being merged again.
                let in_slider = slider.as_ref().is_some_and(|s| pane >= s.cursor && pane < s.cursor + panes.per_window);
                let before = in_slider.then(|| states.clone());
                columns.apply(&self.specs, states, row, time);
                if let (Some(before), Some(s)) = (before, slider.as_mut()) {
                    refresh_pane(s, held, &self.specs, pane, &before, panes.per_window);
                }
                if let Some(t) = self.tracking.as_mut() {
                    t.slots.insert((id, pane));
                }
                // Every window of this key ending at or before the watermark is now done: the
                // timers fired the others, this event refires some, and the rest are past
                // lateness. None of them may fire on time again.
                let done = refire.last().into_iter().chain(too_late.last()).copied().max();
                if let Some(done) = done
                    && fired_through.is_none_or(|f| f < done)
                {
                    *fired_through = Some(done);
                    if let Some(t) = self.tracking.as_mut() {
                        t.fired_through.insert(id);
                    }
                }
                for start in refire {
                    self.emit_sliding(id, start, ChangeKind::Refire, seq)?;
                }
                // The key's timer depends on which panes it holds, `fired_through` and the
                // slider: an event into a pane it already held, refiring nothing and too late
                // for nothing, changes none of them.
                if created || done.is_some() {
                    self.reschedule(id);
                } else {
                    debug_assert_eq!(self.keys[id as usize].as_ref().and_then(|e| e.timer), self.due(id));
                }
            }
            Shape::Sessions { gap } => {
                if session_too_late(watermark, time, gap, self.lateness) {
                    let reason = format!(
                        "session event at {} + gap + allowed lateness is not after the watermark {}",
                        format_time(time),
                        format_time(watermark.unwrap_or(i64::MIN))
                    );
                    self.too_late(key, row, seq, time, Vec::new(), reason);
                    return Ok(());
                }
                let id = self.id_of(key);
                self.apply_session(id, columns, row, time, gap, seq)?;
                self.reschedule(id);
            }
        }
        Ok(())
    }

    /// Records an event that was too late for `windows` (all of them, for a session event).
    fn too_late(
        &mut self,
        key: arrow::row::Row<'_>,
        row: usize,
        seq: u64,
        time: i64,
        windows: Vec<(i64, i64)>,
        reason: String,
    ) {
        self.counters.too_late += 1;
        let watermark = self.watermark.current().unwrap_or(i64::MIN);
        self.late.push(LateEvent { row, seq, key: key.owned(), event_time: time, watermark, windows, reason });
    }

    fn apply_session(
        &mut self,
        id: u32,
        columns: &StageBatch<'_>,
        row: usize,
        time: i64,
        gap: i64,
        seq: u64,
    ) -> Result<()> {
        let watermark = self.watermark.current();
        let entry = self.keys[id as usize].as_mut().expect("live key");
        let KeyState::Sessions(sessions) = &mut entry.state else { unreachable!("session engine holds sessions") };
        let gap_duration = lockstep_features::Duration::from_millis(gap);
        // At most one session before the event and one after it can absorb it.
        let mut absorbed: Vec<(i64, Session)> = Vec::new();
        if let Some((&start, session)) = sessions.range(..=time).next_back()
            && (time <= session.last || continues_session(session.last, time, gap_duration))
        {
            absorbed.push((start, session.clone()));
        }
        if let Some((&start, session)) = sessions.range((Bound::Excluded(time), Bound::Unbounded)).next()
            && continues_session(time, start, gap_duration)
        {
            absorbed.push((start, session.clone()));
        }
        let mut start = time;
        let mut merged = Session {
            last: time,
            fired: false,
            emitted: false,
            states: self.specs.iter().map(Partial::empty).collect(),
        };
        for (s, session) in &absorbed {
            sessions.remove(s);
            start = start.min(*s);
            merged.last = merged.last.max(session.last);
            for (i, spec) in self.specs.iter().enumerate() {
                merged.states[i].merge(spec.function, &session.states[i]);
            }
        }
        columns.apply(&self.specs, &mut merged.states, row, time);
        let end = merged.last.saturating_add(gap);
        let due = watermark.is_some_and(|w| end <= w);
        let was_fired = absorbed.iter().any(|(_, s)| s.emitted);
        merged.emitted = absorbed.iter().any(|(s, session)| *s == start && session.emitted);
        if due || was_fired {
            self.counters.late_applied += 1;
        }
        let key = entry.key.clone();
        let mut retractions = Vec::new();
        for (s, session) in &absorbed {
            if *s != start {
                if let Some(t) = self.tracking.as_mut() {
                    t.deleted.push((key.clone(), *s));
                    t.slots.remove(&(id, *s));
                }
                if session.emitted {
                    retractions.push((*s, session.last.saturating_add(gap)));
                }
            }
        }
        merged.fired = due;
        sessions.insert(start, merged);
        if let Some(t) = self.tracking.as_mut() {
            t.slots.insert((id, start));
        }
        for (s, e) in retractions {
            self.counters.retracted += 1;
            self.out.changes.push(Change {
                kind: ChangeKind::Retract,
                key: key.clone(),
                start: s,
                end: e,
                row: None,
                seq,
            });
        }
        if due {
            self.emit_session(id, start, seq)?;
        }
        Ok(())
    }

    /// Fires every window the watermark has passed and releases what it no longer needs.
    fn run_timers(&mut self, seq: u64) -> Result<()> {
        let Some(watermark) = self.watermark.current() else { return Ok(()) };
        while let Some(&(time, id)) = self.timers.first() {
            if time > watermark {
                break;
            }
            self.timers.pop_first();
            if let Some(entry) = self.keys[id as usize].as_mut() {
                entry.timer = None;
            }
            self.on_timer(id, watermark, seq)?;
            self.reschedule(id);
        }
        Ok(())
    }

    fn on_timer(&mut self, id: u32, watermark: i64, seq: u64) -> Result<()> {
        match self.shape {
            Shape::Panes(panes) => {
                while let Some(start) = self.next_window(id, &panes) {
                    if panes.window_end(start) > watermark {
                        break;
                    }
                    self.emit_sliding(id, start, ChangeKind::Fire, seq)?;
                }
                self.release_panes(id, &panes, watermark);
            }
            Shape::Sessions { gap } => {
                let entry = self.keys[id as usize].as_mut().expect("live key");
                let KeyState::Sessions(sessions) = &mut entry.state else { unreachable!() };
                let due: Vec<i64> = sessions
                    .iter()
                    .filter(|(_, s)| !s.fired && s.last.saturating_add(gap) <= watermark)
                    .map(|(start, _)| *start)
                    .collect();
                for start in due {
                    self.emit_session(id, start, seq)?;
                }
                let entry = self.keys[id as usize].as_mut().expect("live key");
                let KeyState::Sessions(sessions) = &mut entry.state else { unreachable!() };
                let gone: Vec<i64> = sessions
                    .iter()
                    .filter(|(_, s)| {
                        releasable(s.last.saturating_add(gap).saturating_add(gap), Some(watermark), self.lateness)
                    })
                    .map(|(start, _)| *start)
                    .collect();
                for start in gone {
                    sessions.remove(&start);
                    if let Some(t) = self.tracking.as_mut() {
                        t.deleted.push((entry.key.clone(), start));
                        t.slots.remove(&(id, start));
                    }
                }
            }
        }
        self.free_if_empty(id);
        Ok(())
    }

    /// The start pane of the key's next window to fire on time: the first window after
    /// `fired_through` that holds a pane.
    fn next_window(&self, id: u32, panes: &Panes) -> Option<i64> {
        let entry = self.keys[id as usize].as_ref()?;
        let KeyState::Panes { panes: held, fired_through, .. } = &entry.state else { return None };
        let (first, after) = match fired_through {
            None => (held.first()?, i64::MIN),
            Some(f) => (held.first_after(*f)?, f.saturating_add(1)),
        };
        Some(after.max(first.saturating_sub(panes.per_window - 1)))
    }

    /// Moves the key's slider to the window starting at pane `start` and emits the window: on
    /// time (`Fire`; it is then the last window of the key that fired) or again after a late
    /// update (`Refire`, for the windows of a late event in ascending order: one slider merged
    /// from its panes moves over them, and stays as the key's slider).
    fn emit_sliding(&mut self, id: u32, start: i64, kind: ChangeKind, seq: u64) -> Result<()> {
        let Shape::Panes(panes) = self.shape else { unreachable!() };
        let entry = self.keys[id as usize].as_mut().expect("live key");
        let KeyState::Panes { panes: held, fired_through, slider } = &mut entry.state else { unreachable!() };
        let slider = slide_to(slider, held, &self.specs, start, panes.per_window);
        // A slider is dropped whenever an event reaches one of its panes, so unchanged panes
        // mean the values of its last row, which can be copied if that row is in this batch.
        let copy = slider.emitted.filter(|(batch, _)| *batch == self.out.batch).map(|(_, row)| row);
        slider.emitted = Some((self.out.batch, self.out.sink.rows));
        if matches!(kind, ChangeKind::Fire) {
            *fired_through = Some(start);
            if let Some(t) = self.tracking.as_mut() {
                t.fired_through.insert(id);
            }
            self.counters.fired += 1;
        } else {
            self.counters.refired += 1;
        }
        let key = entry.key.clone();
        let row = WindowRow::single(
            panes.start_of(start),
            panes.window_end(start),
            WindowStates::Sliding(&slider.window),
            false,
        );
        self.out.push(key, row, copy, kind, seq)
    }

    /// Emits a session: a first row for its start, or a replacement for an earlier one.
    fn emit_session(&mut self, id: u32, start: i64, seq: u64) -> Result<()> {
        let Shape::Sessions { gap } = self.shape else { unreachable!() };
        let entry = self.keys[id as usize].as_mut().expect("live key");
        let KeyState::Sessions(sessions) = &mut entry.state else { unreachable!() };
        let session = sessions.get_mut(&start).expect("session to emit exists");
        let kind = if session.emitted { ChangeKind::Refire } else { ChangeKind::Fire };
        session.fired = true;
        session.emitted = true;
        if let Some(t) = self.tracking.as_mut() {
            t.slots.insert((id, start));
        }
        let key = entry.key.clone();
        let row =
            WindowRow::single(start, session.last.saturating_add(gap), WindowStates::Merged(&session.states), false);
        match kind {
            ChangeKind::Refire => self.counters.refired += 1,
            _ => self.counters.fired += 1,
        }
        self.out.push(key, row, None, kind, seq)
    }

    /// Drops panes no window can use any more: every window holding them is past allowed
    /// lateness, and the slider no longer holds them.
    fn release_panes(&mut self, id: u32, panes: &Panes, watermark: i64) {
        let has_next = self.next_window(id, panes).is_some();
        let entry = self.keys[id as usize].as_mut().expect("live key");
        let KeyState::Panes { panes: held, slider, .. } = &mut entry.state else { unreachable!() };
        if !has_next {
            *slider = None;
        }
        let limit = slider.as_ref().map_or(i64::MAX, |s| s.cursor);
        while let Some(p) = held.first() {
            if p >= limit || !releasable(panes.window_end(p), Some(watermark), self.lateness) {
                break;
            }
            if let Some(states) = held.pop_first()
                && self.spare.len() < SPARE_PANES
            {
                self.spare.push(states);
            }
            if let Some(t) = self.tracking.as_mut() {
                t.deleted.push((entry.key.clone(), p));
                t.slots.remove(&(id, p));
            }
        }
    }

    /// Forgets a key that holds no state.
    fn free_if_empty(&mut self, id: u32) {
        let empty = match &self.keys[id as usize] {
            Some(KeyEntry { state: KeyState::Panes { panes, .. }, .. }) => panes.is_empty(),
            Some(KeyEntry { state: KeyState::Sessions(sessions), .. }) => sessions.is_empty(),
            None => false,
        };
        if !empty {
            return;
        }
        let entry = self.keys[id as usize].take().expect("checked above");
        if let Some(timer) = entry.timer {
            self.timers.remove(&(timer, id));
        }
        self.ids.remove(entry.key.row().as_ref());
        match self.tracking.as_mut() {
            Some(t) => {
                if t.fired_through.remove(&id) || matches!(entry.state, KeyState::Panes { fired_through: Some(_), .. })
                {
                    t.deleted.push((entry.key.clone(), i64::MIN));
                }
                t.freed.push(id);
            }
            None => self.free.push(id),
        }
    }

    /// Sets the key's timer to [`Engine::due`].
    fn reschedule(&mut self, id: u32) {
        let next = self.due(id);
        let Some(entry) = self.keys[id as usize].as_mut() else { return };
        if entry.timer == next {
            return;
        }
        if let Some(old) = entry.timer.take() {
            self.timers.remove(&(old, id));
        }
        if let Some(time) = next {
            self.timers.insert((time, id));
            entry.timer = Some(time);
        }
    }

    /// When the key's timer is due: its next window end, or the time its oldest state is
    /// released (`None` for a key not live).
    fn due(&self, id: u32) -> Option<i64> {
        match self.shape {
            Shape::Panes(panes) => {
                let fire = self.next_window(id, &panes).map(|s| panes.window_end(s));
                let entry = self.keys[id as usize].as_ref()?;
                let KeyState::Panes { panes: held, slider, .. } = &entry.state else { unreachable!() };
                let limit = if fire.is_some() { slider.as_ref().map_or(i64::MAX, |s| s.cursor) } else { i64::MAX };
                let release =
                    held.first().filter(|p| *p < limit).map(|p| panes.window_end(p).saturating_add(self.lateness));
                [fire, release].into_iter().flatten().min()
            }
            Shape::Sessions { gap } => {
                let entry = self.keys[id as usize].as_ref()?;
                let KeyState::Sessions(sessions) = &entry.state else { unreachable!() };
                sessions
                    .values()
                    .map(|s| {
                        let end = s.last.saturating_add(gap);
                        if s.fired { end.saturating_add(gap).saturating_add(self.lateness) } else { end }
                    })
                    .min()
            }
        }
    }

    /// The changelog records since the last call, as (record key, value); `None` deletes the
    /// record. Empty when the engine does not track changes.
    pub fn take_changes(&mut self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        self.write_changes(|key, value| out.push((key.to_vec(), value.map(<[u8]>::to_vec))));
        out
    }

    /// Hands the changelog records since the last call to `sink`, as (record key, value);
    /// `None` deletes the record. Keys and values are built in two buffers reused for every
    /// record. Nothing when the engine does not track changes.
    pub fn write_changes(&mut self, mut sink: impl FnMut(&[u8], Option<&[u8]>)) {
        let Some(tracking) = self.tracking.as_mut() else { return };
        let tracking = std::mem::take(tracking);
        let (mut key, mut value) = (Vec::with_capacity(64), Vec::with_capacity(256));
        if tracking.watermark_moved
            && let Some(max) = self.watermark.max_event_time()
        {
            value.push(FORMAT);
            value.extend_from_slice(&max.to_le_bytes());
            sink(&[FORMAT, RECORD_WATERMARK], Some(&value));
        }
        for (id_key, slot) in &tracking.deleted {
            let kind = if *slot == i64::MIN { RECORD_FIRED_THROUGH } else { RECORD_SLOT };
            record_key(&mut key, kind, id_key, *slot);
            sink(&key, None);
        }
        let mut slots: Vec<(u32, i64)> = tracking.slots.into_iter().collect();
        slots.sort_unstable();
        for (id, slot) in slots {
            let Some(entry) = self.keys[id as usize].as_ref() else { continue };
            value.clear();
            value.push(FORMAT);
            match &entry.state {
                KeyState::Panes { panes, .. } => {
                    let Some(states) = panes.get(slot) else { continue };
                    put_states(states, &mut value);
                }
                KeyState::Sessions(sessions) => {
                    let Some(session) = sessions.get(&slot) else { continue };
                    value.extend_from_slice(&session.last.to_le_bytes());
                    value.push(session.fired as u8 | (session.emitted as u8) << 1);
                    put_states(&session.states, &mut value);
                }
            }
            record_key(&mut key, RECORD_SLOT, &entry.key, slot);
            sink(&key, Some(&value));
        }
        let mut fired: Vec<u32> = tracking.fired_through.into_iter().collect();
        fired.sort_unstable();
        for id in fired {
            let Some(entry) = self.keys[id as usize].as_ref() else { continue };
            if let KeyState::Panes { fired_through: Some(f), .. } = &entry.state {
                value.clear();
                value.push(FORMAT);
                value.extend_from_slice(&f.to_le_bytes());
                record_key(&mut key, RECORD_FIRED_THROUGH, &entry.key, i64::MIN);
                sink(&key, Some(&value));
            }
        }
        self.free.extend(tracking.freed);
    }

    /// Rebuilds state from changelog records (oldest first; a later record replaces an earlier
    /// one with the same key, `None` deletes it).
    pub fn restore<'a>(&mut self, records: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>) -> Result<()> {
        let mut latest: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for (key, value) in records {
            latest.insert(key.to_vec(), value.map(|v| v.to_vec()));
        }
        let corrupt = |what: &str| DataFusionError::Execution(format!("the state changelog holds {what}"));
        let parser = self.converter.parser();
        for (record, value) in latest {
            let Some(value) = value else { continue };
            let mut input = record.as_slice();
            if take_u8(&mut input) != Some(FORMAT) || value.first() != Some(&FORMAT) {
                return Err(corrupt("a record of another format version; start from an empty changelog"));
            }
            let mut body = &value[1..];
            let kind = take_u8(&mut input).ok_or_else(|| corrupt("an empty record key"))?;
            if kind == RECORD_WATERMARK {
                let max = take_i64(&mut body).ok_or_else(|| corrupt("a bad watermark"))?;
                self.watermark.advance(max);
                continue;
            }
            let len = take_u32(&mut input).ok_or_else(|| corrupt("a bad record key"))? as usize;
            let key_bytes = take(&mut input, len).ok_or_else(|| corrupt("a bad record key"))?;
            let slot = take_i64(&mut input).ok_or_else(|| corrupt("a bad record key"))?;
            let key = parser.parse(key_bytes).owned();
            let id = match self.ids.get(key.row().as_ref()) {
                Some(id) => *id,
                None => self.insert_key(key),
            };
            let entry = self.keys[id as usize].as_mut().expect("just inserted");
            match (&mut entry.state, kind) {
                (KeyState::Panes { fired_through, .. }, RECORD_FIRED_THROUGH) => {
                    *fired_through = Some(take_i64(&mut body).ok_or_else(|| corrupt("a bad fired-through record"))?);
                }
                (KeyState::Panes { panes, .. }, RECORD_SLOT) => {
                    let states = take_states(&mut body, self.specs.len()).ok_or_else(|| corrupt("a bad pane"))?;
                    panes.insert(slot, states);
                }
                (KeyState::Sessions(sessions), RECORD_SLOT) => {
                    let last = take_i64(&mut body).ok_or_else(|| corrupt("a bad session"))?;
                    let flags = take_u8(&mut body).ok_or_else(|| corrupt("a bad session"))?;
                    let states = take_states(&mut body, self.specs.len()).ok_or_else(|| corrupt("a bad session"))?;
                    sessions.insert(slot, Session { last, fired: flags & 1 != 0, emitted: flags & 2 != 0, states });
                }
                _ => return Err(corrupt("a record for another window kind")),
            }
        }
        let ids: Vec<u32> = self.ids.values().copied().collect();
        for id in ids {
            self.reschedule(id);
        }
        Ok(())
    }
}

/// Writes the changelog record key of (`kind`, `key`, `slot`) into `out`, replacing its content.
fn record_key(out: &mut Vec<u8>, kind: u8, key: &OwnedRow, slot: i64) {
    let row = key.row();
    let bytes = row.as_ref();
    out.clear();
    out.push(FORMAT);
    out.push(kind);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
    out.extend_from_slice(&slot.to_le_bytes());
}

fn put_states(states: &[Partial], out: &mut Vec<u8>) {
    for state in states {
        encode_partial(state, out);
    }
}

fn take_states(input: &mut &[u8], n: usize) -> Option<Vec<Partial>> {
    let states = (0..n).map(|_| decode_partial(input)).collect::<Option<Vec<_>>>()?;
    input.is_empty().then_some(states)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray, TimestampMillisecondArray};
    use lockstep_features::{Definitions, compile_feature};
    use proptest::prelude::*;
    use std::sync::Arc;

    proptest! {
        /// Pane states answer every lookup and range as a B-tree map of the same panes does.
        #[test]
        fn pane_states_answer_as_a_btree_map(
            ops in prop::collection::vec((0u8..4, -20i64..20, -20i64..20), 0..120),
        ) {
            let mut panes = PaneStates::default();
            let mut reference: BTreeMap<i64, Vec<Partial>> = BTreeMap::new();
            for (op, a, b) in ops {
                let states = vec![Partial::Count(a * 100 + b)];
                match op {
                    0 => {
                        let (held, created) = panes.get_or_insert_with(a, || states.clone());
                        prop_assert_eq!(created, !reference.contains_key(&a));
                        prop_assert_eq!(&*held, &*reference.entry(a).or_insert(states));
                    }
                    1 => {
                        panes.insert(a, states.clone());
                        reference.insert(a, states);
                    }
                    2 => {
                        panes.pop_first();
                        reference.pop_first();
                    }
                    _ => {}
                }
                prop_assert_eq!(panes.first(), reference.keys().next().copied());
                prop_assert_eq!(panes.first_after(a), reference.range(a + 1..).next().map(|(p, _)| *p));
                prop_assert_eq!(panes.get(b), reference.get(&b));
                let (lo, hi) = (a.min(b), a.max(b));
                let got: Vec<i64> = panes.range(lo..=hi).map(|(p, _)| p).collect();
                prop_assert_eq!(got, reference.range(lo..=hi).map(|(p, _)| *p).collect::<Vec<_>>());
                let got: Vec<i64> = panes.range(lo..hi).map(|(p, _)| p).collect();
                prop_assert_eq!(got, reference.range(lo..hi).map(|(p, _)| *p).collect::<Vec<_>>());
                let got: Vec<i64> = panes.range(b..a).map(|(p, _)| p).collect();
                prop_assert_eq!(got.len(), if b < a { reference.range(b..a).count() } else { 0 });
                prop_assert_eq!(panes.is_empty(), reference.is_empty());
            }
        }
    }

    fn feature(window: &str, watermark: &str, lateness: &str) -> CompiledFeature {
        let text = format!(
            "sources:\n  s:\n    schema: {{ k: string, t: timestamp, x: float64 }}\n    event_time: t\n    watermark: {watermark}\n    allowed_lateness: {lateness}\nfeatures:\n  f:\n    source: s\n    key: [k]\n    window: {window}\n    aggregations: {{ n: count(*), total: sum(x) }}\n"
        );
        let definitions = Definitions::parse("t.yaml", &text, std::path::Path::new(".")).unwrap();
        compile_feature(&definitions, definitions.feature("f").unwrap()).unwrap()
    }

    /// Feeds (key, time) events one call each; returns every change as (kind, key, start, end, n).
    fn feed(
        engine: &mut Engine,
        feature: &CompiledFeature,
        events: &[(&str, i64)],
    ) -> Vec<(ChangeKind, i64, i64, Option<i64>)> {
        let evaluator = StageEvaluator::new(feature).unwrap();
        let mut out = Vec::new();
        for (i, (key, time)) in events.iter().enumerate() {
            let batch = RecordBatch::try_new(
                feature.source_schema.clone(),
                vec![
                    Arc::new(StringArray::from(vec![*key])),
                    Arc::new(TimestampMillisecondArray::from(vec![*time]).with_timezone("UTC")),
                    Arc::new(Float64Array::from(vec![1.0])),
                ],
            )
            .unwrap();
            let (stage, passes) = evaluator.evaluate(&batch).unwrap();
            let effects = engine.process(&stage, &passes, &[i as u64]).unwrap();
            out.extend(changes(&effects));
        }
        out
    }

    fn changes(effects: &Effects) -> Vec<(ChangeKind, i64, i64, Option<i64>)> {
        effects
            .changes
            .iter()
            .map(|c| {
                let n = c.row.map(|r| {
                    effects
                        .rows
                        .as_ref()
                        .unwrap()
                        .column(3)
                        .as_any()
                        .downcast_ref::<arrow::array::Int64Array>()
                        .unwrap()
                        .value(r)
                });
                (c.kind, c.start, c.end, n)
            })
            .collect()
    }

    use lockstep_features::StageEvaluator;

    #[test]
    fn a_late_event_merging_fired_sessions_retracts_the_superseded_row() {
        let f = feature("{ session: 10ms }", "0s", "1s");
        let mut engine = Engine::new(&f, true).unwrap();
        // Sessions [0, 10) and [15, 25) fire once the watermark passes their ends.
        let mut got = feed(&mut engine, &f, &[("a", 0), ("a", 15), ("a", 40)]);
        assert_eq!(got, vec![(ChangeKind::Fire, 0, 10, Some(1)), (ChangeKind::Fire, 15, 25, Some(1))]);
        // An event at 8 is late (watermark 40) but within lateness: it joins [0, 10) and [15, 25)
        // into [0, 25): the row starting at 15 is retracted and the row at 0 fires again.
        got = feed(&mut engine, &f, &[("a", 8)]);
        assert_eq!(got, vec![(ChangeKind::Retract, 15, 25, None), (ChangeKind::Refire, 0, 25, Some(3))]);
        assert_eq!(engine.counters().retracted, 1);
        // A session event is too late once t + gap + lateness <= watermark: 40 - 10 - 1000 < 0.
        let feature0 = feature("{ session: 10ms }", "0s", "0s");
        let mut late = Engine::new(&feature0, false).unwrap();
        feed(&mut late, &feature0, &[("a", 0), ("a", 30)]);
        assert!(feed(&mut late, &feature0, &[("a", 20)]).is_empty());
        assert_eq!(late.counters().too_late, 1);
    }

    #[test]
    fn an_idle_partition_fires_on_processing_time() {
        let feature = feature("{ tumbling: 10ms }", "5ms", "0s");
        let mut engine = Engine::new(&feature, false).unwrap();
        assert!(feed(&mut engine, &feature, &[("a", 1), ("b", 12)]).is_empty());
        let effects = engine.advance_idle(30, 2).unwrap();
        assert_eq!(changes(&effects), vec![(ChangeKind::Fire, 0, 10, Some(1)), (ChangeKind::Fire, 10, 20, Some(1))]);
        assert_eq!(engine.watermark(), Some(25));
    }

    #[test]
    fn a_refired_window_replaces_its_value_and_stale_panes_are_released() {
        let feature = feature("{ sliding: 20ms, every: 10ms }", "0s", "15ms");
        let mut engine = Engine::new(&feature, false).unwrap();
        let got = feed(&mut engine, &feature, &[("a", 5), ("a", 25)]);
        // Watermark 25 passes the ends 10 and 20 of the windows holding the event at 5.
        assert_eq!(got, vec![(ChangeKind::Fire, -10, 10, Some(1)), (ChangeKind::Fire, 0, 20, Some(1))]);
        // An event at 7: [-10, 10) is past lateness (25 >= 10 + 15), [0, 20) is within it.
        let got = feed(&mut engine, &feature, &[("a", 7)]);
        assert_eq!(got, vec![(ChangeKind::Refire, 0, 20, Some(2))]);
        assert_eq!(engine.counters().too_late, 1);
        // The end of input fires the rest and releases every key.
        let effects = engine.finish(9).unwrap();
        assert_eq!(changes(&effects), vec![(ChangeKind::Fire, 10, 30, Some(1)), (ChangeKind::Fire, 20, 40, Some(1))]);
        assert_eq!(engine.live_keys(), 0);
    }
}
