//! Load generator: drives a running billing-coordinator over gRPC the way a
//! fleet of billing workers would, and prints what it measured.
//!
//! `burn-down`: submit N invoices, then W workers each claim B at a time and
//! complete them in one CompleteInvoices call (B = 1 uses CompleteInvoice),
//! until nothing is left. Reports invoices/s and claim/complete latency
//! percentiles.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use billing_coordinator::proto::{
    ClaimInvoicesRequest, CompleteInvoiceRequest, CompleteInvoicesRequest, NewInvoice,
    SubmitInvoicesRequest, coordinator_service_client::CoordinatorServiceClient,
};
use clap::Parser;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// Drives a billing-coordinator with a fleet of simulated billing workers.
#[derive(Debug, Parser)]
struct Args {
    /// The service's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Invoices to submit and drain.
    #[arg(long, default_value_t = 100_000)]
    invoices: usize,
    /// Concurrent workers.
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// Invoices per claim.
    #[arg(long, default_value_t = 100)]
    batch: i32,
    /// gRPC connections shared by the workers.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// A label for the output line.
    #[arg(long, default_value = "service")]
    label: String,
}

#[derive(Default)]
struct Latencies {
    claim: Vec<Duration>,
    complete: Vec<Duration>,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.batch < 1 || args.workers == 0 || args.connections == 0 {
        bail!("--batch, --workers and --connections must be at least 1");
    }
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        channels.push(
            Channel::from_shared(args.addr.clone())?
                .connect()
                .await
                .with_context(|| format!("connecting to {}", args.addr))?,
        );
    }

    let run = format!("{:x}", rand::random::<u64>());
    let mut submitter = CoordinatorServiceClient::new(channels[0].clone());
    let invoices: Vec<NewInvoice> = (0..args.invoices)
        .map(|i| NewInvoice {
            external_id: format!("load-{run}-{i}"),
            customer_id: format!("cus-{}", i % 10_000),
            amount_minor: 1000,
            currency: "EUR".into(),
            ..Default::default()
        })
        .collect();
    for chunk in invoices.chunks(1000) {
        submitter
            .submit_invoices(SubmitInvoicesRequest {
                invoices: chunk.to_vec(),
            })
            .await
            .context("submitting")?;
    }

    let latencies = Arc::new(Mutex::new(Latencies::default()));
    let started = Instant::now();
    let workers = (0..args.workers).map(|n| {
        let mut client = CoordinatorServiceClient::new(channels[n % channels.len()].clone());
        let latencies = latencies.clone();
        let batch = args.batch;
        tokio::spawn(async move {
            let mut mine = Latencies::default();
            let mut done = 0usize;
            loop {
                let t = Instant::now();
                let claimed = client
                    .claim_invoices(ClaimInvoicesRequest {
                        worker_id: format!("loadgen-{n}"),
                        max_count: batch,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .invoices;
                mine.claim.push(t.elapsed());
                if claimed.is_empty() {
                    break;
                }
                let completions: Vec<CompleteInvoiceRequest> = claimed
                    .iter()
                    .map(|c| CompleteInvoiceRequest {
                        invoice_id: c.invoice.as_ref().map_or(0, |i| i.invoice_id),
                        lease_token: c.lease_token.clone(),
                        provider_reference: String::new(),
                    })
                    .collect();
                let t = Instant::now();
                if completions.len() == 1 {
                    client
                        .complete_invoice(completions.into_iter().next().expect("one completion"))
                        .await?;
                } else {
                    let results = client
                        .complete_invoices(CompleteInvoicesRequest { completions })
                        .await?
                        .into_inner()
                        .results;
                    if results.iter().any(|r| r.code != 0) {
                        anyhow::bail!("a completion was refused: {results:?}");
                    }
                }
                mine.complete.push(t.elapsed());
                done += claimed.len();
            }
            let mut all = latencies.lock().await;
            all.claim.extend(mine.claim);
            all.complete.extend(mine.complete);
            anyhow::Ok(done)
        })
    });
    let mut drained = 0;
    for worker in futures::future::join_all(workers).await {
        drained += worker.context("a worker panicked")??;
    }
    let elapsed = started.elapsed();
    let mut all = latencies.lock().await;
    all.claim.sort();
    all.complete.sort();
    println!(
        "{label}: burn-down invoices={drained} workers={w} batch={b} seconds={s:.2} \
         invoices_per_s={rate:.0} claim_ms p50={c50:.2} p99={c99:.2} p999={c999:.2} \
         complete_ms p50={k50:.2} p99={k99:.2} p999={k999:.2}",
        label = args.label,
        w = args.workers,
        b = args.batch,
        s = elapsed.as_secs_f64(),
        rate = drained as f64 / elapsed.as_secs_f64(),
        c50 = percentile(&all.claim, 0.5),
        c99 = percentile(&all.claim, 0.99),
        c999 = percentile(&all.claim, 0.999),
        k50 = percentile(&all.complete, 0.5),
        k99 = percentile(&all.complete, 0.99),
        k999 = percentile(&all.complete, 0.999),
    );
    if drained != args.invoices {
        bail!("drained {drained} of {} invoices", args.invoices);
    }
    Ok(())
}
