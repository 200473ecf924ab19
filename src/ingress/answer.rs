//! What imrelay answers Tencent: the common `{"ActionStatus","ErrorInfo","ErrorCode"}` shape, and
//! for before-events the rules' verdict in the form each command documents (PROTOCOL.md §4–5).

use serde_json::{json, Map, Value};

use crate::config::VerdictFailure;
use crate::event::{CommandKind, Event};
use crate::rules::{Action, Evaluation};

/// Tencent's plain OK answer, `{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}`, serialized.
/// Every after-event gets it: writing it from a constant instead of building, serializing and
/// dropping a JSON map per callback saves ~2,000–2,700 of a callback's ~92,000 instructions
/// through HTTP (callgrind, 10 rules, nothing matching).
pub const OK_BODY: &[u8] = br#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#;

/// What a callback is answered with.
#[derive(Debug)]
pub enum Answer {
    /// The plain OK, written from [`OK_BODY`].
    Ok,
    Body(Value),
}

impl Answer {
    pub fn into_value(self) -> Value {
        match self {
            Answer::Ok => serde_json::from_slice(OK_BODY).expect("OK_BODY is JSON"),
            Answer::Body(v) => v,
        }
    }
}

/// A refusal in Tencent's shape; the HTTP status doubles as the error code.
pub fn fail(status: u16, info: &str) -> Answer {
    Answer::Body(json!({"ActionStatus": "FAIL", "ErrorInfo": info, "ErrorCode": status}))
}

/// The answer to a callback once its rules ran. For a before-event this settles the decision:
/// an allowed message takes the rules' rewrites, and the event records its `verdict` (which
/// forwards then carry).
pub fn settle(event: &mut Event, evaluation: &Evaluation, on_failure: VerdictFailure) -> Answer {
    let kind = CommandKind::of(&event.command);
    if kind == CommandKind::After {
        return Answer::Ok;
    }
    let action = decide(evaluation, on_failure, kind);
    if action == Action::Allow {
        if let Some(elements) = &evaluation.rewrite_elements {
            event.set_elements(elements.clone());
        }
        if let Some(data) = &evaluation.rewrite_custom_data {
            event.custom_data = data.clone();
        }
    }
    let answer = verdict(event, kind, &action, evaluation);
    event.verdict = Some(crate::rules::action_json(&action));
    Answer::Body(answer)
}

/// The final decision on a before-event after failure handling.
pub fn decide(evaluation: &Evaluation, on_failure: VerdictFailure, kind: CommandKind) -> Action {
    match &evaluation.action {
        Some(a @ (Action::Reject { .. } | Action::Discard)) => a.clone(),
        _ if evaluation.failed && on_failure == VerdictFailure::Reject => Action::Reject {
            code: match kind {
                CommandKind::FriendCheck => 38000,
                _ => 1,
            },
            info: String::new(),
        },
        _ => Action::Allow,
    }
}

/// The answer body for a before-event (`Before` or `FriendCheck`).
pub fn verdict(
    event: &Event,
    kind: CommandKind,
    action: &Action,
    evaluation: &Evaluation,
) -> Value {
    if kind == CommandKind::FriendCheck {
        return friend_results(event, action, &evaluation.refused_members);
    }
    let mut m = Map::new();
    m.insert("ActionStatus".into(), "OK".into());
    let (code, info) = match action {
        Action::Allow => (0, String::new()),
        Action::Reject { code, info } => (*code, info.clone()),
        Action::Discard => (2, String::new()),
    };
    m.insert("ErrorInfo".into(), info.into());
    m.insert("ErrorCode".into(), code.into());
    if *action == Action::Allow {
        if evaluation.rewrite_elements.is_some() {
            m.insert("MsgBody".into(), event.msg_body());
        }
        if evaluation.rewrite_custom_data.is_some() {
            m.insert("CloudCustomData".into(), event.custom_data.clone().into());
        }
        if !evaluation.refused_members.is_empty() {
            m.insert(
                "RefusedMembers_Account".into(),
                evaluation.refused_members.clone().into(),
            );
        }
    }
    Value::Object(m)
}

/// `Sns.CallbackPrev*`: one `ResultItem` per friend in the request. `reject` refuses every one;
/// `refuse_members` refuses the accounts it names.
fn friend_results(event: &Event, action: &Action, refused: &[String]) -> Value {
    let list = event
        .payload
        .get("FriendItem")
        .or_else(|| event.payload.get("ResponseFriendItem"))
        .and_then(Value::as_array);
    let items: Vec<Value> = list
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("To_Account").and_then(Value::as_str))
        .map(|account| {
            let (code, info) = match action {
                Action::Reject { code, info } => (*code, info.as_str()),
                Action::Discard => (38000, ""),
                Action::Allow if refused.iter().any(|r| r == account) => (38000, ""),
                Action::Allow => (0, ""),
            };
            json!({"To_Account": account, "ResultCode": code, "ResultInfo": info})
        })
        .collect();
    json!({"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0, "ResultItem": items})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_constant_ok_body_is_the_ok_answer() {
        let ok = json!({"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0});
        let parsed: Value = serde_json::from_slice(OK_BODY).unwrap();
        assert_eq!(parsed, ok);
        // Byte for byte what serializing the answer as a map gave before the constant.
        assert_eq!(serde_json::to_vec(&ok).unwrap(), OK_BODY);
        assert_eq!(Answer::Ok.into_value(), ok);
    }
}
