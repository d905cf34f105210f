//! The real `billing-coordinator` binary, started on a free port for a test
//! that drives it from outside (the end-to-end run, the README walkthrough).

// Every test binary compiles this module but uses only part of it.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    process::{Child, Command},
    sync::oneshot,
};

/// How long the service may take to bind, migrate and answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running service; killed when dropped.
pub struct Service {
    child: Child,
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    /// Its log, JSON lines.
    pub log: PathBuf,
}

impl Service {
    /// Starts `serve --migrate` on `127.0.0.1:0` against `database_url`, with
    /// `extra` flags, and waits until it is ready. Its log goes to `log`.
    pub async fn start(database_url: &str, log: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_billing-coordinator"))
            .args(["serve", "--migrate", "--listen-addr", "127.0.0.1:0"])
            .args(["--metrics-addr", "off", "--log-format", "json"])
            .args(extra)
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting billing-coordinator")?;
        // The port is read from the service's own "serving" line, so there
        // is no window in which another process could take it.
        let stderr = child.stderr.take().context("the service's stderr")?;
        let mut file = tokio::fs::File::create(log)
            .await
            .with_context(|| format!("creating {}", log.display()))?;
        let (addr_tx, addr_rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut addr_tx = Some(addr_tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = file.write_all(format!("{line}\n").as_bytes()).await;
                if let Some(addr) = serving_addr(&line)
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = match tokio::time::timeout(START_TIMEOUT, addr_rx).await {
            Ok(Ok(addr)) => addr,
            _ => bail!(
                "billing-coordinator did not start serving; its log is {}",
                log.display()
            ),
        };
        let service = Self {
            child,
            addr,
            log: log.to_owned(),
        };
        service.wait_ready().await?;
        Ok(service)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the coordinator answers a call that reads the database.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        use billing_coordinator::proto::{
            GetQueueStatsRequest, coordinator_service_client::CoordinatorServiceClient,
        };
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if let Ok(mut client) = CoordinatorServiceClient::connect(self.url()).await
                && client
                    .get_queue_stats(GetQueueStatsRequest::default())
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("billing-coordinator at {} never became ready", self.addr)
    }

    /// SIGTERM, then waits for the drain; SIGKILL if it takes over 30 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            signal(pid, "TERM")?;
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        Ok(())
    }
}

fn serving_addr(line: &str) -> Option<SocketAddr> {
    let entry: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = entry.get("fields")?;
    if fields.get("message")?.as_str()? != "serving billing.coordinator.v1" {
        return None;
    }
    fields.get("addr")?.as_str()?.parse().ok()
}

/// Sends `SIG<name>` to `pid` with kill(1).
pub fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}
