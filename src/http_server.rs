//! The HTTP/1.1 and HTTP/2 connection loop, with the limits a service on the open network needs
//! and `axum::serve` does not offer: a global connection cap, a header-read timeout that also
//! closes idle keep-alive connections, `TCP_NODELAY` on every accepted socket, the request time
//! limit of [`Limits`] (enforced by `http_security::time_limit`), and graceful shutdown.
//!
//! Why `TCP_NODELAY`: SSE frames are small writes; with Nagle's algorithm and the client's
//! delayed ACK they sat in the kernel for tens of milliseconds (measured p95 36–45 ms end to end
//! against ≤ 5 ms inside the service).
//!
//! Why the header-read timeout doubles as the idle timeout: hyper starts it whenever a
//! connection waits for the head of its next request, so a half-sent request and a silent
//! keep-alive connection are both closed after it; a response in progress (an SSE stream) is not
//! waiting for a head and is not affected.

use std::sync::Arc;
use std::time::Duration;

use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};

use crate::http_security::{RequestTimeLimit, REQUEST_TIMEOUT};

/// Connection and request limits of one instance.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most; a connection beyond it is closed at once (the client retries or
    /// another instance answers) rather than queued without bound.
    pub max_connections: usize,
    /// Time a connection may take to send a request head, and may stay idle between requests.
    pub header_read_timeout: Duration,
    /// Time a request may take from its head to its answer (body upload and handler; the SSE
    /// stream is exempt); beyond it the answer is 408 `request-timeout`.
    pub request_timeout: Duration,
    /// How long shutdown waits for open requests and streams.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: REQUEST_TIMEOUT,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` fires, then waits up to the grace period for
/// open connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    mut shutdown: oneshot::Receiver<()>,
) {
    // The router's time-limit middleware reads the limit from each request's extensions.
    let app = app.layer(Extension(RequestTimeLimit(limits.request_timeout)));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, _) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = limits.max_connections,
                "connection limit reached; closing a new connection"
            );
            drop(stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        // HTTP/1.1 only: protocol detection would wait for a first byte with no timeout, so a
        // connection that never sends one would never be closed (and h2 without TLS has no
        // clients here).
        let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        let service = TowerToHyperService::new(app.clone());
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open at shutdown");
    }
}
