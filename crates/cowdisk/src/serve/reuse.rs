//! Opening the next chain of a served image with the layers it already has open.
//!
//! A live snapshot, squash or reset opens a new disk whose parents are (mostly) layers the
//! current disk holds open. Opening them again would cost a descriptor per layer per chain
//! change, and every change keeps its disk ([`super::generations`]): the descriptors would
//! grow with the square of the number of changes and hit the process limit after a few
//! dozen snapshots. This source hands back the open storage of a layer it recognises by
//! identity (the fresh handle it just opened is closed at once), and takes no second lock
//! on it: the open handle holds one already.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cowdisk_core::{Disk, LayerId, LayerSource, OpenError, OpenedLayer, ReadStorage};

/// See the module doc.
pub struct Reusing {
    inner: Arc<dyn LayerSource>,
    open: HashMap<LayerId, Arc<dyn ReadStorage>>,
}

fn id_of(s: &dyn ReadStorage) -> Option<LayerId> {
    let st = rustix::fs::fstat(s.fd()?).ok()?;
    Some(LayerId::File {
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

impl Reusing {
    /// Parents through `inner`, reusing every layer of `disk` (its top included).
    pub fn over(inner: Arc<dyn LayerSource>, disk: &Disk) -> Reusing {
        let top: Arc<dyn ReadStorage> = disk.top_storage().clone();
        let lowers = disk.lower().layers().iter().map(|l| l.storage().clone());
        let open = std::iter::once(top)
            .chain(lowers)
            .filter_map(|s| Some((id_of(&*s)?, s)))
            .collect();
        Reusing { inner, open }
    }
}

impl LayerSource for Reusing {
    fn open_parent(&self, child: &Path, reference: &str) -> Result<OpenedLayer, OpenError> {
        let mut l = self.inner.open_parent(child, reference)?;
        if let Some(s) = self.open.get(&l.id) {
            // The same file (by identity): the handle already open replaces the new one.
            l.storage = s.clone();
        }
        Ok(l)
    }

    fn lock_shared(&self, layer: &OpenedLayer) -> Result<(), OpenError> {
        if self.open.contains_key(&layer.id) {
            // Held by the open handle: a sealed layer shared, or the just-sealed top
            // whose lock was made shared before the new chain is opened.
            return Ok(());
        }
        self.inner.lock_shared(layer)
    }
}
