//! One worker process: claim, charge through the referee, complete; and, by
//! the dice, die mid-lease, stall past the lease, or release with an error.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use billing_coordinator::proto::{
    ClaimInvoicesRequest, ClaimedInvoice, CompleteInvoiceRequest, ReleaseClaimRequest,
    ReleaseReason, coordinator_service_client::CoordinatorServiceClient,
};
use rand::Rng;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::Mutex,
};
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};
use tonic_types::StatusExt;

use crate::Args;

type Client = CoordinatorServiceClient<Channel>;

/// The referee connection; one line out, one line back.
struct Referee {
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Referee {
    async fn say(&mut self, line: String) -> anyhow::Result<String> {
        self.write.write_all(format!("{line}\n").as_bytes()).await?;
        self.lines.next_line().await?.context("the referee hung up")
    }
}

struct Worker {
    name: String,
    clients: Vec<Client>,
    referee: Mutex<Referee>,
    lease: Duration,
}

/// Calls that may fail because a replica or PostgreSQL is down are retried
/// on the next replica; the same token makes the retry safe.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

fn id(c: &ClaimedInvoice) -> i64 {
    c.invoice.as_ref().map_or(0, |i| i.invoice_id)
}

fn epoch(c: &ClaimedInvoice) -> i32 {
    c.lease_token
        .split('.')
        .nth(2)
        .and_then(|e| e.parse().ok())
        .unwrap_or(-1)
}

impl Worker {
    fn client(&self, attempt: usize) -> Client {
        self.clients[attempt % self.clients.len()].clone()
    }

    async fn charge(&self, c: &ClaimedInvoice) -> anyhow::Result<()> {
        let expires = c
            .lease_expires_at
            .as_ref()
            .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_millis() as i64;
        let late = u8::from(now > expires);
        self.referee
            .lock()
            .await
            .say(format!(
                "CHARGE {} {} {} {late}",
                c.idempotency_key,
                id(c),
                epoch(c)
            ))
            .await?;
        Ok(())
    }

    async fn complete(&self, c: &ClaimedInvoice) -> anyhow::Result<()> {
        let mut outcome = String::from("GAVE_UP");
        for attempt in 0..600 {
            let answer = self
                .client(attempt)
                .complete_invoice(CompleteInvoiceRequest {
                    invoice_id: id(c),
                    lease_token: c.lease_token.clone(),
                    provider_reference: format!("ch-{}", id(c)),
                })
                .await;
            match answer {
                Ok(r) if r.get_ref().already_completed => outcome = "RETRY_OK".into(),
                Ok(_) => outcome = "OK".into(),
                Err(s)
                    if s.get_details_error_info()
                        .is_some_and(|i| i.reason == "LEASE_LOST") =>
                {
                    outcome = "LEASE_LOST".into();
                }
                Err(s) if transient(&s) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(s) => outcome = format!("{:?}", s.code()),
            }
            break;
        }
        self.referee
            .lock()
            .await
            .say(format!("COMPLETE {} {} {outcome}", id(c), c.lease_token))
            .await?;
        Ok(())
    }

    async fn release(&self, c: &ClaimedInvoice) -> anyhow::Result<()> {
        for attempt in 0..600 {
            let answer = self
                .client(attempt)
                .release_claim(ReleaseClaimRequest {
                    invoice_id: id(c),
                    lease_token: c.lease_token.clone(),
                    reason: ReleaseReason::Failed as i32,
                    error: "provider declined: try again".into(),
                    retry_after: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 100_000_000,
                    }),
                })
                .await;
            match answer {
                Err(s) if transient(&s) => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => break,
            }
        }
        self.referee
            .lock()
            .await
            .say(format!("RELEASE {}", id(c)))
            .await?;
        Ok(())
    }
}

enum Fate {
    Stall,
    Fail,
    Bill,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut clients = Vec::new();
    for addr in &args.addrs {
        let channel = Endpoint::from_shared(addr.clone())?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        clients.push(CoordinatorServiceClient::new(channel));
    }
    let stream = TcpStream::connect(args.referee.context("--referee")?).await?;
    let (read, write) = stream.into_split();
    let worker = Arc::new(Worker {
        name: args.name.clone(),
        clients,
        referee: Mutex::new(Referee {
            lines: BufReader::new(read).lines(),
            write,
        }),
        lease: Duration::from_millis(args.lease_ms),
    });
    let mut attempt = rand::rng().random_range(0..worker.clients.len());
    loop {
        let claimed = worker
            .client(attempt)
            .claim_invoices(ClaimInvoicesRequest {
                worker_id: worker.name.clone(),
                max_count: args.batch,
                lease_duration: Some(prost_types::Duration {
                    seconds: (worker.lease.as_millis() / 1000) as i64,
                    nanos: ((worker.lease.as_millis() % 1000) * 1_000_000) as i32,
                }),
                queues: Vec::new(),
                wait: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
            })
            .await;
        let claimed = match claimed {
            Ok(answer) => answer.into_inner().invoices,
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if claimed.is_empty() {
            continue;
        }
        // A death takes every lease the worker holds, so it is drawn once
        // per batch: kill_pct of batches, and so of leases, die.
        let (dies, charge_first, fates) = {
            let mut rng = rand::rng();
            let dies = rng.random_bool((args.kill_pct / 100.0).clamp(0.0, 1.0));
            let rest = (100.0 - args.kill_pct).max(f64::MIN_POSITIVE);
            let fates: Vec<Fate> = claimed
                .iter()
                .map(|_| {
                    let roll: f64 = rng.random_range(0.0..rest);
                    if roll < args.stall_pct {
                        Fate::Stall
                    } else if roll < args.stall_pct + args.fail_pct {
                        Fate::Fail
                    } else {
                        Fate::Bill
                    }
                })
                .collect();
            (dies, rng.random_bool(0.5), fates)
        };
        if dies {
            if charge_first {
                worker.charge(&claimed[0]).await?;
            }
            for c in &claimed {
                worker
                    .referee
                    .lock()
                    .await
                    .say(format!("KILL {} {}", id(c), epoch(c)))
                    .await?;
            }
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(std::process::id().to_string())
                .status();
            std::thread::sleep(Duration::from_secs(60));
            unreachable!("SIGKILL ends the process");
        }
        let leases = claimed.into_iter().zip(fates).map(|(c, fate)| {
            let worker = worker.clone();
            async move {
                match fate {
                    Fate::Stall => {
                        worker
                            .referee
                            .lock()
                            .await
                            .say(format!("STALL {}", id(&c)))
                            .await?;
                        tokio::time::sleep(worker.lease + Duration::from_millis(1500)).await;
                        worker.charge(&c).await?;
                        worker.complete(&c).await
                    }
                    Fate::Fail => worker.release(&c).await,
                    Fate::Bill => {
                        worker.charge(&c).await?;
                        worker.complete(&c).await
                    }
                }
            }
        });
        for result in futures::future::join_all(leases).await {
            result?;
        }
    }
}
