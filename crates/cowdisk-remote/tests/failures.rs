//! Failure behaviour against a real S3 server: a damaged object, the store going away
//! mid-read and coming back, a torn cache entry, concurrent readers of one block.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use cowdisk_core::{Access, Disk, OpenOptions, WriteFlags};
use cowdisk_remote::pull::create_over_remote;
use cowdisk_remote::push::push;
use cowdisk_remote::{RemoteSource, S3Url};

/// Pushes the local chain; returns the top object's URL and the expected content.
fn pushed(tmp: &Tmp, server: &test_support::s3server::S3Server, p: &str) -> (S3Url, Vec<u8>) {
    let top = local_chain(&tmp.0);
    let expect = read_all(&top, &OpenOptions::new());
    let src = source(server, None, Duration::from_secs(30));
    let url = push(&src, &top, &prefix(p))
        .unwrap()
        .last()
        .unwrap()
        .url
        .clone();
    (url, expect)
}

fn gets(src: &RemoteSource) -> (u64, u64) {
    let c = src.remote().unwrap().client.clone();
    (
        c.stats.gets.load(Ordering::Relaxed),
        c.stats.get_bytes.load(Ordering::Relaxed),
    )
}

fn new_top(src: &RemoteSource, dir: &Path, name: &str, url: &S3Url) -> std::path::PathBuf {
    let p = dir.join(name);
    create_over_remote(src, &p, url).unwrap();
    p
}

#[test]
fn damaged_block_is_eio_for_that_block_only() {
    let tmp = Tmp::new("damage");
    let Some(server) = start(&tmp) else { return };
    let (url, expect) = pushed(&tmp, &server, "dmg");
    // Flip a byte inside the l3 object's first data block (at 200 MiB), same length.
    let mut obj = server.get(&url.key);
    let data_offset = u64::from_le_bytes(obj[64..72].try_into().unwrap()) as usize;
    obj[data_offset + 10] ^= 0xff;
    server.put(&url.key, &obj);

    let src = source(&server, Some(&tmp.0.join("cache")), Duration::from_secs(10));
    let top = new_top(&src, &tmp.0, "t.cow", &url);
    let d = Disk::open(&top, &OpenOptions::new().source(src.clone())).unwrap();
    let mut b = vec![0u8; BS as usize];
    let e = d.read(200 * MIB, &mut b).unwrap_err();
    assert_eq!(e.kind(), cowdisk_core::IoErrorKind::Io, "{e}");
    // Its neighbour in the same fetch unit, and other layers, still read.
    d.read(200 * MIB + u64::from(BS), &mut b).unwrap();
    assert!(b[..] == expect[(200 * MIB + u64::from(BS)) as usize..][..BS as usize]);
    d.read(0, &mut b).unwrap();
    assert!(b[..] == expect[..BS as usize]);
    // A copy-up over the damaged block fails and leaves the top unchanged.
    assert!(d.write(200 * MIB + 5, b"x", WriteFlags::default()).is_err());
    assert_eq!(
        d.top_state(200 * MIB / u64::from(BS)),
        cowdisk_core::BlockState::Absent
    );

    drop(d);
    // A damaged object header is refused at open, naming the object.
    obj[100] ^= 1;
    server.put(&url.key, &obj);
    let src = source(&server, None, Duration::from_secs(10));
    let e = Disk::open(&top, &OpenOptions::new().source(src))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&url.to_string()) && e.contains("CRC"), "{e}");
}

#[test]
fn store_down_fails_within_deadline_and_recovers() {
    let tmp = Tmp::new("down");
    let Some(mut server) = start(&tmp) else {
        return;
    };
    let (url, expect) = pushed(&tmp, &server, "down");
    let src = source(&server, Some(&tmp.0.join("cache")), Duration::from_secs(3));
    let top = new_top(&src, &tmp.0, "t.cow", &url);
    let d = Disk::open(&top, &OpenOptions::new().source(src.clone())).unwrap();
    let mut b = vec![0u8; BS as usize];
    d.read(0, &mut b).unwrap(); // cached now
    d.write(50 * MIB, b"top data", WriteFlags::default())
        .unwrap();

    server.stop();
    d.read(0, &mut b).unwrap();
    assert!(b[..] == expect[..BS as usize], "cached blocks keep working");
    let mut t = [0u8; 8];
    d.read(50 * MIB, &mut t).unwrap();
    assert_eq!(&t, b"top data", "top-held data keeps working");
    let start = Instant::now();
    assert!(
        d.read(100 * MIB, &mut b).is_err(),
        "uncached remote read fails"
    );
    // A bound against hanging, not a performance assertion: deadline 3 s.
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    assert!(
        d.write(100 * MIB + 7, b"y", WriteFlags::default()).is_err(),
        "copy-up fails"
    );
    assert_eq!(
        d.top_state(100 * MIB / u64::from(BS)),
        cowdisk_core::BlockState::Absent
    );

    server.restart();
    d.read(100 * MIB, &mut b).unwrap();
    assert!(
        b[..] == expect[100 * MIB as usize..][..BS as usize],
        "works again without restart"
    );
}

#[test]
fn eight_clones_fetch_each_block_once_and_torn_cache_entries_are_refetched() {
    let tmp = Tmp::new("dedup");
    let Some(server) = start(&tmp) else { return };
    let (url, expect) = pushed(&tmp, &server, "dedup");
    let cache = tmp.0.join("cache");
    // No readahead, so the count is exactly the units the readers need.
    let mut opts = cowdisk_remote::RemoteOptions {
        cache_dir: Some(cache.clone()),
        store: Some(store(&server)),
        ..Default::default()
    };
    opts.fetch.readahead = 0;
    let src = Arc::new(RemoteSource::new(
        Arc::new(cowdisk_core::LocalFiles::new()),
        opts,
    ));
    let tops: Vec<_> = (0..8)
        .map(|i| new_top(&src, &tmp.0, &format!("c{i}.cow"), &url))
        .collect();
    let disks: Vec<_> = tops
        .iter()
        .map(|t| {
            Arc::new(
                Disk::open(
                    t,
                    &OpenOptions::new()
                        .source(src.clone())
                        .access(Access::ReadOnly),
                )
                .unwrap(),
            )
        })
        .collect();
    let before = gets(&src);
    // 1 MiB at 0: 16 blocks of l1, four 256 KiB fetch units, uncached.
    std::thread::scope(|s| {
        for d in &disks {
            s.spawn(|| {
                let mut b = vec![0u8; MIB as usize];
                d.read(0, &mut b).unwrap();
                assert!(b[..] == expect[..MIB as usize]);
            });
        }
    });
    let after = gets(&src);
    // Each block fetched once: the four adjacent units in one GET, eight readers.
    let (n, bytes) = (after.0 - before.0, after.1 - before.1);
    assert_eq!((n, bytes), (1, MIB), "{n} GETs, {bytes} bytes");

    // A torn cache entry (garbage in the cached block) is detected and refetched.
    let f = std::fs::read_dir(cache.join("v2"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect::<Vec<_>>();
    for p in f {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        file.write_all_at(&[0xAB; 100], 0).unwrap();
    }
    let src2 = source(&server, Some(&cache), Duration::from_secs(30));
    let top = new_top(&src2, &tmp.0, "fresh.cow", &url);
    let d = Disk::open(&top, &OpenOptions::new().source(src2.clone())).unwrap();
    let g0 = gets(&src2).0;
    let mut b = vec![0u8; BS as usize];
    d.read(0, &mut b).unwrap();
    assert!(b[..] == expect[..BS as usize], "never the torn bytes");
    assert_eq!(gets(&src2).0 - g0, 1, "the torn entry was fetched again");
    d.read(0, &mut b).unwrap();
    d.read(u64::from(BS), &mut b).unwrap();
    assert_eq!(gets(&src2).0 - g0, 1, "the rest came from the cache");
}

#[test]
fn cache_stays_bounded() {
    let tmp = Tmp::new("bound");
    let Some(server) = start(&tmp) else { return };
    let (url, expect) = pushed(&tmp, &server, "bound");
    let cache = tmp.0.join("cache");
    let mut opts = cowdisk_remote::RemoteOptions {
        cache_dir: Some(cache.clone()),
        cache_size: 2 * MIB,
        store: Some(store(&server)),
        ..Default::default()
    };
    opts.fetch.readahead = 0;
    let src = Arc::new(RemoteSource::new(
        Arc::new(cowdisk_core::LocalFiles::new()),
        opts,
    ));
    let top = new_top(&src, &tmp.0, "t.cow", &url);
    let all = read_all(&top, &OpenOptions::new().source(src.clone()));
    assert!(all == expect);
    let used: u64 = std::fs::read_dir(cache.join("v2"))
        .unwrap()
        .flatten()
        .map(|e| {
            use std::os::unix::fs::MetadataExt;
            e.metadata().unwrap().blocks() * 512
        })
        .sum();
    // 5.6 MiB of data went through a 2 MiB cache; it is checked every 1 MiB written.
    assert!(used <= 3 * MIB + 256 * 1024, "cache holds {used} bytes");
}

/// Unmounts on drop.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_cache_file_system_degrades_to_fetching_without_caching() {
    let root = rustix::process::geteuid().is_root();
    if !test_support::require(root, "root (to mount a 1 MiB tmpfs as the cache)") {
        return;
    }
    let tmp = Tmp::new("fullcache");
    let Some(server) = start(&tmp) else { return };
    let (url, expect) = pushed(&tmp, &server, "full");
    let cache = tmp.0.join("tiny");
    std::fs::create_dir(&cache).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let _m = Mount(cache.clone());
    let src = source(&server, Some(&cache), Duration::from_secs(10));
    let top = new_top(&src, &tmp.0, "t.cow", &url);
    // 5.6 MiB of data through a cache file system of 1 MiB: every read still succeeds.
    assert!(read_all(&top, &OpenOptions::new().source(src.clone())) == expect);
    let (_, first) = gets(&src);
    assert!(read_all(&top, &OpenOptions::new().source(src.clone())) == expect);
    let (_, both) = gets(&src);
    // Without a cache each pass fetches about the data held (5.6 MiB in 256 KiB units),
    // not a unit per block access: the last units fetched are kept in memory and
    // readahead stops while the cache cannot take writes.
    assert!(
        first < 8 * MIB && both - first < 8 * MIB,
        "{first} then {} bytes",
        both - first
    );
}

#[test]
fn an_object_that_is_not_the_expected_layer_is_refused_at_open() {
    let tmp = Tmp::new("wrongobj");
    let Some(server) = start(&tmp) else { return };
    let top = local_chain(&tmp.0);
    let src = source(&server, None, Duration::from_secs(10));
    let pushed = push(&src, &top, &prefix("w")).unwrap();
    let (l2, l3) = (&pushed[1].url, &pushed[2].url);
    let t = new_top(&src, &tmp.0, "t.cow", l3);
    drop(src);

    // The l3 object replaced by l2's bytes: its name and header disagree.
    let l3_bytes = server.get(&l3.key);
    server.put(&l3.key, &server.get(&l2.key));
    let src = source(&server, None, Duration::from_secs(10));
    let e = Disk::open(&t, &OpenOptions::new().source(src))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&l3.to_string()) && e.contains("not the one its name says"),
        "{e}"
    );

    // A reference by a non-content name to another layer: the walk's identity check.
    server.put(&l3.key, &l3_bytes);
    server.put("w/renamed", &server.get(&l2.key));
    let mut h = cowdisk_core::layer::read_header(
        &cowdisk_core::FileStorage::new(std::fs::File::open(&t).unwrap()),
        &t,
    )
    .unwrap()
    .header;
    h.parent.as_mut().unwrap().path = format!("s3://{}/w/renamed", l3.bucket);
    let t2 = tmp.0.join("t2.cow");
    let tmpf = cowdisk_core::create::write_temp_layer(&t2, &h, "test").unwrap();
    std::fs::rename(tmpf, &t2).unwrap();
    let src = source(&server, None, Duration::from_secs(10));
    let e = Disk::open(&t2, &OpenOptions::new().source(src))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("w/renamed") && e.contains("expects"), "{e}");
}

/// A top over the pushed chain with a host cache: the disk, the chain's content, the
/// cache folder and the source (for its GET counts).
fn cached_disk(
    tmp: &Tmp,
    server: &test_support::s3server::S3Server,
    name: &str,
) -> (Disk, Vec<u8>, std::path::PathBuf, Arc<RemoteSource>) {
    let (url, expect) = pushed(tmp, server, name);
    let cache = tmp.0.join("cache");
    let src = source(server, Some(&cache), Duration::from_secs(30));
    let top = new_top(&src, &tmp.0, "t.cow", &url);
    let d = Disk::open(&top, &OpenOptions::new().source(src.clone())).unwrap();
    (d, expect, cache, src)
}

#[test]
fn warm_readers_notice_another_process_evicting() {
    let tmp = Tmp::new("evict");
    let Some(server) = start(&tmp) else { return };
    let (d, expect, cache, src) = cached_disk(&tmp, &server, "evict");
    let at = 200 * MIB; // held by the remote base only
    let want = &expect[at as usize..][..MIB as usize];
    let mut b = vec![0u8; MIB as usize];
    // Fetched and cached; after that the cache file is trusted.
    for _ in 0..3 {
        d.read(at, &mut b).unwrap();
        assert!(b[..] == want[..]);
    }
    let g0 = gets(&src).0;
    d.read(at, &mut b).unwrap();
    assert_eq!(gets(&src).0, g0, "served from the cache");
    // Another process (its own handle on the folder, a zero bound) empties every file.
    cowdisk_remote::cache::CacheDir::new(&cache, 0)
        .unwrap()
        .enforce();
    d.read(at, &mut b).unwrap();
    assert!(b[..] == want[..], "never the punched zeros");
    // The layer's last block pushes the first unit out of the fetcher's recent units,
    // so the next read must go to the store.
    let last = VSIZE - u64::from(BS);
    d.read(last, &mut b[..BS as usize]).unwrap();
    assert!(b[..BS as usize] == expect[last as usize..]);
    let g1 = gets(&src).0;
    d.read(at, &mut b).unwrap();
    assert!(b[..] == want[..], "never the punched zeros");
    assert!(gets(&src).0 > g1, "fetched again");
    d.read(at, &mut b).unwrap();
    assert!(b[..] == want[..]);
}

/// What a staged piece asks to be checked with: layer depth and token.
type Check = (u32, u64);

/// The bytes a read plan names, read from the files (as `splice` would).
fn staged_bytes(d: &Disk, at: u64, len: u64) -> Option<(Vec<u8>, Vec<Check>)> {
    let mut out = Vec::new();
    let mut checks = Vec::new();
    let complete = d
        .read_pieces(at, len, |p| match p {
            cowdisk_core::ReadPiece::Staged {
                fd,
                offset,
                len,
                depth,
                token,
            } => {
                let mut b = vec![0u8; len as usize];
                let n = rustix::io::pread(fd, &mut b, offset).unwrap();
                assert_eq!(n, b.len());
                out.extend_from_slice(&b);
                checks.push((depth, token));
            }
            other => panic!("not a staged piece: {other:?}"),
        })
        .unwrap();
    complete.then_some((out, checks))
}

/// Reads planned from the host cache (sent by descriptor) are good when the layer says so
/// afterwards, and are refused once another process evicted them; blocks are usable that
/// way as soon as they were fetched, and small reads are copied instead.
#[test]
fn staged_reads_from_the_cache_are_checked_after_reading() {
    let tmp = Tmp::new("staged");
    let Some(server) = start(&tmp) else { return };
    let (d, expect, cache, _) = cached_disk(&tmp, &server, "staged");
    let at = 200 * MIB; // held by the remote base only
    let want = &expect[at as usize..][..MIB as usize];
    assert!(staged_bytes(&d, at, MIB).is_none(), "nothing cached yet");
    let mut b = vec![0u8; MIB as usize];
    d.read(at, &mut b).unwrap();
    // Fetched and cached: staged at once, no read-back needed.
    let (bytes, checks) = staged_bytes(&d, at, MIB).expect("staged after the fetch");
    assert!(bytes[..] == want[..]);
    assert!(checks
        .iter()
        .all(|&(depth, token)| d.staged_valid(depth, token)));
    assert!(
        staged_bytes(&d, at, 4096).is_none(),
        "small reads are copied"
    );
    // Another process empties the cache after the plan: the check now fails, and what
    // the file gives is not the data.
    let (_, checks) = staged_bytes(&d, at, MIB).unwrap();
    cowdisk_remote::cache::CacheDir::new(&cache, 0)
        .unwrap()
        .enforce();
    // The plan still names the cache file (nothing told this process yet): zeros now.
    let punched = staged_bytes(&d, at, MIB).map(|x| x.0);
    assert!(punched.is_none_or(|p| p[..] != want[..]));
    assert!(!checks
        .iter()
        .any(|&(depth, token)| d.staged_valid(depth, token)));
    // Reads fall back to the checked path, and the data comes back.
    assert!(
        staged_bytes(&d, at, MIB).is_none(),
        "forgotten once refused"
    );
    d.read(at, &mut b).unwrap();
    assert!(b[..] == want[..]);
}
