//! The checks and the printed report.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use billing_coordinator::lease::LeaseToken;
use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};

use crate::{Args, Observed, referee::Record};

pub struct Report {
    observed: Observed,
    record: Record,
    states: Vec<(String, i64)>,
    completed: i64,
    double_completions: i64,
    fresh_ok_twice: usize,
    winner_refused: usize,
    superseded_attempts: usize,
    superseded_not_lost: Vec<String>,
    keys_charged: usize,
    keys_missing: i64,
    late_charges: usize,
    late_duplicates: usize,
    recoveries: Vec<Duration>,
    recoveries_clear: Vec<Duration>,
    recoveries_first: Vec<Duration>,
    kills_unmatched: usize,
    lease: Duration,
    invoices: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

impl Report {
    pub async fn gather(
        database_url: &str,
        args: &Args,
        observed: Observed,
        record: Record,
    ) -> anyhow::Result<Self> {
        let mut db = PgConnection::connect(database_url).await?;
        let states: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM invoices GROUP BY state ORDER BY state")
                .fetch_all(&mut db)
                .await?;
        let completed = states
            .iter()
            .find(|(s, _)| s == "completed")
            .map_or(0, |(_, n)| *n);
        let double_completions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT invoice_id FROM invoice_events WHERE kind = 'completed'
                                   GROUP BY invoice_id HAVING count(*) > 1) twice",
        )
        .fetch_one(&mut db)
        .await?;

        // The token each invoice was completed with: the winning lease.
        let winners: HashMap<i64, String> = sqlx::query_as::<_, (i64, i32, i64)>(
            "SELECT id, lease_epoch, lease_nonce FROM invoices WHERE state = 'completed'",
        )
        .fetch_all(&mut db)
        .await?
        .into_iter()
        .map(|(id, epoch, nonce)| {
            let token = LeaseToken {
                invoice_id: id,
                epoch,
                nonce,
            };
            (id, token.to_string())
        })
        .collect();
        let mut fresh_ok: HashMap<i64, usize> = HashMap::new();
        let (mut winner_refused, mut superseded_attempts) = (0, 0);
        let mut superseded_not_lost = Vec::new();
        for attempt in &record.completions {
            let won = winners.get(&attempt.invoice_id) == Some(&attempt.token);
            match (won, attempt.outcome.as_str()) {
                (true, "OK") => *fresh_ok.entry(attempt.invoice_id).or_default() += 1,
                (true, "RETRY_OK") => {}
                (true, _) => winner_refused += 1,
                (false, outcome) => {
                    superseded_attempts += 1;
                    if outcome != "LEASE_LOST" {
                        superseded_not_lost
                            .push(format!("invoice {} answered {outcome}", attempt.invoice_id));
                    }
                }
            }
        }
        let fresh_ok_twice = fresh_ok.values().filter(|n| **n > 1).count();

        let mut keys: HashMap<&str, ()> = HashMap::new();
        for charge in &record.charges {
            keys.insert(&charge.key, ());
        }
        let keys_missing: i64 = {
            let charged: Vec<String> = keys.keys().map(|k| (*k).to_owned()).collect();
            sqlx::query_scalar(
                "SELECT count(*) FROM invoices WHERE state = 'completed'
                 AND NOT (idempotency_key::text = ANY($1))",
            )
            .bind(&charged)
            .fetch_one(&mut db)
            .await?
        };
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut late_duplicates = 0;
        for charge in &record.charges {
            let n = seen.entry(&charge.key).or_default();
            *n += 1;
            if charge.late && *n > 1 {
                late_duplicates += 1;
            }
        }
        let late_charges = record.charges.iter().filter(|c| c.late).count();

        // When each killed lease's invoice became claimable again.
        let claimable: HashMap<(i64, i32), DateTime<Utc>> =
            sqlx::query_as::<_, (i64, i32, DateTime<Utc>, Option<DateTime<Utc>>)>(
                "SELECT invoice_id, lease_epoch, at,
                    substring(detail FROM 'claimable again at (.*)$')::timestamptz
             FROM invoice_events WHERE kind = 'expired'",
            )
            .fetch_all(&mut db)
            .await?
            .into_iter()
            .map(|(id, epoch, rescued, available)| {
                ((id, epoch), available.map_or(rescued, |a| a.max(rescued)))
            })
            .collect();
        let _ = db.close().await;
        let lease = Duration::from_millis(args.lease_ms);
        let near_outage = |at: SystemTime| {
            observed.pg_restarts.iter().any(|(down, up)| {
                at + lease + Duration::from_secs(1) >= *down && at <= *up + Duration::from_secs(5)
            })
        };
        let (mut recoveries, mut recoveries_clear, mut recoveries_first, mut kills_unmatched) =
            (Vec::new(), Vec::new(), Vec::new(), 0);
        for kill in &record.kills {
            let Some(back) = claimable.get(&(kill.invoice_id, kill.epoch)) else {
                // Completed by nobody else and never expired can only mean the
                // run ended first; it is counted, not hidden.
                kills_unmatched += 1;
                continue;
            };
            let back: SystemTime = (*back).into();
            let took = back.duration_since(kill.at).unwrap_or_default();
            recoveries.push(took);
            if !near_outage(kill.at) {
                recoveries_clear.push(took);
                // The invoice's first lease: its backoff is the shortest
                // (base 1 s, equal jitter), so TTL + 1 s is the goal for it.
                if kill.epoch == 1 {
                    recoveries_first.push(took);
                }
            }
        }
        recoveries.sort();
        recoveries_clear.sort();
        recoveries_first.sort();

        Ok(Self {
            keys_charged: keys.len(),
            observed,
            record,
            states,
            completed,
            double_completions,
            fresh_ok_twice,
            winner_refused,
            superseded_attempts,
            superseded_not_lost,
            keys_missing,
            late_charges,
            late_duplicates,
            recoveries,
            recoveries_clear,
            recoveries_first,
            kills_unmatched,
            lease,
            invoices: args.invoices,
        })
    }

    /// The invariants that broke, in words; empty when all held.
    pub fn broken(&self) -> Vec<String> {
        let mut broken = Vec::new();
        if !self.observed.drained {
            broken.push("the run timed out before every invoice was completed".to_owned());
        }
        let lost = self.invoices as i64 - self.completed;
        if lost != 0 {
            broken.push(format!("{lost} invoices lost or stuck: {:?}", self.states));
        }
        if self.double_completions > 0 || self.fresh_ok_twice > 0 {
            broken.push(format!(
                "invoices completed twice: {} by the audit trail, {} by workers' answers",
                self.double_completions, self.fresh_ok_twice
            ));
        }
        if !self.superseded_not_lost.is_empty() {
            broken.push(format!(
                "completions with a superseded token not answered LEASE_LOST: {:?}",
                &self.superseded_not_lost[..self.superseded_not_lost.len().min(5)]
            ));
        }
        if self.winner_refused > 0 {
            broken.push(format!(
                "{} completions with the winning token were refused",
                self.winner_refused
            ));
        }
        if self.keys_missing > 0 {
            broken.push(format!(
                "{} completed invoices were never charged",
                self.keys_missing
            ));
        }
        broken
    }

    pub fn print(&self, args: &Args, took: Duration) {
        let r = &self.record;
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        let goal = self.lease + Duration::from_secs(1);
        let rows: Vec<(&str, String)> = vec![
            ("invoices", self.invoices.to_string()),
            (
                "replicas / workers / batch",
                format!("{} / {} / {}", args.replicas, args.workers, args.batch),
            ),
            ("lease (TTL)", ms(self.lease)),
            ("run time", format!("{:.1} s", took.as_secs_f64())),
            (
                "worker processes started",
                self.observed.worker_processes.to_string(),
            ),
            (
                "leases held by SIGKILLed workers",
                r.kills.len().to_string(),
            ),
            ("leases stalled past expiry", r.stalls.to_string()),
            ("leases released as failed", r.releases.to_string()),
            (
                "replica SIGKILLs (and restarts)",
                self.observed.replica_kills.to_string(),
            ),
            (
                "PostgreSQL crash-restarts",
                self.observed.pg_restarts.len().to_string(),
            ),
            (
                "completed",
                format!("{} (must be {})", self.completed, self.invoices),
            ),
            (
                "lost or stuck",
                format!("{} (must be 0)", self.invoices as i64 - self.completed),
            ),
            (
                "completed twice",
                format!(
                    "{} (must be 0)",
                    self.double_completions.max(self.fresh_ok_twice as i64)
                ),
            ),
            (
                "completions with a superseded token",
                self.superseded_attempts.to_string(),
            ),
            (
                "  of which not LEASE_LOST",
                format!("{} (must be 0)", self.superseded_not_lost.len()),
            ),
            (
                "charge attempts at the provider",
                r.charges.len().to_string(),
            ),
            (
                "distinct idempotency keys charged",
                format!("{} (= invoices billed)", self.keys_charged),
            ),
            (
                "second charges absorbed by the key",
                r.duplicates.to_string(),
            ),
            (
                "charges sent after the lease expired",
                self.late_charges.to_string(),
            ),
            (
                "  of which absorbed by the key",
                self.late_duplicates.to_string(),
            ),
            (
                "crashed invoice claimable again (first failure), p50 / p99 / max",
                format!(
                    "{} / {} / {} over {} kills (goal <= {})",
                    ms(percentile(&self.recoveries_first, 0.5)),
                    ms(percentile(&self.recoveries_first, 0.99)),
                    ms(percentile(&self.recoveries_first, 1.0)),
                    self.recoveries_first.len(),
                    ms(goal)
                ),
            ),
            (
                "  any failure, away from PostgreSQL restarts, p99 / max",
                format!(
                    "{} / {} over {} kills (backoff doubles per failure)",
                    ms(percentile(&self.recoveries_clear, 0.99)),
                    ms(percentile(&self.recoveries_clear, 1.0)),
                    self.recoveries_clear.len()
                ),
            ),
            (
                "  every kill, p99 / max",
                format!(
                    "{} / {} over {} kills",
                    ms(percentile(&self.recoveries, 0.99)),
                    ms(percentile(&self.recoveries, 1.0)),
                    self.recoveries.len()
                ),
            ),
            (
                "killed leases not yet taken back at the end",
                self.kills_unmatched.to_string(),
            ),
        ];
        println!();
        println!("| chaos run | |");
        println!("| --- | --- |");
        for (what, value) in rows {
            println!("| {what} | {value} |");
        }
        println!();
    }
}
