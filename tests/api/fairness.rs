//! A tenant with a huge backlog does not starve a small one.

use crate::helpers::{claim_request, invoice, invoices_in_queues, spawn_app};

#[tokio::test]
async fn a_small_tenant_is_served_within_the_first_batches_despite_a_huge_one() {
    let app = spawn_app().await;
    // The big tenant's backlog is older, so oldest-first would drain it first.
    sqlx::query(
        "INSERT INTO invoices (external_id, queue, customer_id, amount_minor, currency, priority,
                               available_at, max_attempts)
         SELECT 'big-' || n, 'big', 'cus-' || n, 100, 'EUR', 0, now() - interval '1 day', 5
         FROM generate_series(1, 100000) AS n",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let small: Vec<_> = (0..100)
        .map(|i| {
            let mut new = invoice(&format!("small-{i}"));
            new.queue = "small".into();
            new
        })
        .collect();
    app.submit(small).await;

    let mut small_claimed = 0;
    let mut batches = 0;
    while small_claimed < 100 {
        batches += 1;
        assert!(batches <= 3, "the small tenant waited more than 3 batches");
        let claimed = app.claim("w", 100).await;
        assert_eq!(claimed.len(), 100, "claims stay full");
        small_claimed += claimed
            .iter()
            .filter(|c| c.invoice.as_ref().unwrap().queue == "small")
            .count();
    }
    assert_eq!(batches, 2, "half of each batch went to each tenant");
}

#[tokio::test]
async fn weights_set_each_queues_share_of_a_claim() {
    let app = spawn_app().await;
    app.configure_queue("gold", Some(3), None).await;
    let invoices = invoices_in_queues(400, &["gold", "basic"]);
    app.submit(invoices).await;

    let claimed = app.claim("w", 100).await;

    let gold = claimed
        .iter()
        .filter(|c| c.invoice.as_ref().unwrap().queue == "gold")
        .count();
    assert_eq!((gold, claimed.len() - gold), (75, 25));
}

#[tokio::test]
async fn a_tenant_without_enough_work_leaves_its_share_to_the_others() {
    let app = spawn_app().await;
    let invoices: Vec<_> = (0..60)
        .map(|i| {
            let mut new = invoice(&format!("inv-{i}"));
            new.queue = if i < 5 { "tiny" } else { "large" }.into();
            new
        })
        .collect();
    app.submit(invoices).await;

    let claimed = app.claim("w", 40).await;

    assert_eq!(claimed.len(), 40);
    let tiny = claimed
        .iter()
        .filter(|c| c.invoice.as_ref().unwrap().queue == "tiny")
        .count();
    assert_eq!(tiny, 5);
}

#[tokio::test]
async fn a_worker_can_still_claim_from_one_tenant_only() {
    let app = spawn_app().await;
    let invoices = invoices_in_queues(20, &["a", "b"]);
    app.submit(invoices).await;
    let mut request = claim_request("w", 20);
    request.queues = vec!["b".into()];

    let claimed = app.try_claim(request).await.unwrap();

    assert_eq!(claimed.len(), 10);
    assert!(
        claimed
            .iter()
            .all(|c| c.invoice.as_ref().unwrap().queue == "b")
    );
}
