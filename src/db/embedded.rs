//! A private PostgreSQL cluster for `serve --demo` on a machine where nothing answers on the
//! configured admin address but the server programs are installed. Runs the server as an
//! unprivileged user (PostgreSQL refuses to run as root) and stops it on drop.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use sqlx::postgres::PgConnectOptions;

/// A running private cluster; dropping it stops the server.
pub struct EmbeddedCluster {
    bin: PathBuf,
    data: PathBuf,
    uid: Option<(u32, u32)>,
}

/// True when something accepts TCP connections at the URL's host and port.
pub async fn answers(url: &str) -> bool {
    let Ok(opts) = PgConnectOptions::from_str(url) else {
        return false;
    };
    let addr = format!("{}:{}", opts.get_host(), opts.get_port());
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Finds initdb/pg_ctl under /usr/lib/postgresql/*/bin (newest version first) or on PATH.
pub fn find_server_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort_by_key(|d| {
        std::cmp::Reverse(
            d.parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
}

fn unprivileged_ids() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    for name in [c"postgres", c"nobody"] {
        // SAFETY: getpwnam reads a static record; we copy the ids out immediately.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: pw is non-null and points to a valid passwd record.
            return Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) });
        }
    }
    None
}

fn chown_all(path: &Path, ids: (u32, u32)) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::chown(c.as_ptr(), ids.0, ids.1) } != 0 {
        bail!(
            "cannot hand {} to the unprivileged server user",
            path.display()
        );
    }
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_all(&entry?.path(), ids)?;
        }
    }
    Ok(())
}

impl EmbeddedCluster {
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.uid {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Initialises (first time) and starts a cluster in `data` listening on the admin URL's
    /// port at 127.0.0.1, trust authentication for local connections only.
    pub fn start(data: &Path, admin_url: &str) -> anyhow::Result<Self> {
        let bin = find_server_bin().context(
            "nothing answers at the PostgreSQL address and the server programs are not installed: \
             install PostgreSQL (apt-get install postgresql) or set FRESHPLAN_ADMIN_DATABASE_URL \
             and DATABASE_URL to a running server",
        )?;
        let port = PgConnectOptions::from_str(admin_url)?.get_port();
        std::fs::create_dir_all(data)?;
        let data = data.canonicalize()?;
        let cluster = EmbeddedCluster {
            bin,
            data: data.clone(),
            uid: unprivileged_ids(),
        };
        if let Some(ids) = cluster.uid {
            chown_all(&data, ids)?;
        }
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
        if !data.join("PG_VERSION").exists() {
            tracing::info!(data = %data.display(), "initialising a private PostgreSQL cluster");
            let out = cluster
                .command("initdb")
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                    "-D",
                ])
                .arg(&data)
                .output()
                .context("running initdb")?;
            if !out.status.success() {
                bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let log = data.join("server.log");
        let out = cluster
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {port} -c listen_addresses=127.0.0.1 -k {}",
                data.display()
            ))
            .arg("start")
            .output()
            .context("running pg_ctl start")?;
        if !out.status.success() {
            bail!(
                "the private PostgreSQL cluster did not start (see {}): {}",
                log.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tracing::info!(port, data = %data.display(), "private PostgreSQL cluster running");
        Ok(cluster)
    }
}

impl Drop for EmbeddedCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .output();
        tracing::info!("private PostgreSQL cluster stopped");
    }
}
