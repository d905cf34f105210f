//! Command line and environment configuration, validated at start.
//!
//! Every flag can also be set through the environment variable named in its
//! help, which is how the Helm chart and most deployments configure it.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    coordinator::CoordinatorConfig,
    lease::Backoff,
    store::{FUNNEL_CONNECTIONS, PoolSettings},
};

/// Default gRPC listen address.
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:50051";
/// Default Prometheus listen address.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9090";
/// Default pool size: a few connections per core serve many claims, because
/// each claim holds a connection only for one short statement.
pub const DEFAULT_DB_MAX_CONNECTIONS: u32 = 16;
/// Default lease bounds and default lease.
pub const DEFAULT_LEASE_MIN: &str = "1s";
/// See [`DEFAULT_LEASE_MIN`].
pub const DEFAULT_LEASE: &str = "30s";
/// See [`DEFAULT_LEASE_MIN`].
pub const DEFAULT_LEASE_MAX: &str = "1h";
/// Default long-poll bound (SQS allows 20 s; gRPC clients handle longer).
pub const DEFAULT_LONG_POLL_MAX: &str = "30s";
/// Default attempt budget.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;

/// billing-coordinator: fenced, expiring leases on invoices for billing workers.
#[derive(Debug, Parser)]
#[command(name = "billing-coordinator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The binary's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API.
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate(MigrateArgs),
}

/// How to log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Settings shared by every subcommand.
#[derive(Clone, Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user:pass@host:5432/billing.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Most database connections.
    #[arg(long, env = "BC_DB_MAX_CONNECTIONS", default_value_t = DEFAULT_DB_MAX_CONNECTIONS)]
    pub db_max_connections: u32,
    /// How long a call waits for a database connection before UNAVAILABLE.
    #[arg(long, env = "BC_DB_ACQUIRE_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub db_acquire_timeout: Duration,
    /// How often a sweep looks for pending invoices behind the claim
    /// cursors, and the rescuer reads its index from the front: about the
    /// longest an invoice made claimable behind the service's back (by SQL of
    /// your own) can wait.
    #[arg(long, env = "BC_FULL_SCAN_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub full_scan_interval: Duration,
    /// Log format.
    #[arg(long, env = "BC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `billing-coordinator migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Database settings.
    #[command(flatten)]
    pub database: DatabaseArgs,
}

/// `billing-coordinator serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Database settings.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Address the gRPC server listens on.
    #[arg(long, env = "BC_LISTEN_ADDR", default_value = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: SocketAddr,
    /// Address of the Prometheus /metrics endpoint, or "off".
    #[arg(long, env = "BC_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR, value_parser = parse_optional_addr)]
    pub metrics_addr: OptionalAddr,
    /// Apply migrations before serving (safe with many replicas starting at once).
    #[arg(long, env = "BC_MIGRATE", default_value_t = false)]
    pub migrate: bool,
    /// Shortest lease a worker may ask for.
    #[arg(long, env = "BC_LEASE_MIN", default_value = DEFAULT_LEASE_MIN, value_parser = humantime::parse_duration)]
    pub lease_min: Duration,
    /// Lease a worker gets when it does not ask for one.
    #[arg(long, env = "BC_LEASE_DEFAULT", default_value = DEFAULT_LEASE, value_parser = humantime::parse_duration)]
    pub lease_default: Duration,
    /// Longest lease a worker may ask for.
    #[arg(long, env = "BC_LEASE_MAX", default_value = DEFAULT_LEASE_MAX, value_parser = humantime::parse_duration)]
    pub lease_max: Duration,
    /// Longest a claim may long-poll for work.
    #[arg(long, env = "BC_LONG_POLL_MAX", default_value = DEFAULT_LONG_POLL_MAX, value_parser = humantime::parse_duration)]
    pub long_poll_max: Duration,
    /// No lease is extended past its claim time plus this (a hung worker whose
    /// heartbeat still runs cannot hold an invoice forever).
    #[arg(long, env = "BC_MAX_HOLD", default_value = "4h", value_parser = humantime::parse_duration)]
    pub max_hold: Duration,
    /// Delay after a first failed attempt; doubled after each next one, with jitter.
    #[arg(long, env = "BC_BACKOFF_BASE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub backoff_base: Duration,
    /// Longest delay between attempts.
    #[arg(long, env = "BC_BACKOFF_MAX", default_value = "1h", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
    /// How long audit events are kept ("0s" keeps them forever).
    #[arg(long, env = "BC_AUDIT_RETENTION", default_value = "90days", value_parser = humantime::parse_duration)]
    pub audit_retention: Duration,
    /// Attempt budget of invoices submitted without one.
    #[arg(long, env = "BC_DEFAULT_MAX_ATTEMPTS", default_value_t = DEFAULT_MAX_ATTEMPTS)]
    pub default_max_attempts: i32,
    /// How often expired leases are taken back ("0s" turns this replica's rescuer off).
    #[arg(long, env = "BC_RESCUE_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub rescue_interval: Duration,
    /// How often readiness checks the database.
    #[arg(long, env = "BC_HEALTH_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,
    /// How long SIGTERM waits for in-flight calls before giving up on them.
    #[arg(long, env = "BC_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// A listen address that can be turned off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

fn parse_optional_addr(value: &str) -> Result<OptionalAddr, String> {
    match value {
        "" | "off" => Ok(OptionalAddr(None)),
        addr => addr
            .parse()
            .map(|a| OptionalAddr(Some(a)))
            .map_err(|e| format!("{e} (give host:port, or \"off\")")),
    }
}

/// A setting that cannot work, named as its flag.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting --{setting}: {problem}")]
pub struct ConfigError {
    /// The flag's name.
    pub setting: &'static str,
    /// What is wrong.
    pub problem: String,
}

fn invalid(setting: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        problem: problem.into(),
    }
}

impl DatabaseArgs {
    /// Checks the settings and returns the pool's.
    pub fn validate(&self) -> Result<PoolSettings, ConfigError> {
        if !(self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database-url",
                "must start with postgres:// or postgresql://",
            ));
        }
        if self.db_max_connections == 0 {
            return Err(invalid("db-max-connections", "must be at least 1"));
        }
        if self.db_acquire_timeout.is_zero() {
            return Err(invalid("db-acquire-timeout", "must be more than zero"));
        }
        if self.full_scan_interval.is_zero() || self.full_scan_interval > Duration::from_secs(3600)
        {
            return Err(invalid(
                "full-scan-interval",
                "must be more than zero and at most 1h",
            ));
        }
        Ok(PoolSettings {
            max_connections: self.db_max_connections,
            acquire_timeout: self.db_acquire_timeout,
            full_scan_interval: self.full_scan_interval,
            funnel_connections: FUNNEL_CONNECTIONS,
        })
    }
}

impl ServeArgs {
    /// Checks the settings against each other and returns the coordinator's.
    pub fn validate(&self) -> Result<CoordinatorConfig, ConfigError> {
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        if self.lease_min.is_zero() {
            return Err(invalid("lease-min", "must be more than zero"));
        }
        if self.lease_max < self.lease_min {
            return Err(invalid(
                "lease-max",
                format!(
                    "{} is shorter than --lease-min {}",
                    fmt(self.lease_max),
                    fmt(self.lease_min)
                ),
            ));
        }
        if self.lease_default < self.lease_min || self.lease_default > self.lease_max {
            return Err(invalid(
                "lease-default",
                format!(
                    "{} is outside --lease-min {} .. --lease-max {}",
                    fmt(self.lease_default),
                    fmt(self.lease_min),
                    fmt(self.lease_max)
                ),
            ));
        }
        if self.max_hold < self.lease_min {
            return Err(invalid(
                "max-hold",
                format!(
                    "{} is shorter than --lease-min {}",
                    fmt(self.max_hold),
                    fmt(self.lease_min)
                ),
            ));
        }
        if self.backoff_base.is_zero() {
            return Err(invalid("backoff-base", "must be more than zero"));
        }
        if self.backoff_max < self.backoff_base {
            return Err(invalid(
                "backoff-max",
                format!(
                    "{} is shorter than --backoff-base {}",
                    fmt(self.backoff_max),
                    fmt(self.backoff_base)
                ),
            ));
        }
        if self.long_poll_max > Duration::from_secs(300) {
            return Err(invalid("long-poll-max", "must be at most 5m"));
        }
        if !(1..=100).contains(&self.default_max_attempts) {
            return Err(invalid("default-max-attempts", "must be between 1 and 100"));
        }
        if self.health_interval.is_zero() {
            return Err(invalid("health-interval", "must be more than zero"));
        }
        Ok(CoordinatorConfig {
            lease_min: self.lease_min,
            lease_default: self.lease_default,
            lease_max: self.lease_max,
            max_hold: self.max_hold,
            long_poll_max: self.long_poll_max,
            default_max_attempts: self.default_max_attempts,
            backoff: Backoff {
                base: self.backoff_base,
                max: self.backoff_max,
            },
            poll_interval: Duration::from_secs(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn serve(args: &[&str]) -> ServeArgs {
        let mut argv = vec![
            "billing-coordinator",
            "serve",
            "--database-url",
            "postgres://x/y",
        ];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("arguments parse").command {
            Command::Serve(args) => *args,
            Command::Migrate(_) => unreachable!("parsed serve"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let args = serve(&[]);
        assert!(args.validate().is_ok());
        assert!(args.database.validate().is_ok());
        assert_eq!(
            args.metrics_addr,
            OptionalAddr(Some(DEFAULT_METRICS_ADDR.parse().unwrap()))
        );
    }

    #[test]
    fn metrics_can_be_turned_off() {
        assert_eq!(
            serve(&["--metrics-addr", "off"]).metrics_addr,
            OptionalAddr(None)
        );
    }

    #[test]
    fn a_default_lease_outside_the_bounds_is_named() {
        let error = serve(&["--lease-default", "2h"]).validate().unwrap_err();
        assert_eq!(error.setting, "lease-default");
        let error = serve(&["--lease-min", "10s", "--lease-max", "5s"])
            .validate()
            .unwrap_err();
        assert_eq!(error.setting, "lease-max");
        let error = serve(&["--backoff-base", "2h"]).validate().unwrap_err();
        assert_eq!(error.setting, "backoff-max");
    }

    #[test]
    fn a_database_url_that_is_not_postgres_is_named() {
        let mut args = serve(&[]);
        args.database.database_url = "mysql://x".into();
        assert_eq!(
            args.database.validate().unwrap_err().setting,
            "database-url"
        );
    }
}
