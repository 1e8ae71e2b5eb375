//! [`RemoteSource`]: the layer source for chains with remote layers. `s3://` references
//! (from local tops) and the references inside layer objects resolve to objects; every
//! other reference goes to the local source it wraps, unchanged.
//!
//! The store connection is made on first use, so a chain without remote layers never
//! needs S3 configuration. Open layers are shared by location, so every clone in the
//! process reading one base shares its fetches.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use cowdisk_core::{LayerId, LayerSource, OpenError, OpenedLayer};

use crate::cache::CacheDir;
use crate::client::Client;
use crate::config::StoreConfig;
use crate::error::{RemoteError, Result};
use crate::fetch::FetchOptions;
use crate::layer::RemoteLayer;
use crate::trace::{Trace, TraceRecorder};
use crate::url::{is_remote, S3Url};

/// How remote layers are reached and kept.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The host-wide cache folder (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Bound of the cache folder in bytes.
    pub cache_size: u64,
    /// Fetch shape and deadline.
    pub fetch: FetchOptions,
    /// `s3://` locations remote references must lie under (empty: unconfined, unless
    /// `confined` is set because local roots were given).
    pub roots: Vec<S3Url>,
    /// True when any image root was given: remote references must then lie under one of
    /// `roots` (none: no remote reference is allowed).
    pub confined: bool,
    /// The store; `None`: configured from the environment on first use.
    pub store: Option<StoreConfig>,
    /// Records blocks fetched on demand.
    pub record: Option<Arc<TraceRecorder>>,
    /// Blocks to fetch in the background as each layer is opened.
    pub prefetch: Option<Arc<Trace>>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            cache_dir: Some(crate::cache::default_cache_dir()),
            cache_size: crate::cache::DEFAULT_CACHE_SIZE,
            fetch: FetchOptions::default(),
            roots: Vec::new(),
            confined: false,
            store: None,
            record: None,
            prefetch: None,
        }
    }
}

/// The store connection and cache, made once per process on first use.
pub struct Remote {
    /// The client.
    pub client: Arc<Client>,
    cache: Option<Arc<CacheDir>>,
}

/// Local and remote parents.
pub struct RemoteSource {
    local: Arc<dyn LayerSource>,
    opts: RemoteOptions,
    remote: OnceLock<std::result::Result<Arc<Remote>, String>>,
    open: Mutex<HashMap<S3Url, Weak<RemoteLayer>>>,
    prefetching: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl RemoteSource {
    /// Wraps `local` (used for every non-`s3://` reference).
    pub fn new(local: Arc<dyn LayerSource>, opts: RemoteOptions) -> RemoteSource {
        RemoteSource {
            local,
            opts,
            remote: OnceLock::new(),
            open: Mutex::new(HashMap::new()),
            prefetching: Mutex::new(Vec::new()),
        }
    }

    /// The store connection, configured from the environment on first use.
    pub fn remote(&self) -> Result<Arc<Remote>> {
        let r = self.remote.get_or_init(|| {
            let cfg = match &self.opts.store {
                Some(c) => c.clone(),
                None => StoreConfig::from_env().map_err(|e| e.to_string())?,
            };
            let cache = match &self.opts.cache_dir {
                Some(d) => Some(
                    CacheDir::new(d, self.opts.cache_size)
                        .map_err(|e| RemoteError::io(d, "create cache folder", e).to_string())?,
                ),
                None => None,
            };
            Ok(Arc::new(Remote {
                client: Arc::new(Client::new(cfg)),
                cache,
            }))
        });
        r.clone().map_err(|reason| RemoteError::Config {
            field: "store".into(),
            reason,
        })
    }

    /// The layer object at `url`, shared with every other user in the process.
    pub fn open_object(&self, url: &S3Url) -> Result<Arc<RemoteLayer>> {
        self.check_root(url)?;
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = open.get(url).and_then(Weak::upgrade) {
            return Ok(l);
        }
        let remote = self.remote()?;
        let l = RemoteLayer::open(
            remote.client.clone(),
            url,
            remote.cache.as_ref(),
            self.opts.fetch,
            self.opts.record.clone(),
        )?;
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(url.clone(), Arc::downgrade(&l));
        self.start_prefetch(&l);
        Ok(l)
    }

    /// Fetches the blocks the prefetch trace names for layer `l`, in the background.
    fn start_prefetch(&self, l: &Arc<RemoteLayer>) {
        let Some(trace) = &self.opts.prefetch else {
            return;
        };
        if trace.blocks(&l.name()).is_none() {
            return;
        }
        let (l, trace) = (l.clone(), trace.clone());
        let h = std::thread::spawn(move || {
            let blocks = trace.blocks(&l.name()).unwrap_or_default();
            if let Err(e) = l.prefetch_blocks(blocks.iter().copied()) {
                crate::log::log(&format!("prefetch: {e}"));
            }
        });
        self.prefetching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(h);
    }

    /// Waits for the background prefetches started so far.
    pub fn wait_prefetch(&self) {
        let hs: Vec<_> =
            std::mem::take(&mut *self.prefetching.lock().unwrap_or_else(|e| e.into_inner()));
        for h in hs {
            let _ = h.join();
        }
    }

    fn check_root(&self, url: &S3Url) -> Result<()> {
        if !self.opts.confined || self.opts.roots.iter().any(|r| url.is_under(r)) {
            return Ok(());
        }
        Err(RemoteError::bad_object(
            url,
            "leads outside every image root",
        ))
    }

    /// The location a reference names, if it is remote: an `s3://` URL, or any
    /// reference made by a layer that is itself an object.
    pub fn remote_target(child: &Path, reference: &str) -> Option<Result<S3Url>> {
        let child = child.to_str().filter(|c| is_remote(c));
        match child {
            Some(c) => Some(S3Url::parse(c, false).and_then(|c| c.resolve(reference))),
            None if is_remote(reference) => Some(S3Url::parse(reference, false)),
            None => None,
        }
    }
}

/// The local source when only remote image roots are given: every local reference is
/// outside them.
pub struct NoLocal;

impl LayerSource for NoLocal {
    fn open_parent(
        &self,
        child: &Path,
        reference: &str,
    ) -> std::result::Result<OpenedLayer, OpenError> {
        Err(OpenError::Chain {
            path: child.to_path_buf(),
            reason: format!("parent reference {reference:?} leads outside every image root"),
        })
    }

    fn lock_shared(&self, _: &OpenedLayer) -> std::result::Result<(), OpenError> {
        Ok(())
    }
}

/// The identity of the object at `url` for loop detection and the lower cache.
pub fn object_id(url: &S3Url) -> LayerId {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    url.hash(&mut h);
    LayerId::Object { key: h.finish() }
}

fn open_error(child: &Path, e: RemoteError) -> OpenError {
    match e {
        RemoteError::Layer(e) => e,
        e => OpenError::Chain {
            path: child.to_path_buf(),
            reason: e.to_string(),
        },
    }
}

impl LayerSource for RemoteSource {
    fn open_parent(
        &self,
        child: &Path,
        reference: &str,
    ) -> std::result::Result<OpenedLayer, OpenError> {
        let Some(target) = Self::remote_target(child, reference) else {
            return self.local.open_parent(child, reference);
        };
        let url = target.map_err(|e| open_error(child, e))?;
        let layer = self.open_object(&url).map_err(|e| open_error(child, e))?;
        Ok(OpenedLayer {
            storage: layer,
            path: PathBuf::from(url.to_string()),
            id: object_id(&url),
        })
    }

    fn lock_shared(&self, layer: &OpenedLayer) -> std::result::Result<(), OpenError> {
        match layer.id {
            // Objects are immutable: nothing to lock.
            LayerId::Object { .. } => Ok(()),
            _ => self.local.lock_shared(layer),
        }
    }
}
