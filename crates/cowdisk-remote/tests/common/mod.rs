//! Shared set-up: a SeaweedFS per test, a local 3-layer sealed chain, sources.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cowdisk_core::{create_child, create_image, Access, Disk, LocalFiles, OpenOptions, WriteFlags};
use cowdisk_remote::{FetchOptions, RemoteOptions, RemoteSource, S3Url, StoreConfig};
use test_support::s3server::{S3Server, BUCKET};

pub const MIB: u64 = 1 << 20;
pub const BS: u32 = 64 * 1024;
/// Virtual size: much larger than the data held.
pub const VSIZE: u64 = 256 * MIB;

/// A temp folder removed on drop.
pub struct Tmp(pub PathBuf);
impl Tmp {
    pub fn new(name: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!("cowdisk-remote-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn start(tmp: &Tmp) -> Option<S3Server> {
    S3Server::start(&tmp.0)
}

pub fn store(s: &S3Server) -> StoreConfig {
    let env = s.env();
    StoreConfig::from(&move |k: &str| env.iter().find(|e| e.0 == k).map(|e| e.1.clone())).unwrap()
}

pub fn source(s: &S3Server, cache: Option<&Path>, deadline: Duration) -> Arc<RemoteSource> {
    let opts = RemoteOptions {
        cache_dir: cache.map(Path::to_path_buf),
        cache_size: 1 << 30,
        fetch: FetchOptions {
            deadline,
            ..FetchOptions::default()
        },
        store: Some(store(s)),
        ..RemoteOptions::default()
    };
    Arc::new(RemoteSource::new(Arc::new(LocalFiles::new()), opts))
}

pub fn prefix(p: &str) -> S3Url {
    S3Url::parse(&format!("s3://{BUCKET}/{p}"), true).unwrap()
}

/// Deterministic bytes for block-sized writes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(path: &Path, off: u64, data: &[u8]) {
    let d = Disk::open(path, &OpenOptions::new()).unwrap();
    d.write(off, data, WriteFlags::default()).unwrap();
    d.flush().unwrap();
}

/// l1 ← l2 ← l3 (sealed) ← top (writable, empty). Returns (dir of files, top path).
/// Data: l1 holds 3 MiB at 0 and 1 MiB at 100 MiB; l2 overwrites 512 KiB at 1 MiB and
/// a partial block at 100 MiB + 4 KiB; l3 writes 1 MiB at 200 MiB and the disk's last block.
pub fn local_chain(dir: &Path) -> PathBuf {
    let l1 = dir.join("l1.cow");
    create_image(&l1, VSIZE, BS).unwrap();
    write(&l1, 0, &pattern(1, 3 * MIB as usize));
    write(&l1, 100 * MIB, &pattern(2, MIB as usize));
    let l2 = dir.join("l2.cow");
    create_child(&l2, &l1).unwrap();
    write(&l2, MIB, &pattern(3, 512 * 1024));
    write(&l2, 100 * MIB + 4096, &pattern(4, 5000));
    let l3 = dir.join("l3.cow");
    create_child(&l3, &l2).unwrap();
    write(&l3, 200 * MIB, &pattern(5, MIB as usize));
    write(&l3, VSIZE - u64::from(BS), &pattern(6, BS as usize));
    let top = dir.join("top.cow");
    create_child(&top, &l3).unwrap();
    top
}

/// The whole content of the disk at `top`, in 1 MiB reads.
pub fn read_all(top: &Path, opts: &OpenOptions) -> Vec<u8> {
    let d = Disk::open(top, &opts.clone().access(Access::ReadOnly)).unwrap();
    let mut out = vec![0u8; d.size() as usize];
    for (i, c) in out.chunks_mut(MIB as usize).enumerate() {
        d.read(i as u64 * MIB, c).unwrap();
    }
    out
}
