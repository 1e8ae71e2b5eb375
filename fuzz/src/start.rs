//! Starting chains for the model target, made by the engine itself on real files (so
//! sealing is the engine's own), then loaded into simulated storage per input. Cached
//! per geometry: building one costs file I/O, using one a copy.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use cowdisk_core::{create_child, create_image, Disk, OpenOptions, WriteFlags};

/// Durable images of a chain: an optional sealed base under an empty writable top.
pub struct Start {
    /// The base layer's file, if the chain has one.
    pub base: Option<Vec<u8>>,
    /// The top layer's file.
    pub top: Vec<u8>,
    /// Virtual size.
    pub size: u64,
    /// Block size.
    pub bs: u64,
    /// What the disk reads as.
    pub content: Vec<u8>,
}

/// A cheap deterministic byte pattern (xorshift), as the engine's own tests use.
pub fn pattern(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

type Key = (u64, u32, bool);

/// The start for a geometry, built on first use.
pub fn get(size: u64, bs: u32, with_base: bool) -> Arc<Start> {
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<Start>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    c.entry((size, bs, with_base))
        .or_insert_with(|| Arc::new(build(size, bs, with_base)))
        .clone()
}

fn build(size: u64, bs: u32, with_base: bool) -> Start {
    let dir = std::env::temp_dir().join(format!(
        "cowdisk-fuzz-start-{}-{size}-{bs}-{with_base}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp folder");
    let (base_p, top_p) = (dir.join("base.cow"), dir.join("top.cow"));
    let mut content = vec![0u8; size as usize];
    let base = if with_base {
        create_image(&base_p, size, bs).expect("create base");
        let d = Disk::open(&base_p, &OpenOptions::new()).expect("open base");
        // Most blocks hold data in the base; every fourth stays a hole.
        for (b, chunk) in content.chunks_mut(bs as usize).enumerate() {
            if b % 4 != 3 {
                pattern(0xba5e + b as u64, chunk);
                d.write(b as u64 * u64::from(bs), chunk, WriteFlags::default())
                    .expect("write base");
            }
        }
        d.flush().expect("flush base");
        drop(d);
        create_child(&top_p, &base_p).expect("create top");
        Some(read(&base_p))
    } else {
        create_image(&top_p, size, bs).expect("create top");
        None
    };
    let top = read(&top_p);
    let _ = std::fs::remove_dir_all(&dir);
    Start {
        base,
        top,
        size,
        bs: u64::from(bs),
        content,
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).expect("read layer file")
}
