//! EventterMQ broker library. The `eventtermq` binary is a thin shell over
//! [`cli`]; tests start whole nodes in-process through [`node::start`].
//!
//! Map (see ARCHITECTURE.md): [`transport`] (sockets or in-memory network) ->
//! [`membership`] (SWIM gossip) and [`cluster_state`] (Raft-replicated state) ->
//! [`node`] (wiring, bootstrap, leader duties) -> [`api`] (gRPC services) and [`cli`].
//! The data path: [`replication`] (segments on `eventtermq_storage`, publish routing,
//! primaries and replicas) and [`consumer_groups`] (matching, delivery, subscribers).

pub mod api;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod cluster_state;
pub mod config;
pub mod consumer_groups;
pub mod error;
pub mod membership;
pub mod node;
pub mod peers;
pub mod replication;
pub mod transport;
