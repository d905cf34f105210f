//! Many workers over one pending set: each invoice billed and completed
//! exactly once, nothing left behind, nobody blocked or refused.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use billing_coordinator::proto::{CompleteInvoiceRequest, CompleteInvoicesRequest};

use crate::helpers::{TestApp, claim_request, id_of, spawn_app};

/// Runs `servers` concurrent billing loops until the pending set is drained,
/// and returns how often each invoice was charged.
async fn run_billing_loops(app: &TestApp, servers: usize, batch: i32) -> HashMap<i64, u32> {
    let charges: Arc<Mutex<HashMap<i64, u32>>> = Arc::default();
    let loops = (0..servers).map(|n| {
        let mut client = app.client.clone();
        let charges = charges.clone();
        tokio::spawn(async move {
            loop {
                let claimed = client
                    .claim_invoices(claim_request(&format!("server-{n}"), batch))
                    .await
                    .expect("claims never fail")
                    .into_inner()
                    .invoices;
                if claimed.is_empty() {
                    return;
                }
                for c in &claimed {
                    *charges.lock().unwrap().entry(id_of(c)).or_default() += 1;
                }
                let results = client
                    .complete_invoices(CompleteInvoicesRequest {
                        completions: claimed
                            .iter()
                            .map(|c| CompleteInvoiceRequest {
                                invoice_id: id_of(c),
                                lease_token: c.lease_token.clone(),
                                provider_reference: format!("charge-{}", id_of(c)),
                            })
                            .collect(),
                    })
                    .await
                    .expect("completions never fail")
                    .into_inner()
                    .results;
                assert!(
                    results.iter().all(|r| r.code == 0 && !r.already_completed),
                    "{results:?}"
                );
            }
        })
    });
    for result in futures::future::join_all(loops).await {
        result.expect("a billing loop panicked");
    }
    Arc::try_unwrap(charges).unwrap().into_inner().unwrap()
}

async fn assert_all_completed_exactly_once(
    app: &TestApp,
    ids: &[i64],
    charges: &HashMap<i64, u32>,
) {
    assert_eq!(charges.len(), ids.len(), "every invoice was billed");
    assert!(
        charges.values().all(|&n| n == 1),
        "no invoice was billed twice"
    );
    let (completed, single_lease): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'completed'),
                count(*) FILTER (WHERE lease_epoch = 1 AND attempts = 1)
         FROM invoices",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(completed, ids.len() as i64, "none left behind");
    assert_eq!(
        single_lease,
        ids.len() as i64,
        "each invoice was leased once"
    );
}

#[tokio::test]
async fn two_servers_billing_the_same_pending_set_bill_each_invoice_once() {
    let app = spawn_app().await;
    let ids = app.submit_many("inv", 500).await;

    let charges = run_billing_loops(&app, 2, 10).await;

    assert_all_completed_exactly_once(&app, &ids, &charges).await;
}

#[tokio::test]
async fn sixteen_servers_billing_the_same_pending_set_bill_each_invoice_once() {
    let app = spawn_app().await;
    let ids = app.submit_many("inv", 2000).await;

    let charges = run_billing_loops(&app, 16, 10).await;

    assert_all_completed_exactly_once(&app, &ids, &charges).await;
}

#[tokio::test]
async fn thirty_two_claimers_over_ten_thousand_invoices_never_share_a_lease() {
    let app = spawn_app().await;
    let ids = app.submit_many("inv", 10_000).await;

    let charges = run_billing_loops(&app, 32, 25).await;

    assert_all_completed_exactly_once(&app, &ids, &charges).await;
}

#[tokio::test]
async fn single_invoice_claims_from_many_workers_never_collide() {
    let app = spawn_app().await;
    let ids = app.submit_many("inv", 300).await;

    let charges = run_billing_loops(&app, 32, 1).await;

    assert_all_completed_exactly_once(&app, &ids, &charges).await;
}
