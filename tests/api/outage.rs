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

#[tokio::test]
async fn a_connection_the_database_closed_while_it_sat_idle_is_replaced_not_used() {
    let url = PgServer::shared()
        .create_database()
        .await
        .expect("a database");
    let app = spawn_with_settings(test_settings(url)).await;
    // Concurrent calls, so that the pool holds several connections.
    let app = &app;
    let batches = (0..8).map(|i| async move { app.submit_many(&format!("inv-{i}-"), 5).await });
    futures::future::join_all(batches).await;

    // What a restarted PostgreSQL, a pooler or a firewall does to idle
    // connections: the service's are gone, and it was not told.
    let closed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'billing-coordinator'
         ) terminated",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(closed > 2, "the service had connections open: {closed}");
    tokio::time::sleep(Duration::from_millis(700)).await;

    // One call after another, so each takes whichever connection is idle.
    for i in 0..closed {
        match app.try_claim(claim_request("w", 1)).await {
            Ok(claimed) => assert_eq!(claimed.len(), 1),
            Err(status) => panic!("call {i} got a dead connection: {status:?}"),
        }
    }
}
