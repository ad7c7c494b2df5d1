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
            if self.entered > 0 {
                emit(WindowRow {
                    start: self.panes.start_of(start),
                    end: self.panes.window_end(start),
                    states: WindowStates::Sliding(&self.window),
                    repeats: !self.changed,
                })?;
                self.changed = false;
            }
            self.next = start.saturating_add(1);
            if start == i64::MAX {
                break;
            }
        }
        Ok(())
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
            emit(WindowRow {
                start: first,
                end: last.saturating_add(self.gap.millis()),
                states: WindowStates::Merged(&states),
                repeats: false,
            })?;
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

    fn windows(panes: Panes, events: &[i64]) -> Vec<(i64, i64, i64)> {
        let specs = count_spec();
        let mut slider = PaneSlider::new(panes, specs.clone());
        let mut out = Vec::new();
        let mut emit = |row: WindowRow<'_>| -> Result<(), ()> {
            let Output::Int(n) = row.states.evaluate(0, &specs[0]).unwrap() else { panic!() };
            out.push((row.start, row.end, n));
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
        out
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
