//! The batch job against a brute-force reference written plainly in the test: random events
//! with window-boundary times, times before 1970, nulls, NaN and infinities, duplicates, a
//! filter that can remove everything, and every window kind.

mod common;

use common::{Event, assert_rows_match, definitions, reference, run_batch, windows, write_parquet};
use lockstep_features::Location;
use proptest::prelude::*;

const MINUTE: i64 = 60_000;

fn amount() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        8 => (-500i64..5000).prop_map(|c| Some(c as f64 / 100.0)),
        2 => any::<f64>().prop_filter("finite", |v| v.is_finite()).prop_map(Some),
        1 => Just(None),
        1 => prop::sample::select(vec![Some(f64::NAN), Some(f64::INFINITY), Some(f64::NEG_INFINITY), Some(-0.0), Some(0.0), Some(1e308), Some(-1e308)]),
    ]
}

fn time() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![
        // Around the epoch, so windows before 1970 and across it are exercised.
        6 => (-3 * 60 * MINUTE..3 * 60 * MINUTE).prop_map(Some),
        // Exactly on minute boundaries (window and pane edges).
        3 => (-180i64..180).prop_map(|m| Some(m * MINUTE)),
        // Exactly one session gap apart from a boundary.
        1 => (-36i64..36).prop_map(|k| Some(k * 5 * MINUTE)),
        1 => Just(None),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        prop::sample::select(vec![Some("a"), Some("b"), Some("c"), Some("d"), None]),
        prop::sample::select(vec![Some("m1"), Some("m2"), Some("m3"), None]),
        amount(),
        prop::option::of(-1000i64..1000),
        prop::sample::select(vec!["purchase", "refund", "transfer", "blocked"]),
        time(),
    )
        .prop_map(|(user, merchant, amount, qty, kind, time)| Event {
            user: user.map(str::to_string),
            merchant: merchant.map(str::to_string),
            amount,
            qty,
            kind: kind.to_string(),
            time,
        })
}

fn events() -> impl Strategy<Value = Vec<Event>> {
    prop::collection::vec(event(), 0..80).prop_flat_map(|events| {
        // Re-deliver a few events verbatim: duplicates count twice, as in SQL.
        let n = events.len();
        (Just(events), prop::collection::vec(any::<prop::sample::Index>(), 0..4)).prop_map(
            move |(mut events, picks)| {
                if n > 0 {
                    for pick in picks {
                        let copy = events[pick.index(n)].clone();
                        events.push(copy);
                    }
                }
                events
            },
        )
    })
}

fn check(events: &[Event], window: usize, filter: Option<&str>, keep: impl Fn(&Event) -> bool, partitions: usize) {
    let (yaml, ref_window) = windows()[window];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.parquet");
    write_parquet(&path, events);
    let definitions = definitions(yaml, filter);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let actual = runtime.block_on(run_batch(&definitions, Location::Parquet(path.display().to_string()), partitions));
    match reference(events, ref_window, keep) {
        Ok(expected) => {
            assert_rows_match(&actual.expect("batch job succeeds"), &expected, &[(9, 1e-150), (10, 1e-300)])
        }
        Err(message) => {
            let error = actual.expect_err("an int64 overflow must fail the job");
            assert!(error.contains("overflows int64"), "{error} / {message}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn batch_equals_brute_force_reference(events in events(), window in 0usize..5, partitions in 1usize..4) {
        check(&events, window, None, |_| true, partitions);
    }

    #[test]
    fn batch_applies_the_filter_like_the_reference(events in events(), window in 0usize..5) {
        check(&events, window, Some("event_type <> 'blocked'"), |e| e.kind != "blocked", 2);
    }
}

#[test]
fn a_filter_that_removes_everything_gives_no_rows() {
    let events = vec![Event {
        user: Some("a".into()),
        merchant: None,
        amount: Some(1.0),
        qty: None,
        kind: "refund".into(),
        time: Some(0),
    }];
    check(&events, 0, Some("event_type = 'never'"), |_| false, 2);
}

#[test]
fn int64_sum_overflow_fails_the_job_with_a_clear_error() {
    let big = |time| Event {
        user: Some("a".into()),
        merchant: None,
        amount: None,
        qty: Some(i64::MAX),
        kind: "purchase".into(),
        time: Some(time),
    };
    check(&[big(0), big(1)], 2, None, |_| true, 1);
}

#[test]
fn session_gaps_of_exactly_g_split_sessions() {
    let at = |time| Event {
        user: Some("a".into()),
        merchant: Some("m1".into()),
        amount: Some(1.0),
        qty: Some(1),
        kind: "purchase".into(),
        time: Some(time),
    };
    // 5m gap: events 4m59.999s apart chain into one session.
    let events = vec![at(0), at(5 * MINUTE - 1), at(10 * MINUTE - 2), at(15 * MINUTE - 3)];
    check(&events, 4, None, |_| true, 1);
    let (_, window) = windows()[4];
    let rows = reference(&events, window, |_| true).unwrap();
    assert_eq!(rows.iter().map(|r| (r.start, r.end)).collect::<Vec<_>>(), vec![(0, 20 * MINUTE - 3)]);
    // Exactly 5m apart: two sessions.
    let split = vec![at(0), at(5 * MINUTE)];
    check(&split, 4, None, |_| true, 1);
    let rows = reference(&split, window, |_| true).unwrap();
    assert_eq!(rows.len(), 2);
}
