//! Health, draining, and migrations.

use std::time::Duration;

use billing_coordinator::{proto::InvoiceState, store::Store};
use sqlx::postgres::PgPoolOptions;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::{
    helpers::{claim_request, duration, invoice, spawn_app, spawn_with_settings, test_settings},
    support::postgres::PgServer,
};

const SERVICE: &str = "billing.coordinator.v1.CoordinatorService";

async fn status_of(app: &crate::helpers::TestApp, service: &str) -> ServingStatus {
    let answer = app
        .health
        .clone()
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner();
    ServingStatus::try_from(answer.status).expect("a known status")
}

async fn eventually(app: &crate::helpers::TestApp, service: &str, want: ServingStatus) {
    for _ in 0..100 {
        if status_of(app, service).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{service:?} never became {want:?}");
}

#[tokio::test]
async fn the_server_and_the_coordinator_report_serving_when_the_database_answers() {
    let app = spawn_app().await;
    eventually(&app, SERVICE, ServingStatus::Serving).await;
    assert_eq!(status_of(&app, "").await, ServingStatus::Serving);
}

#[tokio::test]
async fn without_a_database_the_coordinator_is_not_serving_but_the_server_is_alive() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut settings = test_settings(format!("postgres://postgres@127.0.0.1:{port}/none"));
    settings.migrate = false;
    settings.pool.acquire_timeout = Duration::from_millis(500);
    let app = spawn_with_settings(settings).await;

    assert_eq!(status_of(&app, "").await, ServingStatus::Serving);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status_of(&app, SERVICE).await, ServingStatus::NotServing);
    let status = app.try_claim(claim_request("w", 1)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn shutdown_ends_waiting_long_polls_and_finishes_in_flight_calls() {
    let mut app = spawn_app().await;
    let mut request = claim_request("w", 1);
    request.wait = Some(duration(Duration::from_secs(25)));
    let mut client = app.client.clone();
    let waiting = tokio::spawn(async move { client.claim_invoices(request).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = std::time::Instant::now();
    let server = app.begin_shutdown();
    let answer = waiting
        .await
        .unwrap()
        .expect("the long-poll is answered, not cut off");

    assert!(answer.into_inner().invoices.is_empty());
    server.await.unwrap().expect("the server drains cleanly");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "did not wait out the long-poll"
    );
}

#[tokio::test]
async fn migrations_are_safe_when_many_replicas_start_at_once() {
    let url = PgServer::shared().create_database().await.unwrap();
    let migrations = (0..4).map(|_| {
        let url = url.clone();
        async move {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await?;
            Store::from_pool(pool)
                .migrate()
                .await
                .map_err(anyhow::Error::from)
        }
    });
    for result in futures::future::join_all(migrations).await {
        result.expect("every concurrent migration succeeds");
    }

    let app = spawn_with_settings(test_settings(url)).await;
    let ids = app.submit(vec![invoice("inv-1")]).await;
    assert_eq!(
        crate::helpers::state(&app.get(ids[0]).await),
        InvoiceState::Pending
    );
}

/// The funnels keep a connection between statements, and a pooled
/// connection normally goes back to its pool in a task of its own: a store
/// that outlives its runtime (as in tests that build one per case) must
/// close such a connection instead of panicking for want of a runtime.
#[test]
fn a_store_dropped_after_its_runtime_closes_its_kept_connections() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let app = runtime.block_on(async {
        let app = spawn_app().await;
        app.submit(vec![invoice("kept")]).await;
        let claimed = app.claim("w", 1).await;
        app.complete(&claimed[0]).await.expect("completes");
        app
    });
    drop(runtime);
    drop(app);
}
