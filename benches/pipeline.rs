//! The CPU cost of one callback on the hot path, without HTTP or storage: normalize the body
//! (`Event::from_callback`) and run the rules on it (`Rules::evaluate`), with 10 rules (none or
//! one matching), 20 rules on a before-event, and 100 rules.
//!
//! `cargo bench --bench pipeline`; the "time" criterion prints is the cost per callback on one
//! core, so 100 µs would mean 10,000 callbacks/s per core. docs/performance.md has the figures.
//!
//! On a busy machine times wander; instruction counts do not. With `PIPELINE_COUNT=N` (and
//! optionally `PIPELINE_CASE=<index>`) the benchmark runs each case N times without criterion, so
//! `valgrind --tool=callgrind` at two values of N gives the instructions per callback
//! (`bash bench/instructions.sh` does that).

use std::collections::BTreeSet;
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, Criterion};
use imrelay::config::{RulesConfig, VerdictFailure};
use imrelay::event::{CallbackQuery, Event};
use imrelay::rules::Rules;

#[path = "../bench/rules.rs"]
mod bench_rules;

const AFTER: &str = "Group.CallbackAfterSendMsg";
const BEFORE: &str = "Group.CallbackBeforeSendMsg";

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn query(command: &str) -> CallbackQuery {
    CallbackQuery {
        sdk_app_id: Some(888888),
        command: Some(command.into()),
        client_ip: "127.0.0.1".into(),
        platform: "RESTAPI".into(),
    }
}

/// A rule set of `count` files in a fresh temporary folder, loaded as the server loads it.
fn rules(count: usize, matching: bool) -> (tempfile::TempDir, Rules) {
    let dir = tempfile::tempdir().expect("temp dir");
    bench_rules::write_rules(dir.path(), count, matching).expect("write rules");
    let config = RulesConfig {
        dir: dir.path().to_path_buf(),
        max_operations: 1_000_000,
        skip_bot_messages: true,
        verdict_budget: Duration::from_millis(1500),
        on_verdict_failure: VerdictFailure::Allow,
        require_tests: false,
    };
    let rules = Rules::new(&config, BTreeSet::from(["sink".to_string()]));
    let loaded = rules.current();
    assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
    assert_eq!(loaded.rules.len(), count);
    (dir, rules)
}

/// (name, command, fixture, rule files, one of them matching, forwards expected)
const CASES: [(&str, &str, &str, usize, bool, usize); 4] = [
    (
        "normalize + 10 rules, none matches",
        AFTER,
        "group-after-send-text.json",
        10,
        false,
        0,
    ),
    (
        "normalize + 10 rules, one matches",
        AFTER,
        "group-after-send-text.json",
        10,
        true,
        1,
    ),
    (
        "before-event: normalize + 20 rules",
        BEFORE,
        "group-before-send.json",
        20,
        false,
        0,
    ),
    (
        "normalize + 100 rules, none matches",
        AFTER,
        "group-after-send-text.json",
        100,
        false,
        0,
    ),
];

/// One case ready to run: its rules loaded and checked to do what the case says.
struct Case {
    name: &'static str,
    query: CallbackQuery,
    body: Vec<u8>,
    _dir: tempfile::TempDir,
    rules: Rules,
}

impl Case {
    fn new(index: usize) -> Case {
        let (name, command, file, count, matching, forwards) = CASES[index];
        let (dir, rules) = rules(count, matching);
        let case = Case {
            name,
            query: query(command),
            body: fixture(file),
            _dir: dir,
            rules,
        };
        let check = case.run();
        assert_eq!(check.forwards.len(), forwards, "{name}");
        assert!(!check.failed, "{name}: a rule failed");
        case
    }

    /// What the server does for one callback between reading its body and queueing.
    fn run(&self) -> imrelay::rules::Evaluation {
        let event = Event::from_callback(&self.query, black_box(&self.body), &[]).expect("event");
        self.rules.evaluate(&self.rules.current(), &event, false)
    }
}

fn pipeline(c: &mut Criterion) {
    // The server records per-rule metrics into a Prometheus recorder; so does the benchmark.
    imrelay::ops::metrics_handle();
    let after = fixture("group-after-send-text.json");
    let after_query = query(AFTER);
    c.bench_function("normalize only", |b| {
        b.iter(|| Event::from_callback(&after_query, black_box(&after), &[]).expect("event"))
    });
    for index in 0..CASES.len() {
        let case = Case::new(index);
        c.bench_function(case.name, |b| b.iter(|| case.run()));
    }
}

/// `PIPELINE_COUNT=N`: run the cases N times each, for counting instructions under callgrind.
fn count(n: usize) {
    imrelay::ops::metrics_handle();
    let only: Option<usize> = std::env::var("PIPELINE_CASE")
        .ok()
        .and_then(|v| v.parse().ok());
    for index in (0..CASES.len()).filter(|i| only.is_none_or(|o| o == *i)) {
        let case = Case::new(index);
        for _ in 0..n {
            black_box(case.run());
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = pipeline
}

fn main() {
    if let Some(n) = std::env::var("PIPELINE_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return count(n);
    }
    // What `criterion_main!(benches)` expands to.
    benches();
    Criterion::default().configure_from_args().final_summary();
}
