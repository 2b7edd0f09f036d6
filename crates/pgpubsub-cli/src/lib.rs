//! The commands of the `pgpubsub` binary, as a library so that the tests
//! can run them in-process (the gateway on port 0, say). Not an API for
//! other programs: that is the `pgpubsub` crate.

// Its items are the binary's internals, documented where they are defined
// for the reader of the code, not as a public API.
#![allow(missing_docs)]
// Module docs link to the private items they describe, for the reader of
// the code.
#![allow(rustdoc::private_intra_doc_links)]

pub mod bridge;
pub mod cli;
pub mod cmd;
#[cfg(feature = "load")]
pub mod load;
pub mod output;
pub mod serve;
pub mod shutdown;
