//! Trace prefetch against a real S3 server: a trace recorded during one cold start makes
//! the next cold start (fresh cache) fetch those blocks before they are read.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cowdisk_core::{Disk, LocalFiles, OpenOptions};
use cowdisk_remote::pull::create_over_remote;
use cowdisk_remote::push::push;
use cowdisk_remote::trace::{Trace, TraceRecorder};
use cowdisk_remote::{RemoteOptions, RemoteSource};

fn with(
    server: &test_support::s3server::S3Server,
    cache: &std::path::Path,
    f: impl FnOnce(&mut RemoteOptions),
) -> Arc<RemoteSource> {
    let mut o = RemoteOptions {
        cache_dir: Some(cache.to_path_buf()),
        store: Some(store(server)),
        ..RemoteOptions::default()
    };
    o.fetch.readahead = 0;
    f(&mut o);
    Arc::new(RemoteSource::new(Arc::new(LocalFiles::new()), o))
}

#[test]
fn recorded_trace_prefetches_the_next_cold_start() {
    let tmp = Tmp::new("trace");
    let Some(server) = start(&tmp) else { return };
    let top = local_chain(&tmp.0);
    let expect = read_all(&top, &OpenOptions::new());
    let src = source(&server, None, Duration::from_secs(30));
    let url = push(&src, &top, &prefix("tr"))
        .unwrap()
        .last()
        .unwrap()
        .url
        .clone();

    // Cold start 1: record what is fetched on demand.
    let trace = tmp.0.join("boot.trace");
    let rec = Arc::new(TraceRecorder::create(&trace).unwrap());
    let a = with(&server, &tmp.0.join("cache-a"), |o| {
        o.record = Some(rec.clone())
    });
    let t1 = tmp.0.join("t1.cow");
    create_over_remote(&a, &t1, &url).unwrap();
    let regions = [
        (0, 256 * 1024),
        (100 * MIB, 64 * 1024),
        (200 * MIB + 512 * 1024, 100_000),
    ];
    let open = |src: &Arc<RemoteSource>, top: &std::path::Path| {
        Disk::open(top, &OpenOptions::new().source(src.clone())).unwrap()
    };
    let read = |d: &Disk| {
        for (off, len) in regions {
            let mut b = vec![0u8; len];
            d.read(off, &mut b).unwrap();
            assert!(b[..] == expect[off as usize..][..len]);
        }
    };
    read(&open(&a, &t1));
    drop(rec);
    let text = std::fs::read_to_string(&trace).unwrap();
    assert!(
        text.starts_with("cowdisk-trace 1\n") && text.lines().count() > 3,
        "{text}"
    );

    // Cold start 2 on a fresh cache: the trace's blocks are fetched at open.
    let t = Arc::new(Trace::load(&trace).unwrap());
    let b = with(&server, &tmp.0.join("cache-b"), |o| {
        o.prefetch = Some(t.clone())
    });
    let t2 = tmp.0.join("t2.cow");
    create_over_remote(&b, &t2, &url).unwrap();
    // Opening fetches metadata and starts the prefetch; reads then find every block.
    let d = open(&b, &t2);
    b.wait_prefetch();
    let stats = &b.remote().unwrap().client.stats;
    let before = stats.gets.load(Ordering::Relaxed);
    read(&d);
    assert_eq!(
        stats.gets.load(Ordering::Relaxed),
        before,
        "every traced block was prefetched"
    );

    // A damaged trace is one clear error naming the file and line.
    std::fs::write(&trace, "cowdisk-trace 1\nabc notanumber\n").unwrap();
    let e = Trace::load(&trace).unwrap_err().to_string();
    assert!(e.contains("boot.trace") && e.contains("line 2"), "{e}");
}
