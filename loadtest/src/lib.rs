//! The load generator's library: the reference backend and development
//! certificates, shared by the `loadtest` binary and the end-to-end tests.
#![warn(missing_docs)]

pub mod backend;
pub mod devcert;
pub mod run;
pub mod storm;
pub mod tcp_echo;
