//! The identity a node gossips under.
//!
//! foca keys its member table by [`Identity::addr`], which here is the node id: there is
//! at most one entry per node id. An identity also carries a `bump` (which "life" of
//! the node this is) and a `leaving` flag, so that a node that restarts, is declared
//! down by mistake, or leaves can be told apart from its previous identity.

use foca::Identity;
use serde::{Deserialize, Serialize};

use crate::cluster_state::model::NodeId;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GossipId {
    pub(crate) id: NodeId,
    /// Advertised `host:port` (gossip datagrams and gRPC).
    pub(crate) addr: String,
    /// Grows with every restart (start time in us since the Unix epoch, by the node's
    /// clock) and with every automatic rejoin after being declared down (+1). The
    /// highest bump wins when two identities share a node id, so a restarted node
    /// replaces its old, dead identity.
    pub(crate) bump: u64,
    /// Set on the identity a node switches to right before leaving the cluster: a
    /// member whose foca state is Down *and* whose identity has this flag left
    /// gracefully (LEFT); Down without it means it failed (DEAD).
    pub(crate) leaving: bool,
}

impl GossipId {
    pub(crate) fn new(id: NodeId, addr: String, bump: u64) -> Self {
        Self { id, addr, bump, leaving: false }
    }

    /// The identity to switch to before leaving: same life, flagged. It wins the
    /// conflict against the current identity, so peers rename us to it.
    pub(crate) fn to_leaving(&self) -> Self {
        Self { leaving: true, ..self.clone() }
    }
}

impl Identity for GossipId {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        // A node that left does not come back by itself; one declared down (a false
        // positive, a healed partition) rejoins at once under the next bump.
        if self.leaving {
            None
        } else {
            Some(Self { bump: self.bump.saturating_add(1), ..self.clone() })
        }
    }

    fn addr(&self) -> NodeId {
        self.id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // Newer life first; within one life the leaving identity wins, since it is
        // the last one a node uses.
        (self.bump, self.leaving) > (adversary.bump, adversary.leaving)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_life_and_leaving_win_conflicts() {
        let a = GossipId::new(1, "h:1".into(), 10);
        let renewed = a.renew().expect("renewable");
        assert!(renewed.win_addr_conflict(&a));
        assert!(!a.win_addr_conflict(&renewed));
        let leaving = a.to_leaving();
        assert!(leaving.win_addr_conflict(&a));
        assert!(leaving.renew().is_none());
        // A restart (much larger bump) beats the previous life's leaving identity.
        let restarted = GossipId::new(1, "h:1".into(), 20);
        assert!(restarted.win_addr_conflict(&leaving));
        assert_eq!(restarted.addr(), 1);
    }
}
