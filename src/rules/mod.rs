//! Rules: every `*.rhai` file directly inside the rules folder, compiled once per change and run
//! in file-name order on every event.
//!
//! A [`RuleSet`] is immutable; reloading builds a new one and swaps it in atomically
//! ([`Rules::current`]), so a callback always runs against one consistent set and never waits
//! for a reload.

mod engine;
pub mod guard;
pub mod reload;
pub mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rhai::{Dynamic, Engine, EvalAltResult, Scope, AST};
use sha2::{Digest, Sha256};

pub use engine::{Action, Forward, ForwardBody};
use engine::{RunState, TOKEN_DEADLINE, TOKEN_STOP};

use crate::config::RulesConfig;
use crate::event::{CommandKind, Element, Event};

/// One compiled rule file.
pub struct Rule {
    /// The file name, e.g. `10-moderation.rhai`; rules run in this order.
    pub name: Arc<str>,
    pub path: PathBuf,
    digest: [u8; 32],
    ast: AST,
    /// Checked natively before running the rule, when its shape allows (see [`guard`]).
    guard: Option<guard::Guard>,
    pub loaded_at: SystemTime,
    metrics: RuleMetrics,
}

struct RuleMetrics {
    runs: metrics::Counter,
    errors: metrics::Counter,
    overruns: metrics::Counter,
    /// Total time in Rhai, not a histogram: a histogram sample per rule per callback cost
    /// 11–15 % of the CPU per callback and 4–10 MB of RSS in the load benchmark. Runs and total
    /// time give the mean per rule; `imrelay_rules_duration_seconds` has the distribution per
    /// callback. A rule its guard decides natively adds no time (it takes tens of nanoseconds,
    /// and reading the clock around it cost as much).
    microseconds: metrics::Counter,
}

impl RuleMetrics {
    fn new(name: &str) -> RuleMetrics {
        let label = name.to_string();
        RuleMetrics {
            runs: metrics::counter!("imrelay_rule_runs_total", "rule" => label.clone()),
            errors: metrics::counter!("imrelay_rule_errors_total", "rule" => label.clone()),
            overruns: metrics::counter!("imrelay_rule_budget_overruns_total", "rule" => label.clone()),
            microseconds: metrics::counter!("imrelay_rule_duration_microseconds_total", "rule" => label),
        }
    }
}

/// A file that did not compile (or a rule test that failed), with where and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// The rules in force, in run order, and the problems found when they were loaded.
#[derive(Default)]
pub struct RuleSet {
    pub rules: Vec<Arc<Rule>>,
    pub problems: Vec<Problem>,
    /// Digest of every module file under sub-folders; when it changes, every rule recompiles.
    modules_digest: [u8; 32],
}

/// What the rules decided for one event.
#[derive(Debug, Default)]
pub struct Evaluation {
    pub forwards: Vec<Forward>,
    pub action: Option<Action>,
    pub rewrite_elements: Option<Vec<Element>>,
    pub rewrite_custom_data: Option<String>,
    pub refused_members: Vec<String>,
    /// A rule errored or ran out of time: before-events answer by `on_verdict_failure`.
    pub failed: bool,
    /// Per-rule detail, filled only when asked for (`dry-run`, rule tests).
    pub reports: Vec<RuleReport>,
}

/// What one rule did with one event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleReport {
    pub rule: String,
    pub forwards: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<serde_json::Value>,
    pub logs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub stopped: bool,
    pub micros: u64,
}

/// The engine, the folder and the rule set in force.
pub struct Rules {
    engine: Engine,
    config: RulesConfig,
    /// The configured destination names (shared with the engine's `forward`), which guards
    /// may forward to without Rhai.
    destinations: Arc<BTreeSet<String>>,
    current: ArcSwap<RuleSet>,
    /// `imrelay_rules_duration_seconds`, looked up once.
    duration: metrics::Histogram,
}

impl Rules {
    /// Builds the engine and loads the folder once.
    pub fn new(config: &RulesConfig, destinations: BTreeSet<String>) -> Rules {
        let destinations = Arc::new(destinations);
        let engine = engine::build_engine(config, destinations.clone());
        let rules = Rules {
            engine,
            duration: metrics::histogram!("imrelay_rules_duration_seconds"),
            config: config.clone(),
            destinations,
            current: ArcSwap::from_pointee(RuleSet::default()),
        };
        rules.reload();
        rules
    }

    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// The rule set in force now.
    pub fn current(&self) -> Arc<RuleSet> {
        self.current.load_full()
    }

    /// Rescans the folder and swaps in the result. Unchanged files are not recompiled; a file
    /// that fails to compile keeps its last good version. Returns the new set.
    pub fn reload(&self) -> Arc<RuleSet> {
        let previous = self.current();
        let next = Arc::new(self.load(&previous));
        self.current.store(next.clone());
        next
    }

    /// Swaps in a set built elsewhere (for example one that passed the rule tests).
    pub fn publish(&self, set: Arc<RuleSet>) {
        self.current.store(set);
    }

    /// Builds the set the folder holds now, reusing what `previous` already compiled.
    pub fn load(&self, previous: &RuleSet) -> RuleSet {
        let dir = &self.config.dir;
        let mut problems = Vec::new();
        let files = match rule_files(dir) {
            Ok(files) => files,
            Err(e) => {
                problems.push(Problem {
                    file: dir.display().to_string(),
                    line: 0,
                    column: 0,
                    message: format!("cannot read the rules folder: {e}"),
                });
                return RuleSet {
                    rules: previous.rules.clone(),
                    problems,
                    modules_digest: previous.modules_digest,
                };
            }
        };
        let modules_digest = modules_digest(dir);
        let modules_same = modules_digest == previous.modules_digest;
        let old: BTreeMap<&str, &Arc<Rule>> =
            previous.rules.iter().map(|r| (&*r.name, r)).collect();

        let mut rules = Vec::with_capacity(files.len());
        for (name, path) in files {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    // A file that vanished between listing and reading was deleted: drop it.
                    if e.kind() != std::io::ErrorKind::NotFound {
                        problems.push(Problem {
                            file: path.display().to_string(),
                            line: 0,
                            column: 0,
                            message: format!("cannot read: {e}"),
                        });
                        if let Some(r) = old.get(name.as_str()) {
                            rules.push(Arc::clone(r));
                        }
                    }
                    continue;
                }
            };
            let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
            match old.get(name.as_str()) {
                Some(r) if r.digest == digest && modules_same => {
                    rules.push(Arc::clone(r));
                    continue;
                }
                _ => {}
            }
            match self.compile(&name, &path, &text) {
                Ok(ast) => rules.push(Arc::new(Rule {
                    metrics: RuleMetrics::new(&name),
                    name: name.into(),
                    path,
                    digest,
                    guard: guard::Guard::of(&ast, self.config.max_operations, &|d| {
                        engine::is_named(&self.destinations, d)
                    }),
                    ast,
                    loaded_at: SystemTime::now(),
                })),
                Err(problem) => {
                    problems.push(problem);
                    if let Some(r) = old.get(name.as_str()) {
                        rules.push(Arc::clone(r));
                    }
                }
            }
        }
        RuleSet {
            rules,
            problems,
            modules_digest,
        }
    }

    /// Compiles one rule with its imports resolved now, so running it never touches the disk.
    fn compile(&self, name: &str, path: &Path, text: &str) -> Result<AST, Problem> {
        let mut ast = compile_source(&self.engine, text)
            .map_err(|e| locate_import(problem_from(path, &e), text))?;
        ast.set_source(name);
        Ok(ast)
    }

    /// Runs every rule in order on `event`. `trace` fills [`Evaluation::reports`]; a traced run
    /// is an inspection (`dry-run`, rule tests, the `require_tests` gate), not traffic, so it
    /// leaves the rule metrics alone.
    pub fn evaluate(&self, set: &RuleSet, event: &Event, trace: bool) -> Evaluation {
        let kind = CommandKind::of(&event.command);
        let budget = self.config.verdict_budget;
        let start = Instant::now();
        // Before-events share one budget across all rules: Tencent waits 2 s for the answer.
        // After-events give each rule the budget on its own.
        let overall = match kind {
            CommandKind::After => None,
            _ => Some(start + budget),
        };
        let state = RunState {
            rule: Arc::from(""),
            kind,
            command_is_c2c: event.command.starts_with("C2C."),
            deadline: start + budget,
            event: Dynamic::UNIT,
            forwards: Vec::new(),
            logs: Vec::new(),
            problems: Vec::new(),
            stopped: false,
            action: Action::Allow,
            rewrite_elements: None,
            rewrite_custom_data: None,
            refused_members: Vec::new(),
        };
        // The event as a Rhai value: built once per callback, when the first rule that is not
        // skipped by its guard runs, and shared by every rule after it (cloning the handle, not
        // the map). Read-only inside, so a rule cannot change what later rules see; only
        // `rewrite` does, from Rust.
        let mut shared: Option<Dynamic> = None;
        let mut failed = false;
        let mut reports = Vec::new();
        let ((), state) = engine::with_run_state(state, || {
            let mut scope = Scope::new();
            for rule in &set.rules {
                let marks = trace.then(engine::marks);
                // A guard reads the event as Tencent sent it, so not after a rewrite.
                let decision = match &rule.guard {
                    Some(g) if !engine::rewritten() => g.decide(event),
                    _ => guard::Decision::Run,
                };
                // Only a rule that runs in Rhai is timed outside traced runs: a guard's decision
                // takes tens of nanoseconds, about what reading the clock twice costs.
                let runs = matches!(decision, guard::Decision::Run);
                let began = (runs || trace).then(Instant::now);
                let deadline = match (overall, began) {
                    (Some(end), Some(began)) => end.min(began + budget),
                    (Some(end), None) => end,
                    (None, began) => began.unwrap_or(start) + budget,
                };
                let result = if let guard::Decision::Forward(destinations) = decision {
                    // What the rule would certainly do, done without Rhai.
                    if !destinations.is_empty() {
                        engine::enter_rule(&rule.name, deadline);
                        destinations.into_iter().for_each(engine::record_forward);
                    }
                    Ok(())
                } else {
                    let event_value = match &shared {
                        Some(d) => d.clone(),
                        None => match event_value(event) {
                            Ok(d) => {
                                engine::set_event(d.clone());
                                shared.insert(d).clone()
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "event could not be handed to the rules");
                                failed = true;
                                break;
                            }
                        },
                    };
                    engine::enter_rule(&rule.name, deadline);
                    scope.rewind(0);
                    scope.push_constant_dynamic("event", event_value);
                    self.engine.run_ast_with_scope(&mut scope, &rule.ast)
                };
                let elapsed = began.map_or(Duration::ZERO, |b| b.elapsed());
                if !trace {
                    rule.metrics.runs.increment(1);
                    if runs {
                        rule.metrics
                            .microseconds
                            .increment(elapsed.as_micros() as u64);
                    }
                }
                let error = match result {
                    Ok(()) => None,
                    Err(e) => match terminated_by(&e) {
                        Some(TOKEN_STOP) => None,
                        Some(TOKEN_DEADLINE) => {
                            if !trace {
                                rule.metrics.overruns.increment(1);
                            }
                            Some(format!(
                                "{}: stopped: over the time budget of {} ms",
                                rule.path.display(),
                                budget.as_millis()
                            ))
                        }
                        _ => Some(problem_from(&rule.path, &e).to_string()),
                    },
                };
                if let Some(message) = &error {
                    failed = true;
                    if !trace {
                        rule.metrics.errors.increment(1);
                    }
                    tracing::warn!(rule = %rule.name, "rule failed: {message}");
                }
                let stopped = engine::is_stopped();
                if let Some(marks) = marks {
                    reports.push(engine::report(rule, marks, error, stopped, elapsed));
                }
                if stopped {
                    break;
                }
                if overall.is_some_and(|end| Instant::now() >= end) {
                    failed = true;
                    break;
                }
            }
        });
        if !trace {
            self.duration.record(start.elapsed().as_secs_f64());
        }
        for (rule, message) in &state.problems {
            failed = true;
            tracing::warn!(rule = %rule, "rule error: {message}");
        }
        Evaluation {
            forwards: state.forwards,
            action: match kind {
                CommandKind::After => None,
                _ => Some(state.action),
            },
            rewrite_elements: state.rewrite_elements,
            rewrite_custom_data: state.rewrite_custom_data,
            refused_members: state.refused_members,
            failed,
            reports,
        }
    }

    /// Compiles every rule from scratch (for `imrelay check`) and lists the problems.
    pub fn check(&self) -> Vec<Problem> {
        self.load(&RuleSet::default()).problems
    }

    pub fn budget(&self) -> Duration {
        self.config.verdict_budget
    }
}

/// Compiles a rule's text with its imports resolved now. `event` is declared for
/// strict-variable checking; as a variable, not a constant: the optimizer would fold a
/// constant's (empty) value into the script.
fn compile_source(engine: &Engine, text: &str) -> Result<AST, Box<EvalAltResult>> {
    let mut scope = Scope::new();
    scope.push("event", rhai::Map::new());
    engine.compile_into_self_contained(&scope, text)
}

/// The event as rules see it: a read-only map, shared by every rule (cloning it clones the
/// handle), so a rule cannot change what later rules see; only `rewrite` does, from Rust.
fn event_value(event: &Event) -> Result<Dynamic, Box<EvalAltResult>> {
    Ok(rhai::serde::to_dynamic(event)?
        .into_read_only()
        .into_shared())
}

fn terminated_by(e: &EvalAltResult) -> Option<&'static str> {
    match e {
        EvalAltResult::ErrorTerminated(token, _) => {
            let t = token.clone().into_immutable_string().ok()?;
            [TOKEN_STOP, TOKEN_DEADLINE]
                .into_iter()
                .find(|known| t.as_str() == *known)
        }
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _)
        | EvalAltResult::ErrorInModule(_, inner, _) => terminated_by(inner),
        _ => None,
    }
}

fn problem_from(path: &Path, e: &EvalAltResult) -> Problem {
    // An error inside an imported module is reported at its place in the module's file.
    if let EvalAltResult::ErrorInModule(module, inner, _) = e {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut p = problem_from(&dir.join(format!("{module}.rhai")), inner);
        p.message = format!("{} (imported by {})", p.message, path.display());
        return p;
    }
    let pos = e.position();
    let mut message = e.to_string();
    // Rhai appends the position to its message; it is already in the line and column.
    if let Some(stripped) = message.strip_suffix(&format!(" ({pos})")) {
        message = stripped.to_string();
    }
    Problem {
        file: path.display().to_string(),
        line: pos.line().unwrap_or(0),
        column: pos.position().unwrap_or(0),
        message,
    }
}

/// Rhai resolves imports at compile time without a position; a failed `import "x"` is placed
/// at the line that names it.
fn locate_import(mut p: Problem, text: &str) -> Problem {
    if p.line != 0 {
        return p;
    }
    let named = p
        .message
        .split("import \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next());
    if let Some(module) = named {
        let quoted = format!("\"{module}\"");
        for (i, line) in text.lines().enumerate() {
            if let Some(col) = line.find(&quoted).filter(|_| line.contains("import")) {
                p.line = i + 1;
                p.column = line[..col].chars().count() + 1;
                break;
            }
        }
    }
    p
}

/// `*.rhai` files directly in `dir`, by name; dotfiles and editor temporaries are skipped.
fn rule_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".rhai") {
            continue;
        }
        let path = entry.path();
        // Follows symlinks, so a Kubernetes ConfigMap's `..data` links count as files.
        if path.is_file() {
            files.push((name, path));
        }
    }
    files.sort();
    Ok(files)
}

/// Digest of every `.rhai` file in the folder's sub-folders (the modules rules import).
fn modules_digest(dir: &Path) -> [u8; 32] {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        if depth > 8 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name != "..data" {
                continue;
            }
            let path = entry.path();
            if path.is_dir() {
                walk(&path, depth + 1, out);
            } else if depth > 0 && name.ends_with(".rhai") {
                out.push((path.clone(), std::fs::read(&path).unwrap_or_default()));
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, 0, &mut files);
    files.sort();
    let mut h = Sha256::new();
    for (path, bytes) in files {
        h.update(path.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(&bytes);
    }
    h.finalize().into()
}

/// Turns a rule's decision into JSON for reports and forwarded before-events.
pub fn action_json(action: &Action) -> serde_json::Value {
    match action {
        Action::Allow => serde_json::json!({"action": "allow", "code": 0, "info": ""}),
        Action::Reject { code, info } => {
            serde_json::json!({"action": "reject", "code": code, "info": info})
        }
        Action::Discard => serde_json::json!({"action": "discard", "code": 2, "info": ""}),
    }
}

/// The JSON form of a forward, as `dry-run` prints it.
pub fn forward_json(f: &Forward) -> serde_json::Value {
    let body = match &f.body {
        None => serde_json::Value::String("event".into()),
        Some(ForwardBody::Json(v)) => v.clone(),
        Some(ForwardBody::Text(t)) => serde_json::Value::String(t.clone()),
    };
    serde_json::json!({"destination": f.destination, "body": body})
}
