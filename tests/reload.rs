//! Hot reload as editors and Kubernetes do it: add, change, break, atomic rename, delete and a
//! ConfigMap symlink swap, each in force within 2 s, with no request failing meanwhile.

mod support;

use std::os::unix::fs::symlink;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const SEND: &str = "Group.CallbackAfterSendMsg";
const IN_FORCE: Duration = Duration::from_secs(2);

/// Posts a callback and returns the body the sink got for it, if any, within `wait`.
async fn forwarded_tag(imrelay: &Imrelay, sink: &Sink, seq: i64, wait: Duration) -> Option<String> {
    let mut body: Value = serde_json::from_slice(&fixture("group-after-send-text.json")).unwrap();
    body["MsgSeq"] = json!(seq);
    let (status, _) = imrelay
        .post(SEND, &serde_json::to_vec(&body).unwrap())
        .await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + wait;
    loop {
        let found = sink.all().iter().rev().find_map(|r| {
            let v = r.json();
            (v["seq"] == seq).then(|| v["tag"].as_str().unwrap_or("").to_string())
        });
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `/readyz` until its JSON satisfies `done`, within the reload deadline.
async fn readyz_until(imrelay: &Imrelay, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (_, body) = imrelay.get("/readyz").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        if done(&v) {
            return v;
        }
        assert!(started.elapsed() < IN_FORCE, "/readyz still says {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tagged(tag: &str) -> String {
    format!("forward(\"sink\", #{{ tag: \"{tag}\", seq: event.seq }});\n")
}

/// Polls with fresh callbacks until the sink sees `tag` (or `None`: nothing forwarded).
async fn until_tag(imrelay: &Imrelay, sink: &Sink, seq: &mut i64, want: Option<&str>) -> Duration {
    let started = Instant::now();
    loop {
        *seq += 1;
        let got = forwarded_tag(imrelay, sink, *seq, Duration::from_millis(150)).await;
        if got.as_deref() == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < IN_FORCE + Duration::from_secs(1),
            "still {got:?} instead of {want:?} after {:?}\n{}",
            started.elapsed(),
            imrelay.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn add_change_break_rename_delete() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    let imrelay = ws.start();
    let mut seq = 0;
    assert_eq!(
        forwarded_tag(&imrelay, &sink, seq, Duration::from_millis(200)).await,
        None
    );

    // Add.
    ws.rule("10-tag.rhai", &tagged("v1"));
    let took = until_tag(&imrelay, &sink, &mut seq, Some("v1")).await;
    assert!(took < IN_FORCE, "add took {took:?}");

    // Change (Workspace::rule writes a temp file and renames it over, as editors do).
    ws.rule("10-tag.rhai", &tagged("v2"));
    let took = until_tag(&imrelay, &sink, &mut seq, Some("v2")).await;
    assert!(took < IN_FORCE, "change took {took:?}");

    // Break: the last good version keeps running and the problem is reported.
    ws.rule("10-tag.rhai", "forward(\"sink\", #{ tag: \"v3\" ");
    let ready = readyz_until(&imrelay, |v| !v["problems"].as_array().unwrap().is_empty()).await;
    assert!(ready["problems"][0]["file"]
        .as_str()
        .unwrap()
        .ends_with("10-tag.rhai"));
    assert!(ready["problems"][0]["line"].as_u64().unwrap() >= 1);
    seq += 1;
    assert_eq!(
        forwarded_tag(&imrelay, &sink, seq, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("v2")
    );
    // The log names the broken file (stderr is read on a thread of the test's own: poll).
    eventually(
        Duration::from_secs(5),
        "the broken file named in the log",
        || imrelay.logs().contains("10-tag.rhai").then_some(()),
    )
    .await;

    // Fix it again, under a new name (rename), then delete it.
    ws.rule("10-tag.rhai", &tagged("v4"));
    until_tag(&imrelay, &sink, &mut seq, Some("v4")).await;
    std::fs::rename(
        ws.rules().join("10-tag.rhai"),
        ws.rules().join("20-renamed.rhai"),
    )
    .unwrap();
    let ready = readyz_until(&imrelay, |v| {
        v["rules"].to_string().contains("20-renamed.rhai")
    })
    .await;
    assert!(
        !ready["rules"].to_string().contains("10-tag.rhai"),
        "{ready}"
    );
    until_tag(&imrelay, &sink, &mut seq, Some("v4")).await;
    ws.remove_rule("20-renamed.rhai");
    let took = until_tag(&imrelay, &sink, &mut seq, None).await;
    assert!(took < IN_FORCE, "delete took {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_configmap_symlink_swap() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    // The layout the kubelet makes: real files in a timestamped folder, `..data` pointing at it,
    // and each visible file a link through `..data`.
    let rules = ws.rules();
    std::fs::create_dir(rules.join("..2026_11_25_01")).unwrap();
    std::fs::write(rules.join("..2026_11_25_01/tag.rhai"), tagged("first")).unwrap();
    symlink("..2026_11_25_01", rules.join("..data")).unwrap();
    symlink("..data/tag.rhai", rules.join("tag.rhai")).unwrap();
    let imrelay = ws.start();
    let mut seq = 0;
    until_tag(&imrelay, &sink, &mut seq, Some("first")).await;

    // An update: a new folder, a new link renamed over `..data`, the old folder removed.
    std::fs::create_dir(rules.join("..2026_11_25_02")).unwrap();
    std::fs::write(rules.join("..2026_11_25_02/tag.rhai"), tagged("second")).unwrap();
    symlink("..2026_11_25_02", rules.join("..data_tmp")).unwrap();
    std::fs::rename(rules.join("..data_tmp"), rules.join("..data")).unwrap();
    std::fs::remove_dir_all(rules.join("..2026_11_25_01")).unwrap();
    let took = until_tag(&imrelay, &sink, &mut seq, Some("second")).await;
    assert!(took < IN_FORCE, "swap took {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_request_fails_while_rules_reload() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule("10-tag.rhai", &tagged("start"));
    let imrelay = Arc::new(ws.start());
    let stop = Arc::new(AtomicBool::new(false));
    let mut posters = Vec::new();
    for worker in 0..4i64 {
        let imrelay = imrelay.clone();
        let stop = stop.clone();
        posters.push(tokio::spawn(async move {
            let mut sent = 0;
            let mut seq = worker * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let mut body: Value =
                    serde_json::from_slice(&fixture("group-after-send-text.json")).unwrap();
                body["MsgSeq"] = json!(seq);
                let (status, answer) = imrelay
                    .post(SEND, &serde_json::to_vec(&body).unwrap())
                    .await;
                assert_eq!(status, 200, "{answer}");
                sent += 1;
            }
            sent
        }));
    }
    for round in 0..20 {
        ws.rule("10-tag.rhai", &tagged(&format!("round-{round}")));
        ws.rule(&format!("2{round}-extra.rhai"), "let x = 1;\n");
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for p in posters {
        sent += p.await.unwrap();
    }
    assert!(sent > 20, "only {sent} callbacks were sent");
    // Every callback was forwarded by some version of the rule.
    sink.wait_for(sent, Duration::from_secs(20)).await;
}
