//! [`MemoryAdmin`]: an in-memory [`TopicAdmin`] with injectable failures, for tests and for the paths no
//! broker available to the tests implements (CreatePartitions).

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures::future::BoxFuture;

use super::{AdminError, NewTopicPlan, TopicAdmin};

/// An in-memory [`TopicAdmin`]: topics, partitions, configs, committed lag, and injectable failures.
#[derive(Debug, Default)]
pub struct MemoryAdmin {
    state: Mutex<MemoryState>,
}

/// What a [`MemoryAdmin`] holds.
#[derive(Debug, Default, Clone)]
pub struct MemoryState {
    /// Topics: partitions and config.
    pub topics: BTreeMap<String, (i32, BTreeMap<String, String>)>,
    /// Lag reported per group.
    pub lag: BTreeMap<String, i64>,
    /// When set, every call fails with this broker message.
    pub fail: Option<String>,
    /// Calls that changed something, in order (`create x 6`, `grow x 8`, `delete x`).
    pub log: Vec<String>,
}

impl MemoryAdmin {
    /// A snapshot of the state.
    pub fn state(&self) -> MemoryState {
        self.state.lock().unwrap().clone()
    }

    /// Changes the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut MemoryState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    fn call<T>(
        &self,
        f: impl FnOnce(&mut MemoryState) -> Result<T, AdminError>,
    ) -> Result<T, AdminError> {
        let mut s = self.state.lock().unwrap();
        if let Some(msg) = &s.fail {
            return Err(AdminError(msg.clone()));
        }
        f(&mut s)
    }
}

impl TopicAdmin for MemoryAdmin {
    fn describe<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<BTreeMap<String, i32>, AdminError>> {
        Box::pin(async move {
            self.call(|s| {
                Ok(s.topics
                    .iter()
                    .filter(|(n, _)| names.contains(n))
                    .map(|(n, (p, _))| (n.clone(), *p))
                    .collect())
            })
        })
    }

    fn create<'a>(&'a self, t: &'a NewTopicPlan) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            self.call(|s| {
                if !s.topics.contains_key(&t.name) {
                    s.topics
                        .insert(t.name.clone(), (t.partitions, t.config.clone()));
                    s.log.push(format!("create {} {}", t.name, t.partitions));
                }
                Ok(())
            })
        })
    }

    fn grow<'a>(&'a self, name: &'a str, total: i32) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            self.call(|s| {
                let Some((p, _)) = s.topics.get_mut(name) else {
                    return Err(AdminError(format!(
                        "{name}: Broker: Unknown topic or partition"
                    )));
                };
                if total <= *p {
                    return Err(AdminError(format!(
                        "{name}: Broker: Invalid partitions (topic has {p}, asked for {total})"
                    )));
                }
                *p = total;
                s.log.push(format!("grow {name} {total}"));
                Ok(())
            })
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            self.call(|s| {
                if s.topics.remove(name).is_some() {
                    s.log.push(format!("delete {name}"));
                }
                Ok(())
            })
        })
    }

    fn lag<'a>(
        &'a self,
        group: &'a str,
        _topics: &'a [String],
    ) -> BoxFuture<'a, Result<i64, AdminError>> {
        Box::pin(async move { self.call(|s| Ok(s.lag.get(group).copied().unwrap_or(0))) })
    }
}
