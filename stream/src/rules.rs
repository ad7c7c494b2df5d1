//! The streaming job's decisions as pure functions (SPEC §4): the watermark of a partition, what
//! an event does to each of its windows, and which windows fire or are released when the
//! watermark moves. No I/O here, so every rule — and every tie at a boundary — is tested without
//! a broker; the Kafka runtime only feeds events in partition order and acts on the verdicts.
//!
//! Worked example (`sliding: 10m, every: 5m`, `watermark: 30s`, `allowed_lateness: 5m`):
//! the largest event time seen so far is 12:20:30, so the watermark is 12:20:00. An event at
//! 12:14 belongs to the windows [12:05, 12:15) and [12:10, 12:20). Both have fired (their ends
//! are at or before the watermark). [12:10, 12:20) is still within lateness (12:20:00 <
//! 12:20 + 5m), so it is updated and fires again; [12:05, 12:15) is past it (12:20:00 ≥
//! 12:15 + 5m), so the event is too late there and goes to the late topic for that window.

use lockstep_features::window::Panes;

/// The watermark of one partition: the largest event time that arrived before, minus the
/// source's `watermark` delay. `None` until the first event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Watermark {
    max_event_time: Option<i64>,
    delay: i64,
}

impl Watermark {
    /// A partition that has seen nothing yet, with bounded out-of-orderness `delay` ms.
    pub fn new(delay: i64) -> Self {
        Watermark { max_event_time: None, delay }
    }

    /// The current watermark, if any event has arrived.
    pub fn current(&self) -> Option<i64> {
        self.max_event_time.map(|t| t.saturating_sub(self.delay))
    }

    /// The bounded out-of-orderness, in milliseconds.
    pub fn delay(&self) -> i64 {
        self.delay
    }

    /// The largest event time seen, if any.
    pub fn max_event_time(&self) -> Option<i64> {
        self.max_event_time
    }

    /// Takes an event into account *after* it was judged: an event is always judged against the
    /// watermark of the events before it, never its own, so batching never changes a verdict.
    pub fn advance(&mut self, event_time: i64) {
        self.max_event_time = Some(self.max_event_time.map_or(event_time, |m| m.max(event_time)));
    }

    /// The end of input (a bounded run): the watermark moves to the end of time.
    pub fn finish(&mut self) {
        self.max_event_time = Some(i64::MAX);
        self.delay = 0;
    }
}

/// What an event does to one of its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The window has not fired: the event updates it.
    Update,
    /// The window fired but is within allowed lateness: update it and fire it again.
    UpdateAndRefire,
    /// The window is past allowed lateness: the event is not applied there and goes to the
    /// late topic with this window as the reason.
    TooLate,
}

/// The verdict for a window ending at `window_end`, for an event judged against `watermark`.
///
/// A window has fired once the watermark reached its end (`watermark >= window_end`); it accepts
/// late updates while `watermark < window_end + allowed_lateness`.
pub fn judge(watermark: Option<i64>, window_end: i64, allowed_lateness: i64) -> Verdict {
    match watermark {
        None => Verdict::Update,
        Some(w) if w < window_end => Verdict::Update,
        Some(w) if (w as i128) < window_end as i128 + allowed_lateness as i128 => Verdict::UpdateAndRefire,
        Some(_) => Verdict::TooLate,
    }
}

/// The verdict for every window of a sliding or tumbling feature set holding an event at
/// `event_time`, earliest window first, as `(window start pane, verdict)`.
pub fn judge_sliding(
    panes: &Panes,
    watermark: Option<i64>,
    event_time: i64,
    allowed_lateness: i64,
) -> Vec<(i64, Verdict)> {
    panes
        .windows_of_pane(panes.pane_of(event_time))
        .map(|start| (start, judge(watermark, panes.window_end(start), allowed_lateness)))
        .collect()
}

/// A session event is too late when `event_time + gap + allowed_lateness <= watermark`: no
/// session it could open or extend can still be updated.
pub fn session_too_late(watermark: Option<i64>, event_time: i64, gap: i64, allowed_lateness: i64) -> bool {
    watermark.is_some_and(|w| event_time as i128 + gap as i128 + allowed_lateness as i128 <= w as i128)
}

/// Windows (by start pane) that fire when the watermark moves from `before` to `after`: those
/// whose end lies in `(before, after]`. Each window fires once on time; late updates refire it
/// through [`Verdict::UpdateAndRefire`].
pub fn fires(window_end: i64, before: Option<i64>, after: Option<i64>) -> bool {
    match after {
        None => false,
        Some(a) => window_end <= a && before.is_none_or(|b| window_end > b),
    }
}

/// A window's state can be dropped once the watermark has passed `window_end + allowed_lateness`.
pub fn releasable(window_end: i64, watermark: Option<i64>, allowed_lateness: i64) -> bool {
    watermark.is_some_and(|w| w as i128 >= window_end as i128 + allowed_lateness as i128)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_features::{Duration, Window};

    const S: i64 = 1_000;
    const M: i64 = 60 * S;

    fn at(h: i64, m: i64, s: i64) -> i64 {
        (h * 60 + m) * M + s * S
    }

    #[test]
    fn worked_example_from_the_module_docs() {
        let panes = Window::sliding(Duration::from_millis(10 * M), Duration::from_millis(5 * M), Duration::ZERO)
            .panes()
            .unwrap();
        let mut watermark = Watermark::new(30 * S);
        watermark.advance(at(12, 20, 30));
        assert_eq!(watermark.current(), Some(at(12, 20, 0)));
        let verdicts = judge_sliding(&panes, watermark.current(), at(12, 14, 0), 5 * M);
        let starts: Vec<i64> = verdicts.iter().map(|(p, _)| panes.start_of(*p)).collect();
        assert_eq!(starts, vec![at(12, 5, 0), at(12, 10, 0)]);
        assert_eq!(
            verdicts.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
            vec![Verdict::TooLate, Verdict::UpdateAndRefire]
        );
    }

    #[test]
    fn every_boundary_tie() {
        // Not yet fired: watermark strictly before the end.
        assert_eq!(judge(Some(99), 100, 0), Verdict::Update);
        // Fired exactly at the end; with no lateness any later event is too late.
        assert_eq!(judge(Some(100), 100, 0), Verdict::TooLate);
        // Within lateness up to, not including, end + lateness.
        assert_eq!(judge(Some(109), 100, 10), Verdict::UpdateAndRefire);
        assert_eq!(judge(Some(110), 100, 10), Verdict::TooLate);
        // Before any event nothing is late.
        assert_eq!(judge(None, i64::MIN, 0), Verdict::Update);
        // Firing: the end in (before, after].
        assert!(fires(100, Some(99), Some(100)));
        assert!(!fires(100, Some(100), Some(150)));
        assert!(!fires(100, None, Some(99)));
        assert!(fires(100, None, Some(100)));
        // Release exactly at end + lateness.
        assert!(!releasable(100, Some(109), 10));
        assert!(releasable(100, Some(110), 10));
        // Sessions: too late when t + gap + lateness <= watermark.
        assert!(!session_too_late(Some(130), 100, 20, 10 + 1));
        assert!(session_too_late(Some(130), 100, 20, 10));
    }

    #[test]
    fn an_event_equal_to_the_maximum_is_not_late_with_zero_delay() {
        // Spark's `ts <= watermark` test dropped such an event; here it is judged against the
        // watermark *before* it and its own window has not fired.
        let panes = Window::tumbling(Duration::from_millis(M), Duration::ZERO).panes().unwrap();
        let mut watermark = Watermark::new(0);
        watermark.advance(at(0, 5, 30));
        let verdicts = judge_sliding(&panes, watermark.current(), at(0, 5, 30), 0);
        assert_eq!(verdicts, vec![(5, Verdict::Update)]);
    }

    #[test]
    fn the_watermark_never_moves_back_and_ends_at_the_end_of_time() {
        let mut watermark = Watermark::new(10);
        assert_eq!(watermark.current(), None);
        watermark.advance(100);
        watermark.advance(50);
        assert_eq!(watermark.current(), Some(90));
        watermark.finish();
        assert_eq!(watermark.current(), Some(i64::MAX));
        assert!(fires(i64::MAX - 1, Some(90), watermark.current()));
    }
}
