//! The schema's own guards: rows written with SQL of an operator's own, not
//! through the service, still cannot break the invariants the service
//! relies on.

use crate::helpers::*;

/// The SQLSTATE of a failed CHECK, on a column or through a domain.
const CHECK_VIOLATION: &str = "23514";

async fn refused(app: &TestApp, sql: &str) -> String {
    let error = sqlx::query(sql)
        .execute(&app.db)
        .await
        .expect_err("the database refuses the write");
    let db = error.as_database_error().expect("a database error");
    assert_eq!(
        db.code().as_deref(),
        Some(CHECK_VIOLATION),
        "{sql}: {error}"
    );
    db.message().to_string()
}

#[tokio::test]
async fn values_outside_their_domains_are_refused_on_insert_and_update() {
    let app = spawn_app().await;
    let id = app.submit(vec![invoice("inv-domains")]).await[0];
    let before = app.snapshot().await;

    // A row that is valid but for the one value under test.
    let insert = |state: &str, priority: &str, amount: &str| {
        format!(
            "INSERT INTO invoices (external_id, queue, customer_id, currency, max_attempts,
                                   available_at, state, priority, amount_minor)
             VALUES ('by-hand', 'default', 'cus', 'EUR', 3, now(), {state}, {priority}, {amount})"
        )
    };
    let message = refused(&app, &insert("'sent'", "5", "100")).await;
    assert!(message.contains("state_is_known"), "{message}");
    let message = refused(&app, &insert("'pending'", "10", "100")).await;
    assert!(message.contains("priority_in_range"), "{message}");
    let message = refused(&app, &insert("'pending'", "5", "-1")).await;
    assert!(message.contains("amount_not_negative"), "{message}");
    let message = refused(
        &app,
        &format!("UPDATE invoices SET state = 'archived' WHERE id = {id}"),
    )
    .await;
    assert!(message.contains("state_is_known"), "{message}");
    let message = refused(
        &app,
        &format!("INSERT INTO invoice_events (invoice_id, kind) VALUES ({id}, 'charged')"),
    )
    .await;
    assert!(message.contains("kind_is_known"), "{message}");

    assert_eq!(app.snapshot().await, before, "nothing was written");
}

#[tokio::test]
async fn a_lease_without_a_holder_is_refused() {
    let app = spawn_app().await;
    let id = app.submit(vec![invoice("inv-holder")]).await[0];
    let before = app.snapshot().await;

    let message = refused(
        &app,
        &format!(
            "UPDATE invoices SET state = 'leased', lease_expires_at = now() + interval '1 minute'
             WHERE id = {id}"
        ),
    )
    .await;
    assert!(message.contains("leased_has_holder"), "{message}");

    assert_eq!(app.snapshot().await, before, "nothing was written");
}
