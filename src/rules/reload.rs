//! Hot reload: watch the rules folder (not the files) and rescan it on any change.
//!
//! Editors save by writing a temporary file and renaming it over the old one, and Kubernetes
//! swaps a ConfigMap by renaming a `..data` symlink, so watching single files misses changes.
//! Any debounced event in the folder triggers a full rescan, which recompiles only files whose
//! content changed. A slow periodic rescan covers events the watcher missed (network
//! filesystems, exhausted inotify limits).

use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::new_debouncer;
use tokio::sync::mpsc;

use super::tests::TestSuite;
use super::{Problem, RuleSet, Rules};

/// How long the watcher waits for a burst of file events to settle.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// The fallback rescan when the watcher is silent.
const RESCAN: Duration = Duration::from_secs(10);

/// Judges a freshly loaded rule set before it replaces the one in force: returns the problems
/// that forbid publishing it (none: publish). `rules.require_tests` uses this to keep the last
/// set that passed the rule tests.
pub type Gate = Arc<dyn Fn(&RuleSet) -> Vec<Problem> + Send + Sync>;

/// Watches until `shutdown` resolves. Problems are logged and published with the set.
pub async fn watch(
    rules: Arc<Rules>,
    gate: Option<Gate>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let dir = rules.dir().to_path_buf();
    let debouncer = new_debouncer(
        DEBOUNCE,
        None,
        move |result: notify_debouncer_full::DebounceEventResult| {
            if result.is_ok() {
                let _ = tx.send(());
            }
        },
    );
    let _debouncer = match debouncer {
        Ok(mut d) => match d.watch(&dir, RecursiveMode::Recursive) {
            Ok(()) => Some(d),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the rules folder; rescanning every {}s", RESCAN.as_secs());
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "file watcher unavailable; rescanning every {}s", RESCAN.as_secs());
            None
        }
    };
    record(&rules.current());
    if gate.is_some() {
        // The start-up load had no earlier set to fall back on: run the tests on it now, so
        // failures show in the log and `/readyz` from the start.
        let (rules, gate) = (rules.clone(), gate.clone());
        let _ = tokio::task::spawn_blocking(move || reload_once(&rules, gate.as_ref())).await;
    }
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(RESCAN);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            Some(()) = rx.recv() => {
                // Let a burst settle into one rescan.
                while rx.try_recv().is_ok() {}
            }
            _ = tick.tick() => {}
        }
        let rules = rules.clone();
        let gate = gate.clone();
        // Compiling reads files: keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || reload_once(&rules, gate.as_ref())).await;
    }
}

/// One rescan: load, pass through the gate, publish, and report what changed.
///
/// A set the gate refuses is not published: the rules in force keep running, and the refusal
/// is published as problems beside them, like a compile error.
pub fn reload_once(rules: &Rules, gate: Option<&Gate>) {
    let previous = rules.current();
    let loaded = rules.load(&previous);
    let refusal = gate.map(|gate| gate(&loaded)).unwrap_or_default();
    let refused = !refusal.is_empty();
    let next = if refused {
        RuleSet {
            rules: previous.rules.clone(),
            problems: loaded.problems.into_iter().chain(refusal).collect(),
            modules_digest: previous.modules_digest,
        }
    } else {
        loaded
    };
    let changed = next.problems != previous.problems
        || next.rules.len() != previous.rules.len()
        || next
            .rules
            .iter()
            .zip(&previous.rules)
            .any(|(a, b)| !Arc::ptr_eq(a, b));
    if !changed {
        return;
    }
    let outcome = match (refused, next.problems.is_empty()) {
        (true, _) => "refused",
        (false, true) => "ok",
        (false, false) => "error",
    };
    metrics::counter!("imrelay_rule_reloads_total", "outcome" => outcome).increment(1);
    record(&next);
    for p in &next.problems {
        tracing::warn!("rule problem: {p}");
    }
    if refused {
        tracing::warn!(
            rules = next.rules.len(),
            problems = next.problems.len(),
            "reload refused: rule tests fail (rules.require_tests); the rules in force keep running"
        );
    } else {
        tracing::info!(
            rules = next.rules.len(),
            problems = next.problems.len(),
            "rules reloaded"
        );
    }
    rules.publish(Arc::new(next));
}

/// The gauges that describe the set in force.
fn record(set: &RuleSet) {
    metrics::gauge!("imrelay_rule_problems").set(set.problems.len() as f64);
    metrics::gauge!("imrelay_rules_loaded").set(set.rules.len() as f64);
}

/// The gate for `rules.require_tests`: `None` when reloads need no tests to pass. Otherwise
/// every candidate set runs the tests in `<rules dir>/tests` (read again each time, so editing
/// a test is picked up like editing a rule), and any failure refuses it.
pub fn gate(config: &crate::config::Config, rules: Arc<Rules>) -> Option<Gate> {
    if !config.rules.require_tests {
        return None;
    }
    let tencent = config.tencent.clone();
    Some(Arc::new(move |candidate: &RuleSet| {
        TestSuite::load(rules.dir(), &tencent)
            .run(&rules, candidate)
            .as_problems()
    }))
}
