//! The load generator's library: the reference backend and development
//! certificates, shared by the `loadtest` binary and the end-to-end tests.
// No unsafe code here: only the gateway binary has one documented exception
// (jemalloc's options in gateway/src/main.rs), so the workspace lint is deny.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod bare_echo;
pub mod devcert;
pub mod run;
pub mod storm;
pub mod tcp_echo;
