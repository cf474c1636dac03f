//! Consumer groups (SPEC section 5).
//!
//! Pure cores, kept free of IO and async so they can be tested exhaustively:
//! - [`matching`] decides whether a message matches a group's bindings (fanout,
//!   direct, topic, headers). A message matching several bindings is delivered once.
//! - [`reader`] decides which segments of the bound topics to read, from where, and
//!   reports every record to the buffer once, in order.
//! - [`stored`] reads what the buffer needs of a stored message (its own TTL, the
//!   AMQP `expiration` property, and its body size) without decoding the rest.
//! - [`lag`] says how many records of its bound topics a group has not dealt with yet.
//! - [`buffer`] is the delivery state machine of one group: the bounded buffer of
//!   matched messages, round-robin hand-out to subscribers within their windows,
//!   ack / nack / redelivery, and the per-segment offsets that are safe to commit.
//!
//! Drivers around them:
//! - [`task`]: one group's task on the node the leader placed it on: reads segments,
//!   feeds the reader and the buffer, hands out, commits offsets.
//! - [`groups`]: the node's groups: starts and stops tasks as the state places them,
//!   finds where a group runs, serves subscriptions, acks and nacks of local groups.

pub mod buffer;
pub mod commits;
pub mod dead_letter;
pub mod groups;
pub mod lag;
pub mod matching;
pub mod reader;
pub mod stored;
mod task;

pub use groups::{GroupHandle, Groups, Located, Occupancy};
pub use task::GroupStats;
