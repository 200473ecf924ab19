//! Property: no JSON body, however odd, panics the normalizer; each one either becomes an event
//! or is refused with a reason that ingress answers as 400.

use imrelay::event::{CallbackQuery, Event, EventError};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        "[0-9]{1,25}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Mostly the keys the normalizer reads, so odd values meet the code that reads them.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "CallbackCommand",
            "EventTime",
            "GroupId",
            "Type",
            "TopicId",
            "From_Account",
            "To_Account",
            "Operator_Account",
            "MsgSeq",
            "Random",
            "MsgRandom",
            "MsgTime",
            "MsgKey",
            "MsgId",
            "OnlineOnlyFlag",
            "MsgBody",
            "MsgType",
            "MsgContent",
            "Text",
            "CloudCustomData",
        ])
        .prop_map(str::to_string),
        "[A-Za-z_]{1,10}",
    ]
}

fn query(command: Option<&str>) -> CallbackQuery {
    CallbackQuery {
        sdk_app_id: Some(888888),
        command: command.map(str::to_string),
        client_ip: String::new(),
        platform: String::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_json_normalizes_or_is_refused(body in json_value(), with_command in any::<bool>()) {
        let bytes = serde_json::to_vec(&body).unwrap();
        let q = query(with_command.then_some("Group.CallbackAfterSendMsg"));
        match Event::from_callback(&q, &bytes, &[]) {
            Ok(event) => {
                prop_assert!(body.is_object());
                prop_assert!(!event.command.is_empty());
                prop_assert_eq!(event.payload, body);
                // The event always serializes: it is what forwards carry.
                prop_assert!(serde_json::to_vec(&event.elements).is_ok());
            }
            Err(EventError::NotObject) => prop_assert!(!body.is_object()),
            Err(EventError::NoCommand) | Err(EventError::CommandMismatch { .. }) => {
                prop_assert!(body.is_object());
            }
            Err(EventError::NotJson(_)) => prop_assert!(false, "valid JSON was called invalid"),
        }
    }

    #[test]
    fn any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Event::from_callback(&query(Some("X.Y")), &bytes, &[]);
    }

    #[test]
    fn event_time_accepts_numbers_and_numeric_strings(t in 0i64..=i64::MAX, as_string in any::<bool>()) {
        let time = if as_string { Value::String(t.to_string()) } else { Value::from(t) };
        let body = serde_json::json!({"CallbackCommand": "X.Y", "EventTime": time});
        let event = Event::from_callback(&query(None), body.to_string().as_bytes(), &[]).unwrap();
        prop_assert_eq!(event.event_time, t);
    }
}
