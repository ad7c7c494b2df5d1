//! Assembling windows from the events of one key.
//!
//! [`PaneSlider`] turns the panes of one key, handed over in increasing pane order, into every
//! window that holds at least one of them, earliest first. Each pane enters the window state once
//! and leaves once ([`Sliding`]), so the cost is O(panes + windows) whatever `size / every` is.
//! [`SessionBuilder`] does the same for session windows over one key's events in time order.
//!
//! Both are pure: the batch job feeds them from a sort of the history, and the tests feed them
//! directly.

use std::collections::VecDeque;

use crate::aggregate::{AggregateSpec, Partial, Sliding};
use crate::duration::Duration;
use crate::window::{Panes, continues_session};

/// A window ready to be written: its bounds and its aggregates' states.
pub struct WindowRow<'a> {
    pub start: i64,
    pub end: i64,
    /// One state per aggregate, in declared order.
    pub states: WindowStates<'a>,
    /// The states are those of the previous window of this key (no pane entered or left between
    /// them), so its values can be repeated rather than computed again.
    pub repeats: bool,
    /// How many windows follow this one, each `step` milliseconds later, with the same states:
    /// a run of repeated windows, handed over at once.
    pub then: usize,
    /// The distance between the starts of consecutive windows of a run.
    pub step: i64,
}

impl<'a> WindowRow<'a> {
    /// One window, not part of a run.
    pub fn single(start: i64, end: i64, states: WindowStates<'a>, repeats: bool) -> Self {
        WindowRow { start, end, states, repeats, then: 0, step: 0 }
    }
}

/// The aggregate states of a finished window.
pub enum WindowStates<'a> {
    Sliding(&'a [Sliding]),
    Merged(&'a [Partial]),
}

impl WindowStates<'_> {
    /// Writes the final value of aggregate `i` to `sink`.
    pub fn emit(
        &self,
        i: usize,
        spec: &AggregateSpec,
        sink: &mut impl crate::aggregate::ValueSink,
    ) -> Result<(), crate::aggregate::AggregateError> {
        match self {
            WindowStates::Sliding(states) => states[i].emit(spec, sink),
            WindowStates::Merged(states) => states[i].emit(spec, sink),
        }
    }

    /// The final value of aggregate `i`.
    pub fn evaluate(
        &self,
        i: usize,
        spec: &AggregateSpec,
    ) -> Result<crate::value::Output, crate::aggregate::AggregateError> {
        match self {
            WindowStates::Sliding(states) => states[i].evaluate(spec),
            WindowStates::Merged(states) => states[i].evaluate(spec),
        }
    }
}

/// Slides a window over the panes of one key; see the module documentation.
pub struct PaneSlider {
    panes: Panes,
    specs: Vec<AggregateSpec>,
    /// Panes not yet left behind, oldest first; the first `entered` are in `window`.
    queue: VecDeque<(i64, Vec<Partial>)>,
    entered: usize,
    window: Vec<Sliding>,
    /// The starting pane of the next window to consider.
    next: i64,
    /// Whether a pane entered or left `window` since the last window emitted.
    changed: bool,
}

impl PaneSlider {
    /// A slider for windows of `panes`, computing `specs`.
    pub fn new(panes: Panes, specs: Vec<AggregateSpec>) -> Self {
        let window = specs.iter().map(Sliding::new).collect();
        PaneSlider { panes, specs, queue: VecDeque::new(), entered: 0, window, next: i64::MIN, changed: true }
    }

    /// Adds the finished pane `pane` (greater than every pane added before for this key), first
    /// emitting every window that ends before it.
    pub fn push<E>(
        &mut self,
        pane: i64,
        states: Vec<Partial>,
        emit: &mut impl FnMut(WindowRow<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.emit_until(self.first_window_of(pane), emit)?;
        self.queue.push_back((pane, states));
        Ok(())
    }

    /// Emits every remaining window of this key and makes the slider ready for the next key.
    pub fn finish<E>(&mut self, emit: &mut impl FnMut(WindowRow<'_>) -> Result<(), E>) -> Result<(), E> {
        self.emit_until(i64::MAX, emit)?;
        self.queue.clear();
        self.entered = 0;
        self.window = self.specs.iter().map(Sliding::new).collect();
        self.next = i64::MIN;
        self.changed = true;
        Ok(())
    }

    fn first_window_of(&self, pane: i64) -> i64 {
        *self.panes.windows_of_pane(pane).start()
    }

    /// Emits the windows starting at panes `next .. limit` that hold a pane.
    fn emit_until<E>(&mut self, limit: i64, emit: &mut impl FnMut(WindowRow<'_>) -> Result<(), E>) -> Result<(), E> {
        let last_offset = self.panes.per_window - 1;
        while self.next < limit {
            let Some(&(oldest, _)) = self.queue.front() else {
                self.next = limit;
                break;
            };
            // Skip windows that hold no pane: jump to the first window of the oldest pane.
            self.next = self.next.max(self.first_window_of(oldest));
            if self.next >= limit {
                break;
            }
            let start = self.next;
            let last_pane = start.saturating_add(last_offset);
            while self.queue.front().is_some_and(|(p, _)| *p < start) {
                let (p, states) = self.queue.pop_front().expect("front checked above");
                if self.entered > 0 {
                    for (window, state) in self.window.iter_mut().zip(&states) {
                        window.pop(p, state);
                    }
                    self.entered -= 1;
                    self.changed = true;
                }
            }
            while self.entered < self.queue.len() && self.queue[self.entered].0 <= last_pane {
                let (p, states) = &self.queue[self.entered];
                for (i, spec) in self.specs.iter().enumerate() {
                    self.window[i].push(spec.function, *p, &states[i]);
                }
                self.entered += 1;
                self.changed = true;
            }
            let mut then = 0;
            if self.entered > 0 {
                then = self.unchanged_after(start, limit);
                emit(WindowRow {
                    start: self.panes.start_of(start),
                    end: self.panes.window_end(start),
                    states: WindowStates::Sliding(&self.window),
                    repeats: !self.changed,
                    then,
                    step: self.panes.width,
                })?;
                self.changed = false;
            }
            // A run ends before `limit`, so only `start == i64::MAX` saturates.
            self.next = start.saturating_add(1 + then as i64);
            if start == i64::MAX {
                break;
            }
        }
        Ok(())
    }

    /// How many windows after the one starting at pane `start` hold the same panes, and start
    /// before pane `limit`: until the oldest pane held leaves, or the next queued pane enters.
    /// Zero when the run's bounds would not be exact milliseconds.
    fn unchanged_after(&self, start: i64, limit: i64) -> usize {
        let Some(&(oldest, _)) = self.queue.front() else { return 0 };
        let leaves = oldest.saturating_add(1);
        let enters =
            self.queue.get(self.entered).map_or(i64::MAX, |(p, _)| p.saturating_sub(self.panes.per_window - 1));
        let end = leaves.min(enters).min(limit);
        if end <= start.saturating_add(1) {
            return 0;
        }
        let last = end - 1;
        // Every start and end of the run must be `start_of` without wrapping, so that a run's
        // bounds (first bound plus a multiple of `step`) equal those of windows emitted singly.
        let (width, offset) = (self.panes.width as i128, self.panes.offset as i128);
        let lowest = start as i128 * width + offset;
        let highest = (last as i128 + self.panes.per_window as i128) * width + offset;
        if lowest < i64::MIN as i128 || highest > i64::MAX as i128 {
            return 0;
        }
        (last - start) as usize
    }
}

/// Builds session windows from one key's events in time order.
pub struct SessionBuilder {
    gap: Duration,
    specs: Vec<AggregateSpec>,
    open: Option<(i64, i64, Vec<Partial>)>,
}

impl SessionBuilder {
    pub fn new(gap: Duration, specs: Vec<AggregateSpec>) -> Self {
        SessionBuilder { gap, specs, open: None }
    }

    /// Prepares for an event at `time` (not earlier than the previous one of this key): emits the
    /// open session if the event does not continue it, and returns the states to update.
    pub fn at<E>(
        &mut self,
        time: i64,
        emit: &mut impl FnMut(WindowRow<'_>) -> Result<(), E>,
    ) -> Result<&mut Vec<Partial>, E> {
        let continues = self.open.as_ref().is_some_and(|(_, last, _)| continues_session(*last, time, self.gap));
        if !continues {
            self.finish(emit)?;
            self.open = Some((time, time, self.specs.iter().map(Partial::empty).collect()));
        }
        let open = self.open.as_mut().expect("a session was just opened or continued");
        open.1 = time;
        Ok(&mut open.2)
    }

    /// Emits the open session, if any.
    pub fn finish<E>(&mut self, emit: &mut impl FnMut(WindowRow<'_>) -> Result<(), E>) -> Result<(), E> {
        if let Some((first, last, states)) = self.open.take() {
            emit(WindowRow::single(
                first,
                last.saturating_add(self.gap.millis()),
                WindowStates::Merged(&states),
                false,
            ))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Function;
    use crate::value::{Output, ValueType};
    use crate::window::Window;

    fn count_spec() -> Vec<AggregateSpec> {
        vec![AggregateSpec { name: "n".into(), function: Function::CountStar, input: None, output: ValueType::Int64 }]
    }

    /// Every window of `events` (sorted) as (start, end, count), runs written out, and how
    /// many windows came as the tail of a run.
    fn windows_and_runs(panes: Panes, events: &[i64]) -> (Vec<(i64, i64, i64)>, usize) {
        let specs = count_spec();
        let mut slider = PaneSlider::new(panes, specs.clone());
        let mut out = Vec::new();
        let mut in_runs = 0;
        let mut emit = |row: WindowRow<'_>| -> Result<(), ()> {
            let Output::Int(n) = row.states.evaluate(0, &specs[0]).unwrap() else { panic!() };
            for i in 0..=row.then as i64 {
                out.push((row.start + i * row.step, row.end + i * row.step, n));
            }
            in_runs += row.then;
            Ok(())
        };
        let mut current: Option<(i64, Vec<Partial>)> = None;
        for &t in events {
            let pane = panes.pane_of(t);
            if current.as_ref().is_some_and(|(p, _)| *p != pane) {
                let (p, states) = current.take().unwrap();
                slider.push(p, states, &mut emit).unwrap();
            }
            let states = &mut current.get_or_insert_with(|| (pane, vec![Partial::empty(&specs[0])])).1;
            states[0].update(Function::CountStar, None, 0, t);
        }
        if let Some((p, states)) = current {
            slider.push(p, states, &mut emit).unwrap();
        }
        slider.finish(&mut emit).unwrap();
        (out, in_runs)
    }

    fn windows(panes: Panes, events: &[i64]) -> Vec<(i64, i64, i64)> {
        windows_and_runs(panes, events).0
    }

    /// Runs of repeated windows, written out, are exactly the windows a brute force finds: every
    /// window start whose span holds an event, with its count, whatever size, step and offset.
    #[test]
    fn runs_of_windows_equal_every_window_by_brute_force() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let mut in_runs = 0;
        for case in 0..300 {
            let every = 1 + next(50) as i64;
            let per_window = 1 + next(12) as i64;
            let offset = next(every as u64) as i64;
            let panes = Panes { width: every, offset, per_window };
            let base = if case % 3 == 0 { -5_000 } else { 0 };
            let mut events: Vec<i64> = (0..next(30)).map(|_| base + next(2_000) as i64).collect();
            if case % 5 == 0 {
                // Events exactly on pane edges.
                events.extend((0..5).map(|k| offset + k * every * per_window));
            }
            events.sort_unstable();
            let mut expected = Vec::new();
            if let (Some(&first), Some(&last)) = (events.first(), events.last()) {
                let (lo, hi) = (panes.pane_of(first) - per_window + 1, panes.pane_of(last));
                for s in lo..=hi {
                    let n = events.iter().filter(|&&t| (s..s + per_window).contains(&panes.pane_of(t))).count() as i64;
                    if n > 0 {
                        expected.push((panes.start_of(s), panes.window_end(s), n));
                    }
                }
            }
            let (got, runs) = windows_and_runs(panes, &events);
            assert_eq!(got, expected, "every {every}, {per_window} panes a window, offset {offset}, events {events:?}");
            in_runs += runs;
        }
        assert!(in_runs > 1_000, "runs are handed over at once ({in_runs} windows in runs)");
    }

    #[test]
    fn every_window_holding_an_event_appears_once_in_order() {
        let d = |s: &str| Duration::parse(s).unwrap();
        let panes = Window::sliding(d("3m"), d("1m"), Duration::ZERO).panes().unwrap();
        let m = 60_000;
        // Events at 0:30, 1:10 and 10:00: windows starting -2m..1m, then 8m..10m.
        let got = windows(panes, &[30_000, 70_000, 10 * m]);
        assert_eq!(
            got,
            vec![
                (-2 * m, m, 1),
                (-m, 2 * m, 2),
                (0, 3 * m, 2),
                (m, 4 * m, 1),
                (8 * m, 11 * m, 1),
                (9 * m, 12 * m, 1),
                (10 * m, 13 * m, 1),
            ]
        );
    }

    #[test]
    fn sessions_split_on_a_gap_of_exactly_g() {
        let specs = count_spec();
        let mut builder = SessionBuilder::new(Duration::from_millis(10), specs.clone());
        let mut out = Vec::new();
        let mut emit = |row: WindowRow<'_>| -> Result<(), ()> {
            let Output::Int(n) = row.states.evaluate(0, &specs[0]).unwrap() else { panic!() };
            out.push((row.start, row.end, n));
            Ok(())
        };
        for t in [0, 9, 19, 28, 28] {
            builder.at(t, &mut emit).unwrap()[0].update(Function::CountStar, None, 0, t);
        }
        builder.finish(&mut emit).unwrap();
        assert_eq!(out, vec![(0, 19, 2), (19, 38, 3)]);
    }
}
