//! The layer-source seam: a reference that is not the recorded parent is refused with
//! nothing read beyond what proves it (its magic, or its header).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use cowdisk_core::layer::{read_header, write_header};
use cowdisk_core::{
    create_child, create_image, open_layer_file, Access, Disk, FileStorage, LayerSource,
    LocalFiles, OpenError, OpenOptions, OpenedLayer, ReadStorage,
};

/// Counts the bytes read from every parent it opens.
struct Counting {
    inner: LocalFiles,
    read: Arc<AtomicU64>,
}

struct CountingStorage {
    inner: Arc<dyn ReadStorage>,
    read: Arc<AtomicU64>,
}

impl ReadStorage for CountingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read.fetch_add(buf.len() as u64, SeqCst);
        self.inner.read_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
}

impl LayerSource for Counting {
    fn open_parent(&self, child: &Path, reference: &str) -> Result<OpenedLayer, OpenError> {
        let o = self.inner.open_parent(child, reference)?;
        Ok(OpenedLayer {
            storage: Arc::new(CountingStorage {
                inner: o.storage,
                read: self.read.clone(),
            }),
            path: o.path,
            id: o.id,
        })
    }
    fn lock_shared(&self, _: &OpenedLayer) -> Result<(), OpenError> {
        Ok(())
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cowdisk-sources-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn retarget(top: &Path, target: &str) {
    let (f, _) = open_layer_file(top, Access::ReadWrite, true).unwrap();
    let st = FileStorage::new(f);
    let loaded = read_header(&st, top).unwrap();
    let mut h = loaded.header.clone();
    h.parent.as_mut().unwrap().path = target.to_string();
    write_header(&st, top, &loaded, &h).unwrap();
}

#[test]
fn wrong_parents_are_read_no_further_than_their_identity() {
    let d = dir("identity");
    let base = d.join("base.cow");
    let top = d.join("top.cow");
    create_image(&base, 1 << 20, 4096).unwrap();
    create_child(&top, &base).unwrap();
    let other = d.join("other.cow");
    create_image(&other, 1 << 20, 4096).unwrap();
    create_child(&d.join("x.cow"), &other).unwrap();
    std::fs::write(d.join("plain"), vec![b'x'; 100_000]).unwrap();
    // The good parent: header and map are read.
    let read = Arc::new(AtomicU64::new(0));
    let src = Arc::new(Counting {
        inner: LocalFiles::new(),
        read: read.clone(),
    });
    let opts = OpenOptions::new().access(Access::ReadOnly).source(src);
    Disk::open(&top, &opts).unwrap();
    assert!(read.load(SeqCst) > 8192, "the good parent's map was read");
    for (target, limit) in [("plain", 8), ("other.cow", 8 + 8192), ("/dev/null", 0)] {
        retarget(&top, target);
        read.store(0, SeqCst);
        let r = Disk::open(&top, &opts);
        assert!(r.is_err(), "{target} accepted");
        let n = read.load(SeqCst);
        assert!(
            n <= limit,
            "{target}: {n} bytes read, at most {limit} allowed"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}
