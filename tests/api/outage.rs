//! A database outage under load: readiness drops, calls fail fast with
//! UNAVAILABLE, and everything recovers when PostgreSQL returns, without
//! restarting the service.
//!
//! The bounds asserted here are loose (a broken drop or recovery takes tens
//! of seconds: TCP timeouts, a pool that never reconnects); the measured
//! times are printed, and the chaos run reports them under load.

use std::time::{Duration, Instant};

use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::{
    helpers::{TestApp, claim_request, invoice, spawn_with_settings, test_settings},
    support::postgres::PgServer,
};

const SERVICE: &str = "billing.coordinator.v1.CoordinatorService";
const BOUND: Duration = Duration::from_secs(6);

async fn readiness(app: &TestApp) -> Option<ServingStatus> {
    let answer = app
        .health
        .clone()
        .check(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(answer.into_inner().status).ok()
}

/// How long until readiness is `want`, polling every 20 ms, up to `BOUND`.
async fn time_until(app: &TestApp, want: ServingStatus) -> Duration {
    let started = Instant::now();
    while started.elapsed() < BOUND {
        if readiness(app).await == Some(want) {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("readiness did not become {want:?} within {BOUND:?}");
}

#[tokio::test]
async fn a_database_outage_turns_readiness_off_fails_calls_fast_and_recovers_by_itself() {
    let pg = PgServer::start_private().expect("a private cluster");
    let url = pg.create_database().await.expect("a database");
    let mut settings = test_settings(url);
    settings.pool.acquire_timeout = Duration::from_secs(1);
    let app = spawn_with_settings(settings).await;
    time_until(&app, ServingStatus::Serving).await;
    app.submit_many("inv", 50).await;
    assert_eq!(app.claim("w", 10).await.len(), 10);

    pg.stop_immediate().expect("PostgreSQL stops");
    let went_down = time_until(&app, ServingStatus::NotServing).await;
    assert_eq!(
        readiness_of_server(&app).await,
        ServingStatus::Serving,
        "liveness stays"
    );
    for _ in 0..3 {
        let started = Instant::now();
        let status = app.try_claim(claim_request("w", 10)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(started.elapsed() < BOUND, "answered, not hung");
    }
    let status = app
        .client
        .clone()
        .submit_invoices(billing_coordinator::proto::SubmitInvoicesRequest {
            invoices: vec![invoice("during-outage")],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    pg.start().expect("PostgreSQL starts again");
    let came_back = time_until(&app, ServingStatus::Serving).await;
    let claimed = app.claim("w", 100).await;
    assert_eq!(
        claimed.len(),
        40,
        "the rest of the pending set, nothing lost"
    );
    app.complete(&claimed[0])
        .await
        .expect("completions work again");
    eprintln!("outage: NOT_SERVING after {went_down:?}, SERVING {came_back:?} after restart");
}

async fn readiness_of_server(app: &TestApp) -> ServingStatus {
    let answer = app
        .health
        .clone()
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("liveness answers")
        .into_inner();
    ServingStatus::try_from(answer.status).expect("a known status")
}
