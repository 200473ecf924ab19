//! Plain `http://` deliveries straight through hyper's connection API, with a small pool of
//! keep-alive connections per lane. A sidecar's busiest destinations are usually plain HTTP
//! next to it (the app's backend, a moderation service); measured here against the same local
//! sink, a request through reqwest cost 16.5–18.2 µs of client CPU and one through a hyper
//! connection 8.8–10.8 µs. `https://` destinations, URLs with credentials, and any process with
//! a proxy set in its environment keep using reqwest, which handles TLS, credentials and proxies.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{lookup_host, TcpStream};

/// How long connecting may take (reqwest's `connect_timeout` for the other destinations).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long reading an answer's body may take after its head came.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(1);
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The proxy variables reqwest reads for `http://` URLs: with any of them set, deliveries go
/// through reqwest so that the proxy is used.
const PROXY_VARIABLES: [&str; 4] = ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"];

/// A lane's connections to one plain-HTTP destination.
pub struct Pool {
    /// `host:port`, to connect to.
    address: String,
    /// The `Host` header.
    host: String,
    idle: Mutex<Vec<(SendRequest<Full<Bytes>>, Instant)>>,
    /// Most idle connections kept: the lane's concurrency.
    keep: usize,
}

/// The answer to one request: status and `Retry-After`.
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
}

impl Answer {
    pub fn of(status: hyper::StatusCode, headers: &hyper::HeaderMap) -> Answer {
        Answer {
            status: status.as_u16(),
            retry_after: headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        }
    }
}

impl Pool {
    /// A pool for this URL, if it is plain HTTP without credentials and no proxy is set.
    pub fn for_url(url: &reqwest::Url, keep: usize) -> Option<Pool> {
        let proxied = PROXY_VARIABLES
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|value| !value.is_empty()));
        let plain = url.scheme() == "http" && url.username().is_empty() && url.password().is_none();
        if proxied || !plain {
            return None;
        }
        let host = url.host_str()?;
        let port = url.port_or_known_default()?;
        // An IPv6 literal is already in brackets in `host_str`.
        let address = format!("{host}:{port}");
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        Some(Pool {
            address,
            host,
            idle: Mutex::new(Vec::new()),
            keep,
        })
    }

    /// POSTs `body` to `target` (path and query) with these headers, and reads the answer
    /// within `timeout` (the body within a further second, so the connection can be reused).
    /// `Host`, `User-Agent` and `Accept` are added unless `headers` has them, as reqwest does.
    pub async fn post(
        &self,
        target: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let mut request = Request::post(target);
        let defaults = [
            ("host", self.host.as_str()),
            ("user-agent", super::USER_AGENT),
            ("accept", "*/*"),
        ];
        for (name, value) in defaults {
            if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                request = request.header(name, value);
            }
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| format!("invalid request: {e}"))?;
        let exchange = async {
            let (mut sender, reused) = self.checkout().await?;
            let response = match sender.try_send_request(request).await {
                Ok(response) => response,
                Err(mut e) => match e.take_message() {
                    // A kept connection the destination closed meanwhile: the request was not
                    // sent, so it goes out once more on a new connection.
                    Some(unsent) if reused => {
                        sender = self.connect().await?;
                        sender
                            .send_request(unsent)
                            .await
                            .map_err(|e| e.to_string())?
                    }
                    _ => return Err(e.into_error().to_string()),
                },
            };
            Ok((sender, response))
        };
        let (sender, response) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("timed out after {} ms", timeout.as_millis()))??;
        let answer = Answer::of(response.status(), response.headers());
        // Read the body within a second, dropping it as it comes (a destination's answer body
        // is not kept); only a connection whose answer was read whole is reused.
        let mut body = response.into_body();
        let drained = async {
            while let Some(frame) = body.frame().await {
                frame?;
            }
            Ok::<(), hyper::Error>(())
        };
        if matches!(
            tokio::time::timeout(BODY_TIMEOUT, drained).await,
            Ok(Ok(()))
        ) {
            self.checkin(sender);
        }
        Ok(answer)
    }

    /// An idle connection that is still open (and whether it was one), or a new one.
    async fn checkout(&self) -> Result<(SendRequest<Full<Bytes>>, bool), String> {
        let kept = {
            let mut idle = self.idle.lock().expect("pool lock");
            prune(&mut idle, Instant::now());
            idle.pop().map(|(sender, _)| sender)
        };
        match kept {
            Some(mut sender) => match sender.ready().await {
                Ok(()) => Ok((sender, true)),
                Err(_) => Ok((self.connect().await?, false)),
            },
            None => Ok((self.connect().await?, false)),
        }
    }

    fn checkin(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("pool lock");
        prune(&mut idle, now);
        if idle.len() < self.keep {
            idle.push((sender, now));
        }
    }

    /// Connects to the destination: each of its addresses in turn, with an equal share of
    /// [`CONNECT_TIMEOUT`], so one address that drops packets does not use it all up.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let cannot = |why: String| format!("cannot connect to {}: {why}", self.address);
        let addresses: Vec<_> = tokio::time::timeout(CONNECT_TIMEOUT, lookup_host(&self.address))
            .await
            .map_err(|_| cannot("name lookup timed out".into()))?
            .map_err(|e| cannot(e.to_string()))?
            .collect();
        let share = CONNECT_TIMEOUT / addresses.len().max(1) as u32;
        let mut last = cannot("the name has no address".into());
        let mut connected = None;
        for address in addresses {
            match tokio::time::timeout(share, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    connected = Some(stream);
                    break;
                }
                Ok(Err(e)) => last = cannot(format!("{address}: {e}")),
                Err(_) => last = cannot(format!("{address}: timed out")),
            }
        }
        let stream = connected.ok_or(last)?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

/// Drops idle connections that are closed or past [`IDLE_TIMEOUT`], wherever they are in the
/// pool (not only the one about to be used). The clock is read once by the caller: reading it
/// per connection cost two of a delivery's ~10 µs with 32 connections kept.
fn prune(idle: &mut Vec<(SendRequest<Full<Bytes>>, Instant)>, now: Instant) {
    idle.retain(|(sender, since)| {
        !sender.is_closed() && now.saturating_duration_since(*since) < IDLE_TIMEOUT
    });
}
