use super::*;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::os::fd::AsFd;

/// A fresh path in this process's scratch directory.
fn temp_path() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cowdisk-ring-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("f{}", rand::random::<u64>()))
}

/// A read-only file holding `bytes` (already unlinked).
fn file_with(bytes: &[u8]) -> std::fs::File {
    let path = temp_path();
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(bytes).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

#[test]
fn many_requests_of_many_pieces_read_the_right_bytes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let data: Vec<u8> = (0..1 << 20).map(|_| rng.gen()).collect();
    let f = file_with(&data);
    let mut ring = Ring::new(32).unwrap();
    let mut want = std::collections::HashMap::new();
    let mut got = 0;
    for round in 0..20u64 {
        let mut batch = ring.batch();
        for r in 0..6u64 {
            // Up to 4 pieces from anywhere in the file, back to back in the buffer.
            let n = rng.gen_range(1..=4);
            let mut pieces = Vec::new();
            let mut expect = Vec::new();
            for _ in 0..n {
                let len = rng.gen_range(1..20000);
                let off = rng.gen_range(0..data.len() - len);
                pieces.push(Piece {
                    fd: f.as_fd(),
                    offset: off as u64,
                    at: 3 + expect.len(),
                    len,
                });
                expect.extend_from_slice(&data[off..off + len]);
            }
            let tag = round * 100 + r;
            if batch
                .push(vec![0u8; 3 + expect.len()], &pieces, tag)
                .is_ok()
            {
                want.insert(tag, expect);
            }
        }
        batch.submit().unwrap();
        // Leave some in flight across rounds.
        while ring.room() < 16 {
            ring.wait(|tag, buf, res| {
                res.unwrap();
                assert_eq!(buf[3..], want.remove(&tag).unwrap()[..]);
                got += 1;
            })
            .unwrap();
        }
    }
    while ring.pending() > 0 {
        ring.wait(|tag, buf, res| {
            res.unwrap();
            assert_eq!(buf[3..], want.remove(&tag).unwrap()[..]);
            got += 1;
        })
        .unwrap();
    }
    assert!(want.is_empty());
    assert!(got > 60);
}

#[test]
fn a_read_past_the_end_fails_and_the_buffer_comes_back() {
    let f = file_with(&[1u8; 4096]);
    let mut ring = Ring::new(4).unwrap();
    let mut b = ring.batch();
    let p = |offset, at| Piece {
        fd: f.as_fd(),
        offset,
        at,
        len: 4096,
    };
    b.push(vec![0u8; 8192], &[p(0, 0), p(4096, 4096)], 9)
        .unwrap();
    b.submit().unwrap();
    let mut seen = false;
    ring.wait(|tag, buf, res| {
        assert_eq!(tag, 9);
        assert_eq!(buf.len(), 8192);
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        seen = true;
    })
    .unwrap();
    assert!(seen);
    assert_eq!(ring.pending(), 0);
    assert_eq!(ring.room(), 4);
}

#[test]
fn pieces_outside_the_buffer_or_beyond_the_room_are_refused() {
    let f = file_with(&[1u8; 4096]);
    let mut ring = Ring::new(2).unwrap();
    let p = |at, len| Piece {
        fd: f.as_fd(),
        offset: 0,
        at,
        len,
    };
    let mut b = ring.batch();
    assert_eq!(
        b.push(vec![0; 100], &[p(50, 51)], 1).unwrap_err().len(),
        100
    );
    assert!(b.push(vec![0; 100], &[p(usize::MAX, 2)], 1).is_err());
    assert!(b.push(vec![0; 100], &[p(0, 0)], 1).is_err());
    assert!(b.push(vec![0; 100], &[], 1).is_err());
    assert!(b
        .push(vec![0; 100], &[p(0, 1), p(1, 1), p(2, 1)], 1)
        .is_err());
    b.push(vec![0; 100], &[p(0, 100)], 1).unwrap();
    drop(b);
    assert_eq!(ring.pending(), 1);
}

#[test]
fn dropping_a_ring_waits_for_its_reads() {
    let f = file_with(&vec![5u8; 1 << 20]);
    for _ in 0..20 {
        let mut ring = Ring::new(8).unwrap();
        let mut b = ring.batch();
        for i in 0..8 {
            let piece = Piece {
                fd: f.as_fd(),
                offset: i << 17,
                at: 0,
                len: 1 << 17,
            };
            b.push(vec![0u8; 1 << 17], &[piece], i).unwrap();
        }
        b.submit().unwrap();
        drop(ring);
    }
}

#[test]
fn writes_in_flight_together_land_where_asked() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let path = temp_path();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut model = vec![0u8; 256 << 10];
    f.set_len(model.len() as u64).unwrap();
    let mut ring = Ring::new(16).unwrap();
    // Each round writes distinct 4 KiB slots (writes in flight together have no order),
    // each buffer in up to 2 pieces.
    for _ in 0..10 {
        let mut slots: Vec<usize> = (0..64).collect();
        let mut batch = ring.batch();
        for tag in 0..8u64 {
            let slot = slots.swap_remove(rng.gen_range(0..slots.len()));
            let bytes: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
            let mut buf = vec![0u8; 5];
            buf.extend_from_slice(&bytes);
            let split = rng.gen_range(1..4096);
            let pieces = [
                Piece {
                    fd: f.as_fd(),
                    offset: (slot * 4096) as u64,
                    at: 5,
                    len: split,
                },
                Piece {
                    fd: f.as_fd(),
                    offset: (slot * 4096 + split) as u64,
                    at: 5 + split,
                    len: 4096 - split,
                },
            ];
            batch.push_write(buf, &pieces, tag).unwrap();
            model[slot * 4096..(slot + 1) * 4096].copy_from_slice(&bytes);
        }
        batch.submit().unwrap();
        let mut back = 0;
        while ring.pending() > 0 {
            ring.wait(|_, buf, res| {
                res.unwrap();
                assert_eq!(buf.len(), 5 + 4096);
                back += 1;
            })
            .unwrap();
        }
        assert_eq!(back, 8);
    }
    let mut on_disk = vec![0u8; model.len()];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut on_disk, 0).unwrap();
    assert!(on_disk == model, "the file differs from the writes");
}

#[test]
fn a_write_to_a_read_only_file_fails_and_the_buffer_comes_back() {
    let f = file_with(&[1u8; 8192]);
    let mut ring = Ring::new(4).unwrap();
    let mut batch = ring.batch();
    let piece = Piece {
        fd: f.as_fd(),
        offset: 0,
        at: 0,
        len: 4096,
    };
    batch.push_write(vec![9u8; 4096], &[piece], 3).unwrap();
    batch.submit().unwrap();
    let mut seen = false;
    ring.wait(|tag, buf, res| {
        assert_eq!(tag, 3);
        assert_eq!(buf, vec![9u8; 4096]);
        assert!(res.is_err());
        seen = true;
    })
    .unwrap();
    assert!(seen);
    let mut on_disk = vec![0u8; 8192];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut on_disk, 0).unwrap();
    assert_eq!(on_disk, vec![1u8; 8192]);
}
