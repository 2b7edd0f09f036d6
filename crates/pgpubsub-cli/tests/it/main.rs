//! The binary and the gateway against the real PostgreSQL. Each test makes
//! its own database (see `common`), so they run in parallel. The library's
//! own behaviour is tested in `pgpubsub/tests/db`.

#![allow(clippy::unwrap_used, clippy::cloned_ref_to_slice_refs, missing_docs)]

mod bridge;
mod browser;
mod capture;
mod cli;
mod crowd;
mod gateway;
mod heartbeat;
mod nats_outage;
mod operable;
mod rls;
mod serve;
mod shapes;
mod tls;

// Test support shared with the library's tests, included by path so there
// is one copy; not every helper is used from here.
#[allow(dead_code)]
#[path = "../../../pgpubsub/tests/db/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "../../../pgpubsub/tests/db/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "../../../pgpubsub/tests/db/proxy.rs"]
mod proxy;
#[allow(dead_code)]
#[path = "../../../pgpubsub/tests/db/tls_server.rs"]
mod tls_server;
