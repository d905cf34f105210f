//! The gRPC face of the coordinator: decode, call the rules, encode.

pub mod convert;
pub mod status;

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use crate::{
    admin::{InvoiceFilter, QueueChange},
    coordinator::{Coordinator, check_batch},
    error::{Error, Result},
    lease::{Completion, InvoiceRef},
    proto::{self, coordinator_service_server::CoordinatorService},
};

pub use proto::coordinator_service_server::CoordinatorServiceServer;

/// Implements `billing.coordinator.v1.CoordinatorService`.
#[derive(Clone, Debug)]
pub struct CoordinatorApi {
    coordinator: Arc<Coordinator>,
}

impl CoordinatorApi {
    /// The API over `coordinator`.
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }
}

/// Records the call's latency and outcome, and turns errors into statuses.
fn answer<T>(
    rpc: &'static str,
    started: Instant,
    result: Result<T>,
) -> Result<Response<T>, Status> {
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(error) => status::code(error),
    };
    metrics::histogram!(
        "billing_coordinator_rpc_duration_seconds",
        "rpc" => rpc,
        "code" => format!("{code:?}"),
    )
    .record(started.elapsed().as_secs_f64());
    result.map(Response::new).map_err(Status::from)
}

fn completion(request: proto::CompleteInvoiceRequest) -> Result<Completion> {
    Ok(Completion {
        token: convert::lease_token(request.invoice_id, &request.lease_token)?,
        provider_reference: convert::provider_reference(request.provider_reference)?,
    })
}

#[tonic::async_trait]
impl CoordinatorService for CoordinatorApi {
    #[tracing::instrument(skip_all, fields(count = request.get_ref().invoices.len()))]
    async fn submit_invoices(
        &self,
        request: Request<proto::SubmitInvoicesRequest>,
    ) -> Result<Response<proto::SubmitInvoicesResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let invoices = request
                .into_inner()
                .invoices
                .into_iter()
                .enumerate()
                .map(|(i, invoice)| convert::new_invoice(i, invoice))
                .collect::<Result<Vec<_>>>()?;
            let submitted = self.coordinator.submit(invoices).await?;
            Ok(proto::SubmitInvoicesResponse {
                results: submitted
                    .into_iter()
                    .map(|s| proto::SubmitResult {
                        invoice_id: s.invoice_id,
                        external_id: s.external_id,
                        created: s.created,
                        state: convert::to_state(s.state).into(),
                    })
                    .collect(),
            })
        }
        .await;
        answer("SubmitInvoices", started, result)
    }

    #[tracing::instrument(skip_all, fields(worker = %request.get_ref().worker_id, max = request.get_ref().max_count, claimed))]
    async fn claim_invoices(
        &self,
        request: Request<proto::ClaimInvoicesRequest>,
    ) -> Result<Response<proto::ClaimInvoicesResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let request = convert::claim_request(request.into_inner())?;
            let claimed = self.coordinator.claim(request).await?;
            tracing::Span::current().record("claimed", claimed.len());
            Ok(proto::ClaimInvoicesResponse {
                invoices: claimed.into_iter().map(convert::to_claimed).collect(),
            })
        }
        .await;
        answer("ClaimInvoices", started, result)
    }

    #[tracing::instrument(skip_all, fields(invoice = request.get_ref().invoice_id))]
    async fn complete_invoice(
        &self,
        request: Request<proto::CompleteInvoiceRequest>,
    ) -> Result<Response<proto::CompleteInvoiceResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let completed = self
                .coordinator
                .complete(completion(request.into_inner())?)
                .await?;
            Ok(proto::CompleteInvoiceResponse {
                invoice: Some(convert::to_invoice(completed.invoice)),
                already_completed: completed.already_completed,
            })
        }
        .await;
        answer("CompleteInvoice", started, result)
    }

    #[tracing::instrument(skip_all, fields(count = request.get_ref().completions.len()))]
    async fn complete_invoices(
        &self,
        request: Request<proto::CompleteInvoicesRequest>,
    ) -> Result<Response<proto::CompleteInvoicesResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let requests = request.into_inner().completions;
            // Malformed entries are answered on their own; the rest go ahead.
            let mut outcomes: Vec<Option<Result<_>>> = Vec::with_capacity(requests.len());
            let mut valid = Vec::with_capacity(requests.len());
            let ids: Vec<i64> = requests.iter().map(|r| r.invoice_id).collect();
            for request in requests {
                match completion(request) {
                    Ok(c) => {
                        valid.push(c);
                        outcomes.push(None);
                    }
                    Err(e) => outcomes.push(Some(Err(e))),
                }
            }
            check_batch("completions", ids.len())?;
            let mut done = if valid.is_empty() {
                Vec::new()
            } else {
                self.coordinator.complete_many(valid).await?
            }
            .into_iter();
            let results = outcomes
                .into_iter()
                .zip(ids)
                .map(|(outcome, invoice_id)| {
                    let outcome = outcome.or_else(|| done.next()).unwrap_or_else(|| {
                        Err(Error::internal(
                            "fewer completion outcomes than completions",
                        ))
                    });
                    batch_result(invoice_id, outcome)
                })
                .collect();
            Ok(proto::CompleteInvoicesResponse { results })
        }
        .await;
        answer("CompleteInvoices", started, result)
    }

    #[tracing::instrument(skip_all, fields(invoice = request.get_ref().invoice_id))]
    async fn release_claim(
        &self,
        request: Request<proto::ReleaseClaimRequest>,
    ) -> Result<Response<proto::ReleaseClaimResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            let token = convert::lease_token(request.invoice_id, &request.lease_token)?;
            let release = convert::release(&request)?;
            let invoice = self.coordinator.release(token, release).await?;
            Ok(proto::ReleaseClaimResponse {
                invoice: Some(convert::to_invoice(invoice)),
            })
        }
        .await;
        answer("ReleaseClaim", started, result)
    }

    #[tracing::instrument(skip_all, fields(invoice = request.get_ref().invoice_id))]
    async fn extend_lease(
        &self,
        request: Request<proto::ExtendLeaseRequest>,
    ) -> Result<Response<proto::ExtendLeaseResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            let token = convert::lease_token(request.invoice_id, &request.lease_token)?;
            let duration = convert::duration("lease_duration", request.lease_duration)?;
            let extended = self.coordinator.extend(token, duration).await?;
            Ok(proto::ExtendLeaseResponse {
                lease_expires_at: Some(convert::to_timestamp(extended.expires_at)),
                hold_deadline: Some(convert::to_timestamp(extended.hold_deadline)),
                cancel_requested: extended.cancel_requested,
            })
        }
        .await;
        answer("ExtendLease", started, result)
    }

    #[tracing::instrument(skip_all)]
    async fn get_invoice(
        &self,
        request: Request<proto::GetInvoiceRequest>,
    ) -> Result<Response<proto::GetInvoiceResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let invoice = match request.into_inner().id {
                Some(proto::get_invoice_request::Id::InvoiceId(id)) if id > 0 => InvoiceRef::Id(id),
                Some(proto::get_invoice_request::Id::InvoiceId(_)) => {
                    return Err(Error::invalid(
                        "invoice_id",
                        "must be a positive invoice id",
                    ));
                }
                Some(proto::get_invoice_request::Id::ExternalId(ext)) => {
                    InvoiceRef::External(convert::external_id(ext)?)
                }
                None => {
                    return Err(Error::invalid("id", "give invoice_id or external_id"));
                }
            };
            let invoice = self.coordinator.get(invoice).await?;
            Ok(proto::GetInvoiceResponse {
                invoice: Some(convert::to_invoice(invoice)),
            })
        }
        .await;
        answer("GetInvoice", started, result)
    }

    #[tracing::instrument(skip_all, fields(invoice = request.get_ref().invoice_id))]
    async fn list_invoice_events(
        &self,
        request: Request<proto::ListInvoiceEventsRequest>,
    ) -> Result<Response<proto::ListInvoiceEventsResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            if request.invoice_id <= 0 {
                return Err(Error::invalid(
                    "invoice_id",
                    "must be a positive invoice id",
                ));
            }
            let page = convert::page(request.page_size, &request.page_token)?;
            let events = self.coordinator.events(request.invoice_id, page).await?;
            let next_page_token =
                convert::next_page_token(page, events.len(), events.last().map(|e| e.id));
            Ok(proto::ListInvoiceEventsResponse {
                events: events.into_iter().map(convert::to_event).collect(),
                next_page_token,
            })
        }
        .await;
        answer("ListInvoiceEvents", started, result)
    }

    #[tracing::instrument(skip_all)]
    async fn list_invoices(
        &self,
        request: Request<proto::ListInvoicesRequest>,
    ) -> Result<Response<proto::ListInvoicesResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            let filter = InvoiceFilter {
                states: request
                    .states
                    .iter()
                    .enumerate()
                    .map(|(i, s)| convert::state_filter(i, *s))
                    .collect::<Result<_>>()?,
                queue: convert::optional_queue("queue", request.queue)?,
                customer_id: convert::optional_id("customer_id", request.customer_id)?,
            };
            let page = convert::page(request.page_size, &request.page_token)?;
            let invoices = self.coordinator.list(filter, page).await?;
            let next_page_token =
                convert::next_page_token(page, invoices.len(), invoices.last().map(|i| i.id));
            Ok(proto::ListInvoicesResponse {
                invoices: invoices.into_iter().map(convert::to_invoice).collect(),
                next_page_token,
            })
        }
        .await;
        answer("ListInvoices", started, result)
    }

    #[tracing::instrument(skip_all)]
    async fn get_queue_stats(
        &self,
        request: Request<proto::GetQueueStatsRequest>,
    ) -> Result<Response<proto::GetQueueStatsResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let queue = convert::optional_queue("queue", request.into_inner().queue)?;
            let stats = self.coordinator.queue_stats(queue).await?;
            Ok(proto::GetQueueStatsResponse {
                queues: stats.into_iter().map(convert::to_queue_stats).collect(),
            })
        }
        .await;
        answer("GetQueueStats", started, result)
    }

    #[tracing::instrument(skip_all)]
    async fn retry_invoices(
        &self,
        request: Request<proto::RetryInvoicesRequest>,
    ) -> Result<Response<proto::RetryInvoicesResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            let selection = convert::selection(
                request.invoice_ids,
                request.queue,
                request.failed_since,
                String::new(),
            )?;
            let redriven = self.coordinator.retry(selection).await?;
            tracing::info!(retried = redriven.retried, "operator redrove dead letters");
            Ok(proto::RetryInvoicesResponse {
                retried: redriven.retried as i64,
                skipped_invoice_ids: redriven.skipped,
            })
        }
        .await;
        answer("RetryInvoices", started, result)
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_invoices(
        &self,
        request: Request<proto::CancelInvoicesRequest>,
    ) -> Result<Response<proto::CancelInvoicesResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            let selection = convert::selection(
                request.invoice_ids,
                request.queue,
                None,
                request.customer_id,
            )?;
            let cancelled = self.coordinator.cancel(selection).await?;
            tracing::info!(
                cancelled = cancelled.cancelled,
                cancel_requested = cancelled.cancel_requested,
                "operator cancelled invoices"
            );
            Ok(proto::CancelInvoicesResponse {
                cancelled: cancelled.cancelled as i64,
                cancel_requested: cancelled.cancel_requested as i64,
                skipped_invoice_ids: cancelled.skipped,
            })
        }
        .await;
        answer("CancelInvoices", started, result)
    }

    #[tracing::instrument(skip_all, fields(queue = %request.get_ref().queue))]
    async fn configure_queue(
        &self,
        request: Request<proto::ConfigureQueueRequest>,
    ) -> Result<Response<proto::ConfigureQueueResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            let queue = convert::optional_queue("queue", request.queue)?
                .ok_or_else(|| Error::invalid("queue", "must not be empty"))?;
            let config = self
                .coordinator
                .configure_queue(QueueChange {
                    queue,
                    weight: request.weight,
                    serialize_by_customer: request.serialize_by_customer,
                })
                .await?;
            Ok(proto::ConfigureQueueResponse {
                queue: config.queue,
                weight: config.weight,
                serialize_by_customer: config.serialize_by_customer,
            })
        }
        .await;
        answer("ConfigureQueue", started, result)
    }
}

fn batch_result(
    invoice_id: i64,
    outcome: Result<crate::lease::Completed>,
) -> proto::CompleteInvoiceResult {
    match outcome {
        Ok(completed) => proto::CompleteInvoiceResult {
            invoice_id,
            code: tonic::Code::Ok as i32,
            reason: String::new(),
            message: String::new(),
            already_completed: completed.already_completed,
        },
        Err(error) => {
            let (code, reason, message) = status::describe(&error);
            proto::CompleteInvoiceResult {
                invoice_id,
                code: code as i32,
                reason: reason.to_owned(),
                message,
                already_completed: false,
            }
        }
    }
}
