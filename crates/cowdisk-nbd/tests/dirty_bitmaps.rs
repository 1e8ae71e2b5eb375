//! `qemu:dirty-bitmap:NAME` contexts in-process: listed by the namespace queries,
//! selected one per connection, answered with flag 1 for dirty extents, and a backend
//! without bitmaps (the default) offers none.

mod client;

use std::sync::Arc;

use client::{meta_payload, Client, TestServer};
use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::wire::{cmd_flags, opt, rep};
use cowdisk_nbd::{
    Backend, BackendError, BackendErrorKind, DirtyExtent, Extent, Limits, ZeroFlags,
};

/// A 1 MiB disk with two bitmaps: "a" (first 64K dirty) and "b" (nothing dirty).
struct Bitmapped(MemBackend);

impl Backend for Bitmapped {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn preferred_block_size(&self) -> u32 {
        self.0.preferred_block_size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read(&self, o: u64, b: &mut [u8]) -> Result<(), BackendError> {
        self.0.read(o, b)
    }
    fn write(&self, o: u64, d: &[u8], fua: bool) -> Result<(), BackendError> {
        self.0.write(o, d, fua)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.0.flush()
    }
    fn trim(&self, o: u64, l: u64, fua: bool) -> Result<(), BackendError> {
        self.0.trim(o, l, fua)
    }
    fn write_zeroes(&self, o: u64, l: u64, f: ZeroFlags) -> Result<(), BackendError> {
        self.0.write_zeroes(o, l, f)
    }
    fn block_status(&self, o: u64, l: u64, out: &mut Vec<Extent>) -> Result<(), BackendError> {
        self.0.block_status(o, l, out)
    }
    fn dirty_bitmaps(&self) -> Vec<String> {
        vec!["a".into(), "b".into()]
    }
    fn dirty_bitmap_key(&self, name: &str) -> Option<u64> {
        ["a", "b"].iter().position(|n| *n == name).map(|i| i as u64)
    }
    fn dirty_status(
        &self,
        key: u64,
        offset: u64,
        len: u64,
        out: &mut Vec<DirtyExtent>,
    ) -> Result<(), BackendError> {
        if key > 1 {
            return Err(BackendError::new(BackendErrorKind::Invalid, "gone"));
        }
        let dirty_end = if key == 0 { 65536 } else { 0 };
        if offset < dirty_end {
            out.push(DirtyExtent {
                length: (dirty_end - offset).min(len),
                dirty: true,
            });
        }
        let start = offset.max(dirty_end);
        if start < offset + len {
            out.push(DirtyExtent {
                length: offset + len - start,
                dirty: false,
            });
        }
        Ok(())
    }
}

fn names(c: &mut Client, option: u32, queries: &[&str]) -> Vec<String> {
    let r = c.opt(option, &meta_payload(b"d", queries));
    assert_eq!(r.last().unwrap().reply_type, rep::ACK, "{r:?}");
    r.iter()
        .filter(|x| x.reply_type == rep::META_CONTEXT)
        .map(|x| String::from_utf8_lossy(&x.payload[4..]).into_owned())
        .collect()
}

#[test]
fn listing_selecting_and_querying_dirty_bitmaps() {
    let backend: Arc<dyn Backend> = Arc::new(Bitmapped(MemBackend::new(1 << 20)));
    let plain: Arc<dyn Backend> = Arc::new(MemBackend::new(1 << 20));
    let srv = TestServer::start(vec![("d", backend), ("p", plain)], Limits::default());
    let mut c = Client::connect(srv.addr);
    c.opt(opt::STRUCTURED_REPLY, &[]);
    let all = names(&mut c, opt::LIST_META_CONTEXT, &[]);
    assert!(all.contains(&"qemu:dirty-bitmap:a".to_string()), "{all:?}");
    assert!(all.contains(&"qemu:dirty-bitmap:b".to_string()), "{all:?}");
    let ns = names(&mut c, opt::LIST_META_CONTEXT, &["qemu:dirty-bitmap:"]);
    assert_eq!(ns, ["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"]);
    let one = names(&mut c, opt::LIST_META_CONTEXT, &["qemu:dirty-bitmap:b"]);
    assert_eq!(one, ["qemu:dirty-bitmap:b"]);
    // Repeated queries list each context once.
    let many = vec!["qemu:"; 300];
    let listed = names(&mut c, opt::LIST_META_CONTEXT, &many);
    assert_eq!(
        listed,
        [
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:a",
            "qemu:dirty-bitmap:b"
        ]
    );
    let none = names(&mut c, opt::LIST_META_CONTEXT, &["qemu:dirty-bitmap:zz"]);
    assert!(none.is_empty());
    // SET with an unknown bitmap or a bare namespace selects nothing of it.
    let set = names(
        &mut c,
        opt::SET_META_CONTEXT,
        &["qemu:dirty-bitmap:", "qemu:dirty-bitmap:\u{ff}"],
    );
    assert!(set.is_empty(), "{set:?}");
    let set = names(
        &mut c,
        opt::SET_META_CONTEXT,
        &[
            "base:allocation",
            "qemu:dirty-bitmap:a",
            "qemu:dirty-bitmap:b",
        ],
    );
    assert_eq!(
        set,
        ["base:allocation", "qemu:dirty-bitmap:a"],
        "one bitmap per connection"
    );
    // Structured replies were negotiated above: GO only.
    c.handshake("d", false, &[]);
    c.structured = true;
    let st = c.block_status(0, 0, 1 << 20);
    let bitmap = st.iter().find(|(id, _)| *id == 3).expect("bitmap chunk");
    assert_eq!(bitmap.1, [(65536, 1), ((1 << 20) - 65536, 0)]);
    let one = c.block_status(cmd_flags::REQ_ONE, 4096, 4096);
    let bitmap = one.iter().find(|(id, _)| *id == 3).unwrap();
    assert_eq!(bitmap.1, [(4096, 1)]);
    // An export without bitmaps lists none.
    let mut p = Client::connect(srv.addr);
    p.opt(opt::STRUCTURED_REPLY, &[]);
    let r = p.opt(opt::LIST_META_CONTEXT, &meta_payload(b"p", &["qemu:"]));
    let listed: Vec<_> = r
        .iter()
        .filter(|x| x.reply_type == rep::META_CONTEXT)
        .collect();
    assert_eq!(listed.len(), 1, "only qemu:allocation-depth");
}
