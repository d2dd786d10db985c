#![doc = include_str!("../README.md")]

pub mod linearizability;
pub mod watch;
