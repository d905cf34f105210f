//! A real PostgreSQL server for integration tests.
//!
//! [`PgServer::shared`] finds a server (from `BC_TEST_DATABASE_URL`, or one
//! listening on 127.0.0.1:5432) or starts a private throwaway cluster, and
//! [`PgServer::create_database`] hands each test a brand-new database, so no
//! test depends on what an earlier run left behind. [`PgServer::start_private`]
//! always starts a cluster of its own, which a chaos test can crash and restart.
//!
//! Private clusters live in a fresh directory under the system temp dir and are
//! removed on drop; a detached watchdog process also removes them when the test
//! process dies without running destructors (statics are never dropped).

// Every test binary compiles this module but uses only part of it.
#![allow(dead_code)]

use std::fs;
use std::future::Future;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use sqlx::{Connection as _, PgConnection};

/// Where an ordinary developer machine or CI runner has PostgreSQL.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long the probe of [`DEFAULT_URL`] may take before we start our own.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a started cluster may take to accept TCP connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on `create_database`, so a wedged server fails the test instead of hanging it.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// The superuser that initdb creates and that runs the server when we are root.
const PG_USER: &str = "postgres";

/// Stops a private cluster when the test process is gone.
///
/// `$1` parent pid, `$2` pg_ctl, `$3` data dir, `$4` dir to remove, `$5` user to
/// run pg_ctl as (empty: as ourselves). A zombie still answers `kill -0`, so
/// the state in /proc is checked too, in case our parent is slow to reap us.
const WATCHDOG_SCRIPT: &str = r#"
while kill -0 "$1" 2>/dev/null; do
  if s=$(cat "/proc/$1/stat" 2>/dev/null); then
    case "${s##*) }" in Z*) break ;; esac
  fi
  sleep 1
done
if [ -n "$5" ]; then
  runuser -u "$5" -- "$2" stop -D "$3" -m immediate
else
  "$2" stop -D "$3" -m immediate
fi >/dev/null 2>&1
rm -rf "$4"
"#;

/// A PostgreSQL server tests can create databases on.
pub struct PgServer {
    /// The URL `admin_url` returns.
    admin: String,
    /// Scheme and authority, e.g. `postgres://postgres@127.0.0.1:5432`.
    base: String,
    /// The admin URL's query string including its `?`, or empty.
    query: String,
    /// Set when this value owns the server process.
    private: Option<PrivateCluster>,
}

impl PgServer {
    /// The process-wide server for ordinary tests, found or started once.
    ///
    /// Order: (1) `BC_TEST_DATABASE_URL` if set (an admin URL such as
    /// `postgres://postgres@127.0.0.1:5432/postgres`), used as is; (2) unless
    /// `BC_TEST_PG=private`, a server at `postgres://postgres@127.0.0.1:5432/postgres`
    /// if it accepts a connection within 2 s; (3) a private cluster, stopped and
    /// removed when the process exits.
    ///
    /// Safe to call from many `#[tokio::test]`s at once, each on its own
    /// runtime: the search runs once, on its own thread and runtime, and nothing
    /// runtime-bound (such as a pool) is kept. Panics if no server can be had,
    /// which fails the calling test with the reason.
    pub fn shared() -> &'static PgServer {
        // The error is kept too, so later callers fail at once with the same
        // reason instead of each trying (and waiting for) a doomed start again.
        static SHARED: OnceLock<Result<PgServer, String>> = OnceLock::new();
        let server = SHARED.get_or_init(|| {
            let (server, how) = find_or_start_shared().map_err(|e| format!("{e:#}"))?;
            eprintln!("test PostgreSQL: {how}");
            Ok(server)
        });
        match server {
            Ok(server) => server,
            Err(e) => panic!("no PostgreSQL server for tests: {e}"),
        }
    }

    /// Always starts a new private cluster.
    ///
    /// It is stopped and its directory removed when the value is dropped, and
    /// also when the process dies without dropping it (a watchdog process
    /// waits for that).
    pub fn start_private() -> anyhow::Result<PgServer> {
        let cluster = PrivateCluster::create()?;
        let base = format!("postgres://{PG_USER}@127.0.0.1:{}", cluster.port);
        Ok(PgServer {
            admin: format!("{base}/postgres"),
            base,
            query: String::new(),
            private: Some(cluster),
        })
    }

    /// A URL for the maintenance database (`…/postgres`) of this server; for
    /// a server given by `BC_TEST_DATABASE_URL`, exactly that URL.
    pub fn admin_url(&self) -> String {
        self.admin.clone()
    }

    /// URL for database `name` on this server.
    pub fn database_url(&self, name: &str) -> String {
        format!("{}/{}{}", self.base, percent_encode(name), self.query)
    }

    /// Creates a brand-new, uniquely named empty database and returns its URL.
    ///
    /// Names look like `bc_test_<pid>_<counter>_<random hex>`: the pid and
    /// counter keep concurrent tests and processes apart, the random part keeps
    /// a rerun from colliding with a database an earlier run left behind.
    pub async fn create_database(&self) -> anyhow::Result<String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "bc_test_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let admin = self.admin_url();
        // A one-off connection rather than a pool: pools belong to the runtime
        // that made them, and each test has its own.
        if self.private.is_none() {
            // Outside the timeout below: a run that follows others may have
            // a hundred databases to drop, and PostgreSQL checkpoints for
            // each, which on a busy machine took longer than the timeout.
            if let Ok(mut conn) = PgConnection::connect(&admin).await {
                drop_stale_databases(&mut conn).await;
                let _ = conn.close().await;
            }
        }
        let create = async {
            let mut conn = PgConnection::connect(&admin).await?;
            // CREATE DATABASE refuses to run in a transaction block, so it goes
            // over the simple query protocol.
            sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
                .execute(&mut conn)
                .await?;
            conn.close().await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(CREATE_TIMEOUT, create).await {
            Ok(created) => created,
            Err(_) => Err(anyhow!("timed out after {CREATE_TIMEOUT:?}")),
        }
        .with_context(|| format!("creating database {name} via {}", redact(&admin)))?;
        Ok(self.database_url(&name))
    }

    /// Crashes a private cluster: `pg_ctl stop -m immediate`, so the next
    /// start runs crash recovery. Errors for a server this value does not own.
    pub fn stop_immediate(&self) -> anyhow::Result<()> {
        self.owned()?.stop_immediate()
    }

    /// Starts a stopped private cluster again on the same port and data
    /// directory and waits until it accepts connections. Errors for a server
    /// this value does not own.
    pub fn start(&self) -> anyhow::Result<()> {
        self.owned()?.start()
    }

    /// [`stop_immediate`](Self::stop_immediate), then [`start`](Self::start).
    pub fn restart_immediate(&self) -> anyhow::Result<()> {
        let cluster = self.owned()?;
        cluster.stop_immediate()?;
        cluster.start()
    }

    /// A server someone else runs, reached by admin URL `url`.
    fn found(url: &str) -> anyhow::Result<PgServer> {
        let (base, query) = split_url(url)?;
        Ok(PgServer {
            admin: url.to_owned(),
            base,
            query,
            private: None,
        })
    }

    fn owned(&self) -> anyhow::Result<&PrivateCluster> {
        self.private.as_ref().ok_or_else(|| {
            anyhow!(
                "{} is not a private cluster started by these tests; it cannot be stopped or started",
                redact(&self.admin)
            )
        })
    }
}

/// Picks the shared server and says in words which one it is.
fn find_or_start_shared() -> anyhow::Result<(PgServer, String)> {
    if let Ok(url) = std::env::var("BC_TEST_DATABASE_URL")
        && !url.is_empty()
    {
        // An explicit choice: a server that is down is an error, not a reason
        // to silently test against something else.
        let server = PgServer::found(&url)?;
        probe(&url, READY_TIMEOUT)
            .with_context(|| format!("BC_TEST_DATABASE_URL={} does not answer", redact(&url)))?;
        return Ok((server, format!("{} (BC_TEST_DATABASE_URL)", redact(&url))));
    }
    let private_only = std::env::var("BC_TEST_PG").is_ok_and(|v| v == "private");
    if !private_only && probe(DEFAULT_URL, PROBE_TIMEOUT).is_ok() {
        return Ok((
            PgServer::found(DEFAULT_URL)?,
            format!("{DEFAULT_URL} (found)"),
        ));
    }
    let server = PgServer::start_private().context("starting a private PostgreSQL cluster")?;
    let how = match &server.private {
        Some(cluster) => format!(
            "{} (private cluster in {})",
            server.admin,
            cluster.root.display()
        ),
        None => server.admin.clone(),
    };
    Ok((server, how))
}

/// Drops, once per process, the test databases of earlier test processes
/// that are gone, so a shared server does not fill up run after run. Best
/// effort: a database still in use, or any error, is left for next time.
async fn drop_stale_databases(conn: &mut PgConnection) {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    let names: Vec<String> = match sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 'bc\\_test\\_%'",
    )
    .fetch_all(&mut *conn)
    .await
    {
        Ok(names) => names,
        Err(_) => return,
    };
    for name in names {
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
            continue;
        }
        let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\""))
            .execute(&mut *conn)
            .await;
    }
}

/// A cluster this process created, with everything needed to run its tools.
struct PrivateCluster {
    bindir: PathBuf,
    /// The temp dir holding everything below; removed on drop.
    root: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    port: u16,
    /// The user to run server tools as, when we are root (they refuse root).
    run_as: Option<&'static str>,
    /// Killed on drop; left running if the process dies, which is its purpose.
    watchdog: Option<Child>,
}

impl PrivateCluster {
    fn create() -> anyhow::Result<PrivateCluster> {
        let bindir = find_bindir()?;
        let owner = if current_uid()? == 0 {
            Some(user_ids(PG_USER).with_context(|| {
                format!(
                    "running as root, and initdb and postgres refuse root, so they run as user \
                     {PG_USER:?}, which has no uid here (it comes with the `postgresql` package; \
                     or run the tests as a non-root user)"
                )
            })?)
        } else {
            None
        };

        let dir = std::env::temp_dir().join(format!(
            "bc-pg-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        // create_dir (not create_dir_all) so we never reuse an existing directory.
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Absolute paths: the tools run with cwd "/", and the watchdog outlives our cwd.
        let root =
            fs::canonicalize(&dir).with_context(|| format!("resolving {}", dir.display()))?;
        let mut cluster = PrivateCluster {
            bindir,
            data: root.join("data"),
            socket_dir: root.join("sock"),
            log: root.join("server.log"),
            root,
            port: 0,
            run_as: owner.map(|_| PG_USER),
            watchdog: None,
        };
        // From here on, Drop cleans up if a later step fails.
        cluster.watchdog = Some(cluster.spawn_watchdog()?);

        fs::create_dir(&cluster.socket_dir)
            .with_context(|| format!("creating {}", cluster.socket_dir.display()))?;
        if let Some((uid, gid)) = owner {
            for dir in [&cluster.root, &cluster.socket_dir] {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                    .with_context(|| format!("giving {} to user {PG_USER}", dir.display()))?;
            }
        }

        let mut initdb = cluster.tool("initdb");
        initdb.arg("-D").arg(&cluster.data).args([
            "-A",
            "trust",
            "-U",
            PG_USER,
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        run(&mut initdb, "initdb")?;

        // Another process may grab the port between our probe and the server's
        // bind; try a few ports before giving up.
        let mut attempts = 0;
        loop {
            attempts += 1;
            cluster.port = free_port()?;
            let log_len = fs::metadata(&cluster.log).map_or(0, |m| m.len());
            let Err(e) = cluster.start() else {
                return Ok(cluster);
            };
            let port_taken = cluster.log_since(log_len).contains("already in use");
            if !port_taken || attempts == 5 {
                return Err(e);
            }
        }
    }

    /// A command running server tool `program`, as `run_as` when set.
    fn tool(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(path);
                cmd
            }
            None => Command::new(path),
        };
        // The postgres user may not be allowed into our cwd.
        cmd.current_dir("/").stdin(Stdio::null());
        cmd
    }

    fn spawn_watchdog(&self) -> anyhow::Result<Child> {
        Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("bc-pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(self.bindir.join("pg_ctl"))
            .arg(&self.data)
            .arg(&self.root)
            .arg(self.run_as.unwrap_or(""))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so a Ctrl-C aimed at the test run does
            // not kill the watchdog before it has cleaned up.
            .process_group(0)
            .spawn()
            .context("spawning the cleanup watchdog (sh)")
    }

    fn start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 \
             -c shared_buffers=128MB -c fsync=on",
            self.port,
            shell_quote(&self.socket_dir.to_string_lossy())
        );
        let mut pg_ctl = self.tool("pg_ctl");
        pg_ctl
            .args(["start", "-w", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .arg("-o")
            .arg(options);
        run(&mut pg_ctl, "pg_ctl start")
            .and_then(|_| {
                wait_until_ready(format!(
                    "postgres://{PG_USER}@127.0.0.1:{}/postgres",
                    self.port
                ))
            })
            .map_err(|e| {
                anyhow!(
                    "{e:#}\n--- tail of {} ---\n{}",
                    self.log.display(),
                    self.log_tail(30)
                )
            })
            .with_context(|| {
                format!(
                    "starting PostgreSQL in {} on port {}",
                    self.data.display(),
                    self.port
                )
            })
    }

    fn stop_immediate(&self) -> anyhow::Result<()> {
        let mut pg_ctl = self.tool("pg_ctl");
        pg_ctl
            .args(["stop", "-w", "-m", "immediate", "-D"])
            .arg(&self.data);
        run(&mut pg_ctl, "pg_ctl stop -m immediate")?;
        Ok(())
    }

    fn log_tail(&self, lines: usize) -> String {
        match fs::read_to_string(&self.log) {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(cannot read the log: {e})"),
        }
    }

    /// The log written since it was `offset` bytes long.
    fn log_since(&self, offset: u64) -> String {
        let text = fs::read(&self.log).unwrap_or_default();
        let from = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(text.len());
        String::from_utf8_lossy(&text[from..]).into_owned()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        // Best effort: the server may already be down (a chaos test stopped
        // it, or it never started), and a panic in drop would abort.
        if self.data.join("postmaster.pid").exists() {
            let _ = self
                .tool("pg_ctl")
                .args(["stop", "-w", "-m", "immediate", "-D"])
                .arg(&self.data)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Runs `cmd` to completion; an error carries its exit status and output.
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<Output> {
    let output = cmd
        .output()
        .with_context(|| format!("running {what} ({cmd:?})"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// The directory with `initdb`, `pg_ctl` and `postgres`: `pg_config --bindir`
/// if that has them (a client-only pg_config may point elsewhere), else the
/// newest version under /usr/lib/postgresql.
fn find_bindir() -> anyhow::Result<PathBuf> {
    let has_server = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    let newest = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: Vec<u32> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .max();
    match newest {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no PostgreSQL server binaries found (tried `pg_config --bindir` and \
             /usr/lib/postgresql/*/bin); install them with `apt-get install -y postgresql`, \
             or point BC_TEST_DATABASE_URL at a server"
        ),
    }
}

fn current_uid() -> anyhow::Result<u32> {
    id_number(&["-u"])
}

/// The uid and gid of `user`.
fn user_ids(user: &str) -> anyhow::Result<(u32, u32)> {
    Ok((id_number(&["-u", user])?, id_number(&["-g", user])?))
}

fn id_number(args: &[&str]) -> anyhow::Result<u32> {
    let out = run(
        Command::new("id").args(args),
        &format!("id {}", args.join(" ")),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("parsing `id` output {text:?}"))
}

/// A TCP port nobody listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("finding a free port")?;
    Ok(listener.local_addr().context("finding a free port")?.port())
}

/// Connects to `url` once, within `timeout`.
fn probe(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let url = url.to_owned();
    block_on(async move {
        let conn = tokio::time::timeout(timeout, PgConnection::connect(&url))
            .await
            .map_err(|_| anyhow!("no answer within {timeout:?}"))??;
        let _ = conn.close().await;
        Ok(())
    })
}

/// Waits until `url` accepts a connection: `pg_ctl -w` only watches the pid
/// file, which does not prove that TCP on our address works.
fn wait_until_ready(url: String) -> anyhow::Result<()> {
    block_on(async move {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let error =
                match tokio::time::timeout(Duration::from_secs(2), PgConnection::connect(&url))
                    .await
                {
                    Ok(Ok(conn)) => {
                        let _ = conn.close().await;
                        return Ok(());
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "connect timed out".to_owned(),
                };
            if Instant::now() >= deadline {
                bail!("{url} not accepting connections after {READY_TIMEOUT:?}: {error}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Runs `fut` to completion on a fresh runtime in a new thread.
///
/// The callers are sync and may themselves be inside a runtime (a
/// `#[tokio::test]`), where blocking on a nested runtime would panic.
fn block_on<T: Send + 'static>(
    fut: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a tokio runtime")?
            .block_on(fut)
    })
    .join()
    .map_err(|_| anyhow!("helper thread panicked"))?
}

/// Splits a `postgres://` URL into scheme plus authority and its `?query`.
fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| anyhow!("{} is not a postgres:// URL", redact(url)))?;
    let authority_start = url.len() - rest.len();
    let (main, query) = url.split_at(url.find('?').unwrap_or(url.len()));
    let base = match main[authority_start..].find('/') {
        Some(slash) => &main[..authority_start + slash],
        None => main,
    };
    Ok((base.to_owned(), query.to_owned()))
}

/// `url` with any password replaced, fit for messages.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    match authority.rfind('@') {
        Some(at) => match authority[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end],
                &authority[..colon],
                &url[scheme_end + at..]
            ),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Percent-encodes everything in a URL path segment but unreserved characters.
fn percent_encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Quotes `s` for `sh`, which pg_ctl passes its `-o` options through.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
