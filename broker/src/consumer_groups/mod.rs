//! Consumer groups (SPEC section 5): the pure parts, kept free of IO and async so they
//! can be tested exhaustively and reasoned about on their own.
//!
//! - [`matching`] decides whether a message matches a group's bindings (fanout,
//!   direct, topic, headers). A message matching several bindings is delivered once.
//! - [`buffer`] is the delivery state machine of one group: the bounded buffer of
//!   matched messages, round-robin hand-out to subscribers within their windows,
//!   ack / nack / redelivery, and the per-segment offsets that are safe to commit.
//!
//! - [`runtime`] runs them: the group task that reads segments, calls these and
//!   persists commits, and the subscriber side of Subscribe / Ack / Nack.

pub mod buffer;
pub mod matching;
pub mod runtime;

pub use runtime::Groups;
