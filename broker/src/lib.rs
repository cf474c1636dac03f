//! EventterMQ broker node as a library: the `eventtermq` binary (`cli/`) runs one over
//! real sockets; tests start whole clusters in-process through [`node::start`].
//!
//! Map (see ARCHITECTURE.md), each module using only those before it:
//! [`error`], [`clock`], [`metrics`] (the Prometheus registry; a leaf), [`security`]
//! (who may make node-to-node calls; a leaf), [`client_cert`] (which user a client
//! certificate names; a leaf), [`transport`]
//! (sockets or an in-memory network) ->
//! [`cluster_state`] (the Raft-replicated state: model, commands, storage) ->
//! [`auth`] (users: passwords, the verification cache, permissions) ->
//! [`peers`] (the one door to other nodes) -> [`membership`] (SWIM gossip) and
//! [`cluster`] (the door to the cluster state: write, read) -> [`disk`] (the data
//! directory's free-space watermark) -> [`replication`]
//! (segments on `eventtermq_storage`, publish routing, primaries and replicas) ->
//! [`consumer_groups`] (reading, matching, delivery, lag) -> [`api`] (the gRPC services,
//! `/metrics`) ->
//! [`node`] (wiring, bootstrap, the leader's membership duties).

pub mod amqp;
pub mod api;
pub mod auth;
pub mod budget;
pub mod client_cert;
pub mod clock;
pub mod cluster;
pub mod cluster_state;
pub mod config;
pub mod consumer_groups;
pub mod disk;
pub mod error;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod peers;
pub mod replication;
pub mod security;
pub mod transport;
pub mod watch;
