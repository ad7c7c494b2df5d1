//! `lockstep demo`, `compare` and `backfill` as a user runs them: the demo tells the whole story
//! and exits 0; compare's exit status gates CI on unexplained differences; backfill reports and
//! repairs.

use std::path::Path;
use std::process::{Command, Output};

fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep")).args(args).arg("--quiet").output().expect("run lockstep")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// Runs a small demo in `dir` and returns its output.
fn demo(dir: &Path) -> String {
    let output = lockstep(&["demo", "--dir", dir.to_str().unwrap(), "--events", "20000", "--users", "100"]);
    let out = text(&output);
    assert!(output.status.success(), "the demo failed:\n{out}");
    out
}

#[test]
fn the_demo_tells_the_whole_story_and_every_tool_agrees_with_it() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("demo");
    let out = demo(&dir);
    for step in ["1. generate", "2. history", "3. batch", "4. stream", "5. compare", "6. late data", "7. backfill"] {
        assert!(out.contains(step), "missing `{step}` in:\n{out}");
    }
    assert!(out.contains("8. compare   backfilled offline vs a full recompute: identical"), "{out}");
    assert_eq!(out.matches("explained by too-late events").count(), 2, "{out}");
    assert!(!out.contains("UNEXPLAINED"), "{out}");
    assert!(out.contains("touch 1 window_start range holding"), "one outage gives one range:\n{out}");

    let path = |p: &str| dir.join(p).display().to_string();
    let (offline, online, late) = (path("lake/offline/user_velocity"), path("online.parquet"), path("late.parquet"));
    // compare: explained differences pass the gate; without the late events they fail it.
    let explained = lockstep(&["compare", &offline, &online, "--late", &late, "--json", &path("report.json")]);
    assert!(explained.status.success(), "{}", text(&explained));
    assert!(text(&explained).contains(", 0 unexplained"), "{}", text(&explained));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path("report.json")).unwrap()).unwrap();
    assert_eq!(report["unexplained"], 0);
    assert!(report["explained"].as_u64().unwrap() > 0);
    let unexplained = lockstep(&["compare", &offline, &online]);
    assert_eq!(unexplained.status.code(), Some(1), "{}", text(&unexplained));
    // A table compared with itself is identical.
    let same = lockstep(&["compare", &offline, &path("lake/recomputed/user_velocity")]);
    assert!(same.status.success() && text(&same).contains("differences: 0"), "{}", text(&same));

    // backfill: the demo's run left nothing to do.
    let definitions = path("features.yaml");
    let again = lockstep(&["backfill", &definitions, "--feature", "user_velocity"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("up to date"), "{}", text(&again));
    // A forced dry run reports the range and writes nothing.
    let dry = lockstep(&[
        "backfill",
        &definitions,
        "--feature",
        "user_velocity",
        "--from",
        "2026-01-06T10:00:00Z",
        "--to",
        "2026-01-06T11:00:00Z",
        "--dry-run",
    ]);
    assert!(dry.status.success(), "{}", text(&dry));
    let dry = text(&dry);
    assert!(dry.contains("[2026-01-06T10:00:00.000Z, 2026-01-06T11:00:00.000Z)"), "{dry}");
    assert!(dry.contains("dry run: nothing written"), "{dry}");
    let log = std::fs::read_dir(dir.join("lake/offline/user_velocity/_delta_log"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json"))
        .count();
    assert_eq!(log, 2, "the batch commit and the demo's backfill commit only");

    // Running the demo again in the same folder starts afresh.
    demo(&dir);
}

#[test]
fn bad_input_to_compare_and_backfill_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing").display().to_string();
    let output = lockstep(&["compare", &missing, &missing]);
    assert!(!output.status.success());
    assert!(text(&output).contains("no such file or folder"), "{}", text(&output));
    let output = lockstep(&["compare", "kafka://", &missing]);
    assert!(text(&output).contains("kafka://HOST:PORT/TOPIC"), "{}", text(&output));
    let output = lockstep(&["compare", &missing, &missing, "--tolerance=-1"]);
    assert!(text(&output).contains("--tolerance"), "{}", text(&output));

    // A demo folder is not emptied when it is somebody else's.
    let other = dir.path().join("precious");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "mine").unwrap();
    let output = lockstep(&["demo", "--dir", other.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(text(&output).contains("not a lockstep demo folder"), "{}", text(&output));
    assert!(other.join("keep.txt").exists());

    let definitions = dir.path().join("d.yaml");
    std::fs::write(
        &definitions,
        "sources:\n  s:\n    schema: { k: string, t: timestamp }\n    event_time: t\n    history: { delta: h }\n\
         features:\n  f:\n    source: s\n    key: [k]\n    window: { tumbling: 1h }\n    aggregations: { n: count(*) }\n    output: { delta: o }\n",
    )
    .unwrap();
    let output = lockstep(&["backfill", definitions.to_str().unwrap(), "--feature", "f", "--from", "x", "--to", "y"]);
    assert!(text(&output).contains("is not a time"), "{}", text(&output));
    let output = lockstep(&["backfill", definitions.to_str().unwrap(), "--feature", "f", "--from", "2026-01-01"]);
    assert!(text(&output).contains("give both --from and --to"), "{}", text(&output));
    let output = lockstep(&["backfill", definitions.to_str().unwrap(), "--feature", "f"]);
    assert!(!output.status.success());
    assert!(text(&output).contains("not a Delta table"), "{}", text(&output));
}
