//! Rule files for the benchmarks: the kinds of checks a team writes (keywords, group and account
//! filters, element types, links, custom data), shared by `benches/pipeline.rs` and
//! `examples/loadbench.rs` through `#[path]` so both measure the same rules.
//!
//! None of the templates matches the fixtures the benchmarks post
//! (`group-after-send-text.json`, `group-before-send.json`); [`MATCHING`] does match the
//! after-send fixture and forwards it to the destination named `sink`.

use std::path::Path;

/// Ten rules a team could have, each parameterised by `__N__` so copies differ.
const TEMPLATES: [&str; 10] = [
    // Keyword moderation.
    r#"if event.text.contains("buy followers __N__") || event.text.contains("free crypto") {
    forward("sink");
}
"#,
    // One VIP group goes to its own channel.
    r#"if event.group_id == "@TGS#vip__N__" && event.command == "Group.CallbackAfterSendMsg" {
    forward("sink");
}
"#,
    // Media messages are reviewed.
    r#"for e in event.elements {
    if e["type"] == "TIMImageElem" || e["type"] == "TIMVideoFileElem" {
        forward("sink");
        break;
    }
}
"#,
    // Support conversations.
    r#"if event.command.starts_with("C2C.") && event.to == "support__N__" {
    forward("sink");
}
"#,
    // Links in text.
    r#"if event.text.contains("http://") || event.text.contains("https://") {
    forward("sink");
}
"#,
    // A word list; before-events are refused, after-events reported.
    r#"let words = ["casino", "loan shark", "scam__N__"];
for w in words {
    if event.text.contains(w) {
        if event.command.contains(".CallbackBefore") {
            reject(10100, "blocked word");
        } else {
            forward("sink");
        }
        break;
    }
}
"#,
    // Very long messages.
    r#"if event.text.len() > 2000 {
    forward("sink");
}
"#,
    // Priority flag in the app's custom data.
    r#"if event.custom_data.contains("priority=high__N__") {
    forward("sink");
}
"#,
    // Group life cycle for the ops channel.
    r#"if event.command == "Group.CallbackAfterGroupDestroyed" || event.command == "Group.CallbackAfterCreateGroup" {
    forward("sink");
}
"#,
    // An audited account.
    r#"if event.from == "watched__N__" && event.time > 0 {
    forward("sink", #{ account: event.from, group: event.group_id, text: event.text });
}
"#,
];

/// A rule that matches the after-send fixture (the README's example rule).
pub const MATCHING: &str = r#"if event.group_type == "Public" && event.text.contains("red packet") {
    forward("sink");
}
"#;

/// Writes `count` rule files into `dir` (created if missing). None matches the benchmark
/// fixtures, except with `matching`, where the last of them (run last) is [`MATCHING`].
pub fn write_rules(dir: &Path, count: usize, matching: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let plain = if matching {
        count.saturating_sub(1)
    } else {
        count
    };
    for i in 0..plain {
        let text = TEMPLATES[i % TEMPLATES.len()].replace("__N__", &i.to_string());
        std::fs::write(dir.join(format!("{i:03}-rule.rhai")), text)?;
    }
    if matching {
        std::fs::write(dir.join("999-red-packets.rhai"), MATCHING)?;
    }
    Ok(())
}
