//! Rule tests: cases kept as data beside the rules (`<rules dir>/tests/*.toml`), run against a
//! rule set the way the server runs it, and compared with what the case expects, field by field.
//!
//! Tests are data, not scripts, so that a reviewer reads the expected forwards and verdicts
//! without knowing Rhai, and so that one format serves both `imrelay test` (CI) and
//! `rules.require_tests` (a hot reload that breaks a test is refused, see [`super::reload`]).
//! Running a test sends nothing: rule functions only record what a rule asks for.
//!
//! ```toml
//! [[test]]
//! name = "a red packet in a public group goes to moderation"
//! command = "Group.CallbackAfterSendMsg"
//! fixture = "../../tests/fixtures/group-after-send-text.json"   # relative to this file
//! query = { platform = "iOS" }                                   # optional query values
//! forwards = [{ destination = "moderation" }]                    # body optional
//! verdict = { action = "reject", code = 1 }                      # before-events only
//! logs = ["red packet in @TGS#2J4SZEAEL"]
//! ```
//!
//! An expectation that is left out is not checked; `forwards = []` expects none. A rule that
//! errors on a case always fails it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{action_json, forward_json, Evaluation, Problem, RuleSet, Rules};
use crate::config::{line_column, TencentConfig};
use crate::event::{CallbackQuery, CommandKind, Event};
use crate::rules::Action;

/// The folder inside the rules folder that holds the test files. Never scanned for rules: only
/// `*.rhai` files directly in the rules folder are rules.
pub const TESTS_DIR: &str = "tests";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    test: Vec<toml::Spanned<RawCase>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    command: Option<String>,
    payload: Option<toml::Value>,
    fixture: Option<PathBuf>,
    #[serde(default)]
    query: RawQuery,
    forwards: Option<Vec<RawForward>>,
    verdict: Option<toml::Table>,
    logs: Option<Vec<String>>,
}

/// The callback's query values, by the event field they fill.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawQuery {
    app_id: Option<u64>,
    client_ip: Option<String>,
    platform: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    destination: String,
    body: Option<toml::Value>,
}

/// One loaded case: the event it feeds the rules and what it expects back.
pub struct TestCase {
    pub file: PathBuf,
    pub line: usize,
    pub name: String,
    event: Event,
    forwards: Option<Vec<ExpectedForward>>,
    verdict: Option<Map<String, Value>>,
    logs: Option<Vec<String>>,
}

struct ExpectedForward {
    destination: String,
    /// `None`: only the destination is compared.
    body: Option<Value>,
}

/// Every case found beside the rules, and the files that could not be read as tests.
#[derive(Default)]
pub struct TestSuite {
    pub cases: Vec<TestCase>,
    pub problems: Vec<Problem>,
}

/// One expectation that did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Where, e.g. `forwards[0].body.text` or `verdict.code`.
    pub field: String,
    pub expected: String,
    pub got: String,
}

/// The outcome of one case.
pub struct CaseResult {
    pub file: PathBuf,
    pub line: usize,
    pub name: String,
    pub mismatches: Vec<Mismatch>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// The outcome of a whole suite.
pub struct Report {
    pub cases: Vec<CaseResult>,
    /// Test files that could not be loaded; they fail the suite too.
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed()).count()
    }

    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed()
    }

    pub fn ok(&self) -> bool {
        self.failed() == 0 && self.problems.is_empty()
    }

    /// The failures in the form of rule problems (`file:line:column: message`), for a refused
    /// reload to report like a compile error: one per failing case, naming its first mismatch.
    pub fn as_problems(&self) -> Vec<Problem> {
        let failing = self.cases.iter().filter(|c| !c.passed()).map(|c| {
            let first = &c.mismatches[0];
            let more = match c.mismatches.len() - 1 {
                0 => String::new(),
                n => format!(" (and {n} more)"),
            };
            Problem {
                file: c.file.display().to_string(),
                line: c.line,
                column: 1,
                message: format!(
                    "rule test \"{}\" fails: {}: expected {}, got {}{more}",
                    c.name, first.field, first.expected, first.got
                ),
            }
        });
        self.problems.iter().cloned().chain(failing).collect()
    }
}

impl TestSuite {
    /// Reads every `*.toml` file in `<rules_dir>/tests`, in name order. No such folder: no tests.
    /// `tencent` supplies what the server would know about a callback: the app id (the first
    /// accepted one unless a case sets `query.app_id`) and the bot accounts.
    pub fn load(rules_dir: &Path, tencent: &TencentConfig) -> TestSuite {
        let dir = rules_dir.join(TESTS_DIR);
        let mut suite = TestSuite::default();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return suite,
            Err(e) => {
                suite
                    .problems
                    .push(problem(&dir, 0, format!("cannot read: {e}")));
                return suite;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                name.is_some_and(|n| !n.starts_with('.') && n.ends_with(".toml")) && p.is_file()
            })
            .collect();
        files.sort();
        for file in files {
            suite.load_file(&file, tencent);
        }
        suite
    }

    fn load_file(&mut self, file: &Path, tencent: &TencentConfig) {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                self.problems
                    .push(problem(file, 0, format!("cannot read: {e}")));
                return;
            }
        };
        let raw: RawFile = match toml::from_str(&text) {
            Ok(raw) => raw,
            Err(e) => {
                let (line, column) = e.span().map_or((0, 0), |s| line_column(&text, s.start));
                self.problems.push(Problem {
                    file: file.display().to_string(),
                    line,
                    column,
                    message: e.message().to_string(),
                });
                return;
            }
        };
        if raw.test.is_empty() {
            self.problems
                .push(problem(file, 1, "no [[test]] cases in this file".into()));
        }
        let mut names = BTreeSet::new();
        for spanned in raw.test {
            let (line, _) = line_column(&text, spanned.span().start);
            let case = spanned.into_inner();
            if !names.insert(case.name.clone()) {
                self.problems.push(problem(
                    file,
                    line,
                    format!("a second test named \"{}\" in this file", case.name),
                ));
                continue;
            }
            match TestCase::new(file, line, case, tencent) {
                Ok(case) => self.cases.push(case),
                Err(message) => self.problems.push(problem(file, line, message)),
            }
        }
    }

    /// Runs every case against `set` with `rules`' engine and settings. Quiet: the rules' own
    /// log lines and failures go into the results, not the process log, and rule metrics do not
    /// count test runs (a traced evaluation is an inspection, not traffic).
    pub fn run(&self, rules: &Rules, set: &RuleSet) -> Report {
        let cases =
            tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
                self.cases
                    .iter()
                    .map(|case| CaseResult {
                        file: case.file.clone(),
                        line: case.line,
                        name: case.name.clone(),
                        mismatches: case.run(rules, set),
                    })
                    .collect()
            });
        Report {
            cases,
            problems: self.problems.clone(),
        }
    }
}

fn problem(file: &Path, line: usize, message: String) -> Problem {
    Problem {
        file: file.display().to_string(),
        line,
        column: usize::from(line > 0),
        message,
    }
}

impl TestCase {
    fn new(
        file: &Path,
        line: usize,
        raw: RawCase,
        tencent: &TencentConfig,
    ) -> Result<TestCase, String> {
        let body = match (raw.payload, raw.fixture) {
            (Some(_), Some(_)) => return Err("give either `payload` or `fixture`, not both".into()),
            (None, None) => return Err("a test needs a `payload` or a `fixture`".into()),
            (Some(toml::Value::String(json)), None) => json.into_bytes(),
            (Some(toml::Value::Table(table)), None) => serde_json::to_vec(&table)
                .map_err(|e| format!("payload cannot be turned into JSON: {e}"))?,
            (Some(_), None) => return Err("`payload` must be a JSON string or a TOML table".into()),
            (None, Some(fixture)) => {
                let path = file.parent().unwrap_or(Path::new(".")).join(fixture);
                std::fs::read(&path)
                    .map_err(|e| format!("fixture {}: cannot read: {e}", path.display()))?
            }
        };
        let query = CallbackQuery {
            sdk_app_id: raw
                .query
                .app_id
                .or_else(|| tencent.sdk_app_ids.first().copied()),
            command: raw.command,
            client_ip: raw.query.client_ip.unwrap_or_default(),
            platform: raw.query.platform.unwrap_or_default(),
        };
        let event = Event::from_callback(&query, &body, &tencent.bot_accounts)
            .map_err(|e| format!("the test's callback is refused: {e}"))?;
        let forwards = raw.forwards.map(|list| {
            list.into_iter()
                .map(|f| ExpectedForward {
                    destination: f.destination,
                    body: f.body.map(|b| json_of(&b)),
                })
                .collect()
        });
        let verdict = raw.verdict.map(|t| match json_of(&toml::Value::Table(t)) {
            Value::Object(m) => m,
            _ => Map::new(),
        });
        Ok(TestCase {
            file: file.to_path_buf(),
            line,
            name: raw.name,
            event,
            forwards,
            verdict,
            logs: raw.logs,
        })
    }

    /// Runs the rules on this case's event as the server would and lists what differs.
    fn run(&self, rules: &Rules, set: &RuleSet) -> Vec<Mismatch> {
        let settings = &rules.config;
        let evaluation = if self.event.from_bot && settings.skip_bot_messages {
            Evaluation::default()
        } else {
            rules.evaluate(set, &self.event, true)
        };
        let mut out = Vec::new();
        for report in &evaluation.reports {
            if let Some(error) = &report.error {
                out.push(Mismatch {
                    field: format!("rule {}", report.rule),
                    expected: "no error".into(),
                    got: error.clone(),
                });
            }
        }
        if let Some(expected) = &self.forwards {
            let got: Vec<Value> = evaluation.forwards.iter().map(forward_json).collect();
            compare_forwards(expected, &got, &mut out);
        }
        if let Some(expected) = &self.verdict {
            match verdict_json(&self.event, &evaluation, settings.on_verdict_failure) {
                None => out.push(Mismatch {
                    field: "verdict".into(),
                    expected: show(&Value::Object(expected.clone())),
                    got: format!("none: {} is not a before-event", self.event.command),
                }),
                // Only the keys the case names are compared.
                Some(got) => {
                    for (key, want) in expected {
                        let have = got.get(key).unwrap_or(&Value::Null);
                        diff(&format!("verdict.{key}"), want, have, &mut out);
                    }
                }
            }
        }
        if let Some(expected) = &self.logs {
            let got: Vec<&String> = evaluation.reports.iter().flat_map(|r| &r.logs).collect();
            if got.len() != expected.len() || got.iter().zip(expected).any(|(a, b)| *a != b) {
                out.push(Mismatch {
                    field: "logs".into(),
                    expected: show(&serde_json::json!(expected)),
                    got: show(&serde_json::json!(got)),
                });
            }
        }
        out
    }
}

/// The decision imrelay would answer a before-event with (after `on_verdict_failure`), with any
/// rewrite; `None` for after-events, which have no verdict.
fn verdict_json(
    event: &Event,
    evaluation: &Evaluation,
    on_failure: crate::config::VerdictFailure,
) -> Option<Map<String, Value>> {
    let kind = CommandKind::of(&event.command);
    if kind == CommandKind::After {
        return None;
    }
    let action = crate::ingress::answer::decide(evaluation, on_failure, kind);
    let Value::Object(mut m) = action_json(&action) else {
        return None;
    };
    if action == Action::Allow {
        if let Some(elements) = &evaluation.rewrite_elements {
            m.insert(
                "elements".into(),
                serde_json::to_value(elements).unwrap_or_default(),
            );
        }
        if let Some(data) = &evaluation.rewrite_custom_data {
            m.insert("custom_data".into(), Value::String(data.clone()));
        }
        if !evaluation.refused_members.is_empty() {
            m.insert(
                "refused_members".into(),
                serde_json::json!(evaluation.refused_members),
            );
        }
    }
    Some(m)
}

/// Forwards are compared in order; a body left out of the expectation is not compared.
fn compare_forwards(expected: &[ExpectedForward], got: &[Value], out: &mut Vec<Mismatch>) {
    for i in 0..expected.len().max(got.len()) {
        let field = format!("forwards[{i}]");
        match (expected.get(i), got.get(i)) {
            (Some(want), Some(have)) => {
                let have_destination = have["destination"].as_str().unwrap_or_default();
                if want.destination != have_destination {
                    out.push(Mismatch {
                        field: format!("{field}.destination"),
                        expected: show(&Value::String(want.destination.clone())),
                        got: show(&have["destination"]),
                    });
                }
                if let Some(body) = &want.body {
                    diff(&format!("{field}.body"), body, &have["body"], out);
                }
            }
            (Some(want), None) => out.push(Mismatch {
                field,
                expected: format!("a forward to {}", show(&want.destination.clone().into())),
                got: "no forward".into(),
            }),
            (None, Some(have)) => out.push(Mismatch {
                field,
                expected: "no forward".into(),
                got: show(have),
            }),
            (None, None) => {}
        }
    }
}

/// Field-by-field differences between two JSON values, with the path to each.
fn diff(path: &str, expected: &Value, got: &Value, out: &mut Vec<Mismatch>) {
    match (expected, got) {
        (Value::Object(e), Value::Object(g)) => {
            let keys: BTreeSet<&String> = e.keys().chain(g.keys()).collect();
            for key in keys {
                let at = format!("{path}.{key}");
                match (e.get(key), g.get(key)) {
                    (Some(a), Some(b)) => diff(&at, a, b, out),
                    (Some(a), None) => out.push(mismatch(at, show(a), "(absent)".into())),
                    (None, Some(b)) => out.push(mismatch(at, "(absent)".into(), show(b))),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(e), Value::Array(g)) if e.len() == g.len() => {
            for (i, (a, b)) in e.iter().zip(g).enumerate() {
                diff(&format!("{path}[{i}]"), a, b, out);
            }
        }
        _ if expected == got => {}
        _ => out.push(mismatch(path.to_string(), show(expected), show(got))),
    }
}

fn mismatch(field: String, expected: String, got: String) -> Mismatch {
    Mismatch {
        field,
        expected,
        got,
    }
}

fn show(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn json_of(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::config::Config;

    fn setup(rule: &str, tests: &str) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        std::fs::create_dir_all(rules.join(TESTS_DIR)).unwrap();
        std::fs::write(rules.join("10-rule.rhai"), rule).unwrap();
        std::fs::write(rules.join(TESTS_DIR).join("cases.toml"), tests).unwrap();
        let mut config = Config::default();
        config.rules.dir = rules;
        (dir, config)
    }

    fn run(rule: &str, tests: &str) -> Report {
        let (_dir, config) = setup(rule, tests);
        let rules = crate::cli::rules_for(&config);
        let suite = TestSuite::load(rules.dir(), &config.tencent);
        suite.run(&rules, &rules.current())
    }

    const GROUP_TEXT: &str = r#"
[[test]]
name = "red packet"
command = "Group.CallbackAfterSendMsg"
payload = { GroupId = "@TGS#1", Type = "Public", From_Account = "jared", MsgBody = [{ MsgType = "TIMTextElem", MsgContent = { Text = "red packet" } }] }
"#;

    #[test]
    fn passing_and_failing_expectations() {
        let rule = r#"
            if event.text.contains("red packet") {
                log(`seen in ${event.group_id}`);
                forward("stdout", #{ text: event.text, from: event.from });
            }
        "#;
        let good = format!(
            "{GROUP_TEXT}forwards = [{{ destination = \"stdout\", body = {{ text = \"red packet\", from = \"jared\" }} }}]\nlogs = [\"seen in @TGS#1\"]\n"
        );
        let report = run(rule, &good);
        assert!(report.ok(), "{:?}", report.as_problems());
        assert_eq!((report.passed(), report.failed()), (1, 0));

        let bad = format!(
            "{GROUP_TEXT}forwards = [{{ destination = \"stdout\", body = {{ text = \"blue packet\", from = \"jared\" }} }}, {{ destination = \"stdout\" }}]\nlogs = []\n"
        );
        let report = run(rule, &bad);
        assert_eq!(report.failed(), 1);
        let m = &report.cases[0].mismatches;
        assert_eq!(
            m[0],
            Mismatch {
                field: "forwards[0].body.text".into(),
                expected: "\"blue packet\"".into(),
                got: "\"red packet\"".into()
            }
        );
        assert_eq!(m[1].field, "forwards[1]");
        assert_eq!(m[1].got, "no forward");
        assert_eq!(m[2].field, "logs");
        let problems = report.as_problems();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, 2, "{}", problems[0]);
        assert!(
            problems[0].message.contains("(and 2 more)"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn verdicts_compare_only_the_keys_given() {
        let rule = r#"if event.text == "bad" { reject(10100, "no"); }"#;
        let tests = r#"
[[test]]
name = "rejected"
command = "Group.CallbackBeforeSendMsg"
payload = '{"GroupId":"@TGS#1","MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"bad"}}]}'
verdict = { action = "reject", code = 10100 }

[[test]]
name = "allowed"
command = "Group.CallbackBeforeSendMsg"
payload = '{"GroupId":"@TGS#1","MsgBody":[]}'
verdict = { action = "reject" }
forwards = []
"#;
        let report = run(rule, tests);
        assert!(report.cases[0].passed());
        assert_eq!(
            report.cases[1].mismatches,
            vec![Mismatch {
                field: "verdict.action".into(),
                expected: "\"reject\"".into(),
                got: "\"allow\"".into()
            }]
        );
    }

    #[test]
    fn a_rule_error_fails_the_case_and_bad_files_are_problems() {
        let report = run("let x = event.nope + 1;", GROUP_TEXT);
        assert_eq!(report.failed(), 1);
        assert!(report.cases[0].mismatches[0].got.contains("10-rule.rhai"));

        let report = run("", "[[test]]\nname = \"x\"\ncomand = \"y\"\n");
        assert_eq!(report.cases.len(), 0);
        assert!(!report.ok());
        assert_eq!(report.problems[0].line, 3, "{}", report.problems[0]);
        assert!(report.problems[0].message.contains("comand"));

        let report = run("", "[[test]]\nname = \"x\"\ncommand = \"y\"\n");
        assert!(report.problems[0].message.contains("payload"));
    }
}
