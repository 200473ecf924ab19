//! The one-shot commands: `check`, `dry-run`, `test` and `replay`. Each returns the process exit
//! code and prints for a person (problems as `path:line:column: message`).

use std::path::Path;

use serde_json::json;

use crate::config::{Config, VerdictFailure};
use crate::event::{CallbackQuery, Event};
use crate::ingress::answer;
use crate::rules::tests::TestSuite;
use crate::rules::{self, Rules};

/// Builds the rule engine the way the server does, for commands that run rules.
pub fn rules_for(config: &Config) -> Rules {
    Rules::new(&config.rules, config.destinations.keys().cloned().collect())
}

/// `imrelay check`: every config and rule problem, one per line; 1 if there is any.
pub fn check(config: &Config) -> i32 {
    let rules = rules_for(config);
    let problems = rules.check();
    for p in &problems {
        println!("{p}");
    }
    if problems.is_empty() {
        println!(
            "ok: configuration and {} rule(s) in {}",
            rules.current().rules.len(),
            config.rules.dir.display()
        );
        0
    } else {
        1
    }
}

/// `imrelay dry-run`: runs the rules on one payload and prints what each rule did, one JSON
/// object per line, then the answer imrelay would give. Sends nothing. Exit 1 when a rule does
/// not compile, errors on this payload or runs out of time.
pub fn dry_run(config: &Config, command: &str, payload: &Path) -> i32 {
    let body = match std::fs::read(payload) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", payload.display());
            return 1;
        }
    };
    let query = CallbackQuery {
        sdk_app_id: config.tencent.sdk_app_ids.first().copied(),
        command: Some(command.to_string()),
        client_ip: String::new(),
        platform: String::new(),
    };
    let event = match Event::from_callback(&query, &body, &config.tencent.bot_accounts) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{}: {e}", payload.display());
            return 1;
        }
    };
    let rules = rules_for(config);
    let set = rules.current();
    for p in &set.problems {
        eprintln!("{p}");
    }
    if event.from_bot && config.rules.skip_bot_messages {
        println!(
            "{}",
            json!({"skipped": "from a bot account (rules.skip_bot_messages)"})
        );
        return 0;
    }
    let evaluation = rules.evaluate(&set, &event, true);
    for report in &evaluation.reports {
        println!("{}", serde_json::to_string(report).unwrap_or_default());
    }
    let mut event = event;
    let result =
        answer::settle(&mut event, &evaluation, config.rules.on_verdict_failure).into_value();
    let on_failure = match config.rules.on_verdict_failure {
        VerdictFailure::Allow => "allow",
        VerdictFailure::Reject => "reject",
    };
    println!(
        "{}",
        json!({"answer": result, "forwards": evaluation.forwards.len(), "failed": evaluation.failed, "on_verdict_failure": on_failure})
    );
    i32::from(!set.problems.is_empty() || evaluation.failed)
}

/// `imrelay replay`: moves dead letters back into the queue.
pub fn replay(config: &Config, destination: Option<&str>) -> i32 {
    match crate::outbox::replay(&config.storage.dir, destination) {
        Ok(n) => {
            println!(
                "moved {n} dead-lettered deliver{} back into the queue{}",
                if n == 1 { "y" } else { "ies" },
                destination
                    .map(|d| format!(" for `{d}`"))
                    .unwrap_or_default()
            );
            0
        }
        Err(e) => {
            eprintln!("replay: {e}");
            1
        }
    }
}

/// `imrelay test`: runs the rule tests kept beside the rules (`<rules dir>/tests/*.toml`).
///
/// Prints one block per failing test (expected and got, per field), then `N passed, M failed`.
/// Exit 1 when a test fails, a test file cannot be read, or a rule does not compile (its tests
/// would otherwise run without it).
pub fn test(config: &Config) -> i32 {
    let rules = rules_for(config);
    let set = rules.current();
    let suite = TestSuite::load(rules.dir(), &config.tencent);
    let report = suite.run(&rules, &set);
    for p in set.problems.iter().chain(&report.problems) {
        println!("{p}");
    }
    for case in report.cases.iter().filter(|c| !c.passed()) {
        println!();
        println!("FAIL {}:{}: {}", case.file.display(), case.line, case.name);
        for m in &case.mismatches {
            println!("  {}", m.field);
            println!("    expected: {}", m.expected);
            println!("    got:      {}", m.got);
        }
    }
    if report.cases.is_empty() && report.problems.is_empty() {
        println!(
            "no rule tests in {}",
            rules.dir().join(rules::tests::TESTS_DIR).display()
        );
    }
    println!();
    println!("{} passed, {} failed", report.passed(), report.failed());
    i32::from(!report.ok() || !set.problems.is_empty())
}
