//! Integration tests against the real PostgreSQL. Each test makes its own
//! database (see `common`), so they run in parallel.

#![allow(clippy::unwrap_used, clippy::cloned_ref_to_slice_refs, missing_docs)]

mod bridge;
mod browser;
mod cli;
mod cluster;
mod common;
mod events;
mod faults;
mod foreign;
mod gateway;
mod migrations;
mod operable;
mod proxy;
mod retention;
mod security;
mod serve;
mod sizes;
mod tls;
