use billing_coordinator::proto::{CompleteInvoiceRequest, CompleteInvoicesRequest, InvoiceState};
use tonic::Code;

use crate::helpers::{assert_lease_lost, id_of, invoice, spawn_app, state};

#[tokio::test]
async fn completing_a_live_lease_marks_the_invoice_completed_once() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("worker-a", 1).await;

    let answer = app
        .client
        .clone()
        .complete_invoice(CompleteInvoiceRequest {
            invoice_id: id_of(&claimed[0]),
            lease_token: claimed[0].lease_token.clone(),
            provider_reference: "ch_123".into(),
        })
        .await
        .unwrap()
        .into_inner();

    assert!(!answer.already_completed);
    let done = answer.invoice.unwrap();
    assert_eq!(state(&done), InvoiceState::Completed);
    assert_eq!(done.provider_reference, "ch_123");
    assert_eq!(done.completed_by, "worker-a");
    assert!(done.lease.is_none());
    let (state, completed_at_set): (String, bool) =
        sqlx::query_as("SELECT state, completed_at IS NOT NULL FROM invoices WHERE id = $1")
            .bind(id_of(&claimed[0]))
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!((state.as_str(), completed_at_set), ("completed", true));
}

#[tokio::test]
async fn a_retried_completion_with_the_same_token_succeeds_again_and_changes_nothing() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("w", 1).await;
    let first = app.complete(&claimed[0]).await.unwrap();
    let row_after_first = app.snapshot().await;

    let retry = app.complete(&claimed[0]).await.unwrap();

    assert!(retry.already_completed);
    assert_eq!(retry.invoice, first.invoice);
    assert_eq!(app.snapshot().await, row_after_first);
}

#[tokio::test]
async fn a_completed_invoice_is_never_claimed_again() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let claimed = app.claim("w", 1).await;
    app.complete(&claimed[0]).await.unwrap();
    app.expire_leases(&[id_of(&claimed[0])]).await;
    app.rescue().await;

    assert!(app.claim("w2", 10).await.is_empty());
}

#[tokio::test]
async fn completing_an_unknown_invoice_is_not_found() {
    let app = spawn_app().await;
    let status = app
        .client
        .clone()
        .complete_invoice(CompleteInvoiceRequest {
            invoice_id: 999,
            lease_token: "v1.999.1.0000000000000001".into(),
            provider_reference: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("999"), "{}", status.message());
}

#[tokio::test]
async fn a_token_the_invoice_never_issued_is_not_found_and_changes_nothing() {
    let app = spawn_app().await;
    let ids = app.submit(vec![invoice("inv-1")]).await;
    app.claim("w", 1).await;
    let before = app.snapshot().await;

    for forged in [
        format!("v1.{}.1.0000000000000001", ids[0]),
        format!("v1.{}.7.0000000000000001", ids[0]),
    ] {
        let status = app
            .client
            .clone()
            .complete_invoice(CompleteInvoiceRequest {
                invoice_id: ids[0],
                lease_token: forged,
                provider_reference: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn a_batch_completion_answers_each_invoice_on_its_own_in_order() {
    let app = spawn_app().await;
    app.submit_many("inv", 3).await;
    let claimed = app.claim("w", 3).await;
    // The third is stolen: expired, taken back and claimed by someone else.
    app.expire_leases(&[id_of(&claimed[2])]).await;
    app.rescue().await;
    let thief = app.claim("thief", 1).await;
    assert_eq!(id_of(&thief[0]), id_of(&claimed[2]));

    let request = |c: &billing_coordinator::proto::ClaimedInvoice| CompleteInvoiceRequest {
        invoice_id: id_of(c),
        lease_token: c.lease_token.clone(),
        provider_reference: String::new(),
    };
    let mut malformed = request(&claimed[1]);
    malformed.lease_token = "garbage".into();
    let results = app
        .client
        .clone()
        .complete_invoices(CompleteInvoicesRequest {
            completions: vec![
                request(&claimed[0]),
                malformed,
                request(&claimed[2]),
                request(&claimed[0]),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;

    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        [
            Code::Ok as i32,
            Code::InvalidArgument as i32,
            Code::FailedPrecondition as i32,
            Code::Ok as i32
        ]
    );
    assert_eq!(results[2].reason, "LEASE_LOST");
    assert!(!results[0].already_completed);
    assert!(results[3].already_completed, "the repeat is a retry");
    assert!(results[1].message.contains("lease_token"));
    assert_eq!(app.count_in_state("completed").await, 1);
    assert_eq!(app.count_in_state("leased").await, 2);
}

#[tokio::test]
async fn a_stolen_lease_cannot_complete_even_in_a_batch() {
    let app = spawn_app().await;
    app.submit(vec![invoice("inv-1")]).await;
    let old = app.claim("slow", 1).await;
    app.expire_leases(&[id_of(&old[0])]).await;
    app.rescue().await;
    let new = app.claim("fast", 1).await;

    let status = app.complete(&old[0]).await.unwrap_err();
    assert_lease_lost(&status);
    app.complete(&new[0]).await.unwrap();

    let done = app.get(id_of(&new[0])).await;
    assert_eq!(done.completed_by, "fast");
}

#[tokio::test]
async fn concurrent_single_completions_each_get_their_own_answer() {
    let app = spawn_app().await;
    app.submit_many("inv", 300).await;
    let live = app.claim("worker", 300).await;
    assert_eq!(live.len(), 300);
    // A third of the leases are lost to another worker before completion.
    let lost: Vec<i64> = live[..100].iter().map(id_of).collect();
    app.expire_leases(&lost).await;
    app.rescue().await;
    app.skip_backoff(&lost).await;
    assert_eq!(app.claim("thief", 100).await.len(), 100);

    // Every live lease is completed twice at once, as a retrying worker would.
    let calls = live.iter().chain(&live[100..]).map(|claimed| {
        let mut client = app.client.clone();
        let request = CompleteInvoiceRequest {
            invoice_id: id_of(claimed),
            lease_token: claimed.lease_token.clone(),
            provider_reference: format!("ch_{}", id_of(claimed)),
        };
        async move { (request.invoice_id, client.complete_invoice(request).await) }
    });
    let answers = futures::future::join_all(calls).await;

    let mut fresh = std::collections::HashMap::new();
    for (id, answer) in answers {
        if lost.contains(&id) {
            assert_lease_lost(&answer.expect_err("a lost lease is refused"));
            continue;
        }
        let answer = answer.expect("a live lease completes").into_inner();
        let invoice = answer.invoice.unwrap();
        assert_eq!(invoice.invoice_id, id);
        assert_eq!(invoice.provider_reference, format!("ch_{id}"));
        *fresh.entry(id).or_insert(0) += usize::from(!answer.already_completed);
    }
    assert_eq!(fresh.len(), 200);
    assert!(
        fresh.values().all(|n| *n == 1),
        "each completed once: {fresh:?}"
    );
}

#[tokio::test]
async fn concurrent_completion_batches_each_get_their_own_outcomes_in_order() {
    let app = spawn_app().await;
    app.submit_many("inv", 1500).await;
    let mut live = app.claim("worker", 1000).await;
    live.extend(app.claim("worker", 500).await);
    assert_eq!(live.len(), 1500);
    // Every seventh lease is lost to another worker before completion.
    let lost: Vec<i64> = live.iter().step_by(7).map(id_of).collect();
    app.expire_leases(&lost).await;
    app.rescue().await;
    app.skip_backoff(&lost).await;
    assert_eq!(app.claim("thief", 1000).await.len(), lost.len());

    // Batches of many sizes at once, two of them too large to share one
    // statement, so answers have to be split back across statements too.
    let sizes = [1, 3, 17, 600, 50, 1, 700, 2, 90, 36];
    assert_eq!(sizes.iter().sum::<usize>(), live.len());
    let mut rest = live.as_slice();
    let calls = sizes.iter().map(|&n| {
        let (batch, later) = rest.split_at(n);
        rest = later;
        let mut client = app.client.clone();
        let completions: Vec<CompleteInvoiceRequest> = batch
            .iter()
            .map(|c| CompleteInvoiceRequest {
                invoice_id: id_of(c),
                lease_token: c.lease_token.clone(),
                provider_reference: format!("ch_{}", id_of(c)),
            })
            .collect();
        async move {
            let ids: Vec<i64> = completions.iter().map(|c| c.invoice_id).collect();
            let answer = client
                .complete_invoices(CompleteInvoicesRequest { completions })
                .await;
            (ids, answer)
        }
    });
    let answers = futures::future::join_all(calls).await;

    for (ids, answer) in answers {
        let results = answer.expect("a batch is answered").into_inner().results;
        let expected: Vec<(i64, i32)> = ids
            .iter()
            .map(|id| {
                let code = if lost.contains(id) {
                    Code::FailedPrecondition
                } else {
                    Code::Ok
                };
                (*id, code as i32)
            })
            .collect();
        let got: Vec<(i64, i32)> = results.iter().map(|r| (r.invoice_id, r.code)).collect();
        assert_eq!(got, expected);
        assert!(results.iter().all(|r| !r.already_completed));
    }
    let (completed, own_reference): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE provider_reference = 'ch_' || id)
         FROM invoices WHERE state = 'completed'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(completed, (live.len() - lost.len()) as i64);
    assert_eq!(own_reference, completed);
}
