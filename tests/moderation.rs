//! Before-event callbacks: the rules' verdicts become Tencent's documented answers, within the
//! time Tencent waits.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const GROUP_BEFORE: &str = "Group.CallbackBeforeSendMsg";
const C2C_BEFORE: &str = "C2C.CallbackBeforeSendMsg";

/// Picks a verdict by the message text, so one rule set serves every case.
const VERDICTS: &str = r#"
let c2c = event.command.starts_with("C2C.");
switch event.text {
    "please reject" => reject(),
    "please discard" => discard(),
    "custom reject" => if c2c { reject(120001, "not here") } else { reject(10100, "not here") },
    "out of range" => reject(5, "nope"),
    "red packet" => {
        if c2c {
            rewrite([
                #{ MsgType: "TIMTextElem", MsgContent: #{ Text: "red packet" } },
                #{ MsgType: "TIMCustomElem", MsgContent: #{ Desc: " CustomElement.MemberLevel ", Data: " LV1" } },
            ]);
            rewrite_custom_data("your new cloud custom data");
        } else {
            rewrite([
                #{ type: "TIMTextElem", content: #{ Text: "red packet" } },
                #{ type: "TIMCustomElem", content: #{ Desc: "CustomElement.MemberLevel", Data: "LV1" } },
            ]);
            rewrite_custom_data("your cloud custom data");
        }
    }
}
"#;

fn with_text(fixture_name: &str, text: &str) -> Vec<u8> {
    let mut body: Value = serde_json::from_slice(&fixture(fixture_name)).unwrap();
    body["MsgBody"] = json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": text}}]);
    serde_json::to_vec(&body).unwrap()
}

fn response(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn verdicts_match_tencents_documented_answers() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule("10-verdicts.rhai", VERDICTS);
    let imrelay = ws.start();
    for (command, request, prefix) in [
        (GROUP_BEFORE, "group-before-send.json", "group-before-send"),
        (C2C_BEFORE, "c2c-before-send.json", "c2c-before-send"),
    ] {
        for (text, answer) in [
            ("hello", "allow"),
            ("please reject", "reject"),
            ("please discard", "discard"),
            ("red packet", "modify"),
        ] {
            let (status, got) = imrelay.post(command, &with_text(request, text)).await;
            assert_eq!(status, 200);
            assert_eq!(
                got,
                response(&format!("{prefix}.response-{answer}.json")),
                "{command} {text}"
            );
        }
        let (_, got) = imrelay
            .post(command, &with_text(request, "custom reject"))
            .await;
        let code = if command == C2C_BEFORE { 120001 } else { 10100 };
        assert_eq!(
            got,
            json!({"ActionStatus": "OK", "ErrorCode": code, "ErrorInfo": "not here"})
        );
        // A code outside Tencent's range is logged and answered as a plain reject.
        let (_, got) = imrelay
            .post(command, &with_text(request, "out of range"))
            .await;
        assert_eq!(
            got,
            json!({"ActionStatus": "OK", "ErrorCode": 1, "ErrorInfo": "nope"})
        );
    }
    // Logged before the answer, but stderr is read on a thread of the test's own.
    eventually(
        Duration::from_secs(5),
        "the out-of-range warning in the log",
        || {
            imrelay
                .logs()
                .contains("outside Tencent's range")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrites_chain_across_rules_and_the_audit_forward_carries_the_verdict() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule(
        "10-mask.rhai",
        r#"
        if event.text.contains("darn") {
            // `replace` changes a string in place: work on a copy (the event is read-only).
            let text = event.text;
            text.replace("darn", "****");
            rewrite([#{ type: "TIMTextElem", content: #{ Text: text } }]);
        }
        "#,
    );
    ws.rule(
        "20-tag.rhai",
        r#"
        if event.text.contains("****") {
            let elements = event.elements;
            elements.push(#{ type: "TIMCustomElem", content: #{ Data: "masked" } });
            rewrite(elements);
            rewrite_custom_data("checked");
        }
        "#,
    );
    ws.rule("30-audit.rhai", r#"forward("sink");"#);
    ws.rule(
        "40-spam.rhai",
        r#"if event.text.contains("http://") { discard(); }"#,
    );
    let imrelay = ws.start();

    let (status, got) = imrelay
        .post(
            GROUP_BEFORE,
            &with_text("group-before-send.json", "oh darn it"),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        got,
        json!({
            "ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0,
            "MsgBody": [
                {"MsgType": "TIMTextElem", "MsgContent": {"Text": "oh **** it"}},
                {"MsgType": "TIMCustomElem", "MsgContent": {"Data": "masked"}}
            ],
            "CloudCustomData": "checked"
        })
    );
    let (_, got) = imrelay
        .post(
            GROUP_BEFORE,
            &with_text("group-before-send.json", "see http://spam"),
        )
        .await;
    assert_eq!(got["ErrorCode"], 2);

    let audit = sink.wait_for(2, Duration::from_secs(10)).await;
    let first = audit
        .iter()
        .map(|r| r.json())
        .find(|e| e["text"] == "oh **** it")
        .unwrap();
    assert_eq!(first["custom_data"], "checked");
    assert_eq!(
        first["verdict"],
        json!({"action": "allow", "code": 0, "info": ""})
    );
    let second = audit
        .iter()
        .map(|r| r.json())
        .find(|e| e["text"] == "see http://spam")
        .unwrap();
    assert_eq!(
        second["verdict"],
        json!({"action": "discard", "code": 2, "info": ""})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runaway_rule_is_answered_by_the_budget() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(
        &sink.url("/in"),
        "[rules]\nmax_operations = 100000000000\n",
    ));
    ws.rule("10-forever.rhai", "loop { }\n");
    ws.rule("20-reject.rhai", "reject();\n");
    let imrelay = ws.start();
    let started = Instant::now();
    let (status, got) = imrelay
        .post(GROUP_BEFORE, &fixture("group-before-send.json"))
        .await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_millis(1900),
        "answered after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(1400),
        "the default budget is 1500 ms: {took:?}"
    );
    // The budget ran out before any rule decided: Tencent's default, allow.
    assert_eq!(got, response("group-before-send.response-allow.json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn on_verdict_failure_reject() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(
        &sink.url("/in"),
        "[rules]\non_verdict_failure = \"reject\"\nverdict_budget_ms = 200\n",
    ));
    ws.rule(
        "10-broken.rhai",
        "if event.text == \"boom\" { let zero = 0; let x = 1 / zero; }\n",
    );
    let imrelay = ws.start();
    let (_, got) = imrelay
        .post(C2C_BEFORE, &with_text("c2c-before-send.json", "boom"))
        .await;
    assert_eq!(got, response("c2c-before-send.response-reject.json"));
    let (_, got) = imrelay
        .post(C2C_BEFORE, &with_text("c2c-before-send.json", "fine"))
        .await;
    assert_eq!(got, response("c2c-before-send.response-allow.json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn invite_join_partial_refusal_and_group_admission() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule(
        "10-members.rhai",
        r#"
        if event.command == "Group.CallbackBeforeInviteJoinGroup" {
            refuse_members(event.payload.DestinationMembers
                .filter(|m| m.Member_Account == "jared")
                .map(|m| m.Member_Account));
        }
        if event.command == "Group.CallbackBeforeApplyJoinGroup" && event.payload.Requestor_Account == "jared" {
            reject(10150, "ask an admin");
        }
        if event.command == "Group.CallbackBeforeCreateGroup" && event.payload.CreateGroupNum > 100 {
            reject();
        }
        "#,
    );
    let imrelay = ws.start();
    let (_, got) = imrelay
        .post(
            "Group.CallbackBeforeInviteJoinGroup",
            &fixture("group-before-invite-join.json"),
        )
        .await;
    assert_eq!(
        got,
        response("group-before-invite-join.response-partial-refuse.json")
    );
    let (_, got) = imrelay
        .post(
            "Group.CallbackBeforeApplyJoinGroup",
            &fixture("group-before-apply-join.json"),
        )
        .await;
    assert_eq!(
        got,
        json!({"ActionStatus": "OK", "ErrorCode": 10150, "ErrorInfo": "ask an admin"})
    );
    let (_, got) = imrelay
        .post(
            "Group.CallbackBeforeCreateGroup",
            &fixture("group-before-create.json"),
        )
        .await;
    assert_eq!(got["ErrorCode"], 1);
    let (_, got) = imrelay
        .post(
            "Group.CallbackBeforeCreateTopic",
            &fixture("topic-before-create.json"),
        )
        .await;
    assert_eq!(got, response("group-before-send.response-allow.json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn friend_requests_are_answered_per_friend() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&config_with_sink(&sink.url("/in"), ""));
    ws.rule(
        "10-friends.rhai",
        r#"
        if event.command == "Sns.CallbackPrevFriendAdd" { refuse_members(["id2"]); }
        if event.command == "Sns.CallbackPrevFriendResponse" { reject(38001, "closed"); }
        "#,
    );
    let imrelay = ws.start();
    let (_, got) = imrelay
        .post(
            "Sns.CallbackPrevFriendAdd",
            &fixture("sns-prev-friend-add.json"),
        )
        .await;
    let mut expected = response("sns-prev-friend-add.response.json");
    expected["ResultItem"][1]["ResultCode"] = json!(38000);
    assert_eq!(got, expected);
    let (_, got) = imrelay
        .post(
            "Sns.CallbackPrevFriendResponse",
            &fixture("sns-prev-friend-response.json"),
        )
        .await;
    assert_eq!(got["ErrorCode"], 0);
    let items = got["ResultItem"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for item in items {
        assert_eq!(item["ResultCode"], 38001);
        assert_eq!(item["ResultInfo"], "closed");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bot_messages_skip_the_rules() {
    let sink = Sink::start().await;
    let ws = Workspace::new(&format!(
        "[tencent]\nsdk_app_ids = [888888]\nbot_accounts = [\"bot_admin\"]\n[destinations.sink]\nurl = \"{}\"\n",
        sink.url("/in")
    ));
    ws.rule(
        "10-all.rhai",
        "forward(\"sink\", #{ from: event.from, bot: event.from_bot });\nreject();\n",
    );
    let imrelay = ws.start();
    let mut bot: Value = serde_json::from_slice(&fixture("group-before-send.json")).unwrap();
    bot["From_Account"] = json!("bot_admin");
    let (_, got) = imrelay
        .post(GROUP_BEFORE, &serde_json::to_vec(&bot).unwrap())
        .await;
    assert_eq!(
        got,
        response("group-before-send.response-allow.json"),
        "bots are allowed untouched"
    );
    let mut after: Value = serde_json::from_slice(&fixture("group-after-send-text.json")).unwrap();
    after["From_Account"] = json!("bot_admin");
    assert_eq!(
        imrelay
            .post(
                "Group.CallbackAfterSendMsg",
                &serde_json::to_vec(&after).unwrap()
            )
            .await
            .0,
        200
    );
    // A person's message still meets the rules.
    let (_, got) = imrelay
        .post(GROUP_BEFORE, &fixture("group-before-send.json"))
        .await;
    assert_eq!(got["ErrorCode"], 1);
    let got = sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].json(), json!({"from": "jared", "bot": false}));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 1, "nothing from the bot was forwarded");
}

/// Copies a folder of rule files (with its module sub-folders) into the workspace.
fn copy_rules(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_rules(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_documented_moderation_example_works_as_described() {
    let ws = Workspace::new("[tencent]\nsdk_app_ids = [888888]\n");
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/moderation/rules");
    copy_rules(&example, &ws.rules());
    let imrelay = ws.start();
    let post = |text: &'static str, request: &'static str, command: &'static str| {
        let imrelay = &imrelay;
        async move { imrelay.post(command, &with_text(request, text)).await.1 }
    };
    let spam = post(
        "free stuff at https://spam.example",
        "group-before-send.json",
        GROUP_BEFORE,
    )
    .await;
    assert_eq!(spam["ErrorCode"], 2);
    let blocked = post("want to buy followers?", "c2c-before-send.json", C2C_BEFORE).await;
    assert_eq!(blocked["ErrorCode"], 120001);
    assert_eq!(
        blocked["ErrorInfo"],
        "This message contains a blocked word."
    );
    let masked = post("you darn 笨蛋", "group-before-send.json", GROUP_BEFORE).await;
    assert_eq!(masked["ErrorCode"], 0);
    assert_eq!(masked["MsgBody"][0]["MsgContent"]["Text"], "you **** **");
    let fine = post("hello", "group-before-send.json", GROUP_BEFORE).await;
    assert_eq!(fine, response("group-before-send.response-allow.json"));

    // The audit rule printed every decision on the built-in `stdout` destination.
    let audit = eventually(
        Duration::from_secs(10),
        "four audit lines on stdout",
        || {
            let lines = imrelay.stdout_lines();
            (lines.len() >= 4).then_some(lines)
        },
    )
    .await;
    let actions: Vec<String> = audit
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["verdict"]["action"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut sorted = actions.clone();
    sorted.sort();
    assert_eq!(sorted, ["allow", "allow", "discard", "reject"]);
}
