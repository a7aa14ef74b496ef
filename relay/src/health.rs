//! Liveness and readiness state shared by the loop, the monitors and the HTTP server.

use std::sync::Mutex;

use process_kit::surfaces::Reachability;
use serde::Serialize;

/// What the relay is doing with respect to coordination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Starting up (connecting, migrating).
    Starting,
    /// Waiting for the right to publish; the text says why.
    Standby(String),
    /// Publishing.
    Active,
}

/// Shared health flags: the database and the broker reachable (as for every process), and the relay's
/// coordination role.
#[derive(Debug)]
pub struct Health {
    reach: Reachability,
    role: Mutex<Role>,
    standby_ready: bool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            reach: Reachability::default(),
            role: Mutex::new(Role::Starting),
            standby_ready: false,
        }
    }
}

impl std::ops::Deref for Health {
    type Target = Reachability;

    fn deref(&self) -> &Reachability {
        &self.reach
    }
}

/// The `/readyz` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// True when the relay publishes: database and broker up, and active.
    pub ready: bool,
    /// Database reachable.
    pub database: bool,
    /// Broker reachable.
    pub broker: bool,
    /// Coordination role.
    pub role: Role,
}

impl Health {
    /// Health whose readiness also counts a healthy standby as ready. Kubernetes needs that: a Deployment
    /// whose standby never turns Ready never finishes a rolling update. The body still names the role.
    pub fn standby_ready() -> Self {
        Self {
            standby_ready: true,
            ..Self::default()
        }
    }

    /// Records the coordination role.
    pub fn set_role(&self, role: Role) {
        *self.role.lock().unwrap() = role;
    }

    /// The current readiness.
    pub fn readiness(&self) -> Readiness {
        let (database, broker) = (self.database(), self.broker());
        let role = self.role.lock().unwrap().clone();
        Readiness {
            ready: database
                && broker
                && match role {
                    Role::Active => true,
                    Role::Standby(_) => self.standby_ready,
                    Role::Starting => false,
                },
            database,
            broker,
            role,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_everything_is_up_and_active() {
        let h = Health::default();
        assert!(!h.readiness().ready);
        h.set_database(true);
        h.set_broker(true);
        assert!(!h.readiness().ready, "starting is not ready");
        h.set_role(Role::Active);
        assert!(h.readiness().ready);
        h.set_broker(false);
        assert!(!h.readiness().ready);
        h.set_broker(true);
        h.set_role(Role::Standby("lock held by pid 7".into()));
        let r = h.readiness();
        assert!(!r.ready);
        assert_eq!(
            serde_json::to_value(&r).unwrap()["role"]["standby"],
            "lock held by pid 7"
        );
        let k = Health::standby_ready();
        k.set_database(true);
        k.set_broker(true);
        assert!(!k.readiness().ready, "starting is never ready");
        k.set_role(Role::Standby("lease held by b".into()));
        assert!(
            k.readiness().ready,
            "a healthy standby is ready in Kubernetes mode"
        );
        k.set_broker(false);
        assert!(!k.readiness().ready);
    }
}
