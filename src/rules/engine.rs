//! The one shared Rhai [`Engine`]: its limits, the `import` resolver rooted at the rules
//! folder, and the functions a rule can call.
//!
//! Rule functions never do I/O. They record what the rule asked for in a per-thread
//! [`RunState`] that [`super::RuleSet::evaluate`] sets up before running a rule and takes back
//! after; Rust then queues forwards and builds the answer. This keeps scripts unable to reach
//! files, the network or the process, and lets `dry-run` show decisions without sending.
//!
//! Rhai has operation limits but no clock, so a wall-clock deadline is kept in the same
//! per-thread state and checked from `on_progress`.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rhai::module_resolvers::FileModuleResolver;
use rhai::{Array, Dynamic, Engine, EvalAltResult, ModuleResolver, Position, INT};
use serde_json::Value;

use crate::config::{RulesConfig, STDOUT_DESTINATION};
use crate::event::{CommandKind, Element};

/// What a rule asked to be sent, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    pub rule: Arc<str>,
    pub destination: String,
    /// `None`: the event itself.
    pub body: Option<ForwardBody>,
}

/// A body a rule gave to `forward(dest, body)`.
#[derive(Debug, Clone, PartialEq)]
pub enum ForwardBody {
    Json(Value),
    Text(String),
}

/// The decision on a before-event, as the rules left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Allow,
    Reject { code: i64, info: String },
    Discard,
}

/// Terminations carry one of these tokens so the caller can tell a rule's own `stop()` (or
/// verdict) from the wall clock running out.
pub(crate) const TOKEN_STOP: &str = "imrelay:stop";
pub(crate) const TOKEN_DEADLINE: &str = "imrelay:deadline";

/// Everything one evaluation collects; lives in a thread-local while rules run.
pub(crate) struct RunState {
    pub rule: Arc<str>,
    pub kind: CommandKind,
    pub command_is_c2c: bool,
    pub deadline: Instant,
    pub event: Dynamic,
    pub forwards: Vec<Forward>,
    pub logs: Vec<(Arc<str>, String)>,
    pub problems: Vec<(Arc<str>, String)>,
    pub stopped: bool,
    pub action: Action,
    pub rewrite_elements: Option<Vec<Element>>,
    pub rewrite_custom_data: Option<String>,
    pub refused_members: Vec<String>,
}

thread_local! {
    static RUN: RefCell<Option<RunState>> = const { RefCell::new(None) };
}

/// Installs `state` for the duration of `f` on this thread and hands it back afterwards.
pub(crate) fn with_run_state<R>(state: RunState, f: impl FnOnce() -> R) -> (R, RunState) {
    RUN.with(|cell| *cell.borrow_mut() = Some(state));
    let r = f();
    let state = RUN
        .with(|cell| cell.borrow_mut().take())
        .expect("run state is present until taken here");
    (r, state)
}

/// Sets the rule whose code runs next, and its deadline.
pub(crate) fn enter_rule(rule: &Arc<str>, deadline: Instant) {
    RUN.with(|cell| {
        if let Some(s) = cell.borrow_mut().as_mut() {
            s.rule = rule.clone();
            s.deadline = deadline;
        }
    });
}

/// A `forward(destination)` of the current rule, made by its guard instead of by Rhai.
pub(crate) fn record_forward(destination: &str) {
    let _ = with_state(|s| push_forward(s, destination, None));
}

fn with_state<R>(f: impl FnOnce(&mut RunState) -> R) -> Result<R, Box<EvalAltResult>> {
    RUN.with(|cell| match cell.borrow_mut().as_mut() {
        Some(s) => Ok(f(s)),
        None => Err(runtime_error(
            "this function can only be called while a rule runs on an event",
        )),
    })
}

fn runtime_error(message: impl Into<String>) -> Box<EvalAltResult> {
    EvalAltResult::ErrorRuntime(Dynamic::from(message.into()), Position::NONE).into()
}

fn terminate() -> Box<EvalAltResult> {
    EvalAltResult::ErrorTerminated(Dynamic::from(TOKEN_STOP), Position::NONE).into()
}

/// Builds the engine every rule runs on. `destinations` are the configured destination names.
pub fn build_engine(config: &RulesConfig, destinations: Arc<BTreeSet<String>>) -> Engine {
    let mut engine = Engine::new();
    engine.set_max_operations(config.max_operations);
    engine.set_max_call_levels(32);
    engine.set_max_expr_depths(64, 32);
    engine.set_max_string_size(1024 * 1024);
    engine.set_max_array_size(10_000);
    engine.set_max_map_size(10_000);
    engine.set_max_variables(256);
    engine.set_max_functions(256);
    engine.set_max_modules(32);
    engine.set_strict_variables(true);
    engine.set_module_resolver(RulesFolderResolver::new(&config.dir));

    // The clock is read every 256 operations: often enough to stop within a fraction of a
    // millisecond, rare enough not to show in the cost of a normal rule.
    engine.on_progress(|ops| {
        if ops & 0xff != 0 {
            return None;
        }
        let late = RUN.with(|cell| {
            cell.borrow()
                .as_ref()
                .is_some_and(|s| Instant::now() >= s.deadline)
        });
        late.then(|| Dynamic::from(TOKEN_DEADLINE))
    });
    engine.on_print(|text| {
        let _ = with_state(|s| record_log(s, text.to_string()));
    });
    engine.on_debug(|text, _, pos| {
        let _ = with_state(|s| record_log(s, format!("{text} (line {})", pos.line().unwrap_or(0))));
    });

    register_forward(&mut engine, destinations);
    register_flow(&mut engine);
    register_verdicts(&mut engine);
    engine
}

/// A rule's own `log` line: the rule author chose its words, so it is logged as written.
fn record_log(s: &mut RunState, message: String) {
    tracing::info!(rule = %s.rule, "{message}");
    s.logs.push((s.rule.clone(), message));
}

fn register_forward(engine: &mut Engine, destinations: Arc<BTreeSet<String>>) {
    let known = destinations.clone();
    engine.register_fn(
        "forward",
        move |dest: &str| -> Result<(), Box<EvalAltResult>> {
            check_destination(&known, dest)?;
            with_state(|s| push_forward(s, dest, None))
        },
    );
    engine.register_fn(
        "forward",
        move |dest: &str, body: Dynamic| -> Result<(), Box<EvalAltResult>> {
            check_destination(&destinations, dest)?;
            let body = if body.is_string() {
                ForwardBody::Text(body.into_string().unwrap_or_default())
            } else {
                ForwardBody::Json(
                    rhai::serde::from_dynamic::<Value>(&body)
                        .map_err(|e| runtime_error(format!("forward body is not JSON: {e}")))?,
                )
            };
            with_state(|s| push_forward(s, dest, Some(body)))
        },
    );
}

fn push_forward(s: &mut RunState, destination: &str, body: Option<ForwardBody>) {
    s.forwards.push(Forward {
        rule: s.rule.clone(),
        destination: destination.to_string(),
        body,
    });
}

/// A destination a rule names: a configured one or the built-in `stdout` (a literal URL is
/// the other kind a rule may give, see [`check_destination`]).
pub(crate) fn is_named(known: &BTreeSet<String>, dest: &str) -> bool {
    dest == STDOUT_DESTINATION || known.contains(dest)
}

/// A destination is a configured name, the built-in `stdout`, or a literal http(s) URL.
fn check_destination(known: &BTreeSet<String>, dest: &str) -> Result<(), Box<EvalAltResult>> {
    if is_named(known, dest) {
        return Ok(());
    }
    if dest.starts_with("http://") || dest.starts_with("https://") {
        return reqwest::Url::parse(dest)
            .map(|_| ())
            .map_err(|e| runtime_error(format!("forward: `{dest}` is not a valid URL: {e}")));
    }
    Err(runtime_error(format!(
        "forward: no destination named `{dest}` (configured: {}; or give an http(s):// URL)",
        std::iter::once(STDOUT_DESTINATION)
            .chain(known.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

fn register_flow(engine: &mut Engine) {
    engine.register_fn("stop", || -> Result<(), Box<EvalAltResult>> {
        with_state(|s| s.stopped = true)?;
        Err(terminate())
    });
    engine.register_fn(
        "log",
        |message: Dynamic| -> Result<(), Box<EvalAltResult>> {
            let text = if message.is_string() {
                message.into_string().unwrap_or_default()
            } else {
                message.to_string()
            };
            with_state(|s| record_log(s, text))
        },
    );
}

fn register_verdicts(engine: &mut Engine) {
    engine.register_fn("reject", || -> Result<(), Box<EvalAltResult>> {
        with_state(|s| {
            s.action = Action::Reject {
                code: default_reject_code(s.kind),
                info: String::new(),
            };
            s.stopped = true;
        })?;
        Err(terminate())
    });
    engine.register_fn(
        "reject",
        |code: INT, info: &str| -> Result<(), Box<EvalAltResult>> {
            with_state(|s| {
                let code = if code_in_range(s.kind, s.command_is_c2c, code) {
                    code
                } else {
                    let rule = s.rule.clone();
                    s.problems.push((
                        rule,
                        format!(
                            "reject code {code} is outside Tencent's range for this command; answered as a plain reject"
                        ),
                    ));
                    default_reject_code(s.kind)
                };
                s.action = Action::Reject {
                    code,
                    info: info.to_string(),
                };
                s.stopped = true;
            })?;
            Err(terminate())
        },
    );
    engine.register_fn("discard", || -> Result<(), Box<EvalAltResult>> {
        with_state(|s| {
            s.action = Action::Discard;
            s.stopped = true;
        })?;
        Err(terminate())
    });
    engine.register_fn(
        "rewrite",
        |elements: Array| -> Result<(), Box<EvalAltResult>> {
            let mut parsed = Vec::with_capacity(elements.len());
            for (i, e) in elements.iter().enumerate() {
                let v: Value = rhai::serde::from_dynamic(e)
                    .map_err(|err| runtime_error(format!("rewrite: element {i}: {err}")))?;
                parsed.push(Element::from_value(&v).ok_or_else(|| {
                    runtime_error(format!(
                        "rewrite: element {i} needs a `type` (or `MsgType`) string and a `content` (or `MsgContent`)"
                    ))
                })?);
            }
            with_state(|s| {
                let text = crate::event::text_of(&parsed);
                let shown: Array = parsed
                    .iter()
                    .filter_map(|e| rhai::serde::to_dynamic(e).ok())
                    .collect();
                set_event_field(&s.event, "elements", Dynamic::from_array(shown));
                set_event_field(&s.event, "text", Dynamic::from(text));
                s.rewrite_elements = Some(parsed);
            })
        },
    );
    engine.register_fn(
        "rewrite_custom_data",
        |data: &str| -> Result<(), Box<EvalAltResult>> {
            with_state(|s| {
                set_event_field(&s.event, "custom_data", Dynamic::from(data.to_string()));
                s.rewrite_custom_data = Some(data.to_string());
            })
        },
    );
    engine.register_fn(
        "refuse_members",
        |accounts: Array| -> Result<(), Box<EvalAltResult>> {
            let accounts: Vec<String> = accounts
                .into_iter()
                .map(|a| {
                    if a.is_string() {
                        a.into_string().unwrap_or_default()
                    } else {
                        a.to_string()
                    }
                })
                .collect();
            with_state(|s| {
                for a in accounts {
                    if !s.refused_members.contains(&a) {
                        s.refused_members.push(a);
                    }
                }
            })
        },
    );
}

/// Later rules see a rewrite: the shared event value is updated in place.
fn set_event_field(event: &Dynamic, field: &str, value: Dynamic) {
    // Cloning a shared value clones the handle, not the map.
    let mut handle = event.clone();
    if let Some(mut map) = handle.write_lock::<rhai::Map>() {
        map.insert(field.into(), value);
    };
}

/// What `reject()` answers: Tencent's plain refusal for messages and groups; for friend checks,
/// the first code of the range Tencent reserves for app refusals.
pub(crate) fn default_reject_code(kind: CommandKind) -> i64 {
    match kind {
        CommandKind::FriendCheck => 38000,
        _ => 1,
    }
}

/// Tencent passes custom codes through only within its ranges (PROTOCOL.md §5).
fn code_in_range(kind: CommandKind, c2c: bool, code: i64) -> bool {
    match kind {
        CommandKind::FriendCheck => (38000..=39000).contains(&code),
        _ if c2c => code == 1 || (120_001..=130_000).contains(&code),
        _ => code == 1 || (10100..=10200).contains(&code),
    }
}

/// Resolves `import "lib/words" as words;` to `<rules dir>/lib/words.rhai`, and nothing outside
/// the rules folder. Caching is off: a changed module is read again at the next compile.
struct RulesFolderResolver {
    inner: FileModuleResolver,
}

impl RulesFolderResolver {
    fn new(root: &Path) -> RulesFolderResolver {
        let mut inner = FileModuleResolver::new_with_path_and_extension(root, "rhai");
        inner.enable_cache(false);
        RulesFolderResolver { inner }
    }
}

impl ModuleResolver for RulesFolderResolver {
    fn resolve(
        &self,
        engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<rhai::Shared<rhai::Module>, Box<EvalAltResult>> {
        let p = PathBuf::from(path);
        let inside = p
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !inside || path.is_empty() {
            return Err(EvalAltResult::ErrorRuntime(
                Dynamic::from(format!(
                    "import \"{path}\": imports must name a file inside the rules folder (no `..`, no absolute path)"
                )),
                pos,
            )
            .into());
        }
        // Relative to the rules folder, whichever rule or module imports it.
        self.inner.resolve(engine, None, path, pos)
    }
}

/// Where the collected lists stood before a rule ran, to tell what that rule added.
pub(crate) struct Marks {
    forwards: usize,
    logs: usize,
    action: Action,
    rewrites: (bool, bool),
}

pub(crate) fn marks() -> Marks {
    with_state(|s| Marks {
        forwards: s.forwards.len(),
        logs: s.logs.len(),
        action: s.action.clone(),
        rewrites: (
            s.rewrite_elements.is_some(),
            s.rewrite_custom_data.is_some(),
        ),
    })
    .expect("called while rules run")
}

/// Hands the rules the event as a Rhai value (built once per callback, when the first rule
/// that needs it runs).
pub(crate) fn set_event(event: Dynamic) {
    let _ = with_state(|s| s.event = event);
}

/// True once a rule rewrote the message or its custom data in this evaluation.
pub(crate) fn rewritten() -> bool {
    with_state(|s| s.rewrite_elements.is_some() || s.rewrite_custom_data.is_some()).unwrap_or(false)
}

pub(crate) fn is_stopped() -> bool {
    with_state(|s| s.stopped).unwrap_or(false)
}

/// What the rule that just ran did, from the marks taken before it.
pub(crate) fn report(
    rule: &super::Rule,
    before: Marks,
    error: Option<String>,
    stopped: bool,
    elapsed: std::time::Duration,
) -> super::RuleReport {
    with_state(|s| {
        let rewrote = (
            s.rewrite_elements.is_some(),
            s.rewrite_custom_data.is_some(),
        ) != before.rewrites;
        let verdict = (s.action != before.action || rewrote).then(|| {
            let mut v = super::action_json(&s.action);
            if let Some(elements) = s.rewrite_elements.as_ref().filter(|_| rewrote) {
                v["elements"] = serde_json::to_value(elements).unwrap_or_default();
            }
            if let Some(data) = s.rewrite_custom_data.as_ref().filter(|_| rewrote) {
                v["custom_data"] = Value::String(data.clone());
            }
            v
        });
        let problems = s
            .problems
            .iter()
            .filter(|(r, _)| *r == rule.name)
            .map(|(_, m)| m.clone());
        super::RuleReport {
            rule: rule.name.to_string(),
            forwards: s.forwards[before.forwards..]
                .iter()
                .map(super::forward_json)
                .collect(),
            verdict,
            logs: s.logs[before.logs..]
                .iter()
                .map(|(_, m)| m.clone())
                .collect(),
            error: error
                .into_iter()
                .chain(problems)
                .reduce(|a, b| format!("{a}; {b}")),
            stopped,
            micros: elapsed.as_micros() as u64,
        }
    })
    .expect("called while rules run")
}
