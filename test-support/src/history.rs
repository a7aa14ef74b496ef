//! The history checker: what a topic holds, held against what the database says was written.
//!
//! Per key it reports the events lost (written, never on the topic), the duplicates (a second copy of an
//! event already seen, allowed by at-least-once delivery and counted), the order inversions (an event
//! appearing for the first time after a later event of its key; only first deliveries count, since a
//! duplicate of an earlier event is not a reordering) and keys spread over several partitions. The relay's
//! tests, the pipeline end-to-end tests and the soak use it, so the next broken schedule shows up here.

use std::collections::{HashMap, HashSet};

use crate::kafka::Record;

/// What was written: for each key, its event ids in the order the key's writers committed them.
#[derive(Debug, Clone, Default)]
pub struct Written {
    per_key: HashMap<String, Vec<String>>,
}

impl Written {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `event_id` of `key` was written after every earlier one of that key (an id already
    /// recorded for the key keeps its first place: a table may list an event twice, e.g. archived twice).
    pub fn push(&mut self, key: impl Into<String>, event_id: impl Into<String>) {
        let ids = self.per_key.entry(key.into()).or_default();
        let id = event_id.into();
        if !ids.contains(&id) {
            ids.push(id);
        }
    }

    /// Builds the history from `(key, event_id)` pairs in write order (e.g. `ORDER BY id` of a table).
    pub fn from_rows<K: Into<String>, E: Into<String>>(
        rows: impl IntoIterator<Item = (K, E)>,
    ) -> Self {
        let mut w = Self::new();
        for (k, e) in rows {
            w.push(k, e);
        }
        w
    }

    /// Events written.
    pub fn len(&self) -> usize {
        self.per_key.values().map(Vec::len).sum()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One event that appeared for the first time after a later event of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inversion {
    /// The key.
    pub key: String,
    /// The event that came late.
    pub event_id: String,
    /// Its offset.
    pub offset: i64,
    /// The later event that had already appeared.
    pub after: String,
}

/// What the checker found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Records read.
    pub records: usize,
    /// Distinct events of the history found on the topic.
    pub delivered: usize,
    /// Written events never found: (key, event id).
    pub lost: Vec<(String, String)>,
    /// Copies beyond the first of an event.
    pub duplicates: usize,
    /// Events that appeared for the first time after a later event of their key.
    pub inversions: Vec<Inversion>,
    /// Keys whose records are on more than one partition.
    pub split_keys: Vec<String>,
    /// Records whose event id is not in the history (another writer's, or a bug).
    pub unknown: usize,
}

impl Report {
    /// Whether nothing was lost, nothing reordered and no key split. Duplicates are allowed.
    pub fn holds(&self) -> bool {
        self.lost.is_empty() && self.inversions.is_empty() && self.split_keys.is_empty()
    }

    /// One line for logs and assertion messages.
    pub fn summary(&self) -> String {
        format!(
            "records={} delivered={} lost={} duplicates={} inversions={} split_keys={} unknown={}{}{}",
            self.records,
            self.delivered,
            self.lost.len(),
            self.duplicates,
            self.inversions.len(),
            self.split_keys.len(),
            self.unknown,
            self.lost
                .first()
                .map(|(k, e)| format!(" first_lost={k}/{e}"))
                .unwrap_or_default(),
            self.inversions
                .first()
                .map(|i| format!(
                    " first_inversion={}/{}@{} after {}",
                    i.key, i.event_id, i.offset, i.after
                ))
                .unwrap_or_default(),
        )
    }
}

/// Checks `records` (sorted by partition then offset, as [`crate::kafka::read_topic`] returns them)
/// against `written`. An event is identified by its `event_id` header.
pub fn check(records: &[Record], written: &Written) -> Report {
    let mut rank: HashMap<&str, (&str, usize)> = HashMap::new();
    for (key, ids) in &written.per_key {
        for (i, id) in ids.iter().enumerate() {
            rank.insert(id.as_str(), (key.as_str(), i));
        }
    }
    let mut report = Report {
        records: records.len(),
        ..Report::default()
    };
    let mut seen: HashSet<&str> = HashSet::new();
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    let mut split: HashSet<&str> = HashSet::new();
    // Per key: the highest rank seen so far and its event id.
    let mut highest: HashMap<&str, (usize, &str)> = HashMap::new();
    for r in records {
        let Some(id) = r.headers.get("event_id").map(String::as_str) else {
            report.unknown += 1;
            continue;
        };
        let Some(&(key, i)) = rank.get(id) else {
            report.unknown += 1;
            continue;
        };
        if *partition_of.entry(key).or_insert(r.partition) != r.partition {
            split.insert(key);
        }
        if !seen.insert(id) {
            report.duplicates += 1;
            continue;
        }
        match highest.get(key) {
            Some(&(h, later)) if h > i => report.inversions.push(Inversion {
                key: key.to_owned(),
                event_id: id.to_owned(),
                offset: r.offset,
                after: later.to_owned(),
            }),
            _ => {
                highest.insert(key, (i, id));
            }
        }
    }
    report.delivered = seen.len();
    for (key, ids) in &written.per_key {
        for id in ids {
            if !seen.contains(id.as_str()) {
                report.lost.push((key.clone(), id.clone()));
            }
        }
    }
    report.lost.sort();
    let mut split: Vec<String> = split.into_iter().map(str::to_owned).collect();
    split.sort();
    report.split_keys = split;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(partition: i32, offset: i64, id: &str) -> Record {
        Record {
            partition,
            offset,
            key: None,
            payload: vec![],
            headers: HashMap::from([("event_id".to_owned(), id.to_owned())]),
        }
    }

    #[test]
    fn finds_losses_duplicates_inversions_and_split_keys() {
        let written = Written::from_rows([("k", "a"), ("k", "b"), ("k", "c"), ("j", "x")]);
        let records = [
            rec(0, 0, "a"),
            rec(0, 1, "c"),
            rec(0, 2, "a"),
            rec(0, 3, "b"),
            rec(1, 0, "x"),
        ];
        let r = check(&records, &written);
        assert_eq!(r.duplicates, 1, "a twice");
        assert_eq!(r.inversions.len(), 1, "{}", r.summary());
        assert_eq!(r.inversions[0].event_id, "b");
        assert_eq!(r.inversions[0].after, "c");
        assert!(r.lost.is_empty());
        assert!(r.split_keys.is_empty());
        assert!(!r.holds());

        let r = check(&[rec(0, 0, "a"), rec(1, 0, "b")], &written);
        assert_eq!(r.lost, [("j".into(), "x".into()), ("k".into(), "c".into())]);
        assert_eq!(r.split_keys, ["k"]);
    }

    #[test]
    fn a_duplicate_of_an_earlier_event_is_not_an_inversion() {
        let written = Written::from_rows([("k", "a"), ("k", "b")]);
        let r = check(
            &[
                rec(0, 0, "a"),
                rec(0, 1, "b"),
                rec(0, 2, "a"),
                rec(0, 3, "b"),
            ],
            &written,
        );
        assert!(r.holds(), "{}", r.summary());
        assert_eq!(r.duplicates, 2);
    }
}
