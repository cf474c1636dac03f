//! EventterMQ Kubernetes operator.
//!
//! The library holds everything testable; the `eventter-operator` binary is a thin
//! command line around it (`run`, `crd`).
//!
//! - [`crd`]: the custom resources and their generated CRDs.
//! - [`builders`]: pure functions from an `EventterCluster` to its child objects.
//! - [`controller`]: the reconcilers (EventterCluster, Topic, ConsumerGroup, User).
//! - [`broker`]: how the reconcilers reach and read a broker's admin API.
//! - [`credentials`]: the operator's own broker user, kept in a Secret per cluster.
//! - [`metrics`]: Prometheus metrics.

pub mod broker;
pub mod builders;
pub mod certificates;
pub mod controller;
pub mod crd;
pub mod credentials;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod run;
pub mod server;
pub mod tls;
