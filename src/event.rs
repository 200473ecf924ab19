//! A Tencent callback becomes one [`Event`]: flat, typed fields that rules can read without
//! checking for missing keys, plus the untouched body in `payload`.
//!
//! Tencent's samples disagree with its own tables (EventTime as a string or a number, u32
//! sequence numbers, fields that come and go between doc versions), so every field is read
//! leniently: a missing or oddly typed field becomes its empty value, never a rejection. Only a
//! body that is not a JSON object, or a command that is missing or contradicts the query, is
//! refused.

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Why a callback cannot become an event; each becomes a 400 answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is not a JSON object")]
    NotObject,
    #[error("CallbackCommand is missing")]
    NoCommand,
    #[error("CallbackCommand in the query ({query}) differs from the body ({body})")]
    CommandMismatch { query: String, body: String },
}

/// The query parameters Tencent appends to the callback URL.
#[derive(Debug, Default, Clone)]
pub struct CallbackQuery {
    pub sdk_app_id: Option<u64>,
    pub command: Option<String>,
    pub client_ip: String,
    pub platform: String,
}

/// One callback, normalized. The field names are the public contract (SPEC §4).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub id: String,
    pub command: String,
    pub app_id: i64,
    pub client_ip: String,
    pub platform: String,
    pub event_time: i64,
    pub group_id: String,
    pub group_type: String,
    pub topic_id: String,
    pub from: String,
    pub to: String,
    pub operator: String,
    pub seq: i64,
    pub random: i64,
    pub time: i64,
    pub msg_key: String,
    pub msg_id: String,
    pub online_only: bool,
    pub text: String,
    pub elements: Vec<Element>,
    pub custom_data: String,
    pub from_bot: bool,
    pub payload: Value,
    /// The final decision on a before-event, set after the rules ran; forwarded events carry it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Value>,
}

/// One `MsgBody` entry: `{"type": MsgType, "content": MsgContent}`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Element {
    #[serde(rename = "type")]
    pub kind: String,
    pub content: Value,
}

/// The kind of answer a command expects (PROTOCOL.md §1.2, §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    /// Tencent ignores the answer; the event is processed after it.
    After,
    /// Tencent acts on the answer: the rules decide it.
    Before,
    /// `Sns.CallbackPrev*`: a `ResultItem` per friend.
    FriendCheck,
}

impl CommandKind {
    pub fn of(command: &str) -> CommandKind {
        // A plain scan: `str::contains` sets up a two-way search on every call, which for a
        // command name costs more than the search. This runs twice per callback; the scan
        // saves ~400 of its ~90,000 instructions through HTTP (callgrind, two rounds).
        const BEFORE: &[u8] = b".CallbackBefore";
        if command.starts_with("Sns.CallbackPrev") {
            CommandKind::FriendCheck
        } else if command
            .as_bytes()
            .windows(BEFORE.len())
            .any(|w| w == BEFORE)
        {
            CommandKind::Before
        } else {
            CommandKind::After
        }
    }
}

impl Event {
    /// Parses and normalizes one callback body. `bots` are the app's own accounts.
    pub fn from_callback(
        query: &CallbackQuery,
        body: &[u8],
        bots: &[String],
    ) -> Result<Event, EventError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| EventError::NotJson(e.to_string()))?;
        let Value::Object(map) = value else {
            return Err(EventError::NotObject);
        };
        let body_command = map.get("CallbackCommand").and_then(Value::as_str);
        let command = match (query.command.as_deref(), body_command) {
            (Some(q), Some(b)) if q != b => {
                return Err(EventError::CommandMismatch {
                    query: q.to_string(),
                    body: b.to_string(),
                })
            }
            (_, Some(c)) | (Some(c), None) if !c.is_empty() => c.to_string(),
            _ => return Err(EventError::NoCommand),
        };
        let app_id = query.sdk_app_id.unwrap_or(0);
        let id = event_id(app_id, &command, body);
        let elements = elements(&map);
        let text = text_of(&elements);
        let from = string(&map, "From_Account");
        let from_bot = !from.is_empty() && bots.contains(&from);
        Ok(Event {
            id,
            app_id: app_id.min(i64::MAX as u64) as i64,
            client_ip: query.client_ip.clone(),
            platform: platform(&query.platform),
            event_time: integer(&map, "EventTime"),
            group_id: string(&map, "GroupId"),
            group_type: string(&map, "Type"),
            topic_id: string(&map, "TopicId"),
            from,
            to: string(&map, "To_Account"),
            operator: string(&map, "Operator_Account"),
            seq: integer(&map, "MsgSeq"),
            random: match map.get("Random") {
                Some(_) => integer(&map, "Random"),
                None => integer(&map, "MsgRandom"),
            },
            time: integer(&map, "MsgTime"),
            msg_key: string(&map, "MsgKey"),
            msg_id: string(&map, "MsgId"),
            online_only: integer(&map, "OnlineOnlyFlag") == 1,
            text,
            elements,
            custom_data: string(&map, "CloudCustomData"),
            from_bot,
            command,
            payload: Value::Object(map),
            verdict: None,
        })
    }

    /// Replaces the message body (a rule's `rewrite`), keeping `text` in step with it.
    pub fn set_elements(&mut self, elements: Vec<Element>) {
        self.text = text_of(&elements);
        self.elements = elements;
    }

    /// The message body in Tencent's `MsgBody` shape.
    pub fn msg_body(&self) -> Value {
        Value::Array(self.elements.iter().map(Element::to_msg_body).collect())
    }
}

impl Element {
    pub fn to_msg_body(&self) -> Value {
        let mut m = Map::new();
        m.insert("MsgType".into(), Value::String(self.kind.clone()));
        m.insert("MsgContent".into(), self.content.clone());
        Value::Object(m)
    }

    /// Reads either shape: `{"type", "content"}` (the event's) or `{"MsgType", "MsgContent"}`
    /// (Tencent's), so rules can hand back what they read or what Tencent documents.
    pub fn from_value(v: &Value) -> Option<Element> {
        let m = v.as_object()?;
        let kind = m.get("type").or_else(|| m.get("MsgType"))?.as_str()?;
        let content = m
            .get("content")
            .or_else(|| m.get("MsgContent"))
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()));
        Some(Element {
            kind: kind.to_string(),
            content,
        })
    }
}

/// The same callback body for the same app and command always gets the same id, so a callback
/// that Tencent delivers twice can be recognised; any other difference gives another id.
fn event_id(app_id: u64, command: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(app_id.to_be_bytes());
    h.update(command.as_bytes());
    h.update([0]);
    h.update(body);
    let digest = h.finalize();
    hex(&digest[..16])
}

/// Tencent's documented `OptPlatform` spellings. `State.StateChange` sends `IOS` where every
/// other callback sends `iOS` (PROTOCOL.md §1.1): a value that matches one of these but for case
/// takes the documented spelling, so a rule compares with one string. Others pass through.
const PLATFORMS: &[&str] = &[
    "RESTAPI", "Web", "Android", "iOS", "Windows", "macOS", "Mac", "iPad", "Linux", "Unknown",
];

fn platform(raw: &str) -> String {
    PLATFORMS
        .iter()
        .find(|p| p.eq_ignore_ascii_case(raw))
        .map_or_else(|| raw.to_string(), |p| p.to_string())
}

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn string(map: &Map<String, Value>, key: &str) -> String {
    match map.get(key) {
        Some(Value::String(s)) => s.clone(),
        // Custom group ids such as 1213456 sometimes arrive as numbers.
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// A number or a numeric string (Tencent sends `EventTime` both ways); anything else is 0.
fn integer(map: &Map<String, Value>, key: &str) -> i64 {
    match map.get(key) {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|u| u.min(i64::MAX as u64) as i64))
            .or_else(|| n.as_f64().map(|f| f as i64))
            .unwrap_or(0),
        Some(Value::String(s)) => s.trim().parse().unwrap_or(0),
        _ => 0,
    }
}

fn elements(map: &Map<String, Value>) -> Vec<Element> {
    let Some(Value::Array(body)) = map.get("MsgBody") else {
        return Vec::new();
    };
    body.iter()
        .map(|e| {
            Element::from_value(e).unwrap_or_else(|| Element {
                kind: String::new(),
                content: e.clone(),
            })
        })
        .collect()
}

pub fn text_of(elements: &[Element]) -> String {
    let mut text = String::new();
    for e in elements.iter().filter(|e| e.kind == "TIMTextElem") {
        if let Some(t) = e.content.get("Text").and_then(Value::as_str) {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(t);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn query(cmd: &str) -> CallbackQuery {
        CallbackQuery {
            sdk_app_id: Some(888888),
            command: Some(cmd.into()),
            client_ip: "127.0.0.1".into(),
            platform: "RESTAPI".into(),
        }
    }

    #[test]
    fn event_time_as_string_or_number() {
        let q = query("X.Y");
        let a = Event::from_callback(
            &q,
            br#"{"CallbackCommand":"X.Y","EventTime":"1670574414123"}"#,
            &[],
        )
        .unwrap();
        let b = Event::from_callback(
            &q,
            br#"{"CallbackCommand":"X.Y","EventTime":1670574414123}"#,
            &[],
        )
        .unwrap();
        assert_eq!(a.event_time, 1_670_574_414_123);
        assert_eq!(b.event_time, 1_670_574_414_123);
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn u32_sequence_numbers_and_msg_random() {
        let body = br#"{"CallbackCommand":"C2C.CallbackAfterSendMsg","MsgSeq":4294967295,"MsgRandom":2784275388}"#;
        let e = Event::from_callback(&query("C2C.CallbackAfterSendMsg"), body, &[]).unwrap();
        assert_eq!(e.seq, 4_294_967_295);
        assert_eq!(e.random, 2_784_275_388);
    }

    #[test]
    fn text_joins_text_elements_and_keeps_unknown_ones() {
        let body = json!({"CallbackCommand":"G.C","MsgBody":[
            {"MsgType":"TIMTextElem","MsgContent":{"Text":"a"}},
            {"MsgType":"TIMNewElem","MsgContent":{"X":1}},
            {"MsgType":"TIMTextElem","MsgContent":{"Text":"红包"}}]});
        let e = Event::from_callback(&query("G.C"), body.to_string().as_bytes(), &[]).unwrap();
        assert_eq!(e.text, "a\n红包");
        assert_eq!(e.elements[1].kind, "TIMNewElem");
        assert_eq!(e.elements[1].content, json!({"X":1}));
    }

    #[test]
    fn command_rules() {
        let q = query("A.B");
        assert_eq!(
            Event::from_callback(&q, b"[1]", &[]).unwrap_err(),
            EventError::NotObject
        );
        assert!(matches!(
            Event::from_callback(&q, b"{", &[]),
            Err(EventError::NotJson(_))
        ));
        assert!(matches!(
            Event::from_callback(&q, br#"{"CallbackCommand":"C.D"}"#, &[]),
            Err(EventError::CommandMismatch { .. })
        ));
        let none = CallbackQuery::default();
        assert_eq!(
            Event::from_callback(&none, b"{}", &[]).unwrap_err(),
            EventError::NoCommand
        );
        // The query alone names the command when the body does not.
        assert_eq!(Event::from_callback(&q, b"{}", &[]).unwrap().command, "A.B");
    }

    #[test]
    fn platform_case_is_made_consistent() {
        let mut q = query("State.StateChange");
        for (sent, seen) in [
            ("IOS", "iOS"),
            ("iOS", "iOS"),
            ("web", "Web"),
            ("Mac", "Mac"),
            ("HarmonyOS", "HarmonyOS"),
            ("", ""),
        ] {
            q.platform = sent.into();
            let e = Event::from_callback(&q, br#"{"CallbackCommand":"State.StateChange"}"#, &[])
                .unwrap();
            assert_eq!(e.platform, seen);
        }
    }

    #[test]
    fn bots_are_marked() {
        let body = br#"{"CallbackCommand":"G.C","From_Account":"bot_admin"}"#;
        let e = Event::from_callback(&query("G.C"), body, &["bot_admin".into()]).unwrap();
        assert!(e.from_bot);
    }

    #[test]
    fn command_kinds() {
        assert_eq!(
            CommandKind::of("Group.CallbackBeforeSendMsg"),
            CommandKind::Before
        );
        assert_eq!(
            CommandKind::of("C2C.CallbackBeforeSendMsg"),
            CommandKind::Before
        );
        assert_eq!(
            CommandKind::of("Sns.CallbackPrevFriendAdd"),
            CommandKind::FriendCheck
        );
        assert_eq!(
            CommandKind::of("Group.CallbackAfterSendMsg"),
            CommandKind::After
        );
        assert_eq!(CommandKind::of("State.StateChange"), CommandKind::After);
    }
}
