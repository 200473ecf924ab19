//! Native guards: most rules are filters (`if event.command == "…" && event.text.contains("…")
//! { … }`), and most events match none of them. For such a rule the condition is also compiled
//! to a small Rust tree and checked on the [`Event`] itself; when it is certainly false, the
//! rule is skipped without entering Rhai, which costs 0.3–1 µs per rule and call.
//!
//! A guard is built only for a rule whose top-level statements are `if`s without `else`,
//! `let`/`const` lists of string literals, and `for` loops over such a list or over
//! `event.elements` whose body is one `if` without `else` (on the loop variable: the string,
//! or the element's `type`). It skips the rule only when every condition is *known* false, for
//! every item of every loop; and when the body of each `if` whose condition holds is only
//! `forward("name")` calls to destinations the rule may name, it makes those forwards itself
//! ([`Decision::Forward`]), so such a routing rule never needs Rhai (nor the event converted to a
//! Rhai map). A condition is known when
//! it is made of what this module understands: `event.<field>`, string, integer and boolean
//! literals, `==` `!=` (same types), `<` `<=` `>` `>=` (integers), `!`, `&&`, `||`, and on a
//! string field `contains`, `starts_with`, `ends_with` (with a string), `len`, `is_empty`.
//! `&&` and `||` are read left to right with Rhai's short-circuit: an operand Rhai would
//! evaluate but this module does not understand (it might error, call a function, log) makes
//! the whole condition unknown, and the rule runs in Rhai as always. A rule that would hit one
//! of the engine's limits (operations, through a long list or a message with very many
//! elements; variables) is not skipped either, so it fails in Rhai as before. So a guard changes
//! cost, never behaviour; `guard_agrees_with_rhai` in the tests checks that claim on generated
//! conditions.

use std::collections::HashMap;

use rhai::{ASTFlags, Expr, Stmt, AST};

use crate::event::{Element, Event};

/// The conditions of a rule's top-level statements.
#[derive(Debug)]
pub struct Guard {
    checks: Vec<Check>,
    /// A skipped rule must also be one that would not have run out of operations in Rhai:
    /// it is skipped only while its estimated operations stay well under this.
    max_operations: u64,
    /// The estimate, fixed at compile time but for loops over `event.elements`: so many
    /// operations, plus so many per element.
    fixed_operations: u64,
    operations_per_element: u64,
}

/// Most `let` lists a guarded rule may have: the engine allows 256 variables, and a rule past
/// that limit must fail in Rhai rather than be skipped.
const MAX_LISTS: usize = 64;

#[derive(Debug)]
enum Check {
    /// `if condition { … }`, with the destinations when the body is only `forward("…")` calls.
    If {
        condition: Node,
        forwards: Option<Vec<Box<str>>>,
    },
    /// `for item in items { if condition { … } }`
    ForEach { items: Items, condition: Node },
}

#[derive(Debug)]
enum Items {
    Strings(Vec<Box<str>>),
    Elements,
}

/// The loop variable a condition may use, by name.
#[derive(Debug, Clone, Copy)]
enum Scope<'a> {
    Top,
    String(&'a str),
    Element(&'a str),
}

/// The current item of a loop while its condition is evaluated.
#[derive(Debug, Clone, Copy)]
enum Item<'a> {
    None,
    Str(&'a str),
    Element(&'a Element),
}

impl Guard {
    /// The guard of a rule, if its shape allows one. `known` says which destinations a rule
    /// may forward to by name without an error.
    pub fn of(ast: &AST, max_operations: u64, known: &dyn Fn(&str) -> bool) -> Option<Guard> {
        // A function defined in the rule (or an imported module) could shadow a method.
        if ast.has_functions() {
            return None;
        }
        let mut lists: HashMap<&str, Vec<Box<str>>> = HashMap::new();
        let mut checks = Vec::new();
        for stmt in ast.statements() {
            match stmt {
                Stmt::If(flow, _) if flow.branch.is_empty() => checks.push(Check::If {
                    condition: Node::compile(&flow.expr, Scope::Top)?,
                    forwards: forwards_only(flow.body.statements(), known),
                }),
                Stmt::Var(var, flags, _)
                    if !flags.contains(ASTFlags::EXPORTED) && var.0.name.as_str() != "event" =>
                {
                    lists.insert(var.0.name.as_str(), string_list(&var.1)?);
                    if lists.len() > MAX_LISTS {
                        return None;
                    }
                }
                Stmt::For(for_loop, _) => {
                    let (name, counter, flow) = &**for_loop;
                    let name = name.name.as_str();
                    if counter.is_some() || name == "event" {
                        return None;
                    }
                    let items = match &flow.expr {
                        Expr::Variable(v, _, _) if v.2.is_empty() => {
                            Items::Strings(lists.get(v.1.as_str())?.clone())
                        }
                        Expr::Dot(chain, flags, _)
                            if *flags == ASTFlags::NONE
                                && is_event(&chain.lhs)
                                && matches!(&chain.rhs, Expr::Property(p, _) if p.2.as_str() == "elements") =>
                        {
                            Items::Elements
                        }
                        other => Items::Strings(string_list(other)?),
                    };
                    let [Stmt::If(inner, _)] = flow.body.statements() else {
                        return None;
                    };
                    if !inner.branch.is_empty() {
                        return None;
                    }
                    let scope = match items {
                        Items::Strings(_) => Scope::String(name),
                        Items::Elements => Scope::Element(name),
                    };
                    let condition = Node::compile(&inner.expr, scope)?;
                    checks.push(Check::ForEach { items, condition });
                }
                _ => return None,
            }
        }
        // Rhai counts an operation per node evaluated, and a few per loop turn and call: four
        // per node and turn is a generous estimate.
        let (mut fixed_operations, mut operations_per_element) = (0u64, 0u64);
        for check in &checks {
            match check {
                Check::If {
                    condition,
                    forwards,
                } => {
                    let calls = forwards.as_ref().map_or(0, Vec::len) as u64;
                    fixed_operations += 4 * (condition.size() + 2 * calls);
                }
                Check::ForEach {
                    items: Items::Strings(list),
                    condition,
                } => fixed_operations += 4 * list.len() as u64 * (condition.size() + 4),
                Check::ForEach {
                    items: Items::Elements,
                    condition,
                } => operations_per_element += 4 * (condition.size() + 4),
            }
        }
        Some(Guard {
            checks,
            max_operations,
            fixed_operations,
            operations_per_element,
        })
    }

    /// What running the rule on `event` would certainly do, if that is known.
    pub fn decide(&self, event: &Event) -> Decision<'_> {
        // Half the limit leaves room for the estimate to be off.
        let operations = self.fixed_operations.saturating_add(
            (event.elements.len() as u64).saturating_mul(self.operations_per_element),
        );
        if operations > self.max_operations / 2 {
            return Decision::Run;
        }
        let false_for = |c: &Node, item| matches!(c.eval(event, item), Some(Val::Bool(false)));
        let mut forwards = Vec::new();
        for check in &self.checks {
            let all_false = match check {
                Check::If {
                    condition,
                    forwards: to,
                } => match (condition.eval(event, Item::None), to) {
                    (Some(Val::Bool(false)), _) => true,
                    (Some(Val::Bool(true)), Some(to)) => {
                        forwards.extend(to.iter().map(|d| &**d));
                        true
                    }
                    _ => false,
                },
                Check::ForEach {
                    items: Items::Strings(list),
                    condition,
                } => list.iter().all(|s| false_for(condition, Item::Str(s))),
                Check::ForEach {
                    items: Items::Elements,
                    condition,
                } => event
                    .elements
                    .iter()
                    .all(|el| false_for(condition, Item::Element(el))),
            };
            if !all_false {
                return Decision::Run;
            }
        }
        Decision::Forward(forwards)
    }
}

/// What a guard knows about running its rule on an event.
#[derive(Debug, PartialEq)]
pub enum Decision<'a> {
    /// The rule would forward the event to these destinations, in this order, and do nothing
    /// else (no destination: it would do nothing at all).
    Forward(Vec<&'a str>),
    /// Not known: the rule runs in Rhai.
    Run,
}

/// The destinations of a block made only of `forward("…")` calls (none: an empty block), when
/// each is one the rule may name; `None` for any other block.
fn forwards_only(body: &[Stmt], known: &dyn Fn(&str) -> bool) -> Option<Vec<Box<str>>> {
    body.iter()
        .map(|stmt| {
            let call = match stmt {
                Stmt::FnCall(call, _) => call,
                Stmt::Expr(expr) => match &**expr {
                    Expr::FnCall(call, _) => call,
                    _ => return None,
                },
                _ => return None,
            };
            let plain = call.name.as_str() == "forward"
                && call.namespace.is_empty()
                && !call.capture_parent_scope
                && call.op_token.is_none();
            match call.args.as_slice() {
                [Expr::StringConstant(dest, _)] if plain && known(dest.as_str()) => {
                    Some(dest.as_str().into())
                }
                _ => None,
            }
        })
        .collect()
}

/// `event` itself (not a variable of that name from a module).
fn is_event(expr: &Expr) -> bool {
    matches!(expr, Expr::Variable(var, _, _) if var.1.as_str() == "event" && var.2.is_empty())
}

/// A list of string literals: `["a", "b"]`, as written or as folded by the optimizer.
fn string_list(expr: &Expr) -> Option<Vec<Box<str>>> {
    match expr {
        Expr::Array(items, _) => items
            .iter()
            .map(|e| match e {
                Expr::StringConstant(s, _) => Some(s.as_str().into()),
                _ => None,
            })
            .collect(),
        Expr::DynamicConstant(value, _) => value
            .read_lock::<rhai::Array>()?
            .iter()
            .map(|v| {
                v.read_lock::<rhai::ImmutableString>()
                    .map(|s| s.as_str().into())
            })
            .collect(),
        _ => None,
    }
}

/// A value the guard can compute.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Val<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
}

#[derive(Debug)]
enum Node {
    /// The current string of a `for` over a list.
    Item,
    /// The `type` of the current element of a `for` over `event.elements`.
    ItemType,
    Str(Box<str>),
    Int(i64),
    Bool(bool),
    Field(Field),
    Len(Box<Node>),
    IsEmpty(Box<Node>),
    Test(Test, Box<Node>, Box<Node>),
    Not(Box<Node>),
    Compare(Op, Box<Node>, Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
}

#[derive(Debug, Clone, Copy)]
enum Test {
    Contains,
    StartsWith,
    EndsWith,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// The event fields a guard reads. `text`, `elements` and `custom_data` can be rewritten by a
/// before-event rule; the caller stops using guards once that happened.
#[derive(Debug, Clone, Copy)]
enum Field {
    Id,
    Command,
    ClientIp,
    Platform,
    GroupId,
    GroupType,
    TopicId,
    From,
    To,
    Operator,
    MsgKey,
    MsgId,
    Text,
    CustomData,
    AppId,
    EventTime,
    Seq,
    Random,
    Time,
    OnlineOnly,
    FromBot,
}

impl Field {
    fn named(name: &str) -> Option<Field> {
        Some(match name {
            "id" => Field::Id,
            "command" => Field::Command,
            "client_ip" => Field::ClientIp,
            "platform" => Field::Platform,
            "group_id" => Field::GroupId,
            "group_type" => Field::GroupType,
            "topic_id" => Field::TopicId,
            "from" => Field::From,
            "to" => Field::To,
            "operator" => Field::Operator,
            "msg_key" => Field::MsgKey,
            "msg_id" => Field::MsgId,
            "text" => Field::Text,
            "custom_data" => Field::CustomData,
            "app_id" => Field::AppId,
            "event_time" => Field::EventTime,
            "seq" => Field::Seq,
            "random" => Field::Random,
            "time" => Field::Time,
            "online_only" => Field::OnlineOnly,
            "from_bot" => Field::FromBot,
            _ => return None,
        })
    }

    fn read(self, e: &Event) -> Val<'_> {
        match self {
            Field::Id => Val::Str(&e.id),
            Field::Command => Val::Str(&e.command),
            Field::ClientIp => Val::Str(&e.client_ip),
            Field::Platform => Val::Str(&e.platform),
            Field::GroupId => Val::Str(&e.group_id),
            Field::GroupType => Val::Str(&e.group_type),
            Field::TopicId => Val::Str(&e.topic_id),
            Field::From => Val::Str(&e.from),
            Field::To => Val::Str(&e.to),
            Field::Operator => Val::Str(&e.operator),
            Field::MsgKey => Val::Str(&e.msg_key),
            Field::MsgId => Val::Str(&e.msg_id),
            Field::Text => Val::Str(&e.text),
            Field::CustomData => Val::Str(&e.custom_data),
            Field::AppId => Val::Int(e.app_id),
            Field::EventTime => Val::Int(e.event_time),
            Field::Seq => Val::Int(e.seq),
            Field::Random => Val::Int(e.random),
            Field::Time => Val::Int(e.time),
            Field::OnlineOnly => Val::Bool(e.online_only),
            Field::FromBot => Val::Bool(e.from_bot),
        }
    }
}

impl Node {
    /// The number of nodes, for the operation estimate.
    fn size(&self) -> u64 {
        1 + match self {
            Node::Len(x) | Node::IsEmpty(x) | Node::Not(x) => x.size(),
            Node::Test(_, a, b) | Node::Compare(_, a, b) => a.size() + b.size(),
            Node::And(xs) | Node::Or(xs) => xs.iter().map(Node::size).sum(),
            _ => 0,
        }
    }

    fn compile(expr: &Expr, scope: Scope) -> Option<Node> {
        let compile = |e: &Expr| Node::compile(e, scope);
        let loop_var = |e: &Expr| match (e, scope) {
            (Expr::Variable(var, _, _), Scope::String(name) | Scope::Element(name)) => {
                var.1.as_str() == name && var.2.is_empty()
            }
            _ => false,
        };
        let element_var = |e: &Expr| matches!(scope, Scope::Element(_)) && loop_var(e);
        Some(match expr {
            e if loop_var(e) && matches!(scope, Scope::String(_)) => Node::Item,
            // `item["type"]`
            Expr::Index(index, flags, _)
                if (*flags - ASTFlags::BREAK).is_empty()
                    && element_var(&index.lhs)
                    && matches!(&index.rhs, Expr::StringConstant(k, _) if k.as_str() == "type") =>
            {
                Node::ItemType
            }
            // `item.type`
            Expr::Dot(chain, flags, _)
                if *flags == ASTFlags::NONE
                    && element_var(&chain.lhs)
                    && matches!(&chain.rhs, Expr::Property(p, _) if p.2.as_str() == "type") =>
            {
                Node::ItemType
            }
            Expr::StringConstant(s, _) => Node::Str(s.as_str().into()),
            Expr::IntegerConstant(i, _) => Node::Int(*i),
            Expr::BoolConstant(b, _) => Node::Bool(*b),
            Expr::And(items, _) => Node::And(items.iter().map(compile).collect::<Option<_>>()?),
            Expr::Or(items, _) => Node::Or(items.iter().map(compile).collect::<Option<_>>()?),
            Expr::FnCall(call, _) if call.op_token.is_some() && call.namespace.is_empty() => {
                let arg = |i: usize| call.args.get(i).and_then(compile).map(Box::new);
                match (call.name.as_str(), call.args.len()) {
                    ("!", 1) => Node::Not(arg(0)?),
                    (op, 2) => {
                        let op = match op {
                            "==" => Op::Eq,
                            "!=" => Op::Ne,
                            "<" => Op::Lt,
                            "<=" => Op::Le,
                            ">" => Op::Gt,
                            ">=" => Op::Ge,
                            _ => return None,
                        };
                        Node::Compare(op, arg(0)?, arg(1)?)
                    }
                    _ => return None,
                }
            }
            Expr::Dot(chain, flags, _) if *flags == ASTFlags::NONE => {
                Node::event_chain(chain, scope)?
            }
            _ => return None,
        })
    }

    /// `event.field`, `event.field.len` / `.is_empty`, or `event.field.method(args)`.
    fn event_chain(chain: &rhai::BinaryExpr, scope: Scope) -> Option<Node> {
        if !is_event(&chain.lhs) {
            return None;
        }
        let field = |e: &Expr| match e {
            Expr::Property(p, _) => Field::named(p.2.as_str()).map(Node::Field),
            _ => None,
        };
        match &chain.rhs {
            rhs @ Expr::Property(..) => field(rhs),
            Expr::Dot(rest, flags, _) if *flags == ASTFlags::NONE => {
                let receiver = Box::new(field(&rest.lhs)?);
                match &rest.rhs {
                    Expr::Property(p, _) => match p.2.as_str() {
                        "len" => Some(Node::Len(receiver)),
                        "is_empty" => Some(Node::IsEmpty(receiver)),
                        _ => None,
                    },
                    Expr::MethodCall(call, _) if call.namespace.is_empty() => {
                        let args: Vec<Node> = call
                            .args
                            .iter()
                            .map(|a| Node::compile(a, scope))
                            .collect::<Option<_>>()?;
                        let mut args = args.into_iter();
                        match (call.name.as_str(), args.next(), args.next()) {
                            ("len", None, None) => Some(Node::Len(receiver)),
                            ("is_empty", None, None) => Some(Node::IsEmpty(receiver)),
                            (name, Some(arg @ (Node::Str(_) | Node::Item)), None) => {
                                let test = match name {
                                    "contains" => Test::Contains,
                                    "starts_with" => Test::StartsWith,
                                    "ends_with" => Test::EndsWith,
                                    _ => return None,
                                };
                                Some(Node::Test(test, receiver, Box::new(arg)))
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The value Rhai would compute, or `None` when this module cannot be sure of it.
    fn eval<'a>(&'a self, e: &'a Event, item: Item<'a>) -> Option<Val<'a>> {
        Some(match self {
            Node::Item => match item {
                Item::Str(s) => Val::Str(s),
                _ => return None,
            },
            Node::ItemType => match item {
                Item::Element(el) => Val::Str(&el.kind),
                _ => return None,
            },
            Node::Str(s) => Val::Str(s),
            Node::Int(i) => Val::Int(*i),
            Node::Bool(b) => Val::Bool(*b),
            Node::Field(f) => f.read(e),
            Node::Len(s) => match s.eval(e, item)? {
                // Rhai counts characters, not bytes.
                Val::Str(s) => Val::Int(s.chars().count() as i64),
                _ => return None,
            },
            Node::IsEmpty(s) => match s.eval(e, item)? {
                Val::Str(s) => Val::Bool(s.is_empty()),
                _ => return None,
            },
            Node::Test(test, s, pattern) => match (s.eval(e, item)?, pattern.eval(e, item)?) {
                (Val::Str(s), Val::Str(p)) => Val::Bool(match test {
                    Test::Contains => s.contains(p),
                    Test::StartsWith => s.starts_with(p),
                    Test::EndsWith => s.ends_with(p),
                }),
                _ => return None,
            },
            Node::Not(x) => match x.eval(e, item)? {
                Val::Bool(b) => Val::Bool(!b),
                _ => return None,
            },
            Node::Compare(op, l, r) => {
                let (l, r) = (l.eval(e, item)?, r.eval(e, item)?);
                let ordering = match (l, r) {
                    (Val::Int(a), Val::Int(b)) => a.cmp(&b),
                    (Val::Str(a), Val::Str(b)) if matches!(op, Op::Eq | Op::Ne) => a.cmp(b),
                    (Val::Bool(a), Val::Bool(b)) if matches!(op, Op::Eq | Op::Ne) => a.cmp(&b),
                    _ => return None,
                };
                Val::Bool(match op {
                    Op::Eq => ordering.is_eq(),
                    Op::Ne => ordering.is_ne(),
                    Op::Lt => ordering.is_lt(),
                    Op::Le => ordering.is_le(),
                    Op::Gt => ordering.is_gt(),
                    Op::Ge => ordering.is_ge(),
                })
            }
            // Left to right, stopping where Rhai stops; an operand not understood before that
            // point makes the whole unknown.
            Node::And(operands) => {
                for operand in operands {
                    if !operand.eval(e, item)?.as_bool()? {
                        return Some(Val::Bool(false));
                    }
                }
                Val::Bool(true)
            }
            Node::Or(operands) => {
                for operand in operands {
                    if operand.eval(e, item)?.as_bool()? {
                        return Some(Val::Bool(true));
                    }
                }
                Val::Bool(false)
            }
        })
    }
}

impl Val<'_> {
    fn as_bool(self) -> Option<bool> {
        match self {
            Val::Bool(b) => Some(b),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use rhai::{Engine, Scope};

    use super::super::{compile_source, event_value};
    use super::*;
    use crate::config::Config;
    use crate::event::CallbackQuery;

    impl Guard {
        /// True when running the rule on `event` would certainly do nothing.
        fn skips(&self, event: &Event) -> bool {
            matches!(self.decide(event), Decision::Forward(ref d) if d.is_empty())
        }
    }

    /// The value of a rule's condition as the guard sees it: the condition of the first
    /// statement, which must be an `if`.
    fn condition_value<'a>(guard: &'a Guard, event: &'a Event) -> Option<Val<'a>> {
        match guard.checks.first()? {
            Check::If { condition, .. } => condition.eval(event, Item::None),
            Check::ForEach { .. } => None,
        }
    }

    fn engine() -> Engine {
        super::super::engine::build_engine(
            &Config::default().rules,
            std::sync::Arc::new(BTreeSet::from(["sink".into()])),
        )
    }

    /// Compiles a rule the way the rule loader does and returns its guard.
    fn guard_of(engine: &Engine, source: &str) -> Option<Guard> {
        let ast = compile_source(engine, source).unwrap_or_else(|e| panic!("{source}: {e}"));
        Guard::of(&ast, Config::default().rules.max_operations, &|d| {
            d == "sink"
        })
    }

    /// Runs a compiled rule on `event` as `Rules::evaluate` hands it over, but outside an
    /// evaluation (so a call to `log` or `forward` fails, which tells a run body apart).
    fn run(engine: &Engine, ast: &AST, event: &Event) -> Result<(), Box<rhai::EvalAltResult>> {
        let mut scope = Scope::new();
        scope.push_constant_dynamic("event", event_value(event).unwrap());
        engine.run_ast_with_scope(&mut scope, ast)
    }

    fn event(text: &str, group_type: &str, from: &str, time: i64) -> Event {
        event_with_body(text, group_type, from, time, &[])
    }

    /// An event whose `MsgBody` holds a text element, then elements of the given types.
    fn event_with_body(
        text: &str,
        group_type: &str,
        from: &str,
        time: i64,
        more: &[&str],
    ) -> Event {
        let mut body =
            vec![serde_json::json!({"MsgType": "TIMTextElem", "MsgContent": {"Text": text}})];
        body.extend(
            more.iter()
                .map(|t| serde_json::json!({"MsgType": t, "MsgContent": {}})),
        );
        let query = CallbackQuery {
            sdk_app_id: Some(888888),
            command: Some("Group.CallbackAfterSendMsg".into()),
            client_ip: String::new(),
            platform: "Web".into(),
        };
        let body = serde_json::json!({
            "CallbackCommand": "Group.CallbackAfterSendMsg",
            "GroupId": "@TGS#1",
            "Type": group_type,
            "From_Account": from,
            "MsgTime": time,
            "MsgBody": body,
        });
        Event::from_callback(&query, body.to_string().as_bytes(), &[]).unwrap()
    }

    #[test]
    fn filters_get_guards_and_other_shapes_do_not() {
        let engine = engine();
        for guarded in [
            "",
            r#"if event.text.contains("buy") || event.text.contains("free crypto") { forward("stdout"); }"#,
            r#"if event.group_id == "@TGS#vip" && event.command == "Group.CallbackAfterSendMsg" { forward("stdout"); }"#,
            r#"if event.command.starts_with("C2C.") && event.to == "support" { forward("stdout"); }"#,
            r#"if event.text.len() > 2000 { forward("stdout"); }"#,
            r#"if !event.from_bot && event.text.len > 3 { log("x"); }"#,
            r#"if event.from == "watched" && event.time > 0 { forward("stdout", #{ a: event.from }); }"#,
            "if event.text.is_empty() { stop(); }\nif event.group_type != \"Public\" { stop(); }",
            r#"for e in event.elements { if e.type == "TIMImageElem" || e["type"] == "TIMVideoFileElem" { forward("stdout"); break; } }"#,
            r#"let words = ["casino", "loan shark"]; for w in words { if event.text.contains(w) { log(w); break; } }"#,
            r#"for w in ["a", "b"] { if event.from == w { stop(); } }"#,
        ] {
            assert!(guard_of(&engine, guarded).is_some(), "{guarded}");
        }
        for unguarded in [
            r#"forward("stdout");"#,
            r#"if event.text.contains("a") { log("a"); } else { log("b"); }"#,
            r#"let w = "a"; if event.text.contains(w) { log("a"); }"#,
            r#"for (e, i) in event.elements { if e.type == "TIMImageElem" { log("a"); } }"#,
            r#"for e in event.elements { log("a"); if e.type == "x" { log("b"); } }"#,
            r#"for e in event.elements { if e.content.Text == "x" { log("a"); } }"#,
            r#"let words = ["a", 1]; for w in words { if event.text.contains(w) { log("a"); } }"#,
            r#"for m in event.payload.MsgBody { if m.MsgType == "x" { log("a"); } }"#,
            r#"let words = ["a"]; for w in words { if event.text.contains(w) { log("a"); } else { log("b"); } }"#,
            r#"if event.payload.Type == "Public" { log("a"); }"#,
            r#"if event.text.to_upper() == "A" { log("a"); }"#,
            r#"fn contains(x) { true } if event.text.contains("a") { log("a"); }"#,
            r#"if event.text.contains('a') { log("a"); }"#,
        ] {
            assert!(guard_of(&engine, unguarded).is_none(), "{unguarded}");
        }
    }

    #[test]
    fn a_rule_that_only_forwards_by_name_is_decided_without_rhai() {
        let engine = engine();
        let red = event("a red packet", "Public", "jared", 1);
        let plain = event("hello", "Public", "jared", 1);
        let decide = |rule: &str, e: &Event| {
            let guard = guard_of(&engine, rule).unwrap_or_else(|| panic!("{rule}"));
            format!("{:?}", guard.decide(e))
        };
        let rule = "if event.text.contains(\"red packet\") { forward(\"sink\"); }\n\
                    if event.group_type == \"Public\" { forward(\"sink\"); forward(\"stdout\"); }";
        let guard = Guard::of(&compile_source(&engine, rule).unwrap(), 100_000, &|d| {
            d == "sink" || d == "stdout"
        })
        .unwrap();
        assert_eq!(
            guard.decide(&red),
            Decision::Forward(vec!["sink", "sink", "stdout"])
        );
        assert_eq!(
            guard.decide(&plain),
            Decision::Forward(vec!["sink", "stdout"])
        );
        assert_eq!(
            decide(
                "if event.text.contains(\"red packet\") { forward(\"sink\"); }",
                &plain
            ),
            "Forward([])"
        );
        // Anything but `forward` with a destination the rule may name runs in Rhai when its
        // condition holds (and is still skipped when it does not).
        for rhai in [
            r#"if event.text.contains("red") { forward("elsewhere"); }"#,
            r#"if event.text.contains("red") { forward("https://example.com/in"); }"#,
            r#"if event.text.contains("red") { forward("sink", event.text); }"#,
            r#"if event.text.contains("red") { forward("sink"); log("x"); }"#,
            r#"if event.text.contains("red") { forward("sink"); stop(); }"#,
            r#"if event.text.contains("red") { forward!("sink"); }"#,
        ] {
            assert_eq!(decide(rhai, &red), "Run", "{rhai}");
            assert_eq!(decide(rhai, &plain), "Forward([])", "{rhai}");
        }
    }

    #[test]
    fn a_guard_skips_only_when_every_condition_is_false() {
        let engine = engine();
        let rule = r#"if event.group_type == "Public" && event.text.contains("red packet") { forward("stdout"); }"#;
        let guard = guard_of(&engine, rule).unwrap();
        assert!(!guard.skips(&event("a red packet", "Public", "jared", 1)));
        assert!(guard.skips(&event("a red packet", "Private", "jared", 1)));
        assert!(guard.skips(&event("hello", "Public", "jared", 1)));
        // Rhai counts characters: 7 characters, 21 bytes.
        let chinese = guard_of(&engine, r#"if event.text.len() > 7 { log("long"); }"#).unwrap();
        assert!(!chinese.skips(&event("我们在一起抢红包", "Public", "x", 1)));
        assert!(chinese.skips(&event("抢红包了吗朋友", "Public", "x", 1)));
        // A length of an integer is an error in Rhai: not known to the guard. Before the
        // deciding operand, Rhai would reach it, so the rule runs (and reports its error).
        let unknown_first = guard_of(
            &engine,
            r#"if (event.time.len() > 1) && false { log("x"); }"#,
        )
        .unwrap();
        assert!(!unknown_first.skips(&event("a", "Public", "x", 1)));
        // After it, Rhai never reaches it either.
        let decided_first = guard_of(
            &engine,
            r#"if false && (event.time.len() > 1) { log("x"); }"#,
        )
        .unwrap();
        assert!(decided_first.skips(&event("a", "Public", "x", 1)));
        // Anything else not understood means no guard at all.
        assert!(guard_of(
            &engine,
            r#"if event.nothing.len() > 1 && false { log("x"); }"#
        )
        .is_none());
        // Two statements: skipped only if both conditions are false.
        let two = guard_of(
            &engine,
            "if event.from == \"a\" { log(\"a\"); }\nif event.from == \"b\" { log(\"b\"); }",
        )
        .unwrap();
        assert!(two.skips(&event("x", "Public", "c", 1)));
        assert!(!two.skips(&event("x", "Public", "b", 1)));
    }

    /// A rule that would run out of operations or variables in Rhai is not skipped: it must
    /// fail there as it always did (found in review).
    #[test]
    fn limits_rhai_would_hit_are_not_skipped() {
        let engine = engine();
        let rule = r#"for e in event.elements { if e.type == "TIMImageElem" || e.type == "x" || e.type == "y" || e.type == "z" || e["type"] == "w" { log("x"); } }"#;
        let guard = guard_of(&engine, rule).unwrap();
        let few = event_with_body("a", "Public", "x", 1, &["a"; 10]);
        assert!(guard.skips(&few));
        let many = event_with_body("a", "Public", "x", 1, &vec!["a"; 62_000]);
        assert!(!guard.skips(&many));
        // Rhai does fail on it, so skipping would have hidden an error.
        let ast = compile_source(&engine, rule).unwrap();
        assert!(run(&engine, &ast, &many).is_err());

        let lists: String = (0..300).map(|i| format!("let w{i} = [\"a\"];\n")).collect();
        assert!(guard_of(&engine, &lists).is_none());
    }

    /// Pieces of conditions: understood ones and ones that are not (or that error in Rhai).
    fn leaf() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "event.text",
                "event.group_type",
                "event.from",
                "event.time",
                "event.seq",
                "event.from_bot",
                "event.text.len()",
                "event.from.len",
                "event.text.is_empty()",
                "event.time.len()",
                "event.nothing.len()",
                "event.payload.Type",
                "event.text.to_upper()",
            ])
            .prop_map(String::from),
            prop::sample::select(vec!["", "a", "red packet", "Public", "红包", "jared"])
                .prop_map(|s| format!("{s:?}")),
            prop::sample::select(vec!["contains", "starts_with", "ends_with"])
                .prop_flat_map(|m| {
                    (
                        Just(m),
                        prop::sample::select(vec!["text", "from", "group_type", "time"]),
                        prop::sample::select(vec!["", "a", "red", "packet", "红"]),
                    )
                })
                .prop_map(|(m, f, s)| format!("event.{f}.{m}({s:?})")),
            (-2i64..2010).prop_map(|i| i.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
        ]
    }

    fn condition() -> impl Strategy<Value = String> {
        leaf().prop_recursive(4, 24, 3, |inner| {
            prop_oneof![
                (
                    inner.clone(),
                    prop::sample::select(vec!["==", "!=", "<", "<=", ">", ">="]),
                    inner.clone()
                )
                    .prop_map(|(a, op, b)| format!("({a}) {op} ({b})")),
                inner.clone().prop_map(|a| format!("!({a})")),
                (inner.clone(), inner.clone(), inner.clone())
                    .prop_map(|(a, b, c)| format!("({a}) && ({b}) && ({c})")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
            ]
        })
    }

    fn some_event() -> impl Strategy<Value = Event> {
        (
            prop::sample::select(vec![
                "",
                "a",
                "red packet",
                "红包",
                "a red packet for jared",
            ]),
            prop::sample::select(vec!["Public", "Private", "ChatRoom"]),
            prop::sample::select(vec!["", "a", "jared"]),
            -1i64..3,
        )
            .prop_map(|(text, group_type, from, time)| event(text, group_type, from, time))
    }

    /// A rule with a loop: over a list of strings (`w`) or over the elements (`e`), whose one
    /// `if` uses the loop variable, the event, or things the guard does not understand.
    fn loop_rule() -> impl Strategy<Value = String> {
        let list_leaf = prop::sample::select(vec![
            "w",
            "event.text.contains(w)",
            "event.from.starts_with(w)",
            "w == event.from",
            "w.len() > 1",
            "w.to_upper() == \"A\"",
            "event.text == \"a\"",
            "\"a\"",
            "true",
            "false",
        ]);
        let element_leaf = prop::sample::select(vec![
            "e.type == \"TIMImageElem\"",
            "e[\"type\"] == \"TIMTextElem\"",
            "e.type.contains(\"Elem\")",
            "e.type",
            "e.content == \"x\"",
            "e.content.Text == \"a\"",
            "event.from == \"jared\"",
            "true",
            "false",
        ]);
        let combine = |leaf: prop::sample::Select<&'static str>| {
            leaf.prop_map(String::from)
                .prop_recursive(3, 12, 2, |inner| {
                    prop_oneof![
                        inner.clone().prop_map(|a| format!("!({a})")),
                        (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) && ({b})")),
                        (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
                    ]
                })
        };
        let words =
            prop::sample::subsequence(vec!["a", "red", "jared", "Public", "红包", ""], 0..4);
        prop_oneof![
            (words, combine(list_leaf)).prop_map(|(ws, c)| {
                format!("let ws = {ws:?};\nfor w in ws {{ if {c} {{ log(\"x\"); }} }}")
            }),
            combine(element_leaf)
                .prop_map(|c| format!("for e in event.elements {{ if {c} {{ log(\"x\"); }} }}")),
        ]
    }

    fn event_with_elements() -> impl Strategy<Value = Event> {
        (
            some_event(),
            prop::sample::subsequence(vec!["TIMImageElem", "TIMTextElem", "TIMCustomElem"], 0..3),
        )
            .prop_map(|(e, more)| event_with_body(&e.text, &e.group_type, &e.from, e.time, &more))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// A loop rule the guard skips does nothing in Rhai either (no body run, no error).
        #[test]
        fn loop_guard_agrees_with_rhai(rule in loop_rule(), event in event_with_elements()) {
            let engine = engine();
            let Ok(ast) = compile_source(&engine, &rule) else {
                return Ok(());
            };
            let Some(guard) = Guard::of(&ast, Config::default().rules.max_operations, &|d| d == "sink") else {
                return Ok(());
            };
            if guard.skips(&event) {
                let ran = run(&engine, &ast, &event);
                prop_assert!(ran.is_ok(), "{rule}: skipped, Rhai {ran:?}");
            }
        }

        /// Whenever the guard knows a rule's condition, Rhai agrees: false → running the rule
        /// does nothing, true → its body runs. The body calls `forward`, which fails outside a
        /// real evaluation, so a run that reached the body is told apart by its error. As the
        /// body only forwards, the guard decides the whole rule: the body's forward when the
        /// condition is true, nothing when it is false.
        #[test]
        fn guard_agrees_with_rhai(cond in condition(), event in some_event()) {
            let engine = engine();
            // Generated conditions that do not compile (a string where Rhai wants a boolean)
            // have nothing to compare.
            let rule = format!("if {cond} {{ forward(\"sink\"); }}");
            let Ok(ast) = compile_source(&engine, &rule) else {
                return Ok(());
            };
            let Some(guard) = Guard::of(&ast, Config::default().rules.max_operations, &|d| d == "sink") else {
                return Ok(());
            };
            let known = condition_value(&guard, &event);
            let ran = run(&engine, &ast, &event);
            let body_ran = |r: &Result<(), Box<rhai::EvalAltResult>>| {
                r.as_ref().is_err_and(|e| e.to_string().contains("only be called while a rule runs"))
            };
            match known {
                Some(Val::Bool(false)) => prop_assert!(ran.is_ok(), "{cond}: guard false, Rhai {ran:?}"),
                Some(Val::Bool(true)) => prop_assert!(body_ran(&ran), "{cond}: guard true, Rhai {ran:?}"),
                _ => {}
            }
            match guard.decide(&event) {
                Decision::Forward(to) if to.is_empty() => prop_assert!(ran.is_ok(), "{cond}: decided nothing, Rhai {ran:?}"),
                Decision::Forward(to) => {
                    prop_assert_eq!(to, vec!["sink"]);
                    prop_assert!(body_ran(&ran), "{cond}: decided a forward, Rhai {ran:?}");
                }
                Decision::Run => {}
            }
            // The optimizer may drop an `if` whose condition is a constant false: no
            // condition left, skipped, and Rhai runs nothing either.
            if guard.skips(&event) {
                prop_assert!(ran.is_ok(), "{cond}: skipped, Rhai {ran:?}");
            }
        }
    }
}
