//! A budget every session of the daemon draws on (memory held for large
//! messages, parsing work), with a share per identity: one token can open
//! many sessions, and without the share its sessions alone could hold the
//! whole budget and make every other identity wait.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `total` units, of which the sessions of one identity hold at most a
/// quarter together. One request larger than that quarter still gets
/// through, alone: it takes the whole quarter.
#[derive(Clone)]
pub struct SharedBudget(Arc<Inner>);

struct Inner {
    all: Arc<Semaphore>,
    total: u32,
    /// Each identity's share, while its sessions hold or wait for some.
    by_identity: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
}

/// Units taken from a [`SharedBudget`]: given back when dropped.
pub struct Share {
    budget: Arc<Inner>,
    identity: Arc<str>,
    all: Option<OwnedSemaphorePermit>,
    identitys: Option<OwnedSemaphorePermit>,
}

impl SharedBudget {
    pub fn new(total: u32) -> Self {
        SharedBudget(Arc::new(Inner {
            all: Arc::new(Semaphore::new(total as usize)),
            total,
            by_identity: Mutex::default(),
        }))
    }

    /// Waits for `units` (at most the whole budget, so that any request
    /// gets through once the others are done) for a session of
    /// `identity`: first out of the identity's quarter (at most all of
    /// it), then out of the whole. `None` only if the budget were closed,
    /// which it never is.
    pub async fn take(&self, units: u32, identity: &str) -> Option<Share> {
        let units = units.min(self.0.total);
        let mut share = Share {
            budget: self.0.clone(),
            identity: identity.into(),
            all: None,
            identitys: None,
        };
        let identitys = self
            .0
            .identity_shares()
            .entry(share.identity.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.0.identity_units() as usize)))
            .clone();
        share.identitys = Some(
            identitys
                .acquire_many_owned(units.min(self.0.identity_units()))
                .await
                .ok()?,
        );
        share.all = Some(self.0.all.clone().acquire_many_owned(units).await.ok()?);
        Some(share)
    }

    /// Units no session holds.
    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.0.all.available_permits()
    }

    /// Identities whose sessions hold or wait for units.
    #[cfg(test)]
    pub fn identities_holding(&self) -> usize {
        self.0.identity_shares().len()
    }
}

impl Inner {
    /// The most the sessions of one identity hold together.
    fn identity_units(&self) -> u32 {
        (self.total / 4).max(1)
    }

    fn identity_shares(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Semaphore>>> {
        self.by_identity
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Share {
    /// Units of the whole budget it holds.
    #[cfg(test)]
    pub fn units(&self) -> usize {
        self.all.as_ref().map_or(0, |p| p.num_permits())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.all.take();
        self.identitys.take();
        // An identity whose sessions hold and await nothing is forgotten
        // (a waiting session holds a clone of its semaphore).
        let mut shares = self.budget.identity_shares();
        if let Some(share) = shares.get(&self.identity) {
            if Arc::strong_count(share) == 1
                && share.available_permits() == self.budget.identity_units() as usize
            {
                shares.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The sessions of one identity hold at most a quarter of the budget
    /// together: past it, that identity's next request waits while
    /// another identity's goes on. One request larger than the quarter
    /// still gets through alone, and one larger than the whole budget
    /// takes all of it. Identities that hold nothing are forgotten.
    #[tokio::test]
    async fn one_identity_holds_at_most_a_quarter_of_the_budget() {
        let budget = SharedBudget::new(40);
        let first = budget.take(9, "agent-a").await.expect("share");
        let more = budget.take(3, "agent-a");
        tokio::pin!(more);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut more)
                .await
                .is_err(),
            "past its quarter, the identity waits"
        );
        let other = tokio::time::timeout(Duration::from_secs(5), budget.take(3, "agent-b"))
            .await
            .expect("another identity goes on")
            .expect("share");
        drop(first);
        let more = tokio::time::timeout(Duration::from_secs(5), more)
            .await
            .expect("taken once the identity's first is done")
            .expect("share");
        drop((more, other));
        let alone = tokio::time::timeout(Duration::from_secs(5), budget.take(15, "agent-a"))
            .await
            .expect("a request over the quarter gets through alone")
            .expect("share");
        assert_eq!(alone.units(), 15);
        drop(alone);
        let all = budget.take(1000, "agent-a").await.expect("share");
        assert_eq!(all.units(), 40, "at most the whole budget");
        drop(all);
        assert_eq!(budget.identities_holding(), 0, "nothing left held");
        assert_eq!(budget.available(), 40);
    }

    /// A request given up while it waits (its session ended) leaves
    /// nothing held and nothing remembered.
    #[tokio::test]
    async fn a_request_given_up_while_waiting_holds_nothing() {
        let budget = SharedBudget::new(8);
        let held = budget.take(8, "agent-a").await.expect("share");
        let waiting = budget.take(2, "agent-b");
        assert!(tokio::time::timeout(Duration::from_millis(20), waiting)
            .await
            .is_err());
        drop(held);
        assert_eq!(budget.available(), 8);
        assert_eq!(budget.identities_holding(), 0);
    }
}
