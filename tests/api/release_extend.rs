use std::time::Duration;

use billing_coordinator::proto::{
    ClaimedInvoice, ExtendLeaseRequest, InvoiceState, ReleaseClaimRequest, ReleaseReason,
};
use chrono::Utc;

use crate::helpers::{TestApp, assert_lease_lost, duration, id_of, invoice, spawn_app, state};

fn release(c: &ClaimedInvoice, reason: ReleaseReason, error: &str) -> ReleaseClaimRequest {
    ReleaseClaimRequest {
        invoice_id: id_of(c),
        lease_token: c.lease_token.clone(),
        reason: reason as i32,
        error: error.into(),
        retry_after: None,
    }
}

fn extend(c: &ClaimedInvoice, secs: u64) -> ExtendLeaseRequest {
    ExtendLeaseRequest {
        invoice_id: id_of(c),
        lease_token: c.lease_token.clone(),
        lease_duration: Some(duration(Duration::from_secs(secs))),
    }
}

async fn stolen(app: &TestApp) -> ClaimedInvoice {
    app.submit(vec![invoice("inv-1")]).await;
    let old = app.claim("slow", 1).await.remove(0);
    app.expire_leases(&[id_of(&old)]).await;
    app.rescue().await;
    app.claim("fast", 1).await;
    old
}

#[tokio::test]
async fn a_failed_release_counts_the_attempt_and_keeps_the_error() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("w", 1).await;

    let after = app
        .client
        .clone()
        .release_claim(release(&claimed[0], ReleaseReason::Failed, "card declined"))
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();

    assert_eq!(state(&after), InvoiceState::Pending);
    assert_eq!(after.attempts, 1);
    assert_eq!(after.last_error, "card declined");
    let again = app.claim("w2", 1).await;
    assert_eq!(again[0].attempt, 2);
}

#[tokio::test]
async fn a_shutdown_release_does_not_count_the_attempt() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("w", 1).await;

    let after = app
        .client
        .clone()
        .release_claim(release(&claimed[0], ReleaseReason::Shutdown, ""))
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();

    assert_eq!(after.attempts, 0);
    assert_eq!(app.claim("w2", 1).await[0].attempt, 1);
}

#[tokio::test]
async fn retry_after_keeps_a_released_invoice_back_until_then() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("w", 1).await;
    let mut request = release(&claimed[0], ReleaseReason::Failed, "rate limited");
    request.retry_after = Some(duration(Duration::from_secs(600)));

    let after = app
        .client
        .clone()
        .release_claim(request)
        .await
        .unwrap()
        .into_inner();

    let available_at = after.invoice.unwrap().available_at.unwrap().seconds;
    assert!(available_at >= Utc::now().timestamp() + 590);
    assert!(app.claim("w2", 1).await.is_empty());
}

#[tokio::test]
async fn failing_the_last_attempt_dead_letters_the_invoice_with_its_error() {
    let app = spawn_app().await;
    let mut fragile = invoice("inv-1");
    fragile.max_attempts = 2;
    app.submit(vec![fragile]).await;

    for error in ["timeout", "card declined"] {
        let claimed = app.claim("w", 1).await;
        app.client
            .clone()
            .release_claim(release(&claimed[0], ReleaseReason::Failed, error))
            .await
            .unwrap();
    }

    let failed = app.get(1).await;
    assert_eq!(state(&failed), InvoiceState::Failed);
    assert_eq!(failed.last_error, "card declined");
    assert!(app.claim("w", 1).await.is_empty());
}

#[tokio::test]
async fn a_retried_release_succeeds_again_and_the_released_token_cannot_complete() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("w", 1).await;
    app.client
        .clone()
        .release_claim(release(&claimed[0], ReleaseReason::Failed, "boom"))
        .await
        .unwrap();
    let after_first = app.snapshot().await;

    app.client
        .clone()
        .release_claim(release(&claimed[0], ReleaseReason::Failed, "boom"))
        .await
        .expect("a retried release is OK");
    assert_eq!(app.snapshot().await, after_first);

    assert_lease_lost(&app.complete(&claimed[0]).await.unwrap_err());
}

#[tokio::test]
async fn extending_a_live_lease_moves_its_expiry() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("w", 1).await;

    let extended = app
        .client
        .clone()
        .extend_lease(extend(&claimed[0], 3000))
        .await
        .unwrap()
        .into_inner()
        .lease_expires_at
        .unwrap();

    assert!(extended.seconds >= Utc::now().timestamp() + 2990);
    let stored = app.get(id_of(&claimed[0])).await;
    assert_eq!(stored.lease.unwrap().expires_at, Some(extended));
}

#[tokio::test]
async fn extend_and_release_with_a_stolen_lease_are_told_lease_lost_and_change_nothing() {
    let app = spawn_app().await;
    let old = stolen(&app).await;
    let before = app.snapshot().await;

    let status = app
        .client
        .clone()
        .extend_lease(extend(&old, 60))
        .await
        .unwrap_err();
    assert_lease_lost(&status);
    let status = app
        .client
        .clone()
        .release_claim(release(&old, ReleaseReason::Failed, "x"))
        .await
        .unwrap_err();
    assert_lease_lost(&status);

    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn an_expired_lease_taken_back_cannot_be_extended() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("w", 1).await;
    app.expire_leases(&[id_of(&claimed[0])]).await;
    app.rescue().await;

    let status = app
        .client
        .clone()
        .extend_lease(extend(&claimed[0], 60))
        .await
        .unwrap_err();

    assert_lease_lost(&status);
    assert!(
        status.message().contains("taken back"),
        "{}",
        status.message()
    );
}
