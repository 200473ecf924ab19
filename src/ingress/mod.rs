//! The callback path: verify → normalize → rules → durably queue → answer.
//!
//! Nothing on this path waits on a destination. The only wait is the outbox commit, and only
//! for callbacks whose rules forwarded something; it is shared with concurrent callbacks
//! (group commit).

pub mod answer;
pub mod verify;

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;
use warp::http::{Response, StatusCode};
use warp::hyper::body::Bytes as HyperBytes;
use warp::{Filter, Rejection};

use crate::config::Config;
use crate::deliver::{format, Dispatcher};
use crate::event::Event;
use crate::outbox::{Enqueued, NewDelivery, Outbox};
use crate::rules::{Evaluation, Rules};
use answer::Answer;
use verify::Query;

/// Everything the callback path needs, shared by every request.
pub struct App {
    pub config: Config,
    pub rules: Arc<Rules>,
    pub outbox: Outbox,
    pub dispatcher: Dispatcher,
    /// `imrelay_callback_duration_seconds`, looked up once instead of per callback.
    callback_duration: metrics::Histogram,
    /// The command names `imrelay_callbacks_total` counts under their own label.
    command_labels: Mutex<HashSet<String>>,
}

/// Most command names `imrelay_callbacks_total` counts under their own label; later ones are
/// counted as `other`. Tencent documents about 45 commands.
const COMMAND_LABELS: usize = 128;

impl App {
    pub fn new(config: Config, rules: Arc<Rules>, outbox: Outbox, dispatcher: Dispatcher) -> App {
        App {
            config,
            rules,
            outbox,
            dispatcher,
            callback_duration: metrics::histogram!("imrelay_callback_duration_seconds"),
            command_labels: Mutex::default(),
        }
    }
}

/// The callback route: `POST {server.path}` with any query string.
pub fn routes(
    app: Arc<App>,
) -> impl Filter<Extract = (Response<HyperBytes>,), Error = Rejection> + Clone {
    let path = app.config.server.path.clone();
    let limit = app.config.server.max_body_bytes;
    let with_app = warp::any().map(move || app.clone());
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    let body = warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .and_then(move |length: Option<u64>, body| async move {
            Ok::<_, Infallible>(read_body(length, body, limit).await)
        });
    warp::post()
        .and(warp::path::full())
        .and_then(move |full: warp::path::FullPath| {
            let matches =
                full.as_str() == path || full.as_str().strip_suffix('/') == Some(path.as_str());
            async move {
                if matches {
                    Ok(())
                } else {
                    Err(warp::reject::not_found())
                }
            }
        })
        .untuple_one()
        .and(query)
        .and(body)
        .and(with_app)
        .and_then(
            |query: String, body: Result<Bytes, BodyError>, app: Arc<App>| async move {
                Ok::<_, Infallible>(handle(&app, &query, body).await)
            },
        )
}

/// Why a callback's body was not read.
#[derive(Debug, Clone, Copy)]
enum BodyError {
    /// Larger than `server.max_body_bytes`.
    TooLarge,
    /// The connection failed while it was being read.
    Unreadable,
}

/// Reads the body up to `limit` bytes: refused early by its Content-Length, or as soon as a
/// chunked body passes the limit, so an oversized body is never held in memory.
async fn read_body<S, B>(length: Option<u64>, body: S, limit: u64) -> Result<Bytes, BodyError>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    use futures_util::StreamExt;
    if length.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    let mut out = bytes::BytesMut::with_capacity(length.unwrap_or(0) as usize);
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|_| BodyError::Unreadable)?;
        if (out.len() + chunk.remaining()) as u64 > limit {
            return Err(BodyError::TooLarge);
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            out.extend_from_slice(part);
            chunk.advance(n);
        }
    }
    Ok(out.freeze())
}

/// A JSON answer with the given status.
pub fn json_response(status: u16, body: &Value) -> Response<HyperBytes> {
    let bytes = serde_json::to_vec(body).expect("a JSON value always serializes");
    json_bytes_response(status, HyperBytes::from(bytes))
}

fn json_bytes_response(status: u16, body: HyperBytes) -> Response<HyperBytes> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(body)
        .expect("static response parts are valid")
}

async fn handle(
    app: &App,
    raw_query: &str,
    body: Result<Bytes, BodyError>,
) -> Response<HyperBytes> {
    let started = Instant::now();
    let (status, reply, claimed) = match body {
        Ok(body) => process(app, raw_query, &body).await,
        Err(error) => refuse_body(app, raw_query, error),
    };
    let command = command_label(app, claimed, status == 200);
    let outcome = match status {
        200 => "ok",
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        413 => "too_large",
        503 => "unavailable",
        _ => "error",
    };
    metrics::counter!("imrelay_callbacks_total", "command" => command, "outcome" => outcome)
        .increment(1);
    app.callback_duration
        .record(started.elapsed().as_secs_f64());
    respond(status, reply)
}

/// Tencent's answer as a response: the plain OK from its constant, any other serialized.
fn respond(status: u16, reply: Answer) -> Response<HyperBytes> {
    match reply {
        Answer::Ok => json_bytes_response(status, HyperBytes::from_static(answer::OK_BODY)),
        Answer::Body(body) => json_response(status, &body),
    }
}

/// The command a callback named, and whether its query passed verification.
struct Claimed {
    command: String,
    verified: bool,
}

/// Bounds the `command` metric label, since every label value is a series kept until exit. A
/// name becomes a label only when a callback naming it is accepted, up to [`COMMAND_LABELS`]:
/// a refused callback, whose command nothing vouches for, keeps the name only if an accepted
/// one brought it first; otherwise it is `unverified` (refused before its query verified) or
/// `other`, as are accepted names beyond the limit. Malformed names are `invalid`. Without
/// `tencent.token`, anyone who knows the SdkAppid can still get names accepted, which the
/// limit bounds.
fn command_label(app: &App, claimed: Claimed, accepted: bool) -> String {
    let command = claimed.command.as_str();
    let plausible = command.len() <= 64
        && command.contains('.')
        && command
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
    if !plausible {
        return "invalid".into();
    }
    let mut known = app
        .command_labels
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if known.contains(command) {
        claimed.command
    } else if accepted && known.len() < COMMAND_LABELS {
        known.insert(claimed.command.clone());
        claimed.command
    } else if claimed.verified {
        "other".into()
    } else {
        "unverified".into()
    }
}

/// A callback whose body was too large or could not be read. Whether it came from Tencent is
/// told by its query alone, where the SdkAppid and the signature are: a verified one is an
/// event Tencent sent and imrelay refused, worth a warning.
fn refuse_body(app: &App, raw_query: &str, error: BodyError) -> (u16, Answer, Claimed) {
    let query = Query::parse(raw_query);
    let verified = verify::verify(&query, &app.config.tencent).is_ok();
    let command = query.callback.command.unwrap_or_default();
    let (status, info) = match error {
        BodyError::TooLarge => (
            413,
            format!(
                "body larger than server.max_body_bytes ({} bytes)",
                app.config.server.max_body_bytes
            ),
        ),
        BodyError::Unreadable => (400, "body could not be read".to_string()),
    };
    if verified {
        tracing::warn!(status, command, reason = %info, "callback refused");
    } else {
        tracing::info!(status, reason = %info, "unverified callback refused");
    }
    let claimed = Claimed { command, verified };
    (status, answer::fail(status, &info), claimed)
}

async fn process(app: &App, raw_query: &str, body: &[u8]) -> (u16, Answer, Claimed) {
    let query = Query::parse(raw_query);
    let claim = |command: Option<&str>, verified| Claimed {
        command: command.unwrap_or_default().to_string(),
        verified,
    };
    if let Err(refusal) = verify::verify(&query, &app.config.tencent) {
        let claimed = claim(query.callback.command.as_deref(), false);
        tracing::info!(status = refusal.status(), reason = %refusal, "callback refused");
        return (
            refusal.status(),
            answer::fail(refusal.status(), &refusal.to_string()),
            claimed,
        );
    }
    let mut event =
        match Event::from_callback(&query.callback, body, &app.config.tencent.bot_accounts) {
            Ok(e) => e,
            Err(e) => {
                let claimed = claim(query.callback.command.as_deref(), true);
                tracing::info!(reason = %e, "callback refused");
                return (400, answer::fail(400, &e.to_string()), claimed);
            }
        };
    let claimed = claim(Some(&event.command), true);

    let evaluation = if event.from_bot && app.config.rules.skip_bot_messages {
        Evaluation::default()
    } else {
        let set = app.rules.current();
        app.rules.evaluate(&set, &event, false)
    };

    let answer = answer::settle(&mut event, &evaluation, app.config.rules.on_verdict_failure);

    if !evaluation.forwards.is_empty() {
        if let Err(status_and_answer) = queue(app, &event, &evaluation).await {
            let (status, answer) = status_and_answer;
            return (status, answer, claimed);
        }
    }
    log_accepted(app, &event, &evaluation);
    (200, answer, claimed)
}

/// One line per accepted callback. Redacted (the default), it names only the command and the
/// event id, at debug level: a line per callback at info would dominate the log at volume and
/// the metrics already count callbacks. Unredacted, it is an info line with who, where and the
/// text, for an operator who asked for message content in the log (`log.redact = false`).
fn log_accepted(app: &App, event: &Event, evaluation: &Evaluation) {
    let verdict = event
        .verdict
        .as_ref()
        .and_then(|v| v["action"].as_str())
        .unwrap_or("");
    let forwards = evaluation.forwards.len();
    if app.config.log.redact {
        tracing::debug!(command = %event.command, event = %event.id, forwards, verdict, "callback");
    } else {
        tracing::info!(
            command = %event.command,
            event = %event.id,
            from = %event.from,
            to = %event.to,
            group = %event.group_id,
            text = %event.text,
            forwards,
            verdict,
            "callback"
        );
    }
}

/// Renders and stores every forward of this event, then hands them to their lanes.
async fn queue(app: &App, event: &Event, evaluation: &Evaluation) -> Result<(), (u16, Answer)> {
    let unavailable = |info: String| (503, answer::fail(503, &info));
    let mut event_json: Option<Vec<u8>> = None;
    let mut deliveries = Vec::with_capacity(evaluation.forwards.len());
    for (i, f) in evaluation.forwards.iter().enumerate() {
        let Some(dest_format) = app.dispatcher.format_of(&f.destination) else {
            tracing::warn!(rule = %f.rule, destination = %f.destination, "forward to an unknown destination ignored");
            continue;
        };
        let event_json = event_json
            .get_or_insert_with(|| serde_json::to_vec(event).expect("an event always serializes"));
        let (body, content_type) = format::render(dest_format, event, event_json, f.body.as_ref());
        deliveries.push(NewDelivery {
            destination: f.destination.clone(),
            webhook_id: format!("msg_{}_{i}", event.id),
            content_type,
            body: body.into(),
        });
    }
    if deliveries.is_empty() {
        return Ok(());
    }
    app.dispatcher
        .admit(deliveries.iter().map(|d| d.destination.as_str()))
        .map_err(|e| unavailable(e.to_string()))?;
    let event_time = u64::try_from(event.event_time).unwrap_or(0);
    match app
        .outbox
        .enqueue(event.id.clone(), event_time, deliveries)
        .await
    {
        Ok(Enqueued::Stored(queued)) => {
            app.dispatcher
                .schedule(queued.into_iter().map(|(name, q, f)| (name, q, Some(f))));
            Ok(())
        }
        Ok(Enqueued::Duplicate) => {
            tracing::debug!(event = %event.id, "duplicate callback: already queued");
            metrics::counter!("imrelay_duplicates_total").increment(1);
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "callback not stored; answered 503");
            Err(unavailable(format!("not stored: {e}")))
        }
    }
}

/// Turns warp's own rejections (wrong method or path) into Tencent's shape.
pub async fn recover(rejection: Rejection) -> Result<Response<HyperBytes>, Infallible> {
    let (status, info) = if rejection.is_not_found() {
        (404, "not found".to_string())
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (405, "method not allowed".to_string())
    } else {
        (400, format!("{rejection:?}"))
    };
    Ok(respond(status, answer::fail(status, &info)))
}
