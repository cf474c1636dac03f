//! EventterMQ broker library. The `eventtermq` binary is a thin shell over
//! [`cli`]; tests start whole nodes in-process through [`node::start`].
//!
//! Map (see ARCHITECTURE.md): [`transport`] (sockets or in-memory network) ->
//! [`membership`] (SWIM gossip) and [`cluster_state`] (Raft-replicated state) ->
//! [`node`] (wiring, bootstrap, leader duties) -> [`api`] (gRPC services) and [`cli`].

pub mod api;
pub mod cli;
pub mod cluster_state;
pub mod config;
pub mod error;
pub mod membership;
pub mod node;
pub mod transport;
