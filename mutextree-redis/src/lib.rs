#![doc = include_str!("../README.md")]
//!
//! # Layout
//!
//! The same files in the same roles as every store crate, each using only
//! those listed before it:
//!
//! * `error.rs`: client errors as [`Error::Store`](mutextree_core::Error::Store),
//!   and which are worth retrying.
//! * `config.rs`: [`RedisConfig`], read from a URL or set in code.
//! * `scripts.rs` and `lua/`: the Lua scripts, one per operation (grant,
//!   of one Exclusive item, mode change, release, refresh, list, listen,
//!   withdraw, waiters) after a shared prelude (`lua/common.lua`: the key
//!   layout, reading entries) and the parts of it a script uses
//!   (`lua/items.lua`: a request's items; `lua/the_way.lua`: the check of
//!   one item; `lua/checks.lua`: the checks every other grant and upgrade
//!   make; `lua/queue.lua`: the waiters' reservations), and
//!   running them on the namespace's keys (this store's own part). *How it works* above says
//!   why each is atomic.
//! * `feed.rs`: the subscription to the release channel that wakes waiters.
//! * `backend.rs`: [`RedisStore`] (with [`RedisConfig::connect`]) and the
//!   [`LockBackend`](mutextree_core::LockBackend), [`RedisBackend`].
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod config;
mod error;
mod feed;
mod scripts;

pub use backend::{RedisBackend, RedisStore};
pub use config::RedisConfig;
