//! Dead letters and redrive, cancellation, listing, statistics, queue
//! settings: what operators do.

use billing_coordinator::proto::{
    CancelInvoicesRequest, ExtendLeaseRequest, GetQueueStatsRequest, InvoiceState,
    ListInvoicesRequest, ReleaseClaimRequest, ReleaseReason, RetryInvoicesRequest,
};
use tonic::Code;

use crate::helpers::{TestApp, id_of, invoice, spawn_app, state};

/// Submits an invoice allowed one attempt and fails it.
async fn dead_letter(app: &TestApp, external_id: &str, queue: &str) -> i64 {
    let mut fragile = invoice(external_id);
    fragile.max_attempts = 1;
    fragile.queue = queue.into();
    let id = app.submit(vec![fragile]).await[0];
    let mut request = crate::helpers::claim_request("w", 1);
    request.queues = vec![queue.into()];
    let claimed = app.try_claim(request).await.unwrap();
    assert_eq!(id_of(&claimed[0]), id);
    let after = app.release_failed(&claimed[0], "card expired").await;
    assert_eq!(state(&after), InvoiceState::Failed);
    id
}

#[tokio::test]
async fn redriving_dead_letters_by_id_gives_them_a_fresh_budget_and_keeps_their_history() {
    let app = spawn_app().await;
    let failed = dead_letter(&app, "inv-1", "default").await;
    let pending = app.submit(vec![invoice("inv-2")]).await[0];

    let answer = app
        .client
        .clone()
        .retry_invoices(RetryInvoicesRequest {
            invoice_ids: vec![failed, pending],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(answer.retried, 1);
    assert_eq!(answer.skipped_invoice_ids, vec![pending]);
    let redriven = app.get(failed).await;
    assert_eq!(state(&redriven), InvoiceState::Pending);
    assert_eq!((redriven.attempts, redriven.max_attempts), (0, 1));
    assert_eq!(redriven.last_error, "card expired");
    assert!(redriven.finished_at.is_none());
    let claimed = app.claim("w", 10).await;
    assert!(claimed.iter().any(|c| id_of(c) == failed && c.attempt == 1));
}

#[tokio::test]
async fn redriving_by_queue_takes_only_that_queues_dead_letters() {
    let app = spawn_app().await;
    let a = dead_letter(&app, "inv-a", "tenant-a").await;
    let b = dead_letter(&app, "inv-b", "tenant-b").await;

    let answer = app
        .client
        .clone()
        .retry_invoices(RetryInvoicesRequest {
            queue: "tenant-a".into(),
            failed_since: Some(prost_types::Timestamp {
                seconds: chrono::Utc::now().timestamp() - 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(answer.retried, 1);
    assert_eq!(state(&app.get(a).await), InvoiceState::Pending);
    assert_eq!(state(&app.get(b).await), InvoiceState::Failed);
}

#[tokio::test]
async fn redriving_an_unknown_id_is_not_found_and_redrives_nothing() {
    let app = spawn_app().await;
    let failed = dead_letter(&app, "inv-1", "default").await;
    let before = app.snapshot().await;

    let status = app
        .client
        .clone()
        .retry_invoices(RetryInvoicesRequest {
            invoice_ids: vec![failed, 424242],
            ..Default::default()
        })
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("424242"));
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn a_cancelled_pending_invoice_is_never_claimed() {
    let app = spawn_app().await;
    let ids = app.submit_many("inv", 2).await;

    let answer = app
        .client
        .clone()
        .cancel_invoices(CancelInvoicesRequest {
            invoice_ids: vec![ids[0]],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!((answer.cancelled, answer.cancel_requested), (1, 0));
    assert_eq!(state(&app.get(ids[0]).await), InvoiceState::Cancelled);
    let claimed = app.claim("w", 10).await;
    assert_eq!(claimed.iter().map(id_of).collect::<Vec<_>>(), vec![ids[1]]);
}

async fn cancel_while_leased(app: &TestApp) -> billing_coordinator::proto::ClaimedInvoice {
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("w", 1).await.remove(0);
    let answer = app
        .client
        .clone()
        .cancel_invoices(CancelInvoicesRequest {
            invoice_ids: vec![id_of(&claimed)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((answer.cancelled, answer.cancel_requested), (0, 1));
    claimed
}

#[tokio::test]
async fn the_holder_of_a_cancelled_lease_hears_it_from_its_heartbeat() {
    let app = spawn_app().await;
    let claimed = cancel_while_leased(&app).await;

    let heartbeat = app
        .client
        .clone()
        .extend_lease(ExtendLeaseRequest {
            invoice_id: id_of(&claimed),
            lease_token: claimed.lease_token.clone(),
            lease_duration: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(heartbeat.cancel_requested);

    let released = app
        .client
        .clone()
        .release_claim(ReleaseClaimRequest {
            invoice_id: id_of(&claimed),
            lease_token: claimed.lease_token.clone(),
            reason: ReleaseReason::Shutdown as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    assert_eq!(state(&released), InvoiceState::Cancelled);
    assert!(app.claim("w2", 1).await.is_empty());
}

#[tokio::test]
async fn a_completion_wins_over_a_cancellation_requested_during_the_lease() {
    let app = spawn_app().await;
    let claimed = cancel_while_leased(&app).await;

    let done = app.complete(&claimed).await.unwrap().invoice.unwrap();

    assert_eq!(state(&done), InvoiceState::Completed);
    assert!(!done.cancel_requested);
}

#[tokio::test]
async fn a_cancelled_lease_that_expires_ends_cancelled() {
    let app = spawn_app().await;
    let claimed = cancel_while_leased(&app).await;
    app.expire_leases(&[id_of(&claimed)]).await;

    let counts = app.rescue().await;

    assert_eq!(counts.cancelled, 1);
    assert_eq!(
        state(&app.get(id_of(&claimed)).await),
        InvoiceState::Cancelled
    );
}

#[tokio::test]
async fn cancelling_finished_invoices_leaves_them_alone() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("w", 1).await.remove(0);
    app.complete(&claimed).await.unwrap();

    let answer = app
        .client
        .clone()
        .cancel_invoices(CancelInvoicesRequest {
            invoice_ids: vec![id_of(&claimed)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(answer.skipped_invoice_ids, vec![id_of(&claimed)]);
    assert_eq!(
        state(&app.get(id_of(&claimed)).await),
        InvoiceState::Completed
    );
}

#[tokio::test]
async fn cancelling_by_customer_cancels_only_that_customers_invoices() {
    let app = spawn_app().await;
    let mut a = invoice("a");
    a.customer_id = "cus-x".into();
    let mut b = invoice("b");
    b.customer_id = "cus-x".into();
    app.submit(vec![a, b, invoice("c")]).await;

    let answer = app
        .client
        .clone()
        .cancel_invoices(CancelInvoicesRequest {
            customer_id: "cus-x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(answer.cancelled, 2);
    assert_eq!(app.count_in_state("cancelled").await, 2);
    assert_eq!(app.count_in_state("pending").await, 1);
}

#[tokio::test]
async fn listing_filters_by_state_queue_and_customer_and_pages_through_everything() {
    let app = spawn_app().await;
    let mut invoices: Vec<_> = (0..7).map(|i| invoice(&format!("inv-{i}"))).collect();
    invoices[6].queue = "other".into();
    invoices[5].customer_id = "vip".into();
    app.submit(invoices).await;
    app.claim("w", 2).await;

    let list = |request: ListInvoicesRequest| {
        let mut client = app.client.clone();
        async move { client.list_invoices(request).await.unwrap().into_inner() }
    };
    let leased = list(ListInvoicesRequest {
        states: vec![InvoiceState::Leased as i32],
        ..Default::default()
    })
    .await;
    assert_eq!(leased.invoices.len(), 2);
    let other = list(ListInvoicesRequest {
        queue: "other".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(other.invoices[0].external_id, "inv-6");
    let vip = list(ListInvoicesRequest {
        customer_id: "vip".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(vip.invoices.len(), 1);

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(ListInvoicesRequest {
            page_size: 3,
            page_token: token.clone(),
            ..Default::default()
        })
        .await;
        assert!(page.invoices.len() <= 3);
        seen.extend(page.invoices.iter().map(|i| i.invoice_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, (1..=7).collect::<Vec<i64>>());
}

#[tokio::test]
async fn queue_stats_count_each_state_and_expired_leases_per_queue() {
    let app = spawn_app().await;
    let mut later = invoice("later");
    later.available_at = Some(prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 3600,
        nanos: 0,
    });
    app.submit(vec![
        invoice("a"),
        invoice("b"),
        invoice("c"),
        invoice("d"),
        later,
    ])
    .await;
    let claimed = app.claim("w", 3).await;
    app.complete(&claimed[0]).await.unwrap();
    app.expire_leases(&[id_of(&claimed[1])]).await;
    dead_letter(&app, "dead", "billing-eu").await;
    app.configure_queue("billing-eu", Some(3), Some(true)).await;

    let stats = app
        .client
        .clone()
        .get_queue_stats(GetQueueStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .queues;

    assert_eq!(stats.len(), 2);
    let default = stats.iter().find(|q| q.queue == "default").unwrap();
    assert_eq!(
        (
            default.available,
            default.scheduled,
            default.leased,
            default.expired_leases,
            default.completed
        ),
        (1, 1, 1, 1, 1)
    );
    assert_eq!(default.weight, 1);
    let eu = stats.iter().find(|q| q.queue == "billing-eu").unwrap();
    assert_eq!(
        (eu.failed, eu.weight, eu.serialize_by_customer),
        (1, 3, true)
    );
}

#[tokio::test]
async fn invoices_written_with_sql_of_ones_own_are_listed_by_customer_too() {
    let app = spawn_app().await;
    app.submit(vec![invoice("submitted")]).await;
    sqlx::query(
        "INSERT INTO invoices (external_id, queue, customer_id, amount_minor, currency, priority,
                               available_at, max_attempts)
         VALUES ('by-hand-1', 'default', 'cus-hand', 100, 'EUR', 0, now(), 5),
                ('by-hand-2', 'default', 'cus-hand', 100, 'EUR', 0, now(), 5)",
    )
    .execute(&app.db)
    .await
    .unwrap();

    let listed = app
        .client
        .clone()
        .list_invoices(ListInvoicesRequest {
            customer_id: "cus-hand".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .invoices;
    let external: Vec<&str> = listed.iter().map(|i| i.external_id.as_str()).collect();
    assert_eq!(external, ["by-hand-1", "by-hand-2"]);
}
