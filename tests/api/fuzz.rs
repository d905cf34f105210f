//! Property-based bad input: random and almost-valid requests to every RPC.
//! Whatever arrives, the server answers with a deliberate status (never
//! INTERNAL, UNKNOWN or UNAVAILABLE, never a panic), every refusal says what
//! was wrong, and a refused request changes nothing.

use std::collections::BTreeMap;

use billing_coordinator::proto::{
    CancelInvoicesRequest, ClaimInvoicesRequest, CompleteInvoiceRequest, CompleteInvoicesRequest,
    ConfigureQueueRequest, ExtendLeaseRequest, GetInvoiceRequest, GetQueueStatsRequest,
    ListInvoiceEventsRequest, ListInvoicesRequest, NewInvoice, ReleaseClaimRequest,
    RetryInvoicesRequest, SubmitInvoicesRequest, get_invoice_request,
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use tonic::Code;

use billing_coordinator::proto::coordinator_service_client::CoordinatorServiceClient;

use crate::helpers::{TestApp, invoice, spawn_app};

type Client = CoordinatorServiceClient<tonic::transport::Channel>;

/// Cases per RPC.
const CASES: u32 = 150;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9_.:-]{1,12}",
        "\\PC{0,40}",
        ".{0,300}",
        Just("\0".to_owned()),
        Just("x".repeat(300)),
        Just("default".to_owned()),
        Just("EUR".to_owned()),
    ]
}

fn small_id() -> impl Strategy<Value = i64> {
    prop_oneof![-3i64..6, any::<i64>()]
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        text(),
        (small_id(), -2i32..4, any::<u64>()).prop_map(|(i, e, n)| format!("v1.{i}.{e}.{n:016x}")),
        (small_id(), any::<i32>()).prop_map(|(i, e)| format!("v1.{i}.{e}.zz")),
    ]
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    prop_oneof![
        Just(None),
        (-5i64..4000, -2i32..1_000_000_002)
            .prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
    ]
}

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop_oneof![
        Just(None),
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
        (1_700_000_000i64..1_900_000_000, 0i32..1_000_000_000)
            .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
    ]
}

fn metadata() -> impl Strategy<Value = std::collections::HashMap<String, String>> {
    prop::collection::hash_map(text(), text(), 0..4)
}

fn new_invoice() -> impl Strategy<Value = NewInvoice> {
    prop_oneof![random_invoice(), almost_valid_invoice()]
}

/// A valid invoice with one field replaced by something random.
fn almost_valid_invoice() -> impl Strategy<Value = NewInvoice> {
    (
        0usize..10,
        text(),
        any::<i64>(),
        timestamp(),
        metadata(),
        "[a-z0-9-]{1,20}",
    )
        .prop_map(|(field, junk, number, at, metadata, external_id)| {
            let mut new = invoice(&external_id);
            match field {
                0 => new.external_id = junk,
                1 => new.queue = junk,
                2 => new.customer_id = junk,
                3 => new.amount_minor = number,
                4 => new.currency = junk,
                5 => new.available_at = at,
                6 => new.priority = number as i32,
                7 => new.max_attempts = number as i32,
                8 => new.metadata = metadata,
                _ => new.serialization_key = junk,
            }
            new
        })
}

fn random_invoice() -> impl Strategy<Value = NewInvoice> {
    (
        (text(), text(), text(), any::<i64>(), text()),
        (timestamp(), -2i32..12, -2i32..110, metadata(), text()),
    )
        .prop_map(
            |(
                (external_id, queue, customer_id, amount_minor, currency),
                (available_at, priority, max_attempts, metadata, serialization_key),
            )| NewInvoice {
                external_id,
                queue,
                customer_id,
                amount_minor,
                currency,
                available_at,
                priority,
                max_attempts,
                metadata,
                serialization_key,
            },
        )
}

/// Runs `call` on `CASES` generated requests against one server.
fn fuzz<S, F, Fut, T>(name: &str, strategy: S, call: F)
where
    S: Strategy,
    S::Value: Clone + std::fmt::Debug,
    F: Fn(Client, S::Value) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    T: std::fmt::Debug,
{
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let app = runtime.block_on(seeded_app());
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let codes = std::sync::Mutex::new(BTreeMap::<String, u32>::new());
    let result = runner.run(&strategy, |request| {
        let (outcome, before, after) = runtime.block_on(async {
            let before = app.snapshot().await;
            let outcome = call(app.client.clone(), request.clone()).await;
            let after = app.snapshot().await;
            (outcome, before, after)
        });
        let code = match &outcome {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        *codes
            .lock()
            .unwrap()
            .entry(format!("{code:?}"))
            .or_default() += 1;
        prop_assert!(
            matches!(
                code,
                Code::Ok
                    | Code::InvalidArgument
                    | Code::NotFound
                    | Code::FailedPrecondition
                    | Code::AlreadyExists
            ),
            "{name}: {outcome:?} for {request:?}"
        );
        if let Err(status) = &outcome {
            prop_assert!(!status.message().is_empty(), "{name}: an empty message");
            if status.code() == Code::InvalidArgument || status.code() == Code::AlreadyExists {
                prop_assert_eq!(&before, &after, "{}: a refused request changed rows", name);
            }
        }
        Ok(())
    });
    eprintln!(
        "fuzz {name}: {CASES} cases, answers {:?}",
        codes.lock().unwrap()
    );
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// A server holding pending, leased, completed and failed invoices.
async fn seeded_app() -> TestApp {
    let app = spawn_app().await;
    let mut fragile = invoice("fragile");
    fragile.max_attempts = 1;
    app.submit(vec![invoice("a"), invoice("b"), invoice("c"), fragile])
        .await;
    let claimed = app.claim("w", 4).await;
    app.complete(&claimed[0]).await.unwrap();
    for c in &claimed {
        if c.invoice.as_ref().unwrap().external_id == "fragile" {
            app.release_failed(c, "boom").await;
        }
    }
    app
}

#[test]
fn random_submissions_get_a_clear_answer() {
    fuzz(
        "SubmitInvoices",
        prop::collection::vec(new_invoice(), 0..4),
        |mut client, invoices| async move {
            client
                .submit_invoices(SubmitInvoicesRequest { invoices })
                .await
        },
    );
}

#[test]
fn random_claims_get_a_clear_answer() {
    let strategy = (
        text(),
        -3i32..1100,
        duration(),
        prop::collection::vec(text(), 0..3),
        duration(),
    );
    fuzz(
        "ClaimInvoices",
        strategy,
        |mut client, (worker_id, max_count, lease_duration, queues, wait)| async move {
            // Long-polls are bounded by the server; keep each case short.
            let wait = wait.filter(|w| w.seconds <= 0 || w.seconds > 30);

            client
                .claim_invoices(ClaimInvoicesRequest {
                    worker_id,
                    max_count,
                    lease_duration,
                    queues,
                    wait,
                })
                .await
        },
    );
}

#[test]
fn random_completions_get_a_clear_answer() {
    fuzz(
        "CompleteInvoice(s)",
        (small_id(), token(), text(), any::<bool>()),
        |mut client, (invoice_id, lease_token, provider_reference, batch)| async move {
            let one = CompleteInvoiceRequest {
                invoice_id,
                lease_token,
                provider_reference,
            };

            if batch {
                client
                    .complete_invoices(CompleteInvoicesRequest {
                        completions: vec![one.clone(), one],
                    })
                    .await
                    .map(|_| ())
            } else {
                client.complete_invoice(one).await.map(|_| ())
            }
        },
    );
}

#[test]
fn random_releases_and_extensions_get_a_clear_answer() {
    let strategy = (
        small_id(),
        token(),
        -1i32..4,
        text(),
        duration(),
        any::<bool>(),
        -1i32..3,
        any::<u64>(),
    );
    fuzz(
        "ReleaseClaim/ExtendLease",
        strategy,
        |mut client, (invoice_id, lease_token, reason, error, d, extend, epoch, nonce)| async move {
            // Half the time, a well-formed token of the invoice named.
            let lease_token = if nonce % 2 == 0 {
                format!("v1.{invoice_id}.{epoch}.{nonce:016x}")
            } else {
                lease_token
            };

            if extend {
                client
                    .extend_lease(ExtendLeaseRequest {
                        invoice_id,
                        lease_token,
                        lease_duration: d,
                    })
                    .await
                    .map(|_| ())
            } else {
                client
                    .release_claim(ReleaseClaimRequest {
                        invoice_id,
                        lease_token,
                        reason,
                        error,
                        retry_after: d,
                    })
                    .await
                    .map(|_| ())
            }
        },
    );
}

#[test]
fn random_lookups_get_a_clear_answer() {
    let strategy = (
        small_id(),
        text(),
        -2i32..1100,
        text(),
        prop::collection::vec(-1i32..7, 0..3),
        0u8..4,
    );
    fuzz(
        "Get/List/Stats",
        strategy,
        |mut client, (id, s, page_size, page_token, states, which)| async move {
            let c = &mut client;

            match which {
                0 => c
                    .get_invoice(GetInvoiceRequest {
                        id: Some(if page_size % 2 == 0 {
                            get_invoice_request::Id::InvoiceId(id)
                        } else {
                            get_invoice_request::Id::ExternalId(s)
                        }),
                    })
                    .await
                    .map(|_| ()),
                1 => c
                    .list_invoice_events(ListInvoiceEventsRequest {
                        invoice_id: id,
                        page_size,
                        page_token,
                    })
                    .await
                    .map(|_| ()),
                2 => c
                    .list_invoices(ListInvoicesRequest {
                        states,
                        queue: s.clone(),
                        customer_id: s,
                        page_size,
                        page_token,
                    })
                    .await
                    .map(|_| ()),
                _ => c
                    .get_queue_stats(GetQueueStatsRequest { queue: s })
                    .await
                    .map(|_| ()),
            }
        },
    );
}

#[test]
fn random_operator_actions_get_a_clear_answer() {
    let strategy = (
        prop::collection::vec(small_id(), 0..4),
        text(),
        timestamp(),
        text(),
        prop::option::of(-2i32..1100),
        prop::option::of(any::<bool>()),
        0u8..3,
    );
    fuzz(
        "Retry/Cancel/ConfigureQueue",
        strategy,
        |mut client, (ids, queue, since, customer, weight, serialize, which)| async move {
            let c = &mut client;

            match which {
                0 => c
                    .retry_invoices(RetryInvoicesRequest {
                        invoice_ids: ids,
                        queue,
                        failed_since: since,
                    })
                    .await
                    .map(|_| ()),
                1 => c
                    .cancel_invoices(CancelInvoicesRequest {
                        invoice_ids: ids,
                        queue,
                        customer_id: customer,
                    })
                    .await
                    .map(|_| ()),
                _ => c
                    .configure_queue(ConfigureQueueRequest {
                        queue,
                        weight,
                        serialize_by_customer: serialize,
                    })
                    .await
                    .map(|_| ()),
            }
        },
    );
}
