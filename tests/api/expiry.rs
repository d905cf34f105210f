use billing_coordinator::proto::InvoiceState;

use crate::helpers::{assert_lease_lost, id_of, invoice, spawn_app, state};

#[tokio::test]
async fn an_expired_lease_is_taken_back_and_claimed_again_with_the_attempt_counted() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let first = app.claim("dead-worker", 1).await;
    let id = id_of(&first[0]);

    // Not expired yet: nothing to take back, nothing to claim.
    assert_eq!(app.rescue().await.returned, 0);
    assert!(app.claim("other", 1).await.is_empty());

    app.expire_leases(&[id]).await;
    assert!(app.get(id).await.lease.unwrap().expired);
    let counts = app.rescue().await;
    assert_eq!((counts.returned, counts.failed), (1, 0));

    let pending = app.get(id).await;
    assert_eq!(state(&pending), InvoiceState::Pending);
    assert!(
        pending.last_error.contains("dead-worker"),
        "{}",
        pending.last_error
    );

    let second = app.claim("other", 1).await;
    assert_eq!(id_of(&second[0]), id);
    assert_eq!(second[0].attempt, 2);
    assert_ne!(second[0].lease_token, first[0].lease_token);
    assert_eq!(second[0].idempotency_key, first[0].idempotency_key);
}

#[tokio::test]
async fn a_stale_token_after_reclaim_is_told_lease_lost() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let first = app.claim("slow", 1).await;
    app.expire_leases(&[id_of(&first[0])]).await;
    app.rescue().await;
    app.claim("fast", 1).await;
    let before = app.snapshot().await;

    let status = app.complete(&first[0]).await.unwrap_err();

    assert_lease_lost(&status);
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn a_completion_after_expiry_lands_when_nobody_claimed_since() {
    let app = spawn_app().await;
    app.submit_many("inv", 2).await;
    let claimed = app.claim("slow", 2).await;
    let (a, b) = (&claimed[0], &claimed[1]);
    app.expire_leases(&[id_of(a), id_of(b)]).await;

    // a: expired, not yet taken back. b: taken back, not yet claimed again.
    app.complete(a)
        .await
        .expect("expired but unclaimed lease completes");
    app.rescue().await;
    assert_eq!(state(&app.get(id_of(b)).await), InvoiceState::Pending);
    app.complete(b)
        .await
        .expect("taken back but unclaimed lease completes");

    assert_eq!(app.count_in_state("completed").await, 2);
    assert!(app.claim("other", 10).await.is_empty());
}

#[tokio::test]
async fn an_invoice_whose_leases_keep_expiring_fails_after_max_attempts() {
    let app = spawn_app().await;
    let mut fragile = invoice("inv-1");
    fragile.max_attempts = 2;
    let ids = app.submit(vec![fragile]).await;

    for attempt in 1..=2 {
        let claimed = app.claim("crashy", 1).await;
        assert_eq!(claimed[0].attempt, attempt);
        app.expire_leases(&ids).await;
        app.rescue().await;
    }

    let failed = app.get(ids[0]).await;
    assert_eq!(state(&failed), InvoiceState::Failed);
    assert_eq!(failed.attempts, 2);
    assert!(
        failed.last_error.contains("expired"),
        "{}",
        failed.last_error
    );
    assert!(app.claim("w", 1).await.is_empty());
}

#[tokio::test]
async fn the_background_rescuer_returns_expired_invoices_without_help() {
    let app = crate::helpers::spawn_app_with(|s| {
        s.rescue_interval = Some(std::time::Duration::from_millis(100));
    })
    .await;
    let ids = app.submit(vec![invoice("inv-1")]).await;
    app.claim("dead", 1).await;
    app.expire_leases(&ids).await;

    let mut request = crate::helpers::claim_request("w", 1);
    request.wait = Some(crate::helpers::duration(std::time::Duration::from_secs(10)));
    let claimed = app.try_claim(request).await.unwrap();

    assert_eq!(claimed.len(), 1, "the long-poll was woken by the rescue");
    assert_eq!(claimed[0].attempt, 2);
}
