//! Every malformed request gets a clear status naming the field, and changes
//! nothing.

use std::time::Duration;

use billing_coordinator::proto::{
    ClaimInvoicesRequest, CompleteInvoiceRequest, CompleteInvoicesRequest, ExtendLeaseRequest,
    GetInvoiceRequest, NewInvoice, ReleaseClaimRequest, ReleaseReason, SubmitInvoicesRequest,
    get_invoice_request,
};
use tonic::{Code, Status};

use crate::helpers::{TestApp, claim_request, duration, id_of, invoice, spawn_app};

#[track_caller]
fn assert_names(result: Result<impl std::fmt::Debug, Status>, code: Code, field: &str) {
    let status = result.expect_err("the request is refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(field),
        "message {:?} should name {field:?}",
        status.message()
    );
}

/// A server holding one pending and one leased invoice, and the lease.
async fn app_with_state() -> (TestApp, billing_coordinator::proto::ClaimedInvoice) {
    let app = spawn_app().await;
    app.submit(vec![invoice("leased"), invoice("pending")])
        .await;
    let claimed = app.claim("w", 1).await.remove(0);
    (app, claimed)
}

fn with(change: impl FnOnce(&mut NewInvoice)) -> SubmitInvoicesRequest {
    let mut new = invoice("fresh");
    change(&mut new);
    SubmitInvoicesRequest {
        invoices: vec![invoice("fine"), new],
    }
}

#[tokio::test]
async fn malformed_submissions_are_refused_naming_the_field() {
    let (app, _) = app_with_state().await;
    let before = app.snapshot().await;
    let cases: Vec<(SubmitInvoicesRequest, &str)> = vec![
        (SubmitInvoicesRequest { invoices: vec![] }, "invoices"),
        (
            SubmitInvoicesRequest {
                invoices: (0..1001).map(|i| invoice(&format!("x{i}"))).collect(),
            },
            "invoices",
        ),
        (
            SubmitInvoicesRequest {
                invoices: vec![invoice("dup"), invoice("dup")],
            },
            "invoices[1].external_id",
        ),
        (with(|i| i.external_id.clear()), "invoices[1].external_id"),
        (
            with(|i| i.external_id = "x".repeat(256)),
            "invoices[1].external_id",
        ),
        (
            with(|i| i.external_id = "a\nb".into()),
            "invoices[1].external_id",
        ),
        (with(|i| i.customer_id.clear()), "invoices[1].customer_id"),
        (with(|i| i.amount_minor = -1), "invoices[1].amount_minor"),
        (with(|i| i.currency = "eur".into()), "invoices[1].currency"),
        (with(|i| i.currency = "EURO".into()), "invoices[1].currency"),
        (with(|i| i.currency.clear()), "invoices[1].currency"),
        (with(|i| i.priority = 10), "invoices[1].priority"),
        (with(|i| i.priority = -1), "invoices[1].priority"),
        (with(|i| i.max_attempts = -1), "invoices[1].max_attempts"),
        (with(|i| i.max_attempts = 101), "invoices[1].max_attempts"),
        (with(|i| i.queue = "has space".into()), "invoices[1].queue"),
        (with(|i| i.queue = "q".repeat(65)), "invoices[1].queue"),
        (
            with(|i| {
                i.available_at = Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                })
            }),
            "invoices[1].available_at",
        ),
        (
            with(|i| {
                i.available_at = Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                })
            }),
            "invoices[1].available_at",
        ),
        (
            with(|i| {
                i.metadata.insert(String::new(), "v".into());
            }),
            "invoices[1].metadata",
        ),
        (
            with(|i| {
                i.metadata.insert("k".into(), "x".repeat(17 * 1024));
            }),
            "invoices[1].metadata",
        ),
        (
            with(|i| {
                i.metadata = (0..65).map(|k| (format!("k{k}"), String::new())).collect();
            }),
            "invoices[1].metadata",
        ),
        (
            with(|i| {
                i.metadata.insert("k".into(), "nul\0".into());
            }),
            "invoices[1].metadata",
        ),
    ];
    for (request, field) in cases {
        let result = app.client.clone().submit_invoices(request).await;
        assert_names(result, Code::InvalidArgument, field);
    }
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn malformed_claims_are_refused_naming_the_field() {
    let (app, _) = app_with_state().await;
    let before = app.snapshot().await;
    let with = |change: &dyn Fn(&mut ClaimInvoicesRequest)| {
        let mut r = claim_request("w", 10);
        change(&mut r);
        r
    };
    let cases: Vec<(ClaimInvoicesRequest, &str)> = vec![
        (with(&|r| r.worker_id.clear()), "worker_id"),
        (with(&|r| r.worker_id = "w".repeat(256)), "worker_id"),
        (with(&|r| r.max_count = 0), "max_count"),
        (with(&|r| r.max_count = 1001), "max_count"),
        (with(&|r| r.max_count = -5), "max_count"),
        (
            with(&|r| r.lease_duration = Some(duration(Duration::from_millis(500)))),
            "lease_duration",
        ),
        (
            with(&|r| r.lease_duration = Some(duration(Duration::from_secs(3601)))),
            "lease_duration",
        ),
        (
            with(&|r| {
                r.lease_duration = Some(prost_types::Duration {
                    seconds: -30,
                    nanos: 0,
                })
            }),
            "lease_duration",
        ),
        (
            with(&|r| r.wait = Some(duration(Duration::from_secs(31)))),
            "wait",
        ),
        (
            with(&|r| {
                r.wait = Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 1_000_000_000,
                })
            }),
            "wait",
        ),
        (
            with(&|r| r.queues = vec!["ok".into(), String::new()]),
            "queues[1]",
        ),
    ];
    for (request, field) in cases {
        let result = app.try_claim(request).await;
        assert_names(result, Code::InvalidArgument, field);
    }
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn malformed_completions_releases_extensions_and_lookups_are_refused() {
    let (app, lease) = app_with_state().await;
    let id = id_of(&lease);
    let before = app.snapshot().await;
    let token = lease.lease_token.clone();
    let complete =
        |invoice_id: i64, lease_token: &str, provider_reference: &str| CompleteInvoiceRequest {
            invoice_id,
            lease_token: lease_token.into(),
            provider_reference: provider_reference.into(),
        };
    let mut client = app.client.clone();

    for (request, code, field) in [
        (complete(0, &token, ""), Code::InvalidArgument, "invoice_id"),
        (
            complete(-3, &token, ""),
            Code::InvalidArgument,
            "invoice_id",
        ),
        (complete(id, "", ""), Code::InvalidArgument, "lease_token"),
        (
            complete(id, "not-a-token", ""),
            Code::InvalidArgument,
            "lease_token",
        ),
        (
            complete(id + 1, &token, ""),
            Code::InvalidArgument,
            "lease_token",
        ),
        (
            complete(id, &token, &"r".repeat(256)),
            Code::InvalidArgument,
            "provider_reference",
        ),
        (
            complete(9999, "v1.9999.1.0000000000000001", ""),
            Code::NotFound,
            "9999",
        ),
    ] {
        assert_names(client.complete_invoice(request).await, code, field);
    }
    assert_names(
        client
            .complete_invoices(CompleteInvoicesRequest {
                completions: vec![],
            })
            .await,
        Code::InvalidArgument,
        "completions",
    );
    assert_names(
        client
            .complete_invoices(CompleteInvoicesRequest {
                completions: (0..1001).map(|_| complete(id, &token, "")).collect(),
            })
            .await,
        Code::InvalidArgument,
        "completions",
    );

    let release =
        |reason: ReleaseReason, error: &str, retry_after: Option<prost_types::Duration>| {
            ReleaseClaimRequest {
                invoice_id: id,
                lease_token: token.clone(),
                reason: reason as i32,
                error: error.into(),
                retry_after,
            }
        };
    for (request, field) in [
        (release(ReleaseReason::Unspecified, "", None), "reason"),
        (
            ReleaseClaimRequest {
                reason: 42,
                ..release(ReleaseReason::Failed, "", None)
            },
            "reason",
        ),
        (
            release(ReleaseReason::Failed, &"e".repeat(4097), None),
            "error",
        ),
        (release(ReleaseReason::Shutdown, "why", None), "error"),
        (
            release(
                ReleaseReason::Shutdown,
                "",
                Some(duration(Duration::from_secs(1))),
            ),
            "retry_after",
        ),
        (
            release(
                ReleaseReason::Failed,
                "",
                Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
            ),
            "retry_after",
        ),
        (
            release(
                ReleaseReason::Failed,
                "",
                Some(duration(Duration::from_secs(400 * 86400))),
            ),
            "retry_after",
        ),
        (
            ReleaseClaimRequest {
                lease_token: "v1.1.1".into(),
                ..release(ReleaseReason::Failed, "", None)
            },
            "lease_token",
        ),
    ] {
        assert_names(
            client.release_claim(request).await,
            Code::InvalidArgument,
            field,
        );
    }

    let extend = |lease_duration: Option<prost_types::Duration>| ExtendLeaseRequest {
        invoice_id: id,
        lease_token: token.clone(),
        lease_duration,
    };
    for (request, field) in [
        (
            extend(Some(duration(Duration::from_secs(7200)))),
            "lease_duration",
        ),
        (extend(Some(duration(Duration::ZERO))), "lease_duration"),
        (
            ExtendLeaseRequest {
                lease_token: String::new(),
                ..extend(None)
            },
            "lease_token",
        ),
    ] {
        assert_names(
            client.extend_lease(request).await,
            Code::InvalidArgument,
            field,
        );
    }

    for (id, code, field) in [
        (None, Code::InvalidArgument, "id"),
        (
            Some(get_invoice_request::Id::InvoiceId(0)),
            Code::InvalidArgument,
            "invoice_id",
        ),
        (
            Some(get_invoice_request::Id::ExternalId(String::new())),
            Code::InvalidArgument,
            "external_id",
        ),
        (
            Some(get_invoice_request::Id::InvoiceId(4242)),
            Code::NotFound,
            "4242",
        ),
        (
            Some(get_invoice_request::Id::ExternalId("nope".into())),
            Code::NotFound,
            "nope",
        ),
    ] {
        assert_names(
            client.get_invoice(GetInvoiceRequest { id }).await,
            code,
            field,
        );
    }

    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn malformed_operator_requests_are_refused_naming_the_field() {
    use billing_coordinator::proto::{
        CancelInvoicesRequest, ConfigureQueueRequest, GetQueueStatsRequest,
        ListInvoiceEventsRequest, ListInvoicesRequest, RetryInvoicesRequest,
    };
    let (app, _) = app_with_state().await;
    app.configure_queue("kept", Some(2), Some(false)).await;
    let before = app.snapshot().await;
    let queues_before: Vec<String> =
        sqlx::query_scalar("SELECT row_to_json(q)::text FROM queues q")
            .fetch_all(&app.db)
            .await
            .unwrap();
    let mut client = app.client.clone();

    for (request, field) in [
        (
            ListInvoicesRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListInvoicesRequest {
                page_size: 1001,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListInvoicesRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            ListInvoicesRequest {
                page_token: "after:-4".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            ListInvoicesRequest {
                states: vec![0],
                ..Default::default()
            },
            "states[0]",
        ),
        (
            ListInvoicesRequest {
                states: vec![1, 77],
                ..Default::default()
            },
            "states[1]",
        ),
        (
            ListInvoicesRequest {
                queue: "bad queue".into(),
                ..Default::default()
            },
            "queue",
        ),
        (
            ListInvoicesRequest {
                customer_id: "c".repeat(256),
                ..Default::default()
            },
            "customer_id",
        ),
    ] {
        assert_names(
            client.list_invoices(request).await,
            Code::InvalidArgument,
            field,
        );
    }
    for (request, code, field) in [
        (
            ListInvoiceEventsRequest {
                invoice_id: 0,
                ..Default::default()
            },
            Code::InvalidArgument,
            "invoice_id",
        ),
        (
            ListInvoiceEventsRequest {
                invoice_id: 1,
                page_size: 5000,
                ..Default::default()
            },
            Code::InvalidArgument,
            "page_size",
        ),
        (
            ListInvoiceEventsRequest {
                invoice_id: 777,
                ..Default::default()
            },
            Code::NotFound,
            "777",
        ),
    ] {
        assert_names(client.list_invoice_events(request).await, code, field);
    }
    assert_names(
        client
            .get_queue_stats(GetQueueStatsRequest {
                queue: "no spaces".into(),
            })
            .await,
        Code::InvalidArgument,
        "queue",
    );
    for (request, code, field) in [
        (
            RetryInvoicesRequest::default(),
            Code::InvalidArgument,
            "invoice_ids",
        ),
        (
            RetryInvoicesRequest {
                invoice_ids: vec![1],
                queue: "default".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "invoice_ids",
        ),
        (
            RetryInvoicesRequest {
                invoice_ids: (1..=1001).collect(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "invoice_ids",
        ),
        (
            RetryInvoicesRequest {
                invoice_ids: vec![1, -2],
                ..Default::default()
            },
            Code::InvalidArgument,
            "invoice_ids[1]",
        ),
        (
            RetryInvoicesRequest {
                failed_since: Some(prost_types::Timestamp {
                    seconds: i64::MIN,
                    nanos: 0,
                }),
                ..Default::default()
            },
            Code::InvalidArgument,
            "failed_since",
        ),
        (
            RetryInvoicesRequest {
                invoice_ids: vec![1, 99999],
                ..Default::default()
            },
            Code::NotFound,
            "99999",
        ),
    ] {
        assert_names(client.retry_invoices(request).await, code, field);
    }
    for (request, code, field) in [
        (
            CancelInvoicesRequest::default(),
            Code::InvalidArgument,
            "invoice_ids",
        ),
        (
            CancelInvoicesRequest {
                invoice_ids: vec![1],
                customer_id: "x".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "invoice_ids",
        ),
        (
            CancelInvoicesRequest {
                queue: "bad/queue".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "queue",
        ),
        (
            CancelInvoicesRequest {
                invoice_ids: vec![1, 2, 31337],
                ..Default::default()
            },
            Code::NotFound,
            "31337",
        ),
    ] {
        assert_names(client.cancel_invoices(request).await, code, field);
    }
    for (request, field) in [
        (
            ConfigureQueueRequest {
                queue: String::new(),
                weight: Some(2),
                ..Default::default()
            },
            "queue",
        ),
        (
            ConfigureQueueRequest {
                queue: "kept".into(),
                weight: Some(0),
                ..Default::default()
            },
            "weight",
        ),
        (
            ConfigureQueueRequest {
                queue: "kept".into(),
                weight: Some(1001),
                ..Default::default()
            },
            "weight",
        ),
    ] {
        assert_names(
            client.configure_queue(request).await,
            Code::InvalidArgument,
            field,
        );
    }

    assert_eq!(app.snapshot().await, before);
    let queues_after: Vec<String> = sqlx::query_scalar("SELECT row_to_json(q)::text FROM queues q")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(queues_after, queues_before);
}
