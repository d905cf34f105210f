use billing_coordinator::proto::{InvoiceState, SubmitInvoicesRequest};
use tonic::Code;

use crate::helpers::{invoice, reason, spawn_app};

#[tokio::test]
async fn submitted_invoices_are_stored_pending_with_their_content() {
    let app = spawn_app().await;
    let mut new = invoice("inv-1");
    new.amount_minor = 4200;
    new.currency = "USD".into();
    new.priority = 3;
    new.max_attempts = 7;
    new.queue = "acme".into();

    let ids = app.submit(vec![new]).await;

    let stored = app.get(ids[0]).await;
    assert_eq!(stored.external_id, "inv-1");
    assert_eq!(stored.customer_id, "cus-inv-1");
    assert_eq!(
        (stored.amount_minor, stored.currency.as_str()),
        (4200, "USD")
    );
    assert_eq!(
        (stored.priority, stored.max_attempts, stored.attempts),
        (3, 7, 0)
    );
    assert_eq!(stored.queue, "acme");
    assert_eq!(stored.metadata.get("plan").map(String::as_str), Some("pro"));
    assert_eq!(crate::helpers::state(&stored), InvoiceState::Pending);
    assert!(!stored.idempotency_key.is_empty());
    let (state, queue): (String, String) =
        sqlx::query_as("SELECT state, queue FROM invoices WHERE id = $1")
            .bind(ids[0])
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!((state.as_str(), queue.as_str()), ("pending", "acme"));
}

#[tokio::test]
async fn invoices_without_queue_or_attempt_budget_get_the_defaults() {
    let app = spawn_app().await;
    let ids = app.submit(vec![invoice("inv-1")]).await;
    let stored = app.get(ids[0]).await;
    assert_eq!(stored.queue, "default");
    assert_eq!(stored.max_attempts, 5);
}

#[tokio::test]
async fn submitting_the_same_invoice_again_creates_nothing_new() {
    let app = spawn_app().await;
    let first = app
        .client
        .clone()
        .submit_invoices(SubmitInvoicesRequest {
            invoices: vec![invoice("inv-1"), invoice("inv-2")],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(first.iter().all(|r| r.created));

    let again = app
        .client
        .clone()
        .submit_invoices(SubmitInvoicesRequest {
            invoices: vec![invoice("inv-2"), invoice("inv-3")],
        })
        .await
        .unwrap()
        .into_inner()
        .results;

    assert_eq!(again[0].invoice_id, first[1].invoice_id);
    assert!(!again[0].created);
    assert!(again[1].created);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM invoices")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 3);
}

#[tokio::test]
async fn a_resubmission_reports_the_invoices_current_state() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("w", 1).await;
    app.complete(&claimed[0]).await.unwrap();

    let again = app
        .client
        .clone()
        .submit_invoices(SubmitInvoicesRequest {
            invoices: vec![invoice("inv-1")],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(again[0].state, InvoiceState::Completed as i32);
    assert!(!again[0].created);
}

#[tokio::test]
async fn a_resubmission_with_different_content_is_refused_and_the_batch_is_not_created() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let before = app.snapshot().await;
    let mut changed = invoice("inv-1");
    changed.amount_minor += 1;

    let status = app
        .client
        .clone()
        .submit_invoices(SubmitInvoicesRequest {
            invoices: vec![invoice("inv-new"), changed],
        })
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(reason(&status).as_deref(), Some("EXTERNAL_ID_CONFLICT"));
    assert!(
        status.message().contains("amount_minor"),
        "{}",
        status.message()
    );
    assert_eq!(app.snapshot().await, before, "nothing was created");
}

#[tokio::test]
async fn concurrent_submissions_of_one_external_id_create_one_invoice() {
    let app = spawn_app().await;
    let calls = (0..8).map(|_| {
        let mut client = app.client.clone();
        async move {
            client
                .submit_invoices(SubmitInvoicesRequest {
                    invoices: vec![invoice("inv-x"), invoice("inv-y")],
                })
                .await
                .map(|r| r.into_inner().results)
        }
    });
    let results = futures::future::join_all(calls).await;

    let mut created = 0;
    for result in results {
        created += result
            .expect("each submit succeeds")
            .iter()
            .filter(|r| r.created)
            .count();
    }
    assert_eq!(created, 2);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM invoices")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 2);
}

/// An invoice written with plain SQL, as an operator's backfill would: the
/// helper `invoice` with the metadata left at its default.
async fn insert_with_sql(app: &crate::helpers::TestApp, external_id: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO invoices (external_id, queue, customer_id, amount_minor, currency, priority,
                               metadata, available_at, max_attempts)
         VALUES ($1, 'default', 'cus-' || $1, 1999, 'EUR', 0, '{\"plan\": \"pro\"}', now(), 5)
         RETURNING id",
    )
    .bind(external_id)
    .fetch_one(&app.db)
    .await
}

#[tokio::test]
async fn an_external_id_taken_by_a_submit_is_refused_to_a_plain_sql_insert() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;

    let refused = insert_with_sql(&app, "inv-1").await.unwrap_err();

    let code = refused.as_database_error().and_then(|e| e.code());
    assert_eq!(code.as_deref(), Some("23505"), "{refused}");
    assert_eq!(app.count_in_state("pending").await, 1);
}

#[tokio::test]
async fn an_invoice_written_with_plain_sql_is_found_by_its_external_id() {
    let app = spawn_app().await;
    let id = insert_with_sql(&app, "inv-sql").await.unwrap();

    let mut same = invoice("inv-sql");
    same.max_attempts = 5;
    same.queue = "default".into();
    let results = app
        .client
        .clone()
        .submit_invoices(SubmitInvoicesRequest {
            invoices: vec![same],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let found = app.get_by_external_id("inv-sql").await;

    assert_eq!((results[0].invoice_id, results[0].created), (id, false));
    assert_eq!(found.invoice_id, id);
}
