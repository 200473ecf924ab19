//! Destination formats: the event (or the body a rule gave) as each chat platform's message JSON,
//! cut to the platform's size limit. Rendering happens once, when the delivery is stored.

use serde_json::{json, Value};

use crate::config::Format;
use crate::event::Event;
use crate::rules::ForwardBody;

pub const JSON: &str = "application/json";
pub const TEXT: &str = "text/plain; charset=utf-8";

/// Renders one delivery body. `event_json` is the event already serialized (done once per
/// callback, shared by every destination that takes the event as it is).
pub fn render(
    format: Format,
    event: &Event,
    event_json: &[u8],
    body: Option<&ForwardBody>,
) -> (Vec<u8>, &'static str) {
    let text = match (format, body) {
        (Format::Json, None) => return (event_json.to_vec(), JSON),
        (Format::Json, Some(ForwardBody::Json(v))) => return (to_vec(v), JSON),
        (Format::Json, Some(ForwardBody::Text(t))) => return (t.clone().into_bytes(), TEXT),
        // A rule that builds the platform's own JSON gets it sent as it is.
        (_, Some(ForwardBody::Json(v))) => return (to_vec(v), JSON),
        (_, Some(ForwardBody::Text(t))) => t.clone(),
        (_, None) => summary(event),
    };
    (to_vec(&chat_message(format, &text)), JSON)
}

fn to_vec(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("a JSON value always serializes")
}

/// A one-line human summary of an event: `[command] from → where: text`.
pub fn summary(event: &Event) -> String {
    let place = if !event.group_id.is_empty() {
        event.group_id.as_str()
    } else {
        event.to.as_str()
    };
    let content = if !event.text.is_empty() {
        event.text.clone()
    } else {
        event
            .elements
            .iter()
            .map(|e| format!("<{}>", e.kind))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut s = format!("[{}]", event.command);
    if !event.from.is_empty() {
        s.push(' ');
        s.push_str(&event.from);
    }
    if !place.is_empty() {
        s.push_str(" → ");
        s.push_str(place);
    }
    if !content.is_empty() {
        s.push_str(": ");
        s.push_str(&content);
    }
    s
}

/// The platform's text message around `text`, cut to its documented limit.
pub fn chat_message(format: Format, text: &str) -> Value {
    match format {
        // Slack truncates `text` past 40,000 characters.
        Format::Slack => json!({ "text": cut_chars(text, 40_000) }),
        // Discord refuses `content` over 2,000 characters.
        Format::Discord => json!({ "content": cut_chars(text, 2_000) }),
        // DingTalk robot messages: at most 20,000 bytes.
        Format::DingTalk => {
            json!({ "msgtype": "text", "text": { "content": cut_bytes(text, 20_000) } })
        }
        // WeCom group robot text: at most 2,048 bytes of UTF-8.
        Format::WeCom => {
            json!({ "msgtype": "text", "text": { "content": cut_bytes(text, 2_048) } })
        }
        // Lark / Feishu custom bot: the whole request at most 20 KB; leave room for the envelope.
        Format::Lark => {
            json!({ "msg_type": "text", "content": { "text": cut_bytes(text, 19_000) } })
        }
        // Teams workflow webhooks take an Adaptive Card; messages are capped at 28 KB.
        Format::Teams => json!({
            "type": "message",
            "attachments": [{
                "contentType": "application/vnd.microsoft.card.adaptive",
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": [{ "type": "TextBlock", "text": cut_bytes(text, 24_000), "wrap": true }]
                }
            }]
        }),
        Format::Json => json!({ "text": text }),
    }
}

const ELLIPSIS: &str = "…";

/// At most `max` characters, the last one an ellipsis when cut.
pub fn cut_chars(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
    s.push_str(ELLIPSIS);
    s
}

/// At most `max` bytes of UTF-8, cut on a character boundary, ending in an ellipsis when cut.
pub fn cut_bytes(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &text[..end])
}

/// Lark wants the signature inside the body: adds `timestamp` (seconds, as a string) and `sign`.
pub fn sign_lark_body(body: &[u8], secret: &str, timestamp_s: u64) -> Vec<u8> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut m)) => {
            m.insert("timestamp".into(), Value::String(timestamp_s.to_string()));
            m.insert(
                "sign".into(),
                Value::String(super::sign::lark(secret, timestamp_s)),
            );
            to_vec(&Value::Object(m))
        }
        _ => body.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_respect_limits_and_characters() {
        let long = "红".repeat(3000);
        let wecom = cut_bytes(&long, 2048);
        assert!(wecom.len() <= 2048 && wecom.ends_with('…'));
        let discord = cut_chars(&long, 2000);
        assert_eq!(discord.chars().count(), 2000);
        assert_eq!(cut_bytes("short", 10), "short");
    }

    #[test]
    fn platform_shapes() {
        assert_eq!(chat_message(Format::Slack, "hi"), json!({"text": "hi"}));
        assert_eq!(
            chat_message(Format::Discord, "hi"),
            json!({"content": "hi"})
        );
        assert_eq!(
            chat_message(Format::DingTalk, "hi"),
            json!({"msgtype": "text", "text": {"content": "hi"}})
        );
        assert_eq!(
            chat_message(Format::WeCom, "hi"),
            json!({"msgtype": "text", "text": {"content": "hi"}})
        );
        assert_eq!(
            chat_message(Format::Lark, "hi"),
            json!({"msg_type": "text", "content": {"text": "hi"}})
        );
        let teams = chat_message(Format::Teams, "hi");
        assert_eq!(teams["attachments"][0]["content"]["body"][0]["text"], "hi");
    }
}
