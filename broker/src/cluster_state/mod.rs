//! The replicated cluster state: what it contains ([`model`]), the commands that
//! change it and their pure, deterministic application ([`commands`]), input validation
//! ([`validate`]), and how it is replicated with openraft ([`raft`]) and stored on disk
//! ([`log_store`], [`state_machine`], both through the storage crate's durable-file
//! module, `eventtermq_storage::durable`).
//!
//! Applying a command is a pure function of (state, command, log index): no clock, no
//! IO, no randomness, so every node computes the same state from the same log.

pub mod changes;
pub mod commands;
pub mod log_store;
pub mod model;
pub mod raft;
pub mod state_machine;
pub mod validate;

pub use changes::{ChangeLog, Touched};
pub use commands::{Command, CommandResponse};
pub use log_store::{LogStore, LogStoreReader};
pub use model::*;
pub use raft::{Raft, TypeConfig};
pub use state_machine::{AppliedState, SharedState, StateMachineStore};
