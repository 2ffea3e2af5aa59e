//! A `nats-server -js` started by a test on a free port with its store in a temporary folder
//! (the relay tests and the load smoke).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use serde_json::Value;
use tempfile::TempDir;

use super::wait_until;

/// The relay's stream.
pub const STREAM: &str = "FRESHPLAN_LEADS";

/// A `nats-server -js` of this test: stopped on drop; restartable on the same port and store.
pub struct Nats {
    child: Option<Child>,
    port: u16,
    store: TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Nats {
    pub async fn start() -> Nats {
        let mut nats = Nats {
            child: None,
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
        };
        nats.spawn().await;
        nats
    }

    pub async fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed (Debian package nats-server; .ci/run installs it)");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        wait_until(
            Duration::from_secs(10),
            "nats-server accepts connections",
            || {
                let addr = addr.clone();
                async move { tokio::net::TcpStream::connect(addr).await.is_ok() }
            },
        )
        .await;
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server gracefully (SIGTERM: the store is flushed, as on a real restart).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(self.url()).await.unwrap())
    }

    /// Messages in the stream (0 while it does not exist).
    pub async fn count(&self) -> u64 {
        let Ok(client) = async_nats::connect(self.url()).await else {
            return 0;
        };
        match jetstream::new(client).get_stream(STREAM).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Every message of the stream, in stream order.
    pub async fn messages(&self) -> Vec<Msg> {
        let js = self.jetstream().await;
        let mut stream = js.get_stream(STREAM).await.unwrap();
        let info = stream.info().await.unwrap().clone();
        assert_eq!(info.state.first_sequence.max(1), 1, "nothing expired");
        let mut out = Vec::new();
        for seq in 1..=info.state.last_sequence {
            let m = stream.get_raw_message(seq).await.unwrap();
            let msg_id = m
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default();
            out.push(Msg {
                stored_micros: (m.time.unix_timestamp_nanos() / 1000) as i64,
                subject: m.subject.to_string(),
                msg_id,
                envelope: serde_json::from_slice(&m.payload).unwrap(),
            });
        }
        out
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One stream message.
pub struct Msg {
    pub subject: String,
    pub msg_id: String,
    pub envelope: Value,
    /// When JetStream stored it (µs since the epoch, server clock = this machine's).
    pub stored_micros: i64,
}
