//! cowdisk-remote: sealed layers kept as objects in S3-compatible storage.
//!
//! ```text
//!   RemoteSource (LayerSource) ── local refs ──► LocalFiles
//!        │ s3:// refs
//!   RemoteLayer (ReadStorage: the object seen as a layer file)
//!        │ metadata at open, blocks on demand
//!   Fetcher (units ≥ 256 KiB, one GET per unit, CRC-checked) ── CacheFile (host-wide)
//!        │
//!   Client (rusty-s3 signs, ureq sends) ── StoreConfig (AWS_* variables, profiles)
//! ```
//!
//! The object layout is specified in REMOTE.md beside this crate's Cargo.toml.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod client;
pub mod config;
pub mod error;
pub mod fetch;
pub mod layer;
pub mod log;
pub mod object;
pub mod pull;
pub mod push;
pub mod source;
pub mod trace;
pub mod url;
mod verified;

pub use cache::{default_cache_dir, CacheDir, DEFAULT_CACHE_SIZE};
pub use client::Client;
pub use config::StoreConfig;
pub use error::RemoteError;
pub use fetch::FetchOptions;
pub use layer::RemoteLayer;
pub use source::{RemoteOptions, RemoteSource};
pub use url::{is_remote, S3Url};
