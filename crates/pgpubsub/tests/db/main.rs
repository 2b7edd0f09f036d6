//! The library against the real PostgreSQL (`DATABASE_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/postgres`). Each test makes its own
//! database (see `common`), so they run in parallel.
//!
//! `common`, `cluster`, `proxy` and `tls_server` are test support; the CLI's
//! tests (`pgpubsub-cli/tests/it`) include them by path rather than keep
//! copies.

#![allow(clippy::unwrap_used, clippy::cloned_ref_to_slice_refs, missing_docs)]

mod capture;
mod cluster;
mod common;
mod events;
mod faults;
mod foreign;
mod migrations;
mod proxy;
mod replays;
mod retention;
mod row_views;
mod security;
mod shape_filter;
mod shape_live;
mod sizes;
mod tls;
mod tls_server;
