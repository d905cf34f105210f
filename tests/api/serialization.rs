//! At most one live lease per serialization key, enforced by the database.

use std::collections::HashMap;

use billing_coordinator::proto::{CompleteInvoiceRequest, CompleteInvoicesRequest};

use crate::helpers::{claim_request, id_of, invoice, spawn_app};

fn for_customer(
    external_id: &str,
    customer: &str,
    queue: &str,
) -> billing_coordinator::proto::NewInvoice {
    let mut new = invoice(external_id);
    new.customer_id = customer.into();
    new.queue = queue.into();
    new
}

#[tokio::test]
async fn a_serializing_queue_never_leases_two_invoices_of_one_customer_at_once() {
    let app = spawn_app().await;
    app.configure_queue("serial", None, Some(true)).await;
    app.submit(vec![
        for_customer("x1", "cus-x", "serial"),
        for_customer("x2", "cus-x", "serial"),
        for_customer("x3", "cus-x", "serial"),
        for_customer("y1", "cus-y", "serial"),
    ])
    .await;

    let first = app.claim("a", 10).await;
    let customers: Vec<&str> = first
        .iter()
        .map(|c| c.invoice.as_ref().unwrap().customer_id.as_str())
        .collect();
    assert_eq!(first.len(), 2, "one per customer: {customers:?}");
    assert!(customers.contains(&"cus-x") && customers.contains(&"cus-y"));
    assert!(
        app.claim("b", 10).await.is_empty(),
        "both customers are busy"
    );

    let x = first
        .iter()
        .find(|c| c.invoice.as_ref().unwrap().customer_id == "cus-x")
        .unwrap();
    app.complete(x).await.unwrap();
    let next = app.claim("b", 10).await;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].invoice.as_ref().unwrap().customer_id, "cus-x");
}

#[tokio::test]
async fn other_queues_are_not_serialized_unless_an_invoice_asks() {
    let app = spawn_app().await;
    let mut keyed_a = invoice("k1");
    keyed_a.serialization_key = "contract-9".into();
    let mut keyed_b = invoice("k2");
    keyed_b.serialization_key = "contract-9".into();
    let mut same_customer = invoice("plain");
    same_customer.customer_id = keyed_a.customer_id.clone();
    app.submit(vec![keyed_a, keyed_b, same_customer]).await;

    let claimed = app.claim("w", 10).await;

    let ids: Vec<&str> = claimed
        .iter()
        .map(|c| c.invoice.as_ref().unwrap().external_id.as_str())
        .collect();
    assert_eq!(claimed.len(), 2, "{ids:?}");
    assert!(ids.contains(&"plain"));
}

#[tokio::test]
async fn thirty_two_claimers_never_hold_two_leases_on_one_customer() {
    let app = spawn_app().await;
    app.configure_queue("serial", None, Some(true)).await;
    let invoices: Vec<_> = (0..400)
        .map(|i| for_customer(&format!("inv-{i}"), &format!("cus-{}", i % 8), "serial"))
        .collect();
    app.submit(invoices).await;

    let workers = (0..32).map(|n| {
        let mut client = app.client.clone();
        tokio::spawn(async move {
            let mut idle = 0;
            while idle < 20 {
                let claimed = client
                    .claim_invoices(claim_request(&format!("w{n}"), 4))
                    .await
                    .expect("claims succeed")
                    .into_inner()
                    .invoices;
                if claimed.is_empty() {
                    idle += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
                idle = 0;
                client
                    .complete_invoices(CompleteInvoicesRequest {
                        completions: claimed
                            .iter()
                            .map(|c| CompleteInvoiceRequest {
                                invoice_id: id_of(c),
                                lease_token: c.lease_token.clone(),
                                provider_reference: String::new(),
                            })
                            .collect(),
                    })
                    .await
                    .expect("completions succeed");
            }
        })
    });
    for worker in futures::future::join_all(workers).await {
        worker.expect("a worker panicked");
    }

    assert_eq!(app.count_in_state("completed").await, 400, "all billed");
    // From the audit trail: per customer, each lease ends before the next
    // one starts.
    let leases: Vec<(
        String,
        i64,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT i.customer_id, i.id, c.at, d.at
             FROM invoices i
             JOIN invoice_events c ON c.invoice_id = i.id AND c.kind = 'claimed'
             JOIN invoice_events d ON d.invoice_id = i.id AND d.kind = 'completed'",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(leases.len(), 400, "each invoice leased once");
    let mut by_customer: HashMap<String, Vec<_>> = HashMap::new();
    for (customer, _, start, end) in leases {
        by_customer.entry(customer).or_default().push((start, end));
    }
    for (customer, mut spans) in by_customer {
        spans.sort();
        for pair in spans.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "{customer}: overlapping leases {pair:?}"
            );
        }
    }
}
