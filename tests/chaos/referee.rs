//! The fake billing provider, which also keeps the record the checks need.
//!
//! Workers speak a line protocol over loopback TCP and wait for each answer,
//! so a line is recorded before a worker can act on it (or kill itself):
//!
//! ```text
//! CHARGE <idempotency key> <invoice> <epoch> <late 0|1>  -> "OK new" | "OK duplicate"
//! KILL <invoice> <epoch>            the worker is about to SIGKILL itself holding this lease
//! COMPLETE <invoice> <token> <outcome>   what CompleteInvoice finally answered
//! STALL <invoice> | RELEASE <invoice>    a stalled lease, a failed release
//! ```

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
    task::JoinHandle,
};

/// One charge attempt the provider received.
#[derive(Clone, Debug)]
pub struct Charge {
    pub key: String,
    /// Sent after the worker's lease had expired.
    pub late: bool,
}

/// A worker that killed itself holding a lease.
#[derive(Clone, Debug)]
pub struct Kill {
    pub invoice_id: i64,
    pub epoch: i32,
    pub at: SystemTime,
}

/// What CompleteInvoice finally answered a worker.
#[derive(Clone, Debug)]
pub struct CompletionAttempt {
    pub invoice_id: i64,
    pub token: String,
    /// `OK`, `RETRY_OK` (already completed with this token), `LEASE_LOST`, or another code.
    pub outcome: String,
}

/// Everything the referee saw.
#[derive(Default, Debug)]
pub struct Record {
    pub charges: Vec<Charge>,
    pub kills: Vec<Kill>,
    pub completions: Vec<CompletionAttempt>,
    pub stalls: usize,
    pub releases: usize,
    /// Charges the provider absorbed because it had seen the key before.
    pub duplicates: usize,
}

pub struct Referee {
    pub addr: SocketAddr,
    record: Arc<Mutex<Record>>,
    task: JoinHandle<()>,
}

impl Referee {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let record = Arc::new(Mutex::new(Record::default()));
        let keys: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let task = {
            let record = record.clone();
            tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    let (record, keys) = (record.clone(), keys.clone());
                    tokio::spawn(async move {
                        let (read, mut write) = socket.into_split();
                        let mut lines = BufReader::new(read).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            let answer = handle(&line, &record, &keys);
                            if write.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            })
        };
        Ok(Self { addr, record, task })
    }

    pub async fn finish(self) -> Record {
        self.task.abort();
        std::mem::take(&mut *self.record.lock().expect("the record"))
    }
}

fn handle(
    line: &str,
    record: &Mutex<Record>,
    keys: &Mutex<HashMap<String, usize>>,
) -> &'static str {
    let parts: Vec<&str> = line.split_whitespace().collect();
    let mut record = record.lock().expect("the record");
    match parts.as_slice() {
        ["CHARGE", key, _invoice, _epoch, late] => {
            let mut keys = keys.lock().expect("the keys");
            let seen = keys.entry((*key).to_owned()).or_default();
            *seen += 1;
            let duplicate = *seen > 1;
            record.duplicates += usize::from(duplicate);
            record.charges.push(Charge {
                key: (*key).to_owned(),
                late: *late == "1",
            });
            if duplicate {
                "OK duplicate\n"
            } else {
                "OK new\n"
            }
        }
        ["KILL", invoice, epoch] => {
            record.kills.push(Kill {
                invoice_id: invoice.parse().unwrap_or(-1),
                epoch: epoch.parse().unwrap_or(-1),
                at: SystemTime::now(),
            });
            "OK\n"
        }
        ["COMPLETE", invoice, token, outcome] => {
            record.completions.push(CompletionAttempt {
                invoice_id: invoice.parse().unwrap_or(-1),
                token: (*token).to_owned(),
                outcome: (*outcome).to_owned(),
            });
            "OK\n"
        }
        ["STALL", _] => {
            record.stalls += 1;
            "OK\n"
        }
        ["RELEASE", _] => {
            record.releases += 1;
            "OK\n"
        }
        _ => "ERR\n",
    }
}
