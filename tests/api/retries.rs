//! Backoff after failed attempts, and the hard deadline on heartbeats.

use std::time::Duration;

use billing_coordinator::{
    lease::Backoff,
    proto::{ExtendLeaseRequest, InvoiceState},
    rescuer::Rescuer,
};

use crate::helpers::{duration, id_of, invoice, seconds_until, spawn_app, spawn_app_with, state};

const MINUTES: Backoff = Backoff {
    base: Duration::from_secs(600),
    max: Duration::from_secs(3600),
};

#[tokio::test]
async fn each_failed_attempt_waits_an_exponentially_growing_jittered_backoff() {
    let app = spawn_app_with(|s| s.coordinator.backoff = MINUTES).await;
    let ids = app.submit(vec![invoice("inv-1")]).await;

    // Attempt n waits between half and all of 10 min * 2^(n-1), capped at 1 h.
    for (attempt, (low, high)) in [(300, 600), (600, 1200), (1200, 2400), (1800, 3600)]
        .into_iter()
        .enumerate()
    {
        let claimed = app.claim("w", 1).await;
        assert_eq!(claimed[0].attempt, attempt as i32 + 1);
        let after = app.release_failed(&claimed[0], "declined").await;
        let wait = seconds_until(after.available_at.as_ref().unwrap());
        assert!(
            (low - 5..=high + 5).contains(&wait),
            "attempt {}: {wait} s",
            attempt + 1
        );
        assert!(app.claim("w", 1).await.is_empty(), "still backing off");
        app.skip_backoff(&ids).await;
    }
}

#[tokio::test]
async fn an_expired_lease_backs_off_from_its_expiry() {
    let app = spawn_app().await;
    let ids = app.submit(vec![invoice("inv-1")]).await;
    app.claim("dead", 1).await;
    sqlx::query("UPDATE invoices SET lease_expires_at = now() - interval '100 seconds'")
        .execute(&app.db)
        .await
        .unwrap();

    Rescuer::new(app.store.clone(), MINUTES)
        .run_once(None)
        .await
        .unwrap();

    let back = app.get(ids[0]).await;
    assert_eq!(state(&back), InvoiceState::Pending);
    let wait = seconds_until(back.available_at.as_ref().unwrap());
    // Half to all of 600 s, counted from 100 s ago.
    assert!((300 - 100 - 5..=600 - 100 + 5).contains(&wait), "{wait} s");
}

#[tokio::test]
async fn heartbeats_never_move_a_lease_past_its_hold_deadline() {
    let app = spawn_app_with(|s| s.coordinator.max_hold = Duration::from_secs(120)).await;
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("w", 1).await.remove(0);
    let deadline = claimed.hold_deadline.unwrap();
    assert!((115..=125).contains(&seconds_until(&deadline)));

    let extended = app
        .client
        .clone()
        .extend_lease(ExtendLeaseRequest {
            invoice_id: id_of(&claimed),
            lease_token: claimed.lease_token.clone(),
            lease_duration: Some(duration(Duration::from_secs(3000))),
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(extended.lease_expires_at, Some(deadline));
    assert_eq!(extended.hold_deadline, Some(deadline));
}

#[tokio::test]
async fn a_lease_held_past_its_hold_deadline_expires_even_with_heartbeats() {
    let app = spawn_app_with(|s| s.coordinator.max_hold = Duration::from_secs(120)).await;
    let ids = app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("hung", 1).await.remove(0);
    // The claim was made long ago; its heartbeats kept it alive until now.
    sqlx::query("UPDATE invoices SET leased_at = now() - interval '1 hour'")
        .execute(&app.db)
        .await
        .unwrap();

    let extended = app
        .client
        .clone()
        .extend_lease(ExtendLeaseRequest {
            invoice_id: id_of(&claimed),
            lease_token: claimed.lease_token.clone(),
            lease_duration: Some(duration(Duration::from_secs(60))),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(seconds_until(extended.lease_expires_at.as_ref().unwrap()) < 0);

    assert_eq!(app.rescue().await.returned, 1);
    let again = app.claim("healthy", 1).await;
    assert_eq!(id_of(&again[0]), ids[0]);
}
