//! Window math shared by the batch and the streaming job.
//!
//! Time is event time in milliseconds since the Unix epoch (UTC), possibly negative. Windows are
//! half-open, `[start, end)`, and align to the epoch plus `offset`.
//!
//! A sliding window of size `S` every `E` is cut into *panes* of width `E`: pane `p` covers
//! `[p·E + offset, (p+1)·E + offset)`, and the window that starts at pane `k` is the union of panes
//! `k ..= k + S/E − 1`. Each event therefore lands in exactly one pane, and a window is the merge of
//! its panes — no event is ever copied into `S/E` windows. Tumbling windows are sliding windows with
//! `S = E` (one pane per window).
//!
//! Worked example: `sliding: 1h, every: 15m, offset: 5m`. An event at 10:12 lies in pane
//! `[10:05, 10:20)`; it belongs to the four windows starting 09:20, 09:35, 09:50 and 10:05.

use crate::duration::Duration;

/// How a feature set cuts time into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Window {
    /// Fixed-size windows starting every `every`; `size` is a multiple of `every`.
    Sliding { size: Duration, every: Duration, offset: Duration },
    /// Per key, events less than `gap` apart form one session `[first, last + gap)`.
    Session { gap: Duration },
}

impl Window {
    /// Sliding windows of `size`, one starting every `every`, aligned to the epoch plus `offset`.
    pub fn sliding(size: Duration, every: Duration, offset: Duration) -> Self {
        Window::Sliding { size, every, offset }
    }

    /// Tumbling windows: sliding windows whose `every` equals their `size`.
    pub fn tumbling(size: Duration, offset: Duration) -> Self {
        Window::Sliding { size, every: size, offset }
    }

    /// The pane layout of a sliding or tumbling window; `None` for sessions.
    pub fn panes(&self) -> Option<Panes> {
        match *self {
            Window::Sliding { size, every, offset } => Some(Panes {
                width: every.millis(),
                offset: offset.millis(),
                per_window: size.millis() / every.millis(),
            }),
            Window::Session { .. } => None,
        }
    }

    /// The largest span between an event and the end of the last window holding it.
    pub fn span(&self) -> Duration {
        match *self {
            Window::Sliding { size, .. } => size,
            Window::Session { gap } => gap,
        }
    }
}

impl std::fmt::Display for Window {
    /// `sliding 1h every 1m`, `tumbling 1d offset 2h` or `session gap 30m`, as plans and
    /// summaries show it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Window::Sliding { size, every, .. } if size == every => write!(f, "tumbling {size}")?,
            Window::Sliding { size, every, .. } => write!(f, "sliding {size} every {every}")?,
            Window::Session { gap } => return write!(f, "session gap {gap}"),
        }
        match *self {
            Window::Sliding { offset, .. } if offset != Duration::ZERO => write!(f, " offset {offset}"),
            _ => Ok(()),
        }
    }
}

/// The panes of a sliding window: width `every`, `per_window = size / every` panes to a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Panes {
    /// Pane width in milliseconds (`every`), always positive.
    pub width: i64,
    /// Alignment offset in milliseconds, `0 <= offset < width`.
    pub offset: i64,
    /// Panes in one window (`size / every`), at least 1.
    pub per_window: i64,
}

impl Panes {
    /// The index of the pane holding an event at `time`: `floor((time − offset) / width)`.
    pub fn pane_of(&self, time: i64) -> i64 {
        (time as i128 - self.offset as i128).div_euclid(self.width as i128) as i64
    }

    /// The start time of pane `pane` (and of the window starting at that pane).
    pub fn start_of(&self, pane: i64) -> i64 {
        (pane as i128 * self.width as i128 + self.offset as i128) as i64
    }

    /// The end time of the window starting at pane `pane`.
    pub fn window_end(&self, pane: i64) -> i64 {
        self.start_of(pane.saturating_add(self.per_window))
    }

    /// The first and last window (by starting pane) that hold pane `pane`:
    /// `pane − per_window + 1 ..= pane`.
    pub fn windows_of_pane(&self, pane: i64) -> std::ops::RangeInclusive<i64> {
        pane.saturating_sub(self.per_window - 1)..=pane
    }

    /// The window a read at `cutoff` (request time − serving delay) is served (SPEC §6): the one
    /// ending at the pane boundary at or before `cutoff`, as (start, end).
    pub fn served_window(&self, cutoff: i64) -> (i64, i64) {
        let end_pane = self.pane_of(cutoff);
        (self.start_of(end_pane - self.per_window), self.start_of(end_pane))
    }

    /// The starts of every window holding an event at `time`, earliest first: the starts in
    /// `(time − size, time]` aligned to `every` (+ offset).
    pub fn window_starts_of(&self, time: i64) -> impl Iterator<Item = i64> + '_ {
        self.windows_of_pane(self.pane_of(time)).map(|pane| self.start_of(pane))
    }
}

/// The latest event time a read at `request_time` may see, exclusive: `request_time −
/// serving_delay` (SPEC §6); `None` when that underflows.
pub fn serving_cutoff(request_time: i64, serving_delay: Duration) -> Option<i64> {
    request_time.checked_sub(serving_delay.millis())
}

/// Whether a session ending at `end` may be served at `cutoff` (it had ended by then); the
/// latest such session is served (SPEC §6).
pub fn session_served(end: i64, cutoff: i64) -> bool {
    end <= cutoff
}

/// Which session an event opens or extends, for events of one key taken in time order.
///
/// Consecutive events *less than* `gap` apart share a session; an event exactly `gap` after the
/// previous one starts a new session. A session spans `[first, last + gap)`.
pub fn continues_session(previous_time: i64, time: i64, gap: Duration) -> bool {
    (time as i128 - previous_time as i128) < gap.millis() as i128
}

/// Converts a timestamp in `unit`s since the epoch to milliseconds, rounding toward the past so
/// that `2.5ms` and `−2.5ms` land in the milliseconds that hold them (`2` and `−3`).
pub fn to_millis(value: i64, unit: arrow::datatypes::TimeUnit) -> i64 {
    use arrow::datatypes::TimeUnit;
    match unit {
        TimeUnit::Second => value.saturating_mul(1_000),
        TimeUnit::Millisecond => value,
        TimeUnit::Microsecond => value.div_euclid(1_000),
        TimeUnit::Nanosecond => value.div_euclid(1_000_000),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_read_is_served_the_window_ending_at_or_before_its_cutoff() {
        // 1h every 15m offset 5m: boundaries at :05, :20, :35, :50.
        let panes = super::Window::sliding(
            crate::Duration::from_millis(3_600_000),
            crate::Duration::from_millis(900_000),
            crate::Duration::from_millis(300_000),
        )
        .panes()
        .unwrap();
        let at = |m: i64| m * 60_000;
        assert_eq!(panes.served_window(at(20)), (at(20 - 60), at(20)), "a cutoff on a boundary ends there");
        assert_eq!(panes.served_window(at(20) - 1), (at(5 - 60), at(5)), "1 ms before: the window before");
        assert_eq!(panes.served_window(at(34)), (at(20 - 60), at(20)));
        assert_eq!(super::serving_cutoff(at(20) + 30_000, crate::Duration::from_millis(30_000)), Some(at(20)));
        assert_eq!(super::serving_cutoff(i64::MIN, crate::Duration::from_millis(1)), None);
        assert!(super::session_served(at(20), at(20)) && !super::session_served(at(20) + 1, at(20)));
    }

    use super::*;

    fn d(text: &str) -> Duration {
        Duration::parse(text).unwrap()
    }

    #[test]
    fn worked_example_from_the_module_docs() {
        let panes = Window::sliding(d("1h"), d("15m"), d("5m")).panes().unwrap();
        let at = |h: i64, m: i64| (h * 60 + m) * 60_000;
        let starts: Vec<i64> = panes.window_starts_of(at(10, 12)).collect();
        assert_eq!(starts, vec![at(9, 20), at(9, 35), at(9, 50), at(10, 5)]);
        for start in starts {
            let pane = panes.pane_of(start);
            assert!(start <= at(10, 12) && at(10, 12) < panes.window_end(pane));
        }
    }

    #[test]
    fn boundaries_are_half_open_and_floor_before_1970() {
        let panes = Window::tumbling(d("1m"), Duration::ZERO).panes().unwrap();
        assert_eq!(panes.pane_of(0), 0);
        assert_eq!(panes.pane_of(59_999), 0);
        assert_eq!(panes.pane_of(60_000), 1);
        assert_eq!(panes.pane_of(-1), -1);
        assert_eq!(panes.start_of(-1), -60_000);
        assert_eq!(panes.pane_of(-60_000), -1);
        assert_eq!(panes.pane_of(-60_001), -2);
    }

    #[test]
    fn displays_as_written() {
        assert_eq!(Window::sliding(d("1h"), d("1m"), Duration::ZERO).to_string(), "sliding 1h every 1m");
        assert_eq!(Window::tumbling(d("1d"), d("2h")).to_string(), "tumbling 1d offset 2h");
        assert_eq!(Window::Session { gap: d("30m") }.to_string(), "session gap 30m");
    }

    #[test]
    fn session_gap_is_strict() {
        assert!(continues_session(0, 29_999, d("30s")));
        assert!(!continues_session(0, 30_000, d("30s")));
    }

    #[test]
    fn sub_millisecond_times_round_toward_the_past() {
        use arrow::datatypes::TimeUnit;
        assert_eq!(to_millis(2_500_000, TimeUnit::Nanosecond), 2);
        assert_eq!(to_millis(-2_500_000, TimeUnit::Nanosecond), -3);
        assert_eq!(to_millis(-1, TimeUnit::Microsecond), -1);
        assert_eq!(to_millis(3, TimeUnit::Second), 3_000);
    }
}
