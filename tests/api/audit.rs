//! "Who sent this invoice, when, and was it ever attempted twice?"

use std::time::Duration;

use billing_coordinator::{
    proto::{InvoiceEventKind as K, ListInvoiceEventsRequest},
    pruner::EventPruner,
    store::Store,
};

use crate::helpers::{assert_lease_lost, id_of, invoice, spawn_app};

#[tokio::test]
async fn the_audit_trail_tells_every_attempt_with_worker_token_and_outcome() {
    let app = spawn_app().await;
    let id = app.submit(vec![invoice("inv-1")]).await[0];
    let first = app.claim("slow-worker", 1).await.remove(0);
    app.expire_leases(&[id]).await;
    app.rescue().await;
    let second = app.claim("fast-worker", 1).await.remove(0);
    assert_lease_lost(&app.complete(&first).await.unwrap_err());
    app.complete(&second).await.unwrap();

    assert_eq!(
        app.event_kinds(id).await,
        [
            K::Submitted,
            K::Claimed,
            K::Expired,
            K::Claimed,
            K::LeaseLost,
            K::Completed
        ]
    );
    let events = app
        .client
        .clone()
        .list_invoice_events(ListInvoiceEventsRequest {
            invoice_id: id,
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        (events[1].worker_id.as_str(), events[1].attempt),
        ("slow-worker", 1)
    );
    assert_eq!(events[1].lease_token, first.lease_token);
    assert!(
        events[2].detail.contains("slow-worker"),
        "{}",
        events[2].detail
    );
    assert_eq!(
        (events[3].worker_id.as_str(), events[3].attempt),
        ("fast-worker", 2)
    );
    assert_eq!(
        events[4].lease_token, first.lease_token,
        "the refused token is named"
    );
    assert_eq!(events[5].lease_token, second.lease_token);
    assert_eq!(events[5].worker_id, "fast-worker");
    assert_eq!(id_of(&second), id);
}

#[tokio::test]
async fn releases_failures_redrives_and_cancellations_are_recorded() {
    let app = spawn_app().await;
    let mut fragile = invoice("inv-1");
    fragile.max_attempts = 1;
    let id = app.submit(vec![fragile]).await[0];
    let claimed = app.claim("w", 1).await.remove(0);
    app.release_failed(&claimed, "declined").await;
    app.client
        .clone()
        .retry_invoices(billing_coordinator::proto::RetryInvoicesRequest {
            invoice_ids: vec![id],
            ..Default::default()
        })
        .await
        .unwrap();
    app.client
        .clone()
        .cancel_invoices(billing_coordinator::proto::CancelInvoicesRequest {
            invoice_ids: vec![id],
            ..Default::default()
        })
        .await
        .unwrap();

    assert_eq!(
        app.event_kinds(id).await,
        [
            K::Submitted,
            K::Claimed,
            K::Released,
            K::Failed,
            K::Redriven,
            K::Cancelled
        ]
    );
}

#[tokio::test]
async fn the_audit_trail_pages_oldest_first() {
    let app = spawn_app().await;
    let id = app.submit(vec![invoice("inv-1")]).await[0];
    let claimed = app.claim("w", 1).await.remove(0);
    for _ in 0..3 {
        app.client
            .clone()
            .extend_lease(billing_coordinator::proto::ExtendLeaseRequest {
                invoice_id: id,
                lease_token: claimed.lease_token.clone(),
                lease_duration: None,
            })
            .await
            .unwrap();
    }

    let mut kinds = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .client
            .clone()
            .list_invoice_events(ListInvoiceEventsRequest {
                invoice_id: id,
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        kinds.extend(page.events.iter().map(|e| e.kind));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        kinds,
        [
            K::Submitted,
            K::Claimed,
            K::Extended,
            K::Extended,
            K::Extended
        ]
        .map(|k| k as i32)
    );
}

#[tokio::test]
async fn events_older_than_the_retention_are_pruned_and_newer_ones_kept() {
    let app = spawn_app().await;
    let ids = app.submit_many("inv", 30).await;
    sqlx::query(
        "UPDATE invoice_events SET at = now() - interval '40 days' WHERE invoice_id = ANY($1)",
    )
    .bind(&ids[..20])
    .execute(&app.db)
    .await
    .unwrap();
    let mut pruner = EventPruner::new(
        Store::from_pool(app.db.clone()),
        Duration::from_secs(30 * 86400),
    );
    pruner.batch = 7;

    let deleted = pruner.run_once().await.unwrap();

    assert_eq!(deleted, 20);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM invoice_events")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(left, 10);
    assert_eq!(app.event_kinds(ids[25]).await, [K::Submitted]);
}
