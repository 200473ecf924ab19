//! Configuration: `imrelay.toml`, then `IMRELAY_<SECTION>__<KEY>` environment variables, then
//! command-line flags, merged as TOML values and parsed once into a validated [`Config`].
//!
//! Every raw section uses `deny_unknown_fields`: a typo in a key is an error with a line and a
//! column, never a silently ignored setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A problem with the configuration, located where possible.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// Values given on the command line; each one beats the file and the environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub rules_dir: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub log_format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    tencent: RawTencent,
    #[serde(default)]
    rules: RawRules,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    destinations: BTreeMap<String, RawDestination>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    path: Option<String>,
    max_body_bytes: Option<u64>,
    shutdown_grace_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTencent {
    sdk_app_ids: Option<Vec<u64>>,
    token: Option<String>,
    max_request_age_secs: Option<u64>,
    bot_accounts: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    dir: Option<PathBuf>,
    max_operations: Option<u64>,
    skip_bot_messages: Option<bool>,
    verdict_budget_ms: Option<u64>,
    on_verdict_failure: Option<String>,
    require_tests: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    redact: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    dir: Option<PathBuf>,
    dedupe_window_secs: Option<u64>,
    max_queue_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    secret: Option<String>,
    timeout_ms: Option<u64>,
    max_attempts: Option<u32>,
    format: Option<String>,
    concurrency: Option<usize>,
    backoff_base_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    max_queue_bytes: Option<u64>,
    rate_per_minute: Option<u32>,
}

/// The validated configuration the service runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub tencent: TencentConfig,
    pub rules: RulesConfig,
    pub log: LogConfig,
    pub storage: StorageConfig,
    pub destinations: BTreeMap<String, DestinationConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Normalized to start with `/` and have no trailing `/` (except the root itself).
    pub path: String,
    pub max_body_bytes: u64,
    /// How long shutdown waits for in-flight requests and deliveries.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct TencentConfig {
    /// Empty: any SdkAppid is accepted (warned about at start-up).
    pub sdk_app_ids: Vec<u64>,
    pub token: Option<String>,
    pub max_request_age: Duration,
    pub bot_accounts: Vec<String>,
}

/// What a before-event callback answers when the rules fail or run out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerdictFailure {
    Allow,
    Reject,
}

#[derive(Debug, Clone)]
pub struct RulesConfig {
    pub dir: PathBuf,
    pub max_operations: u64,
    pub skip_bot_messages: bool,
    pub verdict_budget: Duration,
    pub on_verdict_failure: VerdictFailure,
    pub require_tests: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub redact: bool,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub dir: PathBuf,
    /// How long an event id is remembered to drop a second delivery of the same callback.
    pub dedupe_window: Duration,
    /// Default cap on bytes waiting per destination; destinations may set their own.
    pub max_queue_bytes: u64,
}

/// How a destination wants its body shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Slack,
    Lark,
    DingTalk,
    WeCom,
    Discord,
    Teams,
}

impl Format {
    fn parse(s: &str) -> Option<Format> {
        Some(match s {
            "json" => Format::Json,
            "slack" => Format::Slack,
            "lark" | "feishu" => Format::Lark,
            "dingtalk" => Format::DingTalk,
            "wecom" => Format::WeCom,
            "discord" => Format::Discord,
            "teams" => Format::Teams,
            _ => return None,
        })
    }

    /// Each platform's published rate limit, used when a destination sets none.
    pub fn default_rate_per_minute(self) -> Option<u32> {
        match self {
            Format::DingTalk | Format::WeCom => Some(20),
            Format::Lark => Some(100),
            Format::Slack => Some(60),
            Format::Discord => Some(30),
            Format::Json | Format::Teams => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DestinationConfig {
    pub name: String,
    pub url: reqwest::Url,
    pub headers: Vec<(String, String)>,
    pub secret: Option<String>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub format: Format,
    pub concurrency: usize,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_queue_bytes: u64,
    pub rate_per_minute: Option<u32>,
}

/// The built-in destination that prints forwarded bodies to standard output.
pub const STDOUT_DESTINATION: &str = "stdout";

impl DestinationConfig {
    /// Settings for a destination a rule names by a literal `http(s)://` URL.
    pub fn for_url(url: reqwest::Url, storage: &StorageConfig) -> DestinationConfig {
        DestinationConfig {
            name: url.to_string(),
            url,
            headers: Vec::new(),
            secret: None,
            timeout: Duration::from_millis(5000),
            max_attempts: 12,
            format: Format::Json,
            concurrency: 8,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(600),
            max_queue_bytes: storage.max_queue_bytes,
            rate_per_minute: None,
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config::from_table(toml::Table::new(), "defaults").expect("built-in defaults are valid")
    }
}

impl Config {
    /// Loads the file (if any), the environment and the flags, in that order of strength.
    ///
    /// `file` of `None` reads `imrelay.toml` from the working directory when it exists.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::load_with_env(file, overrides, &env)
    }

    pub fn load_with_env(
        file: Option<&Path>,
        overrides: &Overrides,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let (mut table, origin) = match file {
            Some(path) => (read_table(path)?, path.display().to_string()),
            None if Path::new("imrelay.toml").exists() => (
                read_table(Path::new("imrelay.toml"))?,
                "imrelay.toml".to_string(),
            ),
            None => (toml::Table::new(), "defaults".to_string()),
        };
        apply_env(&mut table, env)?;
        apply_overrides(&mut table, overrides);
        Config::from_table(table, &origin)
    }

    fn from_table(table: toml::Table, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = RawConfig::deserialize(toml::Value::Table(table)).map_err(|e| {
            ConfigError::Invalid {
                origin: origin.to_string(),
                message: e.message().to_string(),
            }
        })?;
        Config::validate(raw, origin)
    }

    fn validate(raw: RawConfig, origin: &str) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let listen_text = raw.server.listen.unwrap_or_else(|| "0.0.0.0:8080".into());
        let listen = listen_text.parse().map_err(|_| {
            invalid(format!(
                "server.listen: `{listen_text}` is not an address like 0.0.0.0:8080"
            ))
        })?;
        let mut path = raw.server.path.unwrap_or_else(|| "/callback".into());
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        while path.len() > 1 && path.ends_with('/') {
            path.pop();
        }
        let max_body_bytes = raw.server.max_body_bytes.unwrap_or(1024 * 1024);
        if max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes must be above 0".into()));
        }

        let on_verdict_failure = match raw.rules.on_verdict_failure.as_deref() {
            None | Some("allow") => VerdictFailure::Allow,
            Some("reject") => VerdictFailure::Reject,
            Some(other) => {
                return Err(invalid(format!(
                    "rules.on_verdict_failure: `{other}` is not allow or reject"
                )))
            }
        };
        let verdict_budget_ms = raw.rules.verdict_budget_ms.unwrap_or(1500);
        if verdict_budget_ms == 0 || verdict_budget_ms >= 2000 {
            return Err(invalid(
                "rules.verdict_budget_ms must be between 1 and 1999: Tencent waits 2 s".into(),
            ));
        }
        let format = match raw.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(format!(
                    "log.format: `{other}` is not text or json"
                )))
            }
        };
        let storage = StorageConfig {
            dir: raw.storage.dir.unwrap_or_else(|| "data".into()),
            dedupe_window: Duration::from_secs(raw.storage.dedupe_window_secs.unwrap_or(600)),
            max_queue_bytes: raw.storage.max_queue_bytes.unwrap_or(256 * 1024 * 1024),
        };

        let mut destinations = BTreeMap::new();
        for (name, d) in raw.destinations {
            if name == STDOUT_DESTINATION {
                return Err(invalid(format!(
                    "destinations.{name}: `stdout` is built in and cannot be redefined"
                )));
            }
            let dest = validate_destination(&name, d, &storage).map_err(&invalid)?;
            destinations.insert(name, dest);
        }

        Ok(Config {
            server: ServerConfig {
                listen,
                path,
                max_body_bytes,
                shutdown_grace: Duration::from_millis(
                    raw.server.shutdown_grace_ms.unwrap_or(10_000),
                ),
            },
            tencent: TencentConfig {
                sdk_app_ids: raw.tencent.sdk_app_ids.unwrap_or_default(),
                token: raw.tencent.token.filter(|t| !t.is_empty()),
                max_request_age: Duration::from_secs(
                    raw.tencent.max_request_age_secs.unwrap_or(300),
                ),
                bot_accounts: raw.tencent.bot_accounts.unwrap_or_default(),
            },
            rules: RulesConfig {
                dir: raw.rules.dir.unwrap_or_else(|| "rules".into()),
                max_operations: raw.rules.max_operations.unwrap_or(1_000_000),
                skip_bot_messages: raw.rules.skip_bot_messages.unwrap_or(true),
                verdict_budget: Duration::from_millis(verdict_budget_ms),
                on_verdict_failure,
                require_tests: raw.rules.require_tests.unwrap_or(false),
            },
            log: LogConfig {
                format,
                redact: raw.log.redact.unwrap_or(true),
            },
            storage,
            destinations,
        })
    }
}

fn validate_destination(
    name: &str,
    d: RawDestination,
    storage: &StorageConfig,
) -> Result<DestinationConfig, String> {
    let url_text = d
        .url
        .ok_or_else(|| format!("destinations.{name}.url is required"))?;
    let url = reqwest::Url::parse(&url_text)
        .map_err(|e| format!("destinations.{name}.url: `{url_text}`: {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!(
            "destinations.{name}.url must be http:// or https://"
        ));
    }
    let format = match d.format.as_deref() {
        None => Format::Json,
        Some(f) => Format::parse(f).ok_or_else(|| {
            format!(
                "destinations.{name}.format: `{f}` is not one of json, slack, lark, dingtalk, wecom, discord, teams"
            )
        })?,
    };
    let max_attempts = d.max_attempts.unwrap_or(12);
    if max_attempts == 0 {
        return Err(format!(
            "destinations.{name}.max_attempts must be at least 1"
        ));
    }
    let concurrency = d.concurrency.unwrap_or(8);
    if concurrency == 0 {
        return Err(format!(
            "destinations.{name}.concurrency must be at least 1"
        ));
    }
    let backoff_base = Duration::from_millis(d.backoff_base_ms.unwrap_or(500).max(1));
    let backoff_max = Duration::from_millis(d.backoff_max_ms.unwrap_or(600_000));
    if backoff_max < backoff_base {
        return Err(format!(
            "destinations.{name}.backoff_max_ms must not be below backoff_base_ms"
        ));
    }
    let rate_per_minute = match d.rate_per_minute {
        Some(0) => None,
        Some(n) => Some(n),
        None => format.default_rate_per_minute(),
    };
    Ok(DestinationConfig {
        name: name.to_string(),
        url,
        headers: d.headers.into_iter().collect(),
        secret: d.secret.filter(|s| !s.is_empty()),
        timeout: Duration::from_millis(d.timeout_ms.unwrap_or(5000).max(1)),
        max_attempts,
        format,
        concurrency,
        backoff_base,
        backoff_max,
        max_queue_bytes: d.max_queue_bytes.unwrap_or(storage.max_queue_bytes),
        rate_per_minute,
    })
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let origin = path.display().to_string();
    // Parse as a table first for a located syntax error, then check the keys against the schema
    // here too, so that an unknown key in the file is reported with its line.
    let table: toml::Table = toml::from_str(&text).map_err(|e| located(&origin, &text, &e))?;
    toml::from_str::<RawConfig>(&text).map_err(|e| located(&origin, &text, &e))?;
    Ok(table)
}

fn located(origin: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = match e.span() {
        Some(span) => line_column(text, span.start),
        None => (1, 1),
    };
    ConfigError::Parse {
        path: origin.to_string(),
        line,
        column,
        message: e.message().to_string(),
    }
}

/// 1-based line and column of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// `IMRELAY_SERVER__LISTEN=…` sets `server.listen`; `IMRELAY_DESTINATIONS__HOOK__URL` sets
/// `destinations.hook.url`. Values are read as TOML when they parse as such (numbers, booleans,
/// arrays), else as plain strings.
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> Result<(), ConfigError> {
    for (key, value) in env {
        let Some(rest) = key.strip_prefix("IMRELAY_") else {
            continue;
        };
        if !rest.contains("__") {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        set_path(table, &path, parsed).map_err(|message| ConfigError::Invalid {
            origin: format!("environment variable {key}"),
            message,
        })?;
    }
    Ok(())
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut at = table;
    for p in parents {
        let entry = at
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a section"))?;
    }
    at.insert(last.clone(), value);
    Ok(())
}

fn apply_overrides(table: &mut toml::Table, o: &Overrides) {
    let mut set = |section: &str, key: &str, value: String| {
        // A flag always names an existing section and key: this cannot fail.
        let _ = set_path(
            table,
            &[section.to_string(), key.to_string()],
            toml::Value::String(value),
        );
    };
    if let Some(v) = &o.listen {
        set("server", "listen", v.clone());
    }
    if let Some(v) = &o.rules_dir {
        set("rules", "dir", v.display().to_string());
    }
    if let Some(v) = &o.data_dir {
        set("storage", "dir", v.display().to_string());
    }
    if let Some(v) = &o.log_format {
        set("log", "format", v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::default();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.server.path, "/callback");
        assert_eq!(c.server.max_body_bytes, 1_048_576);
        assert_eq!(c.rules.max_operations, 1_000_000);
        assert_eq!(c.rules.verdict_budget, Duration::from_millis(1500));
        assert_eq!(c.rules.on_verdict_failure, VerdictFailure::Allow);
        assert!(c.rules.skip_bot_messages);
        assert!(c.log.redact);
        assert_eq!(c.storage.dir, PathBuf::from("data"));
    }

    #[test]
    fn env_beats_file_and_flags_beat_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("imrelay.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:1\"\nmax_body_bytes = 10\n[destinations.a]\nurl = \"http://127.0.0.1:9/x\"\n",
        )
        .unwrap();
        let env = vec![
            ("IMRELAY_SERVER__LISTEN".into(), "127.0.0.1:2".into()),
            ("IMRELAY_SERVER__MAX_BODY_BYTES".into(), "20".into()),
            ("IMRELAY_DESTINATIONS__A__TIMEOUT_MS".into(), "70".into()),
        ];
        let c = Config::load_with_env(Some(&file), &Overrides::default(), &env).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:2");
        assert_eq!(c.server.max_body_bytes, 20);
        assert_eq!(c.destinations["a"].timeout, Duration::from_millis(70));
        let flags = Overrides {
            listen: Some("127.0.0.1:3".into()),
            ..Overrides::default()
        };
        let c = Config::load_with_env(Some(&file), &flags, &env).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:3");
    }

    #[test]
    fn unknown_key_in_file_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("imrelay.toml");
        std::fs::write(&file, "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap();
        let err = Config::load_with_env(Some(&file), &Overrides::default(), &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(":3:1: unknown field `lisen`"), "{text}");
    }

    #[test]
    fn bad_values_are_refused() {
        for (toml_text, needle) in [
            (
                "[rules]\non_verdict_failure = \"maybe\"",
                "on_verdict_failure",
            ),
            ("[rules]\nverdict_budget_ms = 2500", "verdict_budget_ms"),
            (
                "[destinations.x]\nurl = \"ftp://h/\"",
                "http:// or https://",
            ),
            (
                "[destinations.x]\nurl = \"http://h/\"\nformat = \"irc\"",
                "not one of",
            ),
            ("[destinations.stdout]\nurl = \"http://h/\"", "built in"),
        ] {
            let table: toml::Table = toml::from_str(toml_text).unwrap();
            let err = Config::from_table(table, "t").unwrap_err().to_string();
            assert!(err.contains(needle), "{toml_text}: {err}");
        }
    }
}
