//! What the image targets do with a chain that opened: everything a reader of an
//! untrusted image would (`info`, `map`, a read of every block), checking that the
//! answers agree with each other. Errors are fine; panics and contradictions are not.

use cowdisk_core::{Disk, ExtentState, WriteFlags};

/// Lists layers, maps the whole disk, reads every block; on a writable top also writes
/// into the first block (a copy-up from whatever lies below) and reads it back.
pub fn walk(disk: &Disk, layers: usize, writable: bool) {
    let info = disk.layers();
    assert_eq!(info.len(), layers, "layers() lists every layer opened");
    assert_eq!(disk.depth(), layers, "depth() counts every layer opened");
    let size = disk.size();
    let bs = u64::from(disk.block_size());
    let mut extents = Vec::new();
    if disk.block_status(0, size, &mut extents).is_err() {
        return;
    }
    let mut next = 0;
    for e in &extents {
        assert_eq!(e.offset, next, "extents are contiguous: {extents:?}");
        assert!(e.length > 0, "no empty extent: {extents:?}");
        match e.state {
            ExtentState::Hole => assert_eq!(e.depth, None, "a hole has no owner"),
            _ => assert!(
                e.depth.is_some_and(|d| (d as usize) < layers),
                "owner within the chain: {e:?}"
            ),
        }
        next += e.length;
    }
    assert_eq!(next, size, "extents cover the disk: {extents:?}");
    let mut buf = vec![0u8; bs as usize];
    for e in &extents {
        let mut off = e.offset;
        while off < e.offset + e.length {
            let n = (e.offset + e.length - off).min(bs - off % bs);
            let part = &mut buf[..n as usize];
            part.fill(0xee);
            let res = disk.read(off, part);
            if e.state != ExtentState::Data {
                // Holes and whiteouts need no I/O below the top: they always read zeros.
                assert!(
                    res.is_ok(),
                    "read of a {:?} extent at {off}: {res:?}",
                    e.state
                );
                assert!(
                    part.iter().all(|&x| x == 0),
                    "{:?} at {off} reads non-zero",
                    e.state
                );
            }
            off += n;
        }
    }
    if writable {
        write_back(disk, size.min(bs));
    }
}

/// A partial write into block 0 reads back, also after a flush.
fn write_back(disk: &Disk, len: u64) {
    let n = (len / 2).max(1) as usize;
    let data: Vec<u8> = (0..n).map(|i| (i as u8) ^ 0x5a).collect();
    if disk
        .write(1, &data[..n - 1], WriteFlags::default())
        .is_err()
    {
        return;
    }
    let mut got = vec![0u8; n - 1];
    if disk.read(1, &mut got).is_ok() {
        assert_eq!(got, data[..n - 1], "a write reads back");
    }
    if disk.flush().is_ok() && disk.read(1, &mut got).is_ok() {
        assert_eq!(got, data[..n - 1], "a write reads back after a flush");
    }
}
