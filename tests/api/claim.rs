use std::time::Duration;

use billing_coordinator::proto::InvoiceState;
use chrono::Utc;

use crate::helpers::{claim_request, duration, id_of, invoice, spawn_app, state};

#[tokio::test]
async fn a_claim_leases_invoices_with_token_expiry_attempt_and_idempotency_key() {
    let app = spawn_app().await;
    let ids = app.submit_many("inv", 3).await;

    let mut request = claim_request("worker-a", 10);
    request.lease_duration = Some(duration(Duration::from_secs(60)));
    let claimed = app.try_claim(request).await.unwrap();

    assert_eq!(claimed.len(), 3);
    for c in &claimed {
        assert!(ids.contains(&id_of(c)));
        assert!(c.lease_token.starts_with("v1."));
        assert_eq!(c.attempt, 1);
        let inv = c.invoice.as_ref().unwrap();
        assert_eq!(c.idempotency_key, inv.idempotency_key);
        let expires = c.lease_expires_at.unwrap().seconds;
        let in_a_minute = Utc::now().timestamp() + 60;
        assert!((expires - in_a_minute).abs() <= 5, "lease of about 60 s");
    }
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT state, leased_by FROM invoices ORDER BY id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert!(
        rows.iter()
            .all(|(s, by)| s == "leased" && by.as_deref() == Some("worker-a"))
    );
}

#[tokio::test]
async fn a_claim_takes_at_most_max_count_and_never_hands_out_a_leased_invoice() {
    let app = spawn_app().await;
    app.submit_many("inv", 5).await;

    let first = app.claim("a", 3).await;
    let second = app.claim("b", 3).await;
    let third = app.claim("c", 3).await;

    assert_eq!((first.len(), second.len(), third.len()), (3, 2, 0));
    let mut all: Vec<i64> = first.iter().chain(&second).map(id_of).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 5);
}

#[tokio::test]
async fn invoices_are_claimed_by_priority_then_availability() {
    let app = spawn_app().await;
    let mut low = invoice("low");
    low.priority = 5;
    let mut high = invoice("high");
    high.priority = 1;
    app.submit(vec![low, invoice("urgent"), high]).await;

    let claimed = app.claim("w", 3).await;
    let order: Vec<&str> = claimed
        .iter()
        .map(|c| c.invoice.as_ref().unwrap().external_id.as_str())
        .collect();
    assert_eq!(order, ["urgent", "high", "low"]);
}

#[tokio::test]
async fn an_invoice_is_not_claimed_before_its_available_at() {
    let app = spawn_app().await;
    let mut later = invoice("later");
    later.available_at = Some(prost_types::Timestamp {
        seconds: Utc::now().timestamp() + 3600,
        nanos: 0,
    });
    app.submit(vec![later, invoice("now")]).await;

    let claimed = app.claim("w", 10).await;

    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].invoice.as_ref().unwrap().external_id, "now");
}

#[tokio::test]
async fn a_claim_can_be_limited_to_chosen_queues() {
    let app = spawn_app().await;
    let mut a = invoice("a");
    a.queue = "tenant-a".into();
    let mut b = invoice("b");
    b.queue = "tenant-b".into();
    app.submit(vec![a, b, invoice("c")]).await;

    let mut request = claim_request("w", 10);
    request.queues = vec!["tenant-b".into()];
    let claimed = app.try_claim(request).await.unwrap();

    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].invoice.as_ref().unwrap().queue, "tenant-b");
}

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_an_invoice_is_submitted() {
    let app = spawn_app().await;
    let mut request = claim_request("w", 10);
    request.wait = Some(duration(Duration::from_secs(20)));
    let mut client = app.client.clone();
    let waiting = tokio::spawn(async move { client.claim_invoices(request).await });
    // Give the claim time to find the queue empty and start waiting.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = std::time::Instant::now();
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = waiting.await.unwrap().unwrap().into_inner().invoices;

    assert_eq!(claimed.len(), 1);
    // Far below the 20 s wait: it was woken, not timed out.
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn a_long_poll_with_nothing_to_claim_returns_empty_after_its_wait() {
    let app = spawn_app().await;
    let mut request = claim_request("w", 10);
    request.wait = Some(duration(Duration::from_millis(1200)));
    let started = std::time::Instant::now();

    let claimed = app.try_claim(request).await.unwrap();

    assert!(claimed.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(1200));
}

#[tokio::test]
async fn get_invoice_shows_the_lease_holder_and_expiry_and_finds_by_external_id() {
    let app = spawn_app().await;
    let ids = app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("worker-7", 1).await;

    let by_id = app.get(ids[0]).await;
    let by_external = app.get_by_external_id("inv-1").await;

    assert_eq!(by_id, by_external);
    assert_eq!(state(&by_id), InvoiceState::Leased);
    let lease = by_id.lease.unwrap();
    assert_eq!(lease.worker_id, "worker-7");
    assert_eq!(lease.expires_at, claimed[0].lease_expires_at);
    assert!(!lease.expired);
}

#[tokio::test]
async fn concurrent_claims_each_get_their_own_leases_in_their_own_name() {
    let app = spawn_app().await;
    app.submit_many("inv", 500).await;

    // 40 claims at once, asking for 1 to 20 invoices each: the service may
    // serve them with shared statements, but each answer is its own.
    let calls = (0..40).map(|n| {
        let app = &app;
        async move {
            let worker = format!("worker-{n}");
            let claimed = app.claim(&worker, n % 20 + 1).await;
            (worker, n % 20 + 1, claimed)
        }
    });
    let answers = futures::future::join_all(calls).await;

    let mut seen = std::collections::HashSet::new();
    for (worker, asked, claimed) in &answers {
        assert_eq!(
            claimed.len(),
            *asked as usize,
            "{worker} got what it asked for"
        );
        for c in claimed {
            assert!(seen.insert(id_of(c)), "invoice {} leased twice", id_of(c));
            let holder: String = sqlx::query_scalar("SELECT leased_by FROM invoices WHERE id = $1")
                .bind(id_of(c))
                .fetch_one(&app.db)
                .await
                .unwrap();
            assert_eq!(&holder, worker);
            assert!(c.lease_token.starts_with(&format!("v1.{}.", id_of(c))));
        }
    }
    let leased: i64 = sqlx::query_scalar("SELECT count(*) FROM invoices WHERE state = 'leased'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(leased as usize, seen.len());
}
