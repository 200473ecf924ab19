//! What an operator sees and runs: rule tests (`imrelay test`, `rules.require_tests`), `dry-run`,
//! metrics and readiness, logs (JSON, redaction), chat platform formats and signatures, and
//! per-destination rate limits.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use support::*;

const SEND: &str = "Group.CallbackAfterSendMsg";

/// The group text fixture with `MsgSeq` (so each is a different callback) and fields replaced.
fn message(seq: i64, changes: Value) -> Vec<u8> {
    let mut body: Value = serde_json::from_slice(&fixture("group-after-send-text.json")).unwrap();
    body["MsgSeq"] = json!(seq);
    for (k, v) in changes.as_object().unwrap() {
        body[k] = v.clone();
    }
    serde_json::to_vec(&body).unwrap()
}

/// Runs a one-shot subcommand in `ws`, checks its exit code, and returns (stdout, stderr).
fn run(ws: &Workspace, args: &[&str], code: i32) -> (String, String) {
    let out = ws.command(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "imrelay {args:?}:\n{stdout}{stderr}"
    );
    (stdout, stderr)
}

/// A workspace with the moderation rule, its tests, and the fixture they read.
fn moderation_workspace(config: &str) -> Workspace {
    let ws = Workspace::new(config);
    std::fs::write(
        ws.path().join("fixture.json"),
        fixture("group-after-send-text.json"),
    )
    .unwrap();
    ws.rule("10-moderate.rhai", MODERATE);
    std::fs::create_dir_all(ws.rules().join("tests")).unwrap();
    std::fs::write(ws.rules().join("tests/moderate.toml"), MODERATE_TESTS).unwrap();
    ws
}

async fn readyz(imrelay: &Imrelay) -> Value {
    let (status, body) = imrelay.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------------
// Rule tests

const MODERATE: &str = r#"
if event.group_type == "Public" && event.text.contains("red packet") {
    log(`red packet from ${event.from}`);
    forward("sink", #{ group: event.group_id, text: event.text });
}
"#;

const MODERATE_TESTS: &str = r#"
[[test]]
name = "a red packet in a public group is forwarded"
command = "Group.CallbackAfterSendMsg"
fixture = "../../fixture.json"
forwards = [{ destination = "sink", body = { group = "@TGS#2J4SZEAEL", text = "red packet" } }]
logs = ["red packet from jared"]

[[test]]
name = "private groups are left alone"
command = "Group.CallbackAfterSendMsg"
payload = { GroupId = "@TGS#1", Type = "Private", MsgBody = [{ MsgType = "TIMTextElem", MsgContent = { Text = "red packet" } }] }
forwards = []
"#;

#[tokio::test(flavor = "multi_thread")]
async fn rule_tests_pass_or_fail_with_a_readable_diff() {
    let ws = moderation_workspace(&config_with_sink("http://127.0.0.1:9/in", ""));
    let (text, _) = run(&ws, &["test"], 0);
    assert!(text.contains("2 passed, 0 failed"), "{text}");
    // The test folder holds no rules: one rule is loaded.
    let (text, _) = run(&ws, &["check"], 0);
    assert!(text.contains("1 rule(s)"), "{text}");

    // A rule change that breaks an expectation: a diff per field, exit 1.
    ws.rule(
        "10-moderate.rhai",
        &MODERATE.replace("text: event.text", "text: event.text.to_upper()"),
    );
    let (text, _) = run(&ws, &["test"], 1);
    assert!(
        text.contains(
            "FAIL rules/tests/moderate.toml:2: a red packet in a public group is forwarded\n  forwards[0].body.text\n    expected: \"red packet\"\n    got:      \"RED PACKET\"\n"
        ),
        "{text}"
    );
    assert!(text.contains("1 passed, 1 failed"), "{text}");

    // `--rules` picks another folder; a broken test file is reported at its line.
    let other = ws.path().join("other-rules");
    std::fs::create_dir_all(other.join("tests")).unwrap();
    std::fs::write(other.join("10-moderate.rhai"), MODERATE).unwrap();
    std::fs::write(
        other.join("tests/broken.toml"),
        "[[test]]\nname = \"typo\"\ncommand = \"Group.CallbackAfterSendMsg\"\npayload = {}\nforward = []\n",
    )
    .unwrap();
    let (text, _) = run(&ws, &["test", "--rules", "other-rules"], 1);
    assert!(
        text.contains("other-rules/tests/broken.toml:5:1: unknown field `forward`"),
        "{text}"
    );
    assert!(text.contains("0 passed, 0 failed"), "{text}");
}

#[test]
fn the_example_rules_pass_their_tests() {
    let ws = Workspace::new("");
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/rules");
    let (text, _) = run(&ws, &["test", "--rules", rules], 0);
    assert!(text.contains(" passed, 0 failed"), "{text}");
}

#[test]
fn the_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/imrelay.toml");
    let ws = Workspace::new(&std::fs::read_to_string(example).unwrap());
    let (text, _) = run(&ws, &["check"], 0);
    assert!(text.starts_with("ok: configuration"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn require_tests_refuses_a_reload_that_breaks_a_test() {
    let sink = Sink::start().await;
    let ws = moderation_workspace(&config_with_sink(
        &sink.url("/in"),
        "[rules]\nrequire_tests = true",
    ));
    let imrelay = ws.start();
    assert_eq!(imrelay.post(SEND, &message(1, json!({}))).await.0, 200);
    let got = sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].json()["text"], "red packet");

    // This edit compiles, but makes the first test fail: it is refused.
    ws.rule(
        "10-moderate.rhai",
        &MODERATE.replace("text: event.text", "text: \"(hidden)\""),
    );
    let problems = eventually(Duration::from_secs(5), "the refusal in /readyz", || {
        let ready = futures_block(readyz(&imrelay));
        let problems = ready["problems"].as_array().unwrap().clone();
        (!problems.is_empty()).then_some(problems)
    })
    .await;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0]["file"]
        .as_str()
        .unwrap()
        .ends_with("tests/moderate.toml"));
    assert_eq!(problems[0]["line"], 2);
    let why = problems[0]["message"].as_str().unwrap();
    assert!(
        why.contains("rule test \"a red packet in a public group is forwarded\" fails: forwards[0].body.text: expected \"red packet\", got \"(hidden)\""),
        "{why}"
    );
    // Logged before it is published, but stderr is read on a thread of the test's own.
    eventually(Duration::from_secs(5), "the refusal in the log", || {
        imrelay.logs().contains("reload refused").then_some(())
    })
    .await;
    let (_, metrics) = imrelay.get("/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            "imrelay_rule_reloads_total",
            &["outcome=\"refused\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    // The rules in force did not change.
    assert_eq!(imrelay.post(SEND, &message(2, json!({}))).await.0, 200);
    let got = sink.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(got[1].json()["text"], "red packet");

    // A change the tests accept goes live, and the problem is gone.
    ws.rule(
        "10-moderate.rhai",
        &MODERATE.replace("text: event.text", "text: event.text, v: 2"),
    );
    std::fs::write(
        ws.rules().join("tests/moderate.toml"),
        MODERATE_TESTS.replace("text = \"red packet\" }", "text = \"red packet\", v = 2 }"),
    )
    .unwrap();
    eventually(Duration::from_secs(5), "the fixed rules in force", || {
        let ready = futures_block(readyz(&imrelay));
        ready["problems"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
    assert_eq!(imrelay.post(SEND, &message(3, json!({}))).await.0, 200);
    let got = sink.wait_for(3, Duration::from_secs(10)).await;
    assert_eq!(got[2].json()["v"], 2);
}

/// Every label value is a series kept until exit: only accepted callbacks add command names,
/// and only up to a limit.
#[tokio::test(flavor = "multi_thread")]
async fn command_labels_come_from_accepted_callbacks_and_are_bounded() {
    let ws = Workspace::new(&config_with_sink("http://127.0.0.1:9/in", ""));
    let imrelay = ws.start();
    assert_eq!(imrelay.post(SEND, &message(1, json!({}))).await.0, 200);
    // SdkAppid 1 is not the app's: refused before anything is verified.
    for i in 0..20 {
        let query = format!("SdkAppid=1&CallbackCommand=Made.Up{i}");
        assert_eq!(
            imrelay.post_query(&query, &message(2, json!({}))).await.0,
            403
        );
    }
    let query = format!("SdkAppid=1&CallbackCommand={SEND}");
    assert_eq!(
        imrelay.post_query(&query, &message(3, json!({}))).await.0,
        403
    );
    // Verified but refused: the name is not learnt either.
    let refused = imrelay
        .post("Group.CallbackNeverAccepted", b"{not json")
        .await;
    assert_eq!(refused.0, 400);
    // Accepted: 127 more names get their own label (128 with SEND), the last three `other`.
    for i in 0..130 {
        let command = format!("Group.CallbackMadeUp{i}");
        let body = message(4 + i, json!({ "CallbackCommand": command }));
        assert_eq!(imrelay.post(&command, &body).await.0, 200);
    }

    let (_, metrics) = imrelay.get("/metrics").await;
    let count = |labels: &[&str]| sample(&metrics, "imrelay_callbacks_total", labels);
    assert_eq!(
        count(&["command=\"unverified\"", "outcome=\"forbidden\""]),
        Some(20.0)
    );
    assert_eq!(
        count(&[&format!("command=\"{SEND}\""), "outcome=\"forbidden\""]),
        Some(1.0)
    );
    assert_eq!(count(&["command=\"other\"", "outcome=\"ok\""]), Some(3.0));
    assert_eq!(
        count(&["command=\"other\"", "outcome=\"bad_request\""]),
        Some(1.0)
    );
    assert!(!metrics.contains("Made.Up"), "{metrics}");
    assert!(!metrics.contains("NeverAccepted"), "{metrics}");
    let named: std::collections::HashSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("imrelay_callbacks_total{"))
        .filter_map(|l| l.split("command=\"").nth(1)?.split('"').next())
        .filter(|c| !["unverified", "other", "invalid"].contains(c))
        .collect();
    assert_eq!(named.len(), 128, "{named:?}");
}

/// Runs a future to completion from inside a polling closure.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

// ---------------------------------------------------------------------------------------------
// dry-run

#[test]
fn dry_run_prints_one_line_per_rule_and_exits_by_outcome() {
    let ws = Workspace::new(&config_with_sink("http://127.0.0.1:9/in", ""));
    std::fs::write(
        ws.path().join("before.json"),
        fixture("group-before-send.json"),
    )
    .unwrap();
    ws.rule(
        "10-log.rhai",
        "log(`from ${event.from}`);\nforward(\"sink\");\n",
    );
    ws.rule("20-reject.rhai", "reject(10100, \"not today\");\n");
    ws.rule("30-never.rhai", "forward(\"sink\");\n");
    let dry_run = [
        "dry-run",
        "--command",
        "Group.CallbackBeforeSendMsg",
        "before.json",
    ];
    let (out, _) = run(&ws, &dry_run, 0);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        3,
        "two rules ran (reject stops), then the answer: {lines:?}"
    );
    assert_eq!(lines[0]["rule"], "10-log.rhai");
    assert_eq!(
        lines[0]["forwards"],
        json!([{"destination": "sink", "body": "event"}])
    );
    assert_eq!(lines[0]["logs"], json!(["from jared"]));
    assert!(lines[0]["micros"].is_u64());
    assert_eq!(lines[1]["rule"], "20-reject.rhai");
    assert_eq!(
        lines[1]["verdict"],
        json!({"action": "reject", "code": 10100, "info": "not today"})
    );
    assert_eq!(lines[1]["stopped"], true);
    assert_eq!(lines[2]["answer"]["ErrorCode"], 10100);
    assert_eq!(lines[2]["forwards"], 1);

    // A rule that errors on this payload: its line names the file, line and column; exit 1.
    ws.remove_rule("20-reject.rhai");
    ws.rule(
        "20-fails.rhai",
        "let n = 1;\n\nlet x = event.group_id + n / 0;\n",
    );
    let (out, _) = run(&ws, &dry_run, 1);
    let failed: Value = serde_json::from_str(out.lines().nth(1).unwrap()).unwrap();
    assert_eq!(failed["rule"], "20-fails.rhai");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("20-fails.rhai:3:"), "{error}");
    assert!(error.contains("Division by zero"), "{error}");
    // The other rules still ran.
    assert!(out.contains("\"rule\":\"30-never.rhai\""), "{out}");

    // A rule that does not compile: reported as path:line:column on stderr; exit 1.
    ws.rule("40-broken.rhai", "if event.text {\n  forward(\"sink\"\n}\n");
    let (_, errors) = run(&ws, &dry_run, 1);
    assert!(errors.contains("rules/40-broken.rhai:3:1: "), "{errors}");
}

// ---------------------------------------------------------------------------------------------
// Metrics and readiness

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_with_callbacks_rules_reloads_and_deliveries() {
    let sink = Sink::start().await;
    let refusing = Sink::start().await;
    refusing.set_default(400);
    let ws = Workspace::new(&config_with_sink(
        &sink.url("/in"),
        &format!(
            "[destinations.refusing]\nurl = \"{}\"\nmax_attempts = 3\n",
            refusing.url("/no")
        ),
    ));
    ws.rule(
        "10-forward.rhai",
        "forward(\"sink\");\nforward(\"refusing\");\n",
    );
    ws.rule(
        "20-fails.rhai",
        "if event.text == \"fail\" { throw \"asked to\"; }\n",
    );
    let imrelay = ws.start();
    for seq in 1..=3 {
        assert_eq!(imrelay.post(SEND, &message(seq, json!({}))).await.0, 200);
    }
    let fail = message(
        4,
        json!({"MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "fail"}}]}),
    );
    assert_eq!(imrelay.post(SEND, &fail).await.0, 200);
    let refused = imrelay
        .post_query(
            "SdkAppid=1&CallbackCommand=Group.CallbackAfterSendMsg",
            &fail,
        )
        .await;
    assert_eq!(refused.0, 403);
    sink.wait_for(4, Duration::from_secs(10)).await;
    refusing.wait_for(4, Duration::from_secs(10)).await;
    // A rule that stops compiling: a reload with an error.
    ws.rule(
        "20-fails.rhai",
        "let n = 1;\nif event.text == \"fail\" {\n  forward(\"sink\"\n}\n",
    );

    let metrics = eventually(Duration::from_secs(10), "every metric", || {
        let (_, m) = futures_block(imrelay.get("/metrics"));
        let all = sample(&m, "imrelay_rule_reloads_total", &["outcome=\"error\""]).is_some()
            && sample(
                &m,
                "imrelay_dead_letters_total",
                &["destination=\"refusing\""],
            ) == Some(4.0)
            && sample(
                &m,
                "imrelay_deliveries_total",
                &["destination=\"sink\"", "outcome=\"delivered\""],
            ) == Some(4.0)
            // Each of these moves just after the ones above (the dead-letter count when its
            // commit lands, the depth on the lane's next turn): wait for them too.
            && sample(
                &m,
                "imrelay_deliveries_total",
                &["destination=\"refusing\"", "outcome=\"dead\""],
            ) == Some(4.0)
            && sample(&m, "imrelay_queue_depth", &["destination=\"sink\""]) == Some(0.0);
        all.then_some(m)
    })
    .await;
    let expect = |name: &str, labels: &[&str], want: f64| {
        assert_eq!(
            sample(&metrics, name, labels),
            Some(want),
            "{name}{labels:?} in\n{metrics}"
        );
    };
    expect(
        "imrelay_callbacks_total",
        &[&format!("command=\"{SEND}\""), "outcome=\"ok\""],
        4.0,
    );
    expect(
        "imrelay_callbacks_total",
        &[&format!("command=\"{SEND}\""), "outcome=\"forbidden\""],
        1.0,
    );
    expect("imrelay_callback_duration_seconds_count", &[], 5.0);
    expect(
        "imrelay_rule_runs_total",
        &["rule=\"10-forward.rhai\""],
        4.0,
    );
    expect(
        "imrelay_rule_errors_total",
        &["rule=\"20-fails.rhai\""],
        1.0,
    );
    expect(
        "imrelay_rule_errors_total",
        &["rule=\"10-forward.rhai\""],
        0.0,
    );
    expect("imrelay_rules_duration_seconds_count", &[], 4.0);
    expect("imrelay_rule_reloads_total", &["outcome=\"error\""], 1.0);
    expect("imrelay_rule_problems", &[], 1.0);
    expect("imrelay_rules_loaded", &[], 2.0);
    expect(
        "imrelay_deliveries_total",
        &["destination=\"refusing\"", "outcome=\"dead\""],
        4.0,
    );
    expect(
        "imrelay_delivery_duration_seconds_count",
        &["destination=\"sink\""],
        4.0,
    );
    expect("imrelay_queue_depth", &["destination=\"sink\""], 0.0);
    assert!(metrics.contains("# TYPE imrelay_callback_duration_seconds histogram"));
    // The buckets split 1–2.5 ms, so the share answered within 2 ms is one bucket's count.
    for le in ["0.001", "0.0015", "0.002", "0.0025"] {
        let bound = format!("le=\"{le}\"");
        let bucket = sample(
            &metrics,
            "imrelay_callback_duration_seconds_bucket",
            &[&bound],
        );
        assert!(bucket.is_some(), "no {bound} bucket in:\n{metrics}");
    }
    assert!(metrics.contains("# HELP imrelay_dead_letters_total "));

    // Readiness names the broken file where it broke, the rules in force, storage, destinations.
    let ready = readyz(&imrelay).await;
    assert_eq!(ready["ready"], true);
    let problem = &ready["problems"][0];
    assert!(problem["file"]
        .as_str()
        .unwrap()
        .ends_with("rules/20-fails.rhai"));
    assert_eq!(
        (&problem["line"], &problem["column"]),
        (&json!(4), &json!(1))
    );
    assert_eq!(
        problem["message"],
        "Syntax error: Expecting ',' to separate the arguments to function call 'forward'"
    );
    let rules = ready["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2, "the last good 20-fails.rhai keeps running");
    assert!(rules
        .iter()
        .all(|r| r["loaded_at_ms"].as_u64().unwrap() > 0));
    assert_eq!(ready["storage"]["state"], "open");
    assert_eq!(ready["storage"]["dead_letters"], 4);
    let names: Vec<&str> = ready["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["refusing", "sink", "stdout"]);
    let (status, body) = imrelay.get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, "{\"status\":\"ok\"}"));
}

// ---------------------------------------------------------------------------------------------
// Logs

/// A message whose sender, receiver and text are easy to spot in a log.
fn private_message(seq: i64) -> Vec<u8> {
    message(
        seq,
        json!({
            "From_Account": "acct_sender_7f3a",
            "Operator_Account": "acct_operator_7f3a",
            "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "private words 42"}}],
        }),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn redacted_logs_hide_text_and_account_ids() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule("10-forward.rhai", "forward(\"sink\");\n");
    let imrelay = ws.start();
    assert_eq!(imrelay.post(SEND, &private_message(1)).await.0, 200);
    assert_eq!(
        imrelay
            .post_query(
                "SdkAppid=1&CallbackCommand=Group.CallbackAfterSendMsg",
                &private_message(2)
            )
            .await
            .0,
        403
    );
    sink.wait_for(1, Duration::from_secs(10)).await;
    // imrelay logs the refusal before answering, but the test reads its stderr on a thread of
    // its own: wait for the line. Every line before it (the accepted callback's) is in by then.
    let logs = eventually(Duration::from_secs(5), "the refusal in the log", || {
        let logs = imrelay.logs();
        logs.contains("callback refused").then_some(logs)
    })
    .await;
    for secret in ["acct_sender_7f3a", "acct_operator_7f3a", "private words 42"] {
        assert!(!logs.contains(secret), "`{secret}` in the log:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unredacted_json_logs_show_each_callback() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(
        &sink.url("/in"),
        "[log]\nformat = \"json\"\nredact = false",
    ));
    ws.rule("10-forward.rhai", "forward(\"sink\");\n");
    let imrelay = ws.start();
    assert_eq!(imrelay.post(SEND, &private_message(1)).await.0, 200);
    let line = eventually(Duration::from_secs(5), "the callback log line", || {
        imrelay
            .stderr
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("acct_sender_7f3a"))
            .cloned()
    })
    .await;
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["level"], "INFO");
    let fields = &line["fields"];
    assert_eq!(fields["message"], "callback");
    assert_eq!(fields["command"], SEND);
    assert_eq!(fields["from"], "acct_sender_7f3a");
    assert_eq!(fields["group"], "@TGS#2J4SZEAEL");
    assert_eq!(fields["text"], "private words 42");
    assert_eq!(fields["forwards"], 1);
    assert_eq!(fields["event"].as_str().unwrap().len(), 32);
    // Every line imrelay wrote is JSON.
    for l in imrelay.stderr.lock().unwrap().iter() {
        assert!(serde_json::from_str::<Value>(l).is_ok(), "not JSON: {l}");
    }
}

#[test]
fn log_format_flag_makes_one_shot_commands_log_json() {
    let ws = Workspace::new("");
    std::fs::write(
        ws.path().join("payload.json"),
        fixture("group-after-send-text.json"),
    )
    .unwrap();
    ws.rule("10-fails.rhai", "throw \"no\";\n");
    let args = [
        "dry-run",
        "--log-format",
        "json",
        "--command",
        SEND,
        "payload.json",
    ];
    let (_, errors) = run(&ws, &args, 1);
    let lines: Vec<Value> = errors
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "WARN" && l["fields"]["rule"] == "10-fails.rhai"),
        "{lines:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Chat platforms

#[tokio::test(flavor = "multi_thread")]
async fn chat_formats_reach_each_platform_in_its_shape_and_signed() {
    let sink = Sink::start().await;
    let mut config = String::from("[tencent]\nsdk_app_ids = [888888]\n");
    for format in ["slack", "lark", "dingtalk", "wecom", "discord", "teams"] {
        config.push_str(&format!(
            "[destinations.{format}]\nurl = \"{}\"\nformat = \"{format}\"\n",
            sink.url(&format!("/{format}?access_token=abc"))
        ));
        if format == "dingtalk" || format == "lark" {
            config.push_str("secret = \"SECb4f0a1c3e5d7+/=\"\n");
        }
    }
    let ws = Workspace::new(&config);
    ws.rule(
        "10-chat.rhai",
        "for d in [\"slack\", \"lark\", \"dingtalk\", \"wecom\", \"discord\", \"teams\"] { forward(d); }\n",
    );
    let imrelay = ws.start();
    let before = now_ms();
    assert_eq!(imrelay.post(SEND, &message(1, json!({}))).await.0, 200);
    let got = sink.wait_for(6, Duration::from_secs(10)).await;
    let after = now_ms();
    let at = |path: &str| got.iter().find(|r| r.path == path).unwrap().clone();
    let text = "[Group.CallbackAfterSendMsg] jared → @TGS#2J4SZEAEL: red packet";

    assert_eq!(at("/slack").json(), json!({"text": text}));
    assert_eq!(at("/discord").json(), json!({"content": text}));
    assert_eq!(
        at("/wecom").json(),
        json!({"msgtype": "text", "text": {"content": text}})
    );
    let teams = at("/teams").json();
    assert_eq!(teams["type"], "message");
    let card = &teams["attachments"][0];
    assert_eq!(
        card["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    assert_eq!(card["content"]["type"], "AdaptiveCard");
    assert_eq!(card["content"]["body"][0]["text"], text);
    for r in &got {
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r.query.starts_with("access_token=abc"), "{}", r.query);
    }

    // DingTalk: `timestamp` (ms) and `sign` = base64(HMAC-SHA256(secret, "{timestamp}\n{secret}"))
    // in the query, URL-encoded.
    let secret = "SECb4f0a1c3e5d7+/=";
    let dingtalk = at("/dingtalk");
    assert_eq!(
        dingtalk.json(),
        json!({"msgtype": "text", "text": {"content": text}})
    );
    let query: Vec<(String, String)> = form_urlencoded::parse(dingtalk.query.as_bytes())
        .into_owned()
        .collect();
    let param = |k: &str| query.iter().find(|(n, _)| n == k).unwrap().1.clone();
    let timestamp: u64 = param("timestamp").parse().unwrap();
    assert!(
        (before..=after).contains(&timestamp),
        "timestamp {timestamp} is milliseconds of now"
    );
    let expected = base64::engine::general_purpose::STANDARD.encode(hmac_sha256(
        secret.as_bytes(),
        format!("{timestamp}\n{secret}").as_bytes(),
    ));
    assert_eq!(param("sign"), expected);
    let raw_sign = dingtalk.query.split("sign=").nth(1).unwrap();
    assert!(
        !raw_sign.contains(['+', '/', '=']),
        "the signature is URL-encoded: {raw_sign}"
    );

    // Lark: body fields `timestamp` (seconds, a string) and `sign` =
    // base64(HMAC-SHA256(key = "{timestamp}\n{secret}", empty message)).
    let lark = at("/lark").json();
    assert_eq!(lark["msg_type"], "text");
    assert_eq!(lark["content"], json!({"text": text}));
    let timestamp: u64 = lark["timestamp"].as_str().unwrap().parse().unwrap();
    assert!((before / 1000..=after / 1000).contains(&timestamp));
    let expected = base64::engine::general_purpose::STANDARD.encode(hmac_sha256(
        format!("{timestamp}\n{secret}").as_bytes(),
        b"",
    ));
    assert_eq!(lark["sign"], expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_destination_spreads_deliveries_and_drops_none() {
    // Each platform's published limit is the default.
    use imrelay::config::Format;
    assert_eq!(Format::DingTalk.default_rate_per_minute(), Some(20));
    assert_eq!(Format::WeCom.default_rate_per_minute(), Some(20));
    assert_eq!(Format::Lark.default_rate_per_minute(), Some(100));
    assert_eq!(Format::Slack.default_rate_per_minute(), Some(60));
    assert_eq!(Format::Json.default_rate_per_minute(), None);

    // 480 a minute: a burst of 3 (five seconds' worth would be 40; bursts are capped at 3),
    // then one every 125 ms.
    let sink = Sink::start().await;
    // The extra lines land in the sink destination's table.
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), "rate_per_minute = 480"));
    ws.rule(
        "10-forward.rhai",
        "forward(\"sink\", #{ seq: event.seq });\n",
    );
    let imrelay = ws.start();
    const N: i64 = 20;
    for seq in 1..=N {
        assert_eq!(imrelay.post(SEND, &message(seq, json!({}))).await.0, 200);
    }
    // Arrival times as the sink recorded them: sampling the count from here would date each
    // arrival late by however long this task waited for a core, skewing both checks below.
    let got = sink.wait_for(N as usize, Duration::from_secs(30)).await;
    let first = got[0].at;
    let span = got[N as usize - 1].at - first;
    assert!(
        span >= Duration::from_millis(1800),
        "20 deliveries at 8/s after a burst of 3 take 2.1 s, took {span:?}"
    );
    assert!(span < Duration::from_secs(10), "too slow: {span:?}");
    // Never ahead of the bucket: 3 at once, then 8 a second (one delivery of slack).
    for (i, r) in got.iter().enumerate() {
        let n = i + 1;
        let allowed = 3.0 + 8.0 * (r.at - first).as_secs_f64() + 1.0;
        assert!(
            (n as f64) <= allowed,
            "{n} delivered after {:?}",
            r.at - first
        );
    }
    // Nothing dropped, nothing twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seqs: Vec<i64> = sink
        .all()
        .iter()
        .map(|r| r.json()["seq"].as_i64().unwrap())
        .collect();
    seqs.sort();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
}
