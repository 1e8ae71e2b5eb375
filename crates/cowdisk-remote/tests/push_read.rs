//! Push a local chain to a real S3 server (SeaweedFS on 127.0.0.1), then read it back
//! lazily through a local top: content, object sizes, dedup of pushes, pull.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use cowdisk_core::{Disk, OpenOptions, WriteFlags};
use cowdisk_remote::pull::{create_over_remote, pull};
use cowdisk_remote::push::push;

#[test]
fn push_three_layers_read_back_lazily_and_pull() {
    let tmp = Tmp::new("push");
    let Some(server) = start(&tmp) else { return };
    let top = local_chain(&tmp.0);
    let expect = read_all(&top, &OpenOptions::new());
    let src = source(&server, Some(&tmp.0.join("cache")), Duration::from_secs(30));

    let pushed = push(&src, &top, &prefix("images")).unwrap();
    assert_eq!(
        pushed.len(),
        3,
        "three sealed layers, the writable top is not pushed"
    );
    for (p, held) in pushed
        .iter()
        .zip([4 * MIB, 512 * 1024 + 64 * 1024, MIB + 64 * 1024])
    {
        assert_eq!(p.uploaded, p.object_len, "{}", p.url);
        // Metadata is a few KiB here: the object is about the data held, not 256 MiB.
        assert!(
            p.object_len >= held && p.object_len < held + 64 * 1024,
            "{}: {} bytes for {held}",
            p.url,
            p.object_len
        );
    }
    let again = push(&src, &top, &prefix("images")).unwrap();
    assert!(
        again.iter().all(|p| p.uploaded == 0),
        "a second push uploads nothing"
    );
    assert_eq!(again.last().unwrap().url, pushed.last().unwrap().url);

    // A local top over the remote chain reads exactly the local chain's content.
    let rtop = tmp.0.join("rtop.cow");
    create_over_remote(&src, &rtop, &pushed.last().unwrap().url).unwrap();
    let opts = OpenOptions::new().source(src.clone());
    assert!(
        read_all(&rtop, &opts) == expect,
        "remote chain reads as the local one"
    );

    // Copy-up from a remote block, then read back.
    let d = Disk::open(&rtop, &opts).unwrap();
    d.write(MIB + 100, b"hello", WriteFlags::default()).unwrap();
    d.flush().unwrap();
    let mut b = vec![0u8; BS as usize];
    d.read(MIB, &mut b).unwrap();
    let mut want = expect[MIB as usize..(MIB + u64::from(BS)) as usize].to_vec();
    want[100..105].copy_from_slice(b"hello");
    assert!(b == want);
    drop(d);

    // Pull: a local chain that opens without any remote source.
    let dir = tmp.0.join("pulled");
    std::fs::create_dir(&dir).unwrap();
    let ptop = pull(&src, &pushed.last().unwrap().url, &dir).unwrap();
    let child = tmp.0.join("pulled/child.cow");
    cowdisk_core::create_child(&child, &ptop).unwrap();
    assert!(
        read_all(&child, &OpenOptions::new()) == expect,
        "pulled chain reads the same"
    );
    // A pulled layer is sparse: about the data it holds, not its virtual size.
    let alloc = std::fs::metadata(dir.join(ptop.file_name().unwrap())).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    assert!(alloc.unwrap() < 4 * MIB);
    // Pulling again keeps the files.
    assert_eq!(pull(&src, &pushed.last().unwrap().url, &dir).unwrap(), ptop);
    let _ = Arc::strong_count(&src);
}
