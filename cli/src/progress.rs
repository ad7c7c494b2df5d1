//! Progress display for long jobs: a spinner with live counts on stderr, hidden with `--quiet`
//! or when stderr is not a terminal.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lockstep_batch::StageCounters;

/// A bar over a known total.
pub fn bar(quiet: bool, total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), target(quiet));
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {human_pos}/{human_len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

fn target(quiet: bool) -> ProgressDrawTarget {
    if quiet { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() }
}

/// A spinner that follows a batch job's counters until finished.
pub struct Progress {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start(quiet: bool, counters: Arc<StageCounters>) -> Self {
        Self::follow(quiet, move || {
            let events = counters.events.load(Ordering::Relaxed);
            let windows = counters.windows.load(Ordering::Relaxed);
            format!("{events} events read, {windows} windows written")
        })
    }

    /// A spinner showing `message()` every 100 ms.
    pub fn follow(quiet: bool, message: impl Fn() -> String + Send + 'static) -> Self {
        let bar = ProgressBar::with_draw_target(None, target(quiet));
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        let ticking = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                ticking.set_message(message());
                ticking.tick();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Progress { bar, ticker }
    }

    pub fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}
