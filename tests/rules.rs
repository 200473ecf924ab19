//! Rules as a user writes them: filters, custom bodies, literal URLs, `stop()`, runaway and
//! failing rules, and a destination that hangs.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// The group text fixture with some fields replaced.
fn group_message(changes: Value) -> Vec<u8> {
    let mut body: Value = serde_json::from_slice(&fixture("group-after-send-text.json")).unwrap();
    for (k, v) in changes.as_object().unwrap() {
        body[k] = v.clone();
    }
    serde_json::to_vec(&body).unwrap()
}

fn text_body(text: &str) -> Value {
    json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": text}}])
}

const SEND: &str = "Group.CallbackAfterSendMsg";

#[tokio::test(flavor = "multi_thread")]
async fn filters_by_group_type_keyword_and_sender() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule(
        "10-public.rhai",
        r#"if event.group_type == "Public" { forward("sink", #{ rule: "public", seq: event.seq }); }"#,
    );
    ws.rule(
        "20-keyword.rhai",
        r#"if event.text.contains("红包") { forward("sink", #{ rule: "keyword", seq: event.seq }); }"#,
    );
    ws.rule(
        "30-sender.rhai",
        r#"if event.from == "leckie" { forward("sink", #{ rule: "sender", seq: event.seq }); }"#,
    );
    let imrelay = ws.start();
    let cases = [
        (
            1,
            json!({"Type": "Public", "MsgSeq": 1, "MsgBody": text_body("hello")}),
        ),
        (
            2,
            json!({"Type": "Private", "MsgSeq": 2, "MsgBody": text_body("抢红包啦")}),
        ),
        (
            3,
            json!({"Type": "ChatRoom", "MsgSeq": 3, "From_Account": "leckie"}),
        ),
        (
            4,
            json!({"Type": "AVChatRoom", "MsgSeq": 4, "MsgBody": text_body("nothing here")}),
        ),
    ];
    for (_, changes) in &cases {
        assert_eq!(
            imrelay.post(SEND, &group_message(changes.clone())).await.0,
            200
        );
    }
    let got = sink.wait_for(3, Duration::from_secs(10)).await;
    let mut seen: Vec<(String, i64)> = got
        .iter()
        .map(|r| {
            let v = r.json();
            (
                v["rule"].as_str().unwrap().to_string(),
                v["seq"].as_i64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("keyword".into(), 2),
            ("public".into(), 1),
            ("sender".into(), 3)
        ]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 3, "message 4 matches no rule");
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_bodies_literal_urls_and_stop() {
    let sink = Sink::start().await;
    let literal = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule(
        "10-custom.rhai",
        &format!(
            r#"
            forward("sink", #{{ who: event.from, words: event.text.split(" ") }});
            forward("sink", `plain: ${{event.text}}`);
            forward("{}");
            if event.seq == 7 {{ stop(); }}
            "#,
            literal.url("/literal")
        ),
    );
    ws.rule(
        "20-after-stop.rhai",
        r#"forward("sink", "second rule ran");"#,
    );
    let imrelay = ws.start();
    assert_eq!(
        imrelay
            .post(SEND, &group_message(json!({"MsgSeq": 7})))
            .await
            .0,
        200
    );

    let got = sink.wait_for(2, Duration::from_secs(10)).await;
    let json_one = got
        .iter()
        .find(|r| r.header("content-type") == Some("application/json"))
        .unwrap();
    assert_eq!(
        json_one.json(),
        json!({"who": "jared", "words": ["red", "packet"]})
    );
    let text_one = got.iter().find(|r| r.text().starts_with("plain")).unwrap();
    assert_eq!(text_one.text(), "plain: red packet");
    assert_eq!(
        text_one.header("content-type"),
        Some("text/plain; charset=utf-8")
    );

    let lit = literal.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(lit[0].path, "/literal");
    assert_eq!(lit[0].json()["seq"], 7);

    // `stop()` kept the second rule from running for seq 7; another message reaches it.
    assert_eq!(
        imrelay
            .post(SEND, &group_message(json!({"MsgSeq": 8})))
            .await
            .0,
        200
    );
    let got = sink.wait_for(5, Duration::from_secs(10)).await;
    let second: Vec<_> = got
        .iter()
        .filter(|r| r.text() == "second rule ran")
        .collect();
    assert_eq!(second.len(), 1);
    // Nothing beyond those five turns up late.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 5, "2 from seq 7, 3 from seq 8");
}

#[tokio::test(flavor = "multi_thread")]
async fn runaway_and_failing_rules_do_not_stop_the_others() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(
        &sink.url("/in"),
        // A huge operation limit: only the wall-clock budget can stop `loop {}`.
        "[rules]\nmax_operations = 100000000000\nverdict_budget_ms = 300\n",
    ));
    ws.rule("10-loop.rhai", "loop { }\n");
    ws.rule("20-divide.rhai", "let zero = 0;\nlet x = 1 / zero;\n");
    ws.rule("30-mutate.rhai", "event.text = \"changed\";\n");
    ws.rule(
        "40-forward.rhai",
        r#"forward("sink", #{ text: event.text });"#,
    );
    let imrelay = ws.start();
    let started = Instant::now();
    let (status, _) = imrelay
        .post(SEND, &fixture("group-after-send-text.json"))
        .await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert!(took < Duration::from_millis(1500), "answered in {took:?}");
    let got = sink.wait_for(1, Duration::from_secs(10)).await;
    // The event is read-only to rules: the third rule's assignment failed, the text is intact.
    assert_eq!(got[0].json(), json!({"text": "red packet"}));
    let logs = eventually(Duration::from_secs(5), "rule failures in the log", || {
        let l = imrelay.logs();
        (l.contains("10-loop.rhai") && l.contains("20-divide.rhai") && l.contains("30-mutate.rhai"))
            .then_some(l)
    })
    .await;
    assert!(logs.contains("over the time budget"), "{logs}");
    assert!(
        logs.contains("20-divide.rhai:2:"),
        "error located at its line: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn operation_limit_stops_an_endless_loop_quickly() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule("10-loop.rhai", "let n = 0;\nloop { n += 1; }\n");
    ws.rule("20-forward.rhai", r#"forward("sink");"#);
    let imrelay = ws.start();
    let started = Instant::now();
    assert_eq!(
        imrelay
            .post(SEND, &fixture("group-after-send-text.json"))
            .await
            .0,
        200
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    sink.wait_for(1, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_callbacks_make_two_hundred_forwards() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule("all.rhai", r#"forward("sink");"#);
    let imrelay = std::sync::Arc::new(ws.start());
    post_group_messages_at_once(&imrelay, 0..200).await;
    let got = sink.wait_for(200, Duration::from_secs(20)).await;
    let mut seqs: Vec<i64> = got
        .iter()
        .map(|r| r.json()["seq"].as_i64().unwrap())
        .collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 200, "exactly one forward per callback");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_destination_delays_neither_answers_nor_other_destinations() {
    let fast = Sink::start().await;
    let hang = Sink::start().await;
    hang.set_delay(Duration::from_secs(30));
    let ws = Workspace::new(&format!(
        "{}\n[destinations.hang]\nurl = \"{}\"\ntimeout_ms = 20000\n",
        config_with_sink(&fast.url("/in"), ""),
        hang.url("/hang")
    ));
    ws.rule("all.rhai", "forward(\"hang\");\nforward(\"sink\");\n");
    let imrelay = ws.start();
    let mut slowest = Duration::ZERO;
    for seq in 0..30 {
        let started = Instant::now();
        let (status, _) = imrelay
            .post(SEND, &group_message(json!({"MsgSeq": seq})))
            .await;
        assert_eq!(status, 200);
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "slowest answer {slowest:?}"
    );
    fast.wait_for(30, Duration::from_secs(10)).await;
    assert!(hang.count() >= 1, "the hanging destination was tried");
}

#[tokio::test(flavor = "multi_thread")]
async fn imports_resolve_inside_the_rules_folder_only() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    std::fs::create_dir_all(ws.rules().join("lib")).unwrap();
    std::fs::write(
        ws.rules().join("lib/words.rhai"),
        "fn bad(text) { text.contains(\"spam\") }\n",
    )
    .unwrap();
    std::fs::write(ws.path().join("secret.rhai"), "fn leak() { 1 }\n").unwrap();
    ws.rule(
        "10-use.rhai",
        "import \"lib/words\" as words;\nif words::bad(event.text) { forward(\"sink\"); }\n",
    );
    ws.rule(
        "20-escape.rhai",
        "import \"../secret\" as s;\nforward(\"sink\");\n",
    );
    let out = ws.command(&["check"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{printed}");
    assert!(printed.contains("20-escape.rhai:1:"), "{printed}");
    assert!(printed.contains("inside the rules folder"), "{printed}");
    assert!(!printed.contains("10-use.rhai"), "{printed}");

    let imrelay = ws.start();
    let body = group_message(json!({"MsgBody": text_body("buy spam now")}));
    assert_eq!(imrelay.post(SEND, &body).await.0, 200);
    sink.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 1, "the escaping rule never loaded");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_rule_and_config_problems_with_locations() {
    let ws = Workspace::new("[server]\nlisten = \"127.0.0.1:0\"\n");
    ws.rule("ok.rhai", "forward(\"stdout\");\n");
    ws.rule(
        "typo.rhai",
        "let a = 1;\nif event.text.contains(\"x\") {\n  forwrd(\"stdout\")\n",
    );
    let out = ws.command(&["check"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    let line = printed.lines().find(|l| l.contains("typo.rhai")).unwrap();
    let parts: Vec<&str> = line.splitn(4, ':').collect();
    assert!(
        parts[1].parse::<u32>().is_ok() && parts[2].parse::<u32>().is_ok(),
        "{line}"
    );

    std::fs::write(ws.path().join("imrelay.toml"), "[server]\nlisen = \"x\"\n").unwrap();
    let out = ws.command(&["check"]);
    let printed = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        printed.contains("imrelay.toml:2:1: unknown field `lisen`"),
        "{printed}"
    );

    std::fs::write(ws.path().join("imrelay.toml"), "").unwrap();
    ws.remove_rule("typo.rhai");
    let out = ws.command(&["check"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn literal_url_destinations_are_capped() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    // A new URL for every message: each would be a delivery lane of its own.
    ws.rule(
        "10-per-event-url.rhai",
        &format!(
            "forward(`{}?seq=${{event.seq}}`);\n",
            sink.url("/per-event")
        ),
    );
    let imrelay = std::sync::Arc::new(ws.start());
    let limit = imrelay::deliver::MAX_URL_LANES as i64;
    post_group_messages_at_once(&imrelay, 0..limit).await;
    // One URL past the cap is refused as a whole, like a full queue: 503, nothing lost silently.
    let (status, answer) = imrelay
        .post(SEND, &group_message(json!({"MsgSeq": limit})))
        .await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["ErrorInfo"]
            .as_str()
            .unwrap()
            .contains("distinct literal URLs"),
        "{answer}"
    );
    // A URL already in use still works.
    assert_eq!(
        imrelay
            .post(SEND, &group_message(json!({"MsgSeq": 0, "Random": 7})))
            .await
            .0,
        200
    );
    sink.wait_for(limit as usize + 1, Duration::from_secs(20))
        .await;
}

/// Posts one group message per sequence number, all at once, and expects a 200 for each.
async fn post_group_messages_at_once(
    imrelay: &std::sync::Arc<Imrelay>,
    seqs: std::ops::Range<i64>,
) {
    let mut tasks = Vec::new();
    for seq in seqs {
        let imrelay = imrelay.clone();
        tasks.push(tokio::spawn(async move {
            imrelay
                .post(SEND, &group_message(json!({"MsgSeq": seq})))
                .await
                .0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}
