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

    let insert = |column: &str, value: &str| {
        let mut values = [
            ("state", "'pending'"),
            ("priority", "5"),
            ("amount_minor", "100"),
        ];
        for v in &mut values {
            if v.0 == column {
                v.1 = value;
            }
        }
        format!(
            "INSERT INTO invoices (external_id, queue, customer_id, currency, max_attempts,
                                   available_at, state, priority, amount_minor)
             VALUES ('by-hand', 'default', 'cus', 'EUR', 3, now(), {}, {}, {})",
            values[0].1, values[1].1, values[2].1
        )
    };
    let message = refused(&app, &insert("state", "'sent'")).await;
    assert!(message.contains("state_is_known"), "{message}");
    let message = refused(&app, &insert("priority", "10")).await;
    assert!(message.contains("priority_in_range"), "{message}");
    let message = refused(&app, &insert("amount_minor", "-1")).await;
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
