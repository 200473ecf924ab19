//! The callback endpoint: every documented payload is accepted and normalized; requests that are
//! not Tencent's, not for our app, or not well-formed are refused and forward nothing.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::*;

const FORWARD_ALL: &str = "forward(\"sink\");\n";

#[tokio::test(flavor = "multi_thread")]
async fn every_fixture_is_accepted_and_forwarded() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule("all.rhai", FORWARD_ALL);
    let imrelay = ws.start();
    let fixtures = request_fixtures();
    assert!(
        fixtures.len() >= 40,
        "expected the documented fixtures, found {}",
        fixtures.len()
    );
    for (name, command) in &fixtures {
        let (status, answer) = imrelay.post(command, &fixture(name)).await;
        assert_eq!(status, 200, "{name}: {answer}");
        assert_eq!(answer["ActionStatus"], "OK", "{name}");
        assert_eq!(answer["ErrorCode"], 0, "{name}");
    }
    let got = sink.wait_for(fixtures.len(), Duration::from_secs(20)).await;
    let mut commands: Vec<String> = got
        .iter()
        .map(|r| r.json()["command"].as_str().unwrap().to_string())
        .collect();
    let mut expected: Vec<String> = fixtures.iter().map(|(_, c)| c.clone()).collect();
    commands.sort();
    expected.sort();
    assert_eq!(commands, expected);
    // Every event has every field of SPEC §4, with its type.
    for r in &got {
        let e = r.json();
        for key in [
            "id",
            "command",
            "client_ip",
            "platform",
            "group_id",
            "group_type",
            "topic_id",
            "from",
            "to",
            "operator",
            "msg_key",
            "msg_id",
            "text",
            "custom_data",
        ] {
            assert!(e[key].is_string(), "{key} in {e}");
        }
        for key in ["app_id", "event_time", "seq", "random", "time"] {
            assert!(e[key].is_i64(), "{key} in {e}");
        }
        assert!(e["online_only"].is_boolean() && e["from_bot"].is_boolean());
        assert!(e["elements"].is_array() && e["payload"].is_object());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn group_message_event_matches_the_spec_field_by_field() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule("all.rhai", FORWARD_ALL);
    let imrelay = ws.start();
    let body = fixture("group-after-send-text.json");
    let (status, _) = imrelay.post("Group.CallbackAfterSendMsg", &body).await;
    assert_eq!(status, 200);
    let got = sink.wait_for(1, Duration::from_secs(10)).await;
    let mut e = got[0].json();
    let id = e.as_object_mut().unwrap().remove("id").unwrap();
    assert!(id.as_str().is_some_and(|s| s.len() == 32));
    let payload: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        e,
        json!({
            "command": "Group.CallbackAfterSendMsg",
            "app_id": 888888,
            "client_ip": "127.0.0.1",
            "platform": "RESTAPI",
            "event_time": 1670574414123i64,
            "group_id": "@TGS#2J4SZEAEL",
            "group_type": "Public",
            "topic_id": "",
            "from": "jared",
            "to": "",
            "operator": "admin",
            "seq": 123,
            "random": 123456,
            "time": 1490686222,
            "msg_key": "",
            "msg_id": "",
            "online_only": true,
            "text": "red packet",
            "elements": [{"type": "TIMTextElem", "content": {"Text": "red packet"}}],
            "custom_data": "your cloud custom data",
            "from_bot": false,
            "payload": payload,
        })
    );
    let r = &got[0];
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("user-agent").unwrap().starts_with("imrelay/"));
    assert!(r.header("webhook-id").is_some() && r.header("webhook-timestamp").is_some());
    assert_eq!(
        r.header("webhook-signature"),
        None,
        "no secret, no signature"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_callback_gets_the_same_id_and_others_differ() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(
        &sink.url("/in"),
        "[storage]\ndedupe_window_secs = 0",
    ));
    ws.rule("all.rhai", FORWARD_ALL);
    let imrelay = ws.start();
    let a = fixture("group-after-send-text.json");
    let b = fixture("group-after-send-with-msgid.json");
    for body in [&a, &a, &b] {
        assert_eq!(
            imrelay.post("Group.CallbackAfterSendMsg", body).await.0,
            200
        );
    }
    let got = sink.wait_for(3, Duration::from_secs(10)).await;
    // Deliveries run concurrently, so they may arrive in any order: tell them by payload.
    let ids_of = |body: &[u8]| -> Vec<Value> {
        let payload: Value = serde_json::from_slice(body).unwrap();
        got.iter()
            .map(|r| r.json())
            .filter(|e| e["payload"] == payload)
            .map(|e| e["id"].clone())
            .collect()
    };
    let (ids_a, ids_b) = (ids_of(&a), ids_of(&b));
    let texts: Vec<String> = got.iter().map(Received::text).collect();
    assert_eq!((ids_a.len(), ids_b.len()), (2, 1), "{texts:?}");
    assert_eq!(ids_a[0], ids_a[1]);
    assert_ne!(ids_a[0], ids_b[0]);
}

fn signed_query(token: &str, time: u64) -> String {
    use sha2::Digest;
    let sign = imrelay::event::hex(&sha2::Sha256::digest(format!("{token}{time}").as_bytes()));
    format!("SdkAppid=888888&CallbackCommand=Group.CallbackAfterSendMsg&contenttype=json&Sign={sign}&RequestTime={time}")
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_answer_in_tencents_shape_and_forward_nothing() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&format!(
        "[server]\nmax_body_bytes = 2048\n[tencent]\nsdk_app_ids = [888888]\ntoken = \"xxxxyyyy\"\n[destinations.sink]\nurl = \"{}\"\n",
        sink.url("/in")
    ));
    ws.rule("all.rhai", FORWARD_ALL);
    let imrelay = ws.start();
    let body = fixture("group-after-send-text.json");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let good = signed_query("xxxxyyyy", now);

    let cases: Vec<(String, Vec<u8>, u16)> = vec![
        (good.replace("SdkAppid=888888", "SdkAppid=1400000001"), body.clone(), 403),
        (good.replace("SdkAppid=888888&", ""), body.clone(), 403),
        (good.replace("&Sign=", "&Sig="), body.clone(), 401),
        (signed_query("wrong-token", now), body.clone(), 401),
        // The documented vector is valid but years old.
        (
            "SdkAppid=888888&CallbackCommand=Group.CallbackAfterSendMsg&RequestTime=1669872112&Sign=17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061".into(),
            body.clone(),
            401,
        ),
        (signed_query("xxxxyyyy", now - 3600), body.clone(), 401),
        (good.clone(), b"{not json".to_vec(), 400),
        (good.clone(), b"[1,2,3]".to_vec(), 400),
        (good.replace("CallbackCommand=Group.CallbackAfterSendMsg&", ""), br#"{"GroupId":"x"}"#.to_vec(), 400),
        (good.replace("Group.CallbackAfterSendMsg", "C2C.CallbackAfterSendMsg"), body.clone(), 400),
        (good.clone(), vec![b' '; 4096], 413),
        // Too large and unverified: its command is not taken as a metric label.
        ("SdkAppid=1&CallbackCommand=Made.Up".into(), vec![b' '; 4096], 413),
    ];
    for (query, body, want) in &cases {
        let (status, answer) = imrelay.post_query(query, body).await;
        assert_eq!(status, *want, "{query}: {answer}");
        assert_eq!(answer["ActionStatus"], "FAIL", "{query}");
        assert_ne!(answer["ErrorCode"], 0, "{query}");
        assert!(answer["ErrorInfo"].as_str().is_some_and(|s| !s.is_empty()));
    }
    // Refusals are counted, the too-large ones too. No callback naming these commands has been
    // accepted yet, so none is a label: verified ones count as `other`, the rest `unverified`.
    let (_, metrics) = imrelay.get("/metrics").await;
    let counted = [
        ("other", "too_large", 1.0),
        ("unverified", "too_large", 1.0),
        ("other", "bad_request", 3.0),
        ("unverified", "forbidden", 2.0),
    ];
    for (command, outcome, want) in counted {
        let (command, outcome) = (
            format!("command=\"{command}\""),
            format!("outcome=\"{outcome}\""),
        );
        let got = sample(&metrics, "imrelay_callbacks_total", &[&command, &outcome]);
        assert_eq!(got, Some(want), "{command} {outcome}: {metrics}");
    }
    assert!(!metrics.contains("CallbackAfterSendMsg"), "{metrics}");
    assert!(!metrics.contains("Made.Up"), "{metrics}");

    // The valid, signed request goes through; it is the only one forwarded.
    let (status, _) = imrelay.post_query(&good, &body).await;
    assert_eq!(status, 200);
    sink.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn documented_sign_vector_is_accepted_within_its_window() {
    // With a window wide enough to reach 2022, Tencent's own example request passes.
    let sink = Sink::start().await;
    let ws = Workspace::new(&format!(
        "[tencent]\nsdk_app_ids = [888888]\ntoken = \"xxxxyyyy\"\nmax_request_age_secs = 4000000000\n[destinations.sink]\nurl = \"{}\"\n",
        sink.url("/in")
    ));
    ws.rule("all.rhai", FORWARD_ALL);
    let imrelay = ws.start();
    let query = "SdkAppid=888888&CallbackCommand=Group.CallbackAfterSendMsg&contenttype=json&ClientIP=$ClientIP&OptPlatform=$OptPlatform&Sign=17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061&RequestTime=1669872112";
    let (status, answer) = imrelay
        .post_query(query, &fixture("group-after-send-text.json"))
        .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_inputs_never_get_a_500_or_a_hang() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule("all.rhai", FORWARD_ALL);
    let imrelay = ws.start();
    let bodies: Vec<&[u8]> = vec![
        b"",
        b"null",
        b"\"str\"",
        b"{\"CallbackCommand\": 5}",
        b"{\"CallbackCommand\": \"\"}",
        b"{\"CallbackCommand\":\"Group.CallbackAfterSendMsg\",\"MsgBody\":\"not an array\",\"EventTime\":{}}",
        b"{\"CallbackCommand\":\"Group.CallbackAfterSendMsg\",\"MsgBody\":[1,null,{\"MsgType\":7}],\"MsgSeq\":-1,\"Random\":1e30}",
        b"{\"CallbackCommand\":\"Group.CallbackAfterSendMsg\",\"MsgSeq\":\"18446744073709551616\"}",
        b"\xff\xfe\x00",
        b"{\"CallbackCommand\":\"Unknown.Command\",\"Whatever\":[[[[[]]]]]}",
    ];
    for body in bodies {
        let (status, answer) = imrelay
            .post_query(
                "SdkAppid=888888&CallbackCommand=Group.CallbackAfterSendMsg",
                body,
            )
            .await;
        assert!(
            status == 200 || status == 400,
            "{status} {answer} for {:?}",
            String::from_utf8_lossy(body)
        );
    }
    let (status, answer) = imrelay
        .post_query(
            "SdkAppid=888888",
            b"{\"CallbackCommand\":\"Unknown.Command\",\"X\":1}",
        )
        .await;
    assert_eq!(status, 200, "unknown commands are accepted: {answer}");
}
