//! Where claims start reading the claim index, so that they do not wade
//! through the entries of invoices that stopped being pending.
//!
//! A claim reads `invoices_queue_claim_order` (queue, priority, available_at,
//! id) in order. Each invoice it leases leaves its entry behind, pointing at
//! a row version that is no longer pending. Vacuum removes such entries, and
//! index scans mark them dead as they pass, but both only once no transaction
//! can still see the old version. One transaction held open anywhere in the
//! cluster (a long report, a forgotten session, a standby with
//! `hot_standby_feedback`) stops both, and a claim that starts at the front
//! then visits every invoice leased since: throughput falls as the pile grows.
//!
//! So each replica remembers, per lane (a queue and a priority), the key of
//! the first invoice its latest claim there took. Everything before that key
//! was, when the claim looked, leased, finished, locked by a concurrent claim
//! or held back by a busy serialization key, and claims read from the key on.
//! Whatever can put a claimable invoice behind a cursor moves it back:
//! - a write that makes invoices pending (submit, release, rescue, redrive)
//!   lowers each lane it touched to the smallest key it wrote: on this
//!   replica at once, and on the others through the notification that also
//!   wakes their long-polls ([`encode`]);
//! - invoices with a serialization key are skipped while their key is busy,
//!   so leasing or finishing one resets its queue's lanes;
//! - a claim that failed may have held rows that concurrent claims then
//!   skipped, so it resets the lanes it read;
//! - a lost listener connection resets every lane, since notifications sent
//!   meanwhile are gone;
//! - and every `full_scan_interval` a background sweep reads each lane from
//!   the front up to its cursor and moves the cursor back to any pending
//!   invoice it finds there, so that nothing this list misses (an operator's
//!   manual UPDATE, say) waits much longer than that. The sweep pays for the
//!   walk once per interval and off the claim path, instead of on every
//!   claim.
//!
//! The same reasoning keeps a cache of the queues that have pending invoices,
//! which is found by walking the index from the front: the sweep refreshes
//! it; a write that names a queue the list lacks adds it at once, and one
//! claim then reads the list again for the queue's weight. Claims that name
//! their queues take them from this list too, so a change of weights on any
//! replica marks it stale everywhere.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write,
    sync::Mutex,
    time::Duration,
};

use crate::lease::{PRIORITIES, Timestamp};

/// The weight of a queue nobody configured (the `queues` table's default).
const DEFAULT_WEIGHT: i32 = 1;

/// How often the cursors are swept, and the rescuer reads its whole index, by default.
pub const DEFAULT_FULL_SCAN_INTERVAL: Duration = Duration::from_secs(30);

/// An invoice's place in its lane: (available_at, id).
pub(crate) type LaneKey = (Timestamp, i64);

/// Where a claim statement starts reading one lane, and the lane's version
/// when it was read: the claim may move the cursor forward afterwards only if
/// nothing moved it back meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LaneStart {
    pub queue: String,
    pub priority: i16,
    pub after: Option<LaneKey>,
    version: u64,
}

/// Something that may have put claimable invoices behind cursors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// `count` invoices became pending in this lane, the first at this key.
    /// The count tells listeners how many waiting claims to wake.
    Pending {
        queue: String,
        priority: i16,
        key: LaneKey,
        count: u32,
    },
    /// Anything in this queue may be claimable again.
    Queue(String),
    /// The set of queues or their weights changed.
    Queues,
    /// Anything anywhere.
    All,
}

#[derive(Clone, Copy, Debug, Default)]
struct Lane {
    after: Option<LaneKey>,
    version: u64,
}

/// The cached list of queues with pending invoices.
#[derive(Debug, Default)]
struct Queues {
    /// The queues and their weights, if ever read.
    list: Option<Vec<(String, i32)>>,
    /// A write named a queue the list lacks, or weights changed.
    stale: bool,
    /// A claim is reading the list again.
    refreshing: bool,
}

/// What a claim should do for the list of queues with pending invoices.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum QueueList {
    /// Use this list.
    Use(Vec<(String, i32)>),
    /// Read the list, then hand it to [`ClaimCursors::set_active_queues`].
    Read,
}

#[derive(Debug, Default)]
struct State {
    lanes: HashMap<(String, i16), Lane>,
    queues: Queues,
    next_version: u64,
}

/// The claim cursors of one replica.
#[derive(Debug, Default)]
pub(crate) struct ClaimCursors {
    state: Mutex<State>,
}

impl ClaimCursors {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a cache: what a panicking holder left is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a claim over `queues` starts each of their lanes, ordered by
    /// priority and then by the order of `queues`.
    pub fn starts(&self, queues: &[&str]) -> Vec<LaneStart> {
        let mut state = self.lock();
        let mut starts = Vec::with_capacity(queues.len() * PRIORITIES.len());
        for priority in PRIORITIES {
            for queue in queues {
                let lane = *state
                    .lanes
                    .entry(((*queue).to_owned(), priority))
                    .or_default();
                starts.push(LaneStart {
                    queue: (*queue).to_owned(),
                    priority,
                    after: lane.after,
                    version: lane.version,
                });
            }
        }
        starts
    }

    /// Moves each lane a claim read to the first key it took there, unless
    /// the lane was moved back since the claim read it.
    pub fn advance<'a>(
        &self,
        starts: &[LaneStart],
        taken: impl IntoIterator<Item = (&'a str, i16, LaneKey)>,
    ) {
        let mut first: BTreeMap<(&str, i16), LaneKey> = BTreeMap::new();
        for (queue, priority, key) in taken {
            first
                .entry((queue, priority))
                .and_modify(|k| *k = (*k).min(key))
                .or_insert(key);
        }
        let mut state = self.lock();
        for start in starts {
            let Some(&key) = first.get(&(start.queue.as_str(), start.priority)) else {
                continue;
            };
            if let Some(lane) = state.lanes.get_mut(&(start.queue.clone(), start.priority))
                && lane.version == start.version
            {
                lane.after = Some(lane.after.map_or(key, |after| after.max(key)));
            }
        }
    }

    /// Moves cursors back past whatever `changes` may have made claimable.
    pub fn apply(&self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let mut state = self.lock();
        for change in changes {
            match change {
                Change::Pending {
                    queue,
                    priority,
                    key,
                    ..
                } => {
                    // A queue new to the list joins it at once, with the
                    // default weight until one claim reads the list again.
                    if let Some(list) = &mut state.queues.list
                        && !list.iter().any(|(q, _)| q == queue)
                    {
                        list.push((queue.clone(), DEFAULT_WEIGHT));
                        state.queues.stale = true;
                    }
                    let version = state.bump();
                    if let Some(lane) = state.lanes.get_mut(&(queue.clone(), *priority))
                        && lane.after.is_some_and(|after| *key < after)
                    {
                        lane.after = Some(*key);
                        lane.version = version;
                    }
                }
                Change::Queue(queue) => state.reset_queue(queue),
                Change::Queues => state.queues.stale = true,
                Change::All => state.reset_all(),
            }
        }
    }

    /// The queues with pending invoices, or that this caller should read
    /// them: one caller at a time reads a stale list again, the others use
    /// it meanwhile.
    pub fn active_queues(&self) -> QueueList {
        let mut state = self.lock();
        let queues = &mut state.queues;
        match &queues.list {
            Some(list) if !queues.stale || queues.refreshing => QueueList::Use(list.clone()),
            _ => {
                queues.refreshing = true;
                queues.stale = false;
                QueueList::Read
            }
        }
    }

    /// Remembers the queues with pending invoices.
    pub fn set_active_queues(&self, list: Vec<(String, i32)>) {
        let mut state = self.lock();
        state.queues.list = Some(list);
        state.queues.refreshing = false;
    }

    /// A read of the queue list failed: the next caller tries again.
    pub fn active_queues_unread(&self) {
        let mut state = self.lock();
        state.queues.refreshing = false;
        state.queues.stale = true;
    }

    /// The lanes whose cursor is past the front, for the sweep.
    pub fn lanes_past_front(&self) -> Vec<(String, i16, LaneKey)> {
        self.lock()
            .lanes
            .iter()
            .filter_map(|((queue, priority), lane)| Some((queue.clone(), *priority, lane.after?)))
            .collect()
    }
}

impl State {
    fn bump(&mut self) -> u64 {
        self.next_version += 1;
        self.next_version
    }

    fn reset_queue(&mut self, queue: &str) {
        for priority in PRIORITIES {
            let version = self.bump();
            if let Some(lane) = self.lanes.get_mut(&(queue.to_owned(), priority)) {
                *lane = Lane {
                    after: None,
                    version,
                };
            }
        }
    }

    fn reset_all(&mut self) {
        let version = self.bump();
        for lane in self.lanes.values_mut() {
            *lane = Lane {
                after: None,
                version,
            };
        }
        self.queues.stale = true;
    }
}

/// The longest payload PostgreSQL's NOTIFY takes is 8000 bytes.
const MAX_PAYLOAD: usize = 7900;

/// The notification payload that tells other replicas about `changes`: one
/// line per change, per lane the smallest key and how many invoices. Queue
/// names cannot contain spaces or line breaks (the API refuses them), so they
/// need no quoting. Too many lanes for one payload become "reset everything".
pub(crate) fn encode(changes: &[Change]) -> String {
    let mut lowest: BTreeMap<(&str, i16), (LaneKey, u32)> = BTreeMap::new();
    let mut out = String::new();
    for change in changes {
        match change {
            Change::Pending {
                queue,
                priority,
                key,
                count,
            } => {
                lowest
                    .entry((queue, *priority))
                    .and_modify(|(k, n)| {
                        *k = (*k).min(*key);
                        *n = n.saturating_add(*count);
                    })
                    .or_insert((*key, *count));
            }
            Change::Queue(queue) => {
                let _ = writeln!(out, "Q {queue}");
            }
            Change::Queues => out.push_str("W\n"),
            Change::All => out.push_str("*\n"),
        }
    }
    for ((queue, priority), ((at, id), count)) in lowest {
        let _ = writeln!(
            out,
            "P {queue} {priority} {} {id} {count}",
            at.timestamp_micros()
        );
    }
    if out.len() > MAX_PAYLOAD {
        return "*\n".to_owned();
    }
    out
}

/// The changes in a payload from [`encode`]. An empty payload (an older
/// replica's) or one that cannot be read means "reset everything"; a lane
/// line without a count (also an older replica's) wakes every waiting claim.
pub(crate) fn decode(payload: &str) -> Vec<Change> {
    let parse = |line: &str| -> Option<Change> {
        let mut fields = line.split(' ');
        let change = match fields.next()? {
            "P" => Change::Pending {
                queue: fields.next()?.to_owned(),
                priority: fields.next()?.parse().ok()?,
                key: (
                    Timestamp::from_timestamp_micros(fields.next()?.parse().ok()?)?,
                    fields.next()?.parse().ok()?,
                ),
                count: match fields.next() {
                    Some(count) => count.parse().ok()?,
                    None => u32::MAX,
                },
            },
            "Q" => Change::Queue(fields.next()?.to_owned()),
            "W" => Change::Queues,
            "*" => Change::All,
            _ => return None,
        };
        fields.next().is_none().then_some(change)
    };
    let changes: Option<Vec<Change>> = payload.lines().map(parse).collect();
    match changes {
        Some(changes) if !changes.is_empty() => changes,
        _ => vec![Change::All],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_timestamp(secs, 0).unwrap()
    }

    fn pending(queue: &str, priority: i16, secs: i64, id: i64) -> Change {
        Change::Pending {
            queue: queue.to_owned(),
            priority,
            key: (at(secs), id),
            count: 1,
        }
    }

    fn after(cursors: &ClaimCursors, queue: &str, priority: i16) -> Option<LaneKey> {
        cursors
            .starts(&[queue])
            .into_iter()
            .find(|s| s.priority == priority)
            .and_then(|s| s.after)
    }

    #[test]
    fn a_claim_moves_its_lane_to_the_first_key_it_took() {
        let cursors = ClaimCursors::new();
        let starts = cursors.starts(&["a"]);
        assert!(starts.iter().all(|s| s.after.is_none()));
        assert_eq!(starts.len(), PRIORITIES.len());
        cursors.advance(&starts, [("a", 0, (at(5), 7)), ("a", 0, (at(3), 9))]);
        assert_eq!(after(&cursors, "a", 0), Some((at(3), 9)));
        assert_eq!(after(&cursors, "a", 1), None);

        // An older claim finishing late does not move the cursor back.
        cursors.advance(&starts, [("a", 0, (at(1), 1))]);
        assert_eq!(after(&cursors, "a", 0), Some((at(3), 9)));
    }

    #[test]
    fn pending_invoices_behind_a_cursor_move_it_back() {
        let cursors = ClaimCursors::new();
        let starts = cursors.starts(&["a"]);
        cursors.advance(&starts, [("a", 2, (at(10), 10))]);
        cursors.apply(&[pending("a", 2, 20, 20)]);
        assert_eq!(after(&cursors, "a", 2), Some((at(10), 10)));
        cursors.apply(&[pending("a", 2, 4, 30)]);
        assert_eq!(after(&cursors, "a", 2), Some((at(4), 30)));
    }

    #[test]
    fn a_claim_does_not_advance_a_lane_moved_back_while_it_ran() {
        let cursors = ClaimCursors::new();
        let first = cursors.starts(&["a"]);
        cursors.advance(&first, [("a", 0, (at(10), 10))]);
        let running = cursors.starts(&["a"]);
        cursors.apply(&[pending("a", 0, 1, 99)]);
        cursors.advance(&running, [("a", 0, (at(50), 50))]);
        assert_eq!(after(&cursors, "a", 0), Some((at(1), 99)));

        let running = cursors.starts(&["a"]);
        cursors.apply(&[Change::Queue("a".into())]);
        cursors.advance(&running, [("a", 0, (at(50), 50))]);
        assert_eq!(after(&cursors, "a", 0), None);
    }

    #[test]
    fn resets_send_lanes_back_to_the_front() {
        let cursors = ClaimCursors::new();
        let starts = cursors.starts(&["a", "b"]);
        cursors.advance(&starts, [("a", 0, (at(1), 1)), ("b", 0, (at(1), 2))]);
        cursors.apply(&[Change::Queue("a".into())]);
        assert_eq!(after(&cursors, "a", 0), None);
        assert_eq!(after(&cursors, "b", 0), Some((at(1), 2)));
        cursors.apply(&[Change::All]);
        assert_eq!(after(&cursors, "b", 0), None);
    }

    #[test]
    fn a_new_queue_joins_the_list_at_once_and_one_claim_reads_the_weights_again() {
        let cursors = ClaimCursors::new();
        assert_eq!(cursors.active_queues(), QueueList::Read);
        let known = vec![("a".to_owned(), 1)];
        cursors.set_active_queues(known.clone());
        cursors.apply(&[pending("a", 0, 1, 1)]);
        assert_eq!(cursors.active_queues(), QueueList::Use(known.clone()));

        cursors.apply(&[pending("b", 0, 1, 1)]);
        assert_eq!(cursors.active_queues(), QueueList::Read);
        let both = vec![("a".to_owned(), 1), ("b".to_owned(), 1)];
        assert_eq!(cursors.active_queues(), QueueList::Use(both.clone()));
        let weighted = vec![("a".to_owned(), 1), ("b".to_owned(), 5)];
        cursors.set_active_queues(weighted.clone());
        assert_eq!(cursors.active_queues(), QueueList::Use(weighted));

        cursors.apply(&[Change::Queues]);
        assert_eq!(cursors.active_queues(), QueueList::Read);
        cursors.active_queues_unread();
        assert_eq!(cursors.active_queues(), QueueList::Read);
    }

    #[test]
    fn only_lanes_past_the_front_are_swept() {
        let cursors = ClaimCursors::new();
        let starts = cursors.starts(&["a"]);
        cursors.advance(&starts, [("a", 3, (at(1), 1))]);
        assert_eq!(
            cursors.lanes_past_front(),
            [("a".to_owned(), 3, (at(1), 1))]
        );
    }

    #[test]
    fn starts_are_ordered_by_priority_then_queue() {
        let cursors = ClaimCursors::new();
        let starts = cursors.starts(&["b", "a"]);
        let order: Vec<(i16, &str)> = starts
            .iter()
            .take(4)
            .map(|s| (s.priority, s.queue.as_str()))
            .collect();
        assert_eq!(order, [(0, "b"), (0, "a"), (1, "b"), (1, "a")]);
    }

    #[test]
    fn payloads_round_trip_with_the_lowest_key_per_lane() {
        let changes = [
            pending("a", 0, 9, 9),
            pending("a", 0, 3, 4),
            pending("b", 5, 1, 1),
            Change::Queue("c".into()),
            Change::Queues,
        ];
        let decoded = decode(&encode(&changes));
        let two_in_a = Change::Pending {
            queue: "a".into(),
            priority: 0,
            key: (at(3), 4),
            count: 2,
        };
        assert_eq!(
            decoded,
            [
                Change::Queue("c".into()),
                Change::Queues,
                two_in_a,
                pending("b", 5, 1, 1),
            ]
        );
    }

    #[test]
    fn a_lane_without_a_count_wakes_every_waiting_claim() {
        let older = Change::Pending {
            queue: "a".into(),
            priority: 0,
            key: (at(3), 4),
            count: u32::MAX,
        };
        assert_eq!(decode("P a 0 3000000 4"), [older]);
    }

    #[test]
    fn unreadable_or_empty_payloads_reset_everything() {
        assert_eq!(decode(""), [Change::All]);
        assert_eq!(decode("P a x 1 1"), [Change::All]);
        assert_eq!(decode("Q a b"), [Change::All]);
        let many: Vec<Change> = (0..1000)
            .map(|i| pending(&format!("q{i}"), 0, 1, 1))
            .collect();
        assert_eq!(decode(&encode(&many)), [Change::All]);
    }
}
