//! Client toolchains for tests that drive the service from other languages:
//! a fresh Python virtualenv, the Node client's locked dependencies.

// Every test binary compiles this module but uses only part of it.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Runs `cmd` to completion; on failure, the error holds its output.
pub fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot run {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Creates a brand-new virtualenv at `dir` (removing what was there) and
/// pip-installs `requirements` into it. Returns its `bin` directory.
pub fn python_venv(dir: &Path, requirements: &[&str]) -> anyhow::Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    run(
        Command::new("python3").arg("-m").arg("venv").arg(dir),
        "creating a Python virtualenv (python3 -m venv)",
    )?;
    let bin = dir.join("bin");
    run(
        Command::new(bin.join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(requirements),
        &format!("pip install {}", requirements.join(" ")),
    )?;
    Ok(bin)
}

/// `npm ci` in `dir`: exactly the locked dependencies, installed afresh.
pub fn npm_ci(dir: &Path) -> anyhow::Result<()> {
    run(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(dir),
        &format!("npm ci in {}", dir.display()),
    )
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
