//! Claims read each lane from where the previous claim stopped. These tests
//! prove that nothing claimable is left behind by that: invoices that become
//! claimable before a cursor, on this replica or another, are still found.

use std::time::Duration;

use billing_coordinator::{proto::ClaimedInvoice, rescuer::Rescuer, sweeper::CursorSweeper};

use crate::{
    helpers::{
        TEST_BACKOFF, TestApp, claim_request, duration, id_of, invoice, invoices_in_queues,
        spawn_app, spawn_with_settings, test_settings,
    },
    support::postgres::PgServer,
};

fn an_hour_ago() -> prost_types::Timestamp {
    let secs = chrono::Utc::now().timestamp() - 3600;
    prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    }
}

/// Two replicas of the service on one database.
async fn two_replicas() -> (TestApp, TestApp) {
    let url = PgServer::shared()
        .create_database()
        .await
        .expect("a fresh database");
    let a = spawn_with_settings(test_settings(url.clone())).await;
    let b = spawn_with_settings(test_settings(url)).await;
    (a, b)
}

async fn claim_one(app: &TestApp) -> ClaimedInvoice {
    let mut claimed = app.claim("w", 1).await;
    assert_eq!(claimed.len(), 1, "one invoice claimed");
    claimed.remove(0)
}

#[tokio::test]
async fn an_invoice_due_before_those_already_claimed_is_claimed_next() {
    let app = spawn_app().await;
    app.submit_many("now", 20).await;
    assert_eq!(app.claim("w", 10).await.len(), 10);

    let mut overdue = invoice("overdue");
    overdue.available_at = Some(an_hour_ago());
    let ids = app.submit(vec![overdue]).await;

    assert_eq!(id_of(&claim_one(&app).await), ids[0]);
}

#[tokio::test]
async fn an_invoice_of_a_higher_priority_is_claimed_before_the_lane_being_drained() {
    let app = spawn_app().await;
    let mut later = Vec::new();
    for i in 0..20 {
        let mut inv = invoice(&format!("low-{i}"));
        inv.priority = 5;
        later.push(inv);
    }
    app.submit(later).await;
    assert_eq!(app.claim("w", 5).await.len(), 5);

    let ids = app.submit(vec![invoice("urgent")]).await;
    assert_eq!(id_of(&claim_one(&app).await), ids[0]);
}

#[tokio::test]
async fn an_invoice_submitted_on_another_replica_behind_this_replicas_cursor_is_claimed() {
    let (a, b) = two_replicas().await;
    a.submit_many("now", 20).await;
    assert_eq!(a.claim("w", 10).await.len(), 10);

    let mut overdue = invoice("overdue");
    overdue.available_at = Some(an_hour_ago());
    let ids = b.submit(vec![overdue]).await;
    // The other replica hears of it through a notification, which arrives
    // within milliseconds; give it ample time on a busy machine.
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(id_of(&claim_one(&a).await), ids[0]);
}

#[tokio::test]
async fn an_invoice_released_on_another_replica_is_claimed_again() {
    let (a, b) = two_replicas().await;
    let ids = a.submit_many("inv", 20).await;
    let first = a.claim("w", 10).await;
    assert_eq!(id_of(&first[0]), ids[0]);

    // Released for shutdown: claimable again at once.
    b.client
        .clone()
        .release_claim(billing_coordinator::proto::ReleaseClaimRequest {
            invoice_id: ids[0],
            lease_token: first[0].lease_token.clone(),
            reason: billing_coordinator::proto::ReleaseReason::Shutdown as i32,
            error: String::new(),
            retry_after: None,
        })
        .await
        .expect("release succeeds");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let again = a.claim("w", 11).await;
    let again: Vec<i64> = again.iter().map(id_of).collect();
    assert!(
        again.contains(&ids[0]),
        "released invoice claimed: {again:?}"
    );
}

#[tokio::test]
async fn a_claim_finds_a_queue_that_appeared_after_the_queues_were_known() {
    let app = spawn_app().await;
    let mut first = invoice("a-1");
    first.queue = "a".into();
    app.submit(vec![first]).await;
    assert_eq!(app.claim("w", 10).await.len(), 1);

    let mut second = invoice("b-1");
    second.queue = "b".into();
    let ids = app.submit(vec![second]).await;
    assert_eq!(id_of(&claim_one(&app).await), ids[0]);
}

#[tokio::test]
async fn a_lease_that_expires_between_rescue_passes_is_taken_back_by_the_next() {
    let app = spawn_app().await;
    let ids = app.submit(vec![invoice("inv")]).await;
    let mut request = claim_request("dying", 1);
    request.lease_duration = Some(duration(Duration::from_secs(1)));
    assert_eq!(app.try_claim(request).await.unwrap().len(), 1);

    let rescuer = Rescuer::new(app.store.clone(), TEST_BACKOFF);
    assert_eq!(rescuer.run_once(None).await.unwrap().returned, 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rescuer.run_once(None).await.unwrap().returned, 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(id_of(&claim_one(&app).await), ids[0]);
}

#[tokio::test]
async fn the_sweep_finds_an_invoice_put_behind_the_cursor_by_hand() {
    let app = spawn_app().await;
    let ids = app.submit_many("inv", 20).await;
    assert_eq!(app.claim("w", 10).await.len(), 10);

    // Inserted with SQL of an operator's own, so nobody is told about it.
    let hidden: i64 = sqlx::query_scalar(
        "INSERT INTO invoices (external_id, queue, customer_id, amount_minor, currency,
                               priority, available_at, max_attempts)
         SELECT 'by-hand', queue, customer_id, amount_minor, currency, priority,
                available_at - interval '1 hour', max_attempts
         FROM invoices WHERE id = $1
         RETURNING id",
    )
    .bind(ids[0])
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_ne!(
        id_of(&claim_one(&app).await),
        hidden,
        "claims read on from the cursor"
    );

    let moved = CursorSweeper::new(app.store.clone())
        .run_once()
        .await
        .unwrap();
    assert_eq!(moved, 1);
    assert_eq!(id_of(&claim_one(&app).await), hidden);
}

#[tokio::test]
async fn a_claim_naming_its_queue_finds_invoices_another_replica_submitted_to_it() {
    let (a, b) = two_replicas().await;
    let mut request = claim_request("w", 1);
    request.queues = vec!["eu".into()];
    // The replica now knows the queues with pending invoices: none.
    assert!(a.try_claim(request.clone()).await.unwrap().is_empty());

    let mut new = invoice("eu-1");
    new.queue = "eu".into();
    let ids = b.submit(vec![new]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let claimed = a.try_claim(request).await.unwrap();
    assert_eq!(claimed.iter().map(id_of).collect::<Vec<_>>(), ids);
}

#[tokio::test]
async fn a_claim_naming_queues_shares_by_weights_set_on_another_replica() {
    let (a, b) = two_replicas().await;
    let invoices = invoices_in_queues(400, &["gold", "basic"]);
    a.submit(invoices).await;
    let mut request = claim_request("w", 4);
    request.queues = vec!["gold".into(), "basic".into()];
    // Read while both weigh the same.
    assert_eq!(a.try_claim(request.clone()).await.unwrap().len(), 4);

    b.configure_queue("gold", Some(3), None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    request.max_count = 100;
    let claimed = a.try_claim(request).await.unwrap();

    let gold = claimed
        .iter()
        .filter(|c| c.invoice.as_ref().unwrap().queue == "gold")
        .count();
    assert_eq!((gold, claimed.len() - gold), (75, 25));
}
