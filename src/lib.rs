//! imrelay: receives Tencent Cloud Chat (IM) webhooks, checks they come from Tencent, turns each
//! into a normalized event, runs the team's Rhai rules on it, and forwards what the rules pick.
//!
//! The data's path, one module per stage: [`ingress`] (HTTP, verification, answers) →
//! [`event`] (normalization) → [`rules`] (scripts, hot reload) → [`outbox`] (durable queue) →
//! [`deliver`] (HTTP delivery, retries, formats). [`run`] wires them into one service.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod deliver;
pub mod event;
pub mod ingress;
pub mod ops;
pub mod outbox;
pub mod rules;

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use tokio::net::TcpListener;
use warp::Filter;

use config::Config;
use deliver::Dispatcher;
use outbox::{Outbox, StoreError};
use rules::Rules;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen: {0}")]
    Listen(std::io::Error),
}

/// Runs the whole service on `listener` until `shutdown` resolves, then stops accepting,
/// finishes in-flight callbacks and deliveries (bounded by `server.shutdown_grace_ms`) and
/// returns. Tests call this on `127.0.0.1:0`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    ops::metrics_handle();
    // rustls needs a process-wide crypto provider; ring builds fast and needs no system library.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let outbox = Outbox::open(&config.storage.dir, config.storage.dedupe_window)?;
    let dispatcher = Dispatcher::new(
        outbox.clone(),
        config.destinations.clone(),
        config.storage.clone(),
    );
    let waiting = outbox.pending()?;
    if !waiting.is_empty() {
        tracing::info!(deliveries = waiting.len(), "resuming stored deliveries");
    }
    dispatcher.schedule(waiting.into_iter().map(|(name, q)| (name, q, None)));

    if config.tencent.sdk_app_ids.is_empty() {
        tracing::warn!("tencent.sdk_app_ids is empty: callbacks for any SdkAppid are accepted");
    }
    let rules = Arc::new(Rules::new(
        &config.rules,
        config.destinations.keys().cloned().collect(),
    ));
    let loaded = rules.current();
    for p in &loaded.problems {
        tracing::warn!("rule problem: {p}");
    }
    tracing::info!(rules = loaded.rules.len(), dir = %config.rules.dir.display(), "rules loaded");

    let (stop_watch, watch_stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(rules::reload::watch(
        rules.clone(),
        rules::reload::gate(&config, rules.clone()),
        async move {
            let _ = watch_stopped.await;
        },
    ));

    let grace = config.server.shutdown_grace;
    let addr = listener.local_addr().map_err(RunError::Listen)?;
    let path = config.server.path.clone();
    let app = Arc::new(ingress::App::new(config, rules, outbox, dispatcher.clone()));
    let routes = ingress::routes(app.clone())
        .or(ops::routes(app))
        .unify()
        .recover(ingress::recover)
        .unify();

    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        warp::serve(routes)
            .incoming(listener)
            .graceful(async move {
                let _ = server_stopped.await;
            })
            .run(),
    );
    // Poll `shutdown` once before saying we listen: a signal handler it installs on first poll
    // is then in place by the time anyone can know we are up, so an early SIGTERM stops us
    // cleanly (exit 0) instead of killing us.
    let mut shutdown = Box::pin(shutdown);
    let first_poll = std::future::poll_fn(|cx| Poll::Ready(shutdown.as_mut().poll(cx)));
    let early = first_poll.await.is_ready();
    tracing::info!("imrelay listening on http://{addr}{path}");
    if !early {
        shutdown.await;
    }
    tracing::info!("shutting down: no new callbacks; finishing in-flight work");
    // One grace period for all of it: callbacks, then deliveries, in what the callbacks leave.
    let deadline = tokio::time::Instant::now() + grace;
    let _ = stop_server.send(());
    if tokio::time::timeout_at(deadline, server).await.is_err() {
        tracing::warn!("in-flight callbacks did not finish within the grace period");
    }
    let _ = stop_watch.send(());
    let _ = watcher.await;
    dispatcher.shutdown(deadline).await;
    tracing::info!("stopped");
    Ok(())
}
