//! The `billing-coordinator` binary: parse configuration, start telemetry,
//! then `serve` or `migrate`.

use anyhow::Context;
use billing_coordinator::{
    config::{Cli, Command},
    startup::{Application, Settings},
    store::Store,
    telemetry,
};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Migrate(args) => {
            let pool = args.database.validate()?;
            let _telemetry = telemetry::init(args.database.log_format)?;
            Store::connect_lazy(&args.database.database_url, &pool)?
                .migrate()
                .await
                .context("applying migrations")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Serve(args) => {
            let pool = args.database.validate()?;
            let coordinator = args.validate()?;
            let _telemetry = telemetry::init(args.database.log_format)?;
            if let Some(addr) = args.metrics_addr.0 {
                telemetry::serve_metrics(addr)?;
            }
            let settings = Settings {
                database_url: args.database.database_url.clone(),
                pool,
                listen_addr: args.listen_addr,
                migrate: args.migrate,
                coordinator,
                rescue_interval: (!args.rescue_interval.is_zero()).then_some(args.rescue_interval),
                audit_retention: (!args.audit_retention.is_zero()).then_some(args.audit_retention),
                health_interval: args.health_interval,
                shutdown_grace: args.shutdown_grace,
            };
            Application::build(settings)
                .await?
                .run_until(shutdown_signal())
                .await
        }
    }
}

/// Completes on SIGTERM (what Kubernetes sends) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
