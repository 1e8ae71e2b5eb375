//! Engine benchmarks on real files in a temp folder (page cache warm; no flushes in
//! the measured loops unless stated).
//!
//! - `read/{4k_random,1m_seq}/depth`: reads over chains of depth 1, 8, 16, 64 whose
//!   data is spread over every layer (block b lives in layer b % depth).
//! - `read/4k_base_held/depth`: the same blocks, held by the base, read through chains of
//!   depth 1, 8, 16, 64 whose upper layers each hold other scattered blocks: isolates
//!   the cost of resolution from the spread of data over files.
//! - `copy_up/block_size`: first partial write (512 B) into blocks held only by the
//!   sealed base, 4 KiB, 64 KiB, 1 MiB blocks, copying the whole block up (`CopyUp::Copy`);
//!   a fresh top per batch.
//! - `partial/block_size`: the same writes with the default partial blocks (only the
//!   sub-block written, completed from below).
//! - `rewrite_4k`: 4 KiB random writes into blocks the top already holds.
//! - `discard/whiteout_lower`: whole-block discards of blocks held below (metadata only).
//! - `block_status/fragmented`: block status of a whole 16-layer chain with data and
//!   whiteouts interleaved.
//! - `open/1000_layers`: opening a 1,000-layer chain read-only.
//!
//! `cargo bench --bench engine -- --quick` runs in a few minutes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};

use cowdisk_core::layer::{self, NewLayer};
use cowdisk_core::{
    create_child, create_image, Access, CopyUp, Disk, FileStorage, OpenOptions, ParentRef,
    WriteFlags,
};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("cowdisk-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create bench folder");
        TempDir(d)
    }
    fn p(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rw() -> OpenOptions {
    OpenOptions::new()
}
fn ro() -> OpenOptions {
    OpenOptions::new().access(Access::ReadOnly)
}

/// A chain of `depth` layers; block `b` is written (whole) in layer `b % depth`, and
/// with `whiteouts` every 7th block of each upper layer's share is discarded instead.
fn build_chain(dir: &TempDir, depth: usize, size: u64, bs: u32, whiteouts: bool) -> PathBuf {
    let blocks = size / u64::from(bs);
    let mut prev: Option<PathBuf> = None;
    let buf = vec![0x5au8; bs as usize];
    for i in 0..depth {
        let p = dir.p(&format!("l{i}.cow"));
        match &prev {
            None => {
                create_image(&p, size, bs).expect("create base");
            }
            Some(parent) => {
                create_child(&p, parent).expect("create child");
            }
        }
        let d = Disk::open(&p, &rw()).expect("open layer");
        for b in (i as u64..blocks).step_by(depth) {
            if whiteouts && i > 0 && b % 7 == 0 {
                d.discard(b * u64::from(bs), u64::from(bs), WriteFlags::default())
                    .expect("discard");
            } else {
                d.write(b * u64::from(bs), &buf, WriteFlags::default())
                    .expect("write");
            }
        }
        if depth == 1 {
            // A single layer: fill it all.
            for b in 0..blocks {
                d.write(b * u64::from(bs), &buf, WriteFlags::default())
                    .expect("write");
            }
        }
        d.flush().expect("flush");
        prev = Some(p);
    }
    prev.expect("depth >= 1")
}

fn quick<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    g
}

fn read_by_depth(c: &mut Criterion) {
    let size = 64 << 20;
    let bs = 64 * 1024;
    let dir = TempDir::new("read");
    let mut chains = Vec::new();
    for depth in [1usize, 8, 16, 64] {
        let sub = TempDir::new(&format!("read-{depth}"));
        let top = build_chain(&sub, depth, size, bs, false);
        chains.push((depth, sub, top));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let offsets: Vec<u64> = (0..4096)
        .map(|_| rng.gen_range(0..size / 4096) * 4096)
        .collect();

    let mut g = quick(c, "read/4k_random");
    g.throughput(Throughput::Bytes(4096));
    for (depth, _, top) in &chains {
        let d = Disk::open(top, &ro()).expect("open");
        let mut buf = vec![0u8; 4096];
        let mut i = 0;
        g.bench_with_input(BenchmarkId::from_parameter(depth), depth, |b, _| {
            b.iter(|| {
                i = (i + 1) % offsets.len();
                d.read(offsets[i], &mut buf).expect("read");
            })
        });
    }
    g.finish();

    let mut g = quick(c, "read/1m_seq");
    g.throughput(Throughput::Bytes(1 << 20));
    for (depth, _, top) in &chains {
        let d = Disk::open(top, &ro()).expect("open");
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        g.bench_with_input(BenchmarkId::from_parameter(depth), depth, |b, _| {
            b.iter(|| {
                d.read(off, &mut buf).expect("read");
                off = (off + (1 << 20)) % size;
            })
        });
    }
    g.finish();
    drop(dir);
}

/// A filled base under `depth - 1` layers; layer `i` holds blocks `b % 64 == i`, so
/// blocks `b % 64 == 0` stay with the base at every depth.
fn build_base_held(dir: &TempDir, depth: usize, size: u64, bs: u32) -> PathBuf {
    let blocks = size / u64::from(bs);
    let buf = vec![0x5au8; bs as usize];
    let mut prev = dir.p("l0.cow");
    create_image(&prev, size, bs).expect("create base");
    {
        let d = Disk::open(&prev, &rw()).expect("open base");
        for b in 0..blocks {
            d.write(b * u64::from(bs), &buf, WriteFlags::default())
                .expect("write");
        }
        d.flush().expect("flush");
    }
    for i in 1..depth {
        let p = dir.p(&format!("l{i}.cow"));
        create_child(&p, &prev).expect("create child");
        let d = Disk::open(&p, &rw()).expect("open layer");
        for b in (i as u64 % 64..blocks).step_by(64) {
            d.write(b * u64::from(bs), &buf, WriteFlags::default())
                .expect("write");
        }
        d.flush().expect("flush");
        prev = p;
    }
    prev
}

fn read_base_held_by_depth(c: &mut Criterion) {
    let size = 64 << 20;
    let bs = 64 * 1024;
    let mut chains = Vec::new();
    for depth in [1usize, 8, 16, 64] {
        let sub = TempDir::new(&format!("base-held-{depth}"));
        let top = build_base_held(&sub, depth, size, bs);
        chains.push((depth, sub, top));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let per_block = u64::from(bs) / 4096;
    let offsets: Vec<u64> = (0..4096)
        .map(|_| {
            let b = rng.gen_range(0..size / u64::from(bs) / 64) * 64;
            (b * per_block + rng.gen_range(0..per_block)) * 4096
        })
        .collect();
    let mut g = quick(c, "read/4k_base_held");
    g.throughput(Throughput::Bytes(4096));
    for (depth, _, top) in &chains {
        let d = Disk::open(top, &ro()).expect("open");
        assert_eq!(d.depth(), *depth);
        let mut buf = vec![0u8; 4096];
        let mut i = 0;
        g.bench_with_input(BenchmarkId::from_parameter(depth), depth, |b, _| {
            b.iter(|| {
                i = (i + 1) % offsets.len();
                d.read(offsets[i], &mut buf).expect("read");
            })
        });
    }
    g.finish();
}

/// A sealed base filled with data, and the identity a new top needs.
fn sealed_base(dir: &TempDir, size: u64, bs: u32) -> (PathBuf, ParentRef) {
    let base = dir.p("base.cow");
    create_image(&base, size, bs).expect("create base");
    {
        let d = Disk::open(&base, &rw()).expect("open base");
        let chunk = vec![0x77u8; 1 << 20];
        for off in (0..size).step_by(1 << 20) {
            d.write(
                off,
                &chunk[..(size - off).min(1 << 20) as usize],
                WriteFlags::default(),
            )
            .expect("fill");
        }
        d.flush().expect("flush");
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&base)
        .expect("open base file");
    let (uuid, digest) = layer::seal(&FileStorage::new(f), &base).expect("seal");
    (
        base,
        ParentRef {
            path: "base.cow".into(),
            uuid,
            digest,
        },
    )
}

/// A fresh empty top over the base (one fdatasync), opened read-write.
fn fresh_top(dir: &TempDir, n: &mut u64, size: u64, bs: u32, parent: &ParentRef) -> Disk {
    let _ = std::fs::remove_file(dir.p(&format!("top{}.cow", *n)));
    *n += 1;
    let p = dir.p(&format!("top{}.cow", *n));
    let h = NewLayer {
        virtual_size: size,
        block_size: bs,
        parent: Some(parent.clone()),
    }
    .header(&p)
    .expect("header");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .expect("create top");
    layer::create_on(&FileStorage::new(f), &p, &h).expect("create_on");
    Disk::open(&p, &rw()).expect("open top")
}

fn copy_up(c: &mut Criterion) {
    first_writes(c, "copy_up", CopyUp::Copy);
    first_writes(c, "partial", CopyUp::Partial);
}

fn first_writes(c: &mut Criterion, name: &str, mode: CopyUp) {
    let mut g = quick(c, name);
    for bs in [4096u32, 64 * 1024, 1 << 20] {
        // 4 MiB copied per batch whatever the block size.
        let size = 4u64 << 20;
        let blocks = size / u64::from(bs);
        let dir = TempDir::new(&format!("{name}-{bs}"));
        let (_base, parent) = sealed_base(&dir, size, bs);
        let mut n = 0;
        g.throughput(Throughput::Bytes(size));
        g.bench_with_input(BenchmarkId::from_parameter(bs), &bs, |b, &bs| {
            b.iter_batched(
                || {
                    let d = fresh_top(&dir, &mut n, size, bs, &parent);
                    d.set_copy_up(mode);
                    d
                },
                |d| {
                    for blk in 0..blocks {
                        d.write(
                            blk * u64::from(bs) + 100,
                            &[1u8; 512],
                            WriteFlags::default(),
                        )
                        .expect("write");
                    }
                    d
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn rewrite_in_place(c: &mut Criterion) {
    let size = 64u64 << 20;
    let bs = 64 * 1024;
    let dir = TempDir::new("rewrite");
    let top = build_chain(&dir, 1, size, bs, false);
    let d = Disk::open(&top, &rw()).expect("open");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let offsets: Vec<u64> = (0..4096)
        .map(|_| rng.gen_range(0..size / 4096) * 4096)
        .collect();
    let data = vec![0x33u8; 4096];
    let mut i = 0;
    let mut g = quick(c, "rewrite");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("4k_random", |b| {
        b.iter(|| {
            i = (i + 1) % offsets.len();
            d.write(offsets[i], &data, WriteFlags::default())
                .expect("write");
        })
    });
    g.finish();
}

fn whiteouts(c: &mut Criterion) {
    let size = 64u64 << 20;
    let bs = 64 * 1024;
    let blocks = size / u64::from(bs);
    let dir = TempDir::new("discard");
    let (_base, parent) = sealed_base(&dir, size, bs);
    let mut n = 0;
    let mut g = quick(c, "discard");
    g.throughput(Throughput::Elements(blocks));
    g.bench_function("whiteout_lower_blocks", |b| {
        b.iter_batched(
            || fresh_top(&dir, &mut n, size, bs, &parent),
            |d| {
                for blk in 0..blocks {
                    d.discard(blk * u64::from(bs), u64::from(bs), WriteFlags::default())
                        .expect("discard");
                }
                d
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn block_status(c: &mut Criterion) {
    let size = 256u64 << 20;
    let bs = 64 * 1024;
    let blocks = size / u64::from(bs);
    let dir = TempDir::new("status");
    let top = build_chain(&dir, 16, size, bs, true);
    let d = Disk::open(&top, &ro()).expect("open");
    let mut out = Vec::new();
    let mut g = quick(c, "block_status");
    g.throughput(Throughput::Elements(blocks));
    g.bench_function("fragmented_16_layers", |b| {
        b.iter(|| {
            out.clear();
            d.block_status(0, size, &mut out).expect("status");
            assert!(out.len() > 1000);
        })
    });
    g.finish();
}

fn open_deep(c: &mut Criterion) {
    const LAYERS: usize = 1000;
    let dir = TempDir::new("deep");
    let size = 4u64 << 20;
    let bs = 64 * 1024;
    // create_child seals each parent and syncs; fine once.
    let mut prev: Option<PathBuf> = None;
    for i in 0..LAYERS {
        let p = dir.p(&format!("l{i}.cow"));
        match &prev {
            None => {
                create_image(&p, size, bs).expect("create");
            }
            Some(parent) => {
                create_child(&p, parent).expect("child");
            }
        }
        if i % 10 == 0 {
            let d = Disk::open(&p, &rw()).expect("open");
            d.write(
                (i as u64 % 64) * u64::from(bs),
                &[9u8; 4096],
                WriteFlags::default(),
            )
            .expect("write");
            d.flush().expect("flush");
        }
        prev = Some(p);
    }
    let top: PathBuf = prev.expect("layers");
    let mut g = c.benchmark_group("open");
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(LAYERS as u64));
    g.bench_function("1000_layers", |b| {
        b.iter(|| {
            let d = Disk::open(Path::new(&top), &ro()).expect("open");
            assert_eq!(d.depth(), LAYERS);
            d
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    read_by_depth,
    read_base_held_by_depth,
    copy_up,
    rewrite_in_place,
    whiteouts,
    block_status,
    open_deep
);
criterion_main!(benches);
