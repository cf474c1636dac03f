//! What the broker and its clients (the CLI, the operator) must agree on beyond the
//! `.proto` files, kept in one place so that no side restates a rule of the other:
//!
//! - [`defaults`]: what a field left at zero (or empty) on the wire means, and the
//!   defaults of ports and sizes;
//! - [`health`]: the `grpc.health.v1` service names for liveness and readiness;
//! - [`error`]: the stable numeric error codes sent in the `eventter-error-code`
//!   metadata;
//! - [`same`]: when a topic or consumer group the broker holds is what a client asks
//!   for, compared as the broker compares a repeated create.

pub mod defaults;
pub mod error;
pub mod health;
pub mod same;

pub use error::{ErrorCode, ERROR_CODE_METADATA};
