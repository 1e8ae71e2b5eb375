//! Basic chain semantics on real files.
use cowdisk_core::*;

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("cowdisk-smoke-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn copy_up_whiteout_and_reopen() {
    let d = tmpdir("cow");
    let base = d.join("base.cow");
    let top = d.join("top.cow");
    create_image(&base, 1 << 20, 4096).unwrap();
    {
        let disk = Disk::open(&base, &OpenOptions::new()).unwrap();
        disk.write(0, &[0xaa; 8192], WriteFlags::default()).unwrap();
        disk.write(16384, &[0xbb; 4096], WriteFlags::default())
            .unwrap();
        disk.flush().unwrap();
    }
    create_child(&top, &base).unwrap();
    let base_bytes = std::fs::read(&base).unwrap();
    {
        let disk = Disk::open(&top, &OpenOptions::new()).unwrap();
        assert_eq!(disk.depth(), 2);
        let mut b = vec![0u8; 4096];
        disk.read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0xaa));
        // Partial write into a lower block: copy-up.
        disk.write(100, &[1, 2, 3], WriteFlags::default()).unwrap();
        disk.read(0, &mut b).unwrap();
        assert_eq!(&b[99..104], &[0xaa, 1, 2, 3, 0xaa]);
        assert_eq!(disk.top_state(0), BlockState::Data);
        // Whiteout of a lower block.
        disk.discard(4096, 4096, WriteFlags::default()).unwrap();
        disk.read(4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(disk.top_state(1), BlockState::Zero);
        // Partial write to an unheld block.
        disk.write(40960 + 10, &[9], WriteFlags { fua: true })
            .unwrap();
        let mut ext = Vec::new();
        disk.block_status(0, 1 << 20, &mut ext).unwrap();
        assert_eq!(
            ext[0],
            Extent {
                offset: 0,
                length: 4096,
                state: ExtentState::Data,
                depth: Some(0)
            }
        );
        assert_eq!(
            ext[1],
            Extent {
                offset: 4096,
                length: 4096,
                state: ExtentState::Zero,
                depth: Some(0)
            }
        );
        disk.flush().unwrap();
        // Second writer refused.
        assert!(matches!(
            Disk::open(&top, &OpenOptions::new()),
            Err(OpenError::Locked { .. })
        ));
    }
    let disk = Disk::open(&top, &OpenOptions::new().access(Access::ReadOnly)).unwrap();
    let mut b = vec![0u8; 4096];
    disk.read(0, &mut b).unwrap();
    assert_eq!(&b[99..104], &[0xaa, 1, 2, 3, 0xaa]);
    disk.read(4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    disk.read(16384, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0xbb));
    disk.read(40960, &mut b).unwrap();
    assert_eq!(b[10], 9);
    assert_eq!(b.iter().filter(|&&x| x != 0).count(), 1);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_bytes,
        "base must be untouched"
    );
    // While a child is open the base's shared lock blocks writers (I14).
    assert!(matches!(
        Disk::open(&base, &OpenOptions::new()),
        Err(OpenError::Locked { .. })
    ));
    drop(disk);
    // Base is sealed: writing it is refused.
    assert!(matches!(
        Disk::open(&base, &OpenOptions::new()),
        Err(OpenError::Sealed { .. })
    ));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn clones_share_one_resolved_lower_chain() {
    let d = tmpdir("clones");
    let base = d.join("base.cow");
    create_image(&base, 1 << 20, 4096).unwrap();
    {
        let disk = Disk::open(&base, &OpenOptions::new()).unwrap();
        disk.write(0, &[7; 4096], WriteFlags::default()).unwrap();
        disk.flush().unwrap();
    }
    let cache = std::sync::Arc::new(LowerCache::new());
    let opts = OpenOptions::new().cache(cache.clone());
    let mut disks = Vec::new();
    for i in 0..4 {
        let top = d.join(format!("c{i}.cow"));
        create_child(&top, &base).unwrap();
        disks.push(Disk::open(&top, &opts).unwrap());
    }
    for pair in disks.windows(2) {
        assert!(
            std::sync::Arc::ptr_eq(pair[0].lower(), pair[1].lower()),
            "clones must share the base's chain"
        );
    }
    // A clone open for writing is locked against a second open.
    let alone = Disk::open(
        d.join("c0.cow"),
        &OpenOptions::new().access(Access::ReadOnly),
    );
    assert!(
        matches!(alone, Err(OpenError::Locked { .. })),
        "c0 is open for writing"
    );
    // Without the cache a disk resolves its own copy.
    let own = d.join("c4.cow");
    create_child(&own, &base).unwrap();
    let own = Disk::open(&own, &OpenOptions::new()).unwrap();
    assert!(!std::sync::Arc::ptr_eq(own.lower(), disks[0].lower()));
    disks[1].write(0, &[9; 10], WriteFlags::default()).unwrap();
    let mut b = [0u8; 16];
    disks[0].read(0, &mut b).unwrap();
    assert_eq!(b, [7; 16], "a clone's write must not show in another clone");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A sealed base with blocks 0-1 (4 KiB) full of 1s, a top over it, and the base's data
/// byte at `damaged` flipped behind the engine's back. Returns the folder and the top.
fn damaged_parent(name: &str, damaged: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::FileExt;
    let d = tmpdir(name);
    let base = d.join("base.cow");
    let top = d.join("top.cow");
    create_image(&base, 1 << 20, 4096).unwrap();
    {
        let disk = Disk::open(&base, &OpenOptions::new()).unwrap();
        disk.write(0, &[1; 8192], WriteFlags::default()).unwrap();
        disk.flush().unwrap();
    }
    create_child(&top, &base).unwrap();
    let data_offset = Geometry::new(1 << 20, 4096).unwrap().data_offset;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .write_all_at(&[0xff], data_offset + damaged)
        .unwrap();
    (d, top)
}

#[test]
fn damaged_parent_block_is_eio_never_bad_bytes() {
    let (d, top) = damaged_parent("crc", 100);
    let disk = Disk::open(&top, &OpenOptions::new()).unwrap();
    let mut b = vec![0u8; 512];
    let e = disk.read(0, &mut b).unwrap_err();
    assert!(matches!(e, IoError::Checksum { block: 0, .. }), "{e}");
    assert_eq!(e.kind(), IoErrorKind::Io);
    // A copy-up of the damaged block fails too and allocates nothing.
    assert!(matches!(
        disk.write(10, &[2], WriteFlags::default()),
        Err(IoError::Checksum { .. })
    ));
    assert_eq!(disk.top_state(0), BlockState::Absent);
    // The intact block reads fine, twice (the second time from the verified bitmap).
    for _ in 0..2 {
        disk.read(4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 1));
    }
    // Overwriting the whole damaged block needs no lower data: allowed.
    disk.write(0, &[3; 4096], WriteFlags::default()).unwrap();
    disk.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 3));
    std::fs::remove_dir_all(&d).unwrap();
}

/// Copy-up of a damaged block as the first access, in the kernel (`copy_file_range`) and
/// through a buffer: refused before anything reaches the top, nothing allocated; a good
/// block copies up with its bytes.
#[test]
fn copy_up_paths_verify_before_copying() {
    for kernel in [true, false] {
        let (d, top) = damaged_parent(if kernel { "cu-k" } else { "cu-b" }, 100);
        let disk = Disk::open(&top, &OpenOptions::new()).unwrap();
        // Share: in the kernel wherever it can (a copy where the file system cannot share).
        disk.set_copy_up(if kernel {
            CopyUp::Share
        } else {
            CopyUp::Buffer
        });
        // Verified by this read, block 1 then copies up in the kernel where allowed.
        let mut b = vec![0u8; 4096];
        disk.read(4096, &mut b).unwrap();
        disk.write(4096 + 10, &[2], WriteFlags::default()).unwrap();
        let before = disk.layers()[0].allocated_bytes;
        let e = disk.write(10, &[2], WriteFlags::default()).unwrap_err();
        assert!(matches!(e, IoError::Checksum { block: 0, .. }), "{e}");
        assert_eq!(disk.top_state(0), BlockState::Absent);
        assert_eq!(disk.layers()[0].allocated_bytes, before, "kernel {kernel}");
        disk.read(4096, &mut b).unwrap();
        assert!(b[..10].iter().chain(&b[11..]).all(|&x| x == 1) && b[10] == 2);
        assert_eq!(disk.top_state(1), BlockState::Data);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// xorshift64: enough randomness for offsets, no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Bytes a plan of read pieces stands for, read back from the files it names.
fn assemble(pieces: &[ReadPiece<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        match *p {
            ReadPiece::Zeros(n) => out.resize(out.len() + n as usize, 0),
            ReadPiece::File { fd, offset, len }
            | ReadPiece::Staged {
                fd, offset, len, ..
            } => {
                let mut b = vec![0u8; len as usize];
                let n = rustix::io::pread(fd, &mut b, offset).unwrap();
                assert_eq!(n, b.len(), "piece past the end of its file");
                out.extend_from_slice(&b);
            }
            ReadPiece::Direct { fd, offset, len } => {
                let a = DIRECT_ALIGN as usize;
                assert_eq!(
                    (offset % DIRECT_ALIGN, len % DIRECT_ALIGN),
                    (0, 0),
                    "unaligned"
                );
                let mut b = vec![0u8; len as usize + a];
                let skip = b.as_ptr().align_offset(a);
                let n = rustix::io::pread(fd, &mut b[skip..skip + len as usize], offset).unwrap();
                assert_eq!(n, len as usize, "piece past the end of its file");
                out.extend_from_slice(&b[skip..skip + n]);
            }
        }
    }
    out
}

#[test]
fn read_pieces_name_the_same_bytes_as_read() {
    let (d, top, size) = chain_of_three("pieces");
    let disk = Disk::open(&top, &OpenOptions::new()).unwrap();
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    for _ in 0..400 {
        let off = rng.below(size);
        let len = rng.below((size - off).min(20 * 4096) + 1);
        let mut want = vec![0u8; len as usize];
        disk.read(off, &mut want).unwrap();
        let mut pieces = Vec::new();
        assert!(disk.read_pieces(off, len, |p| pieces.push(p)).unwrap());
        assert_eq!(assemble(&pieces), want, "read {off}+{len}");
    }
    let e = disk.read_pieces(size - 1, 2, |_| {}).unwrap_err();
    assert!(matches!(e, IoError::OutOfRange { .. }), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Under direct I/O an aligned read is planned as direct pieces and zeros (read in place
/// into aligned memory), the same bytes as `read`; an unaligned one is not planned.
#[test]
fn read_pieces_under_direct_io_name_the_same_bytes_as_read() {
    let (d, top, size) = chain_of_three("pieces-direct");
    let disk = Disk::open(&top, &OpenOptions::new().direct_io(true)).unwrap();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut planned, mut refused) = (0, 0);
    for i in 0..400 {
        let aligned = i % 2 == 0;
        let (off, len) = if aligned {
            let off = rng.below(size / 4096) * 4096;
            (
                off,
                (rng.below((size - off).min(20 * 4096) / 4096) + 1) * 4096,
            )
        } else {
            let off = rng.below(size);
            (off, rng.below((size - off).min(20 * 4096) + 1))
        };
        let mut want = vec![0u8; len as usize];
        disk.read(off, &mut want).unwrap();
        let mut pieces = Vec::new();
        if disk.read_pieces(off, len, |p| pieces.push(p)).unwrap() {
            assert!(pieces.iter().all(|p| !matches!(p, ReadPiece::File { .. })));
            assert_eq!(assemble(&pieces), want, "read {off}+{len}");
            planned += 1;
        } else {
            assert!(!aligned, "an aligned read {off}+{len} was not planned");
            refused += 1;
        }
    }
    assert!(
        planned > 200 && refused > 50,
        "{planned} planned, {refused} refused"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// Three layers of 1 MiB in 4 KiB blocks, each with random writes and discards; returns
/// the folder, the top and the size.
fn chain_of_three(name: &str) -> (std::path::PathBuf, std::path::PathBuf, u64) {
    let d = tmpdir(name);
    let size = 1u64 << 20;
    let bs = 4096u64;
    let paths: Vec<_> = (0..3).map(|i| d.join(format!("l{i}.cow"))).collect();
    create_image(&paths[0], size, bs as u32).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (i, p) in paths.iter().enumerate() {
        if i > 0 {
            create_child(p, &paths[i - 1]).unwrap();
        }
        let disk = Disk::open(p, &OpenOptions::new()).unwrap();
        for _ in 0..60 {
            let off = rng.below(size - 3 * bs);
            let len = 1 + rng.below(3 * bs - 1);
            if rng.below(5) == 0 {
                disk.discard(off, len, WriteFlags::default()).unwrap();
            } else {
                let fill = vec![(i as u8 + 1) * 40 + rng.below(40) as u8; len as usize];
                disk.write(off, &fill, WriteFlags::default()).unwrap();
            }
        }
        disk.flush().unwrap();
    }
    let top = paths[2].clone();
    (d, top, size)
}

#[test]
fn read_pieces_verify_parent_blocks_first() {
    let (d, top) = damaged_parent("pieces-crc", 4096 + 7);
    let disk = Disk::open(&top, &OpenOptions::new()).unwrap();
    let e = disk.read_pieces(0, 8192, |_| {}).unwrap_err();
    assert!(matches!(e, IoError::Checksum { block: 1, .. }), "{e}");
    // Pieces before the bad block may have been planned; the caller sends none of them
    // because the call failed. The intact block alone plans fine.
    let mut got = Vec::new();
    assert!(disk.read_pieces(0, 4096, |p| got.push(p)).unwrap());
    assert_eq!(assemble(&got), vec![1u8; 4096]);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn damaged_block_of_a_sealed_top_is_eio_too() {
    let (d, _top) = damaged_parent("sealed-top", 100);
    // The sealed base opened on its own: it is the top now, and still checked.
    let base = d.join("base.cow");
    let disk = Disk::open(&base, &OpenOptions::new().access(Access::ReadOnly)).unwrap();
    let mut b = vec![0u8; 512];
    let e = disk.read(0, &mut b).unwrap_err();
    assert!(matches!(e, IoError::Checksum { block: 0, .. }), "{e}");
    let e = disk.read_pieces(0, 512, |_| {}).unwrap_err();
    assert!(matches!(e, IoError::Checksum { block: 0, .. }), "{e}");
    disk.read(4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    std::fs::remove_dir_all(&d).unwrap();
}

/// A 1 MiB image of 64 KiB blocks, every byte 0xaa.
fn base_of_0xaa(base: &std::path::Path) {
    create_image(base, 1 << 20, 65536).unwrap();
    let disk = Disk::open(base, &OpenOptions::new()).unwrap();
    disk.write(0, &[0xaa; 1 << 20], WriteFlags::default())
        .unwrap();
    disk.flush().unwrap();
}

/// Partial blocks: a first 4 KiB write into a block the base holds writes that sub-block
/// only; the rest reads from below, across a reopen; a write that completes the block
/// makes it data at the next flush; filling before a seal makes every partial block data
/// with the same content, and the sealed layer then serves a child.
#[test]
fn partial_blocks_write_read_fill_and_seal() {
    let d = tmpdir("partial");
    let (base, top, child) = (d.join("base.cow"), d.join("top.cow"), d.join("child.cow"));
    base_of_0xaa(&base);
    create_child(&top, &base).unwrap();
    let mut want = vec![0xaau8; 1 << 20];
    {
        let disk = Disk::open(&top, &OpenOptions::new()).unwrap();
        assert_eq!(disk.copy_up_mode(), CopyUp::Partial);
        disk.write(65536 + 8192, &[1; 4096], WriteFlags::default())
            .unwrap();
        want[65536 + 8192..65536 + 12288].fill(1);
        // Unaligned: sub-blocks 0 and 1 of block 3, completed from below.
        disk.write(3 * 65536 + 100, &[2; 5000], WriteFlags::default())
            .unwrap();
        want[3 * 65536 + 100..3 * 65536 + 5100].fill(2);
        assert_eq!(disk.top_state(1), BlockState::Partial);
        assert_eq!(disk.top_state(3), BlockState::Partial);
        assert_eq!(disk.copy_ups(), 0);
        // Two sub-blocks of the top, the rest of the base: 8 KiB allocated, not 128 KiB.
        let mut ext = Vec::new();
        disk.block_status(65536, 65536, &mut ext).unwrap();
        let depths: Vec<_> = ext.iter().map(|e| (e.length, e.depth)).collect();
        assert_eq!(depths, [(8192, Some(1)), (4096, Some(0)), (53248, Some(1))]);
        disk.flush().unwrap();
    }
    let read_all = |p: &std::path::Path| {
        let disk = Disk::open(p, &OpenOptions::new().access(Access::ReadOnly)).unwrap();
        let mut b = vec![0u8; 1 << 20];
        disk.read(0, &mut b).unwrap();
        b
    };
    assert!(read_all(&top) == want, "after a reopen");
    {
        let disk = Disk::open(&top, &OpenOptions::new()).unwrap();
        assert_eq!(disk.top_state(1), BlockState::Partial);
        // Completing every sub-block copies nothing; the block stays partial until the
        // next full flush makes it data.
        disk.write(65536, &[3; 8192], WriteFlags::default())
            .unwrap();
        disk.write(65536 + 12288, &[3; 53248], WriteFlags::default())
            .unwrap();
        want[65536..65536 + 8192].fill(3);
        want[65536 + 12288..2 * 65536].fill(3);
        assert_eq!(disk.top_state(1), BlockState::Partial);
        assert_eq!(disk.copy_ups(), 0);
        disk.flush().unwrap();
        assert_eq!(disk.top_state(1), BlockState::Data);
        assert_eq!(disk.fill_partial_blocks().unwrap(), 1);
        assert_eq!(disk.top_state(3), BlockState::Data);
        disk.flush().unwrap();
    }
    assert!(read_all(&top) == want, "after filling");
    create_child(&child, &top).unwrap();
    assert!(read_all(&child) == want, "through the sealed layer");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A partial write that must complete a sub-block from a damaged base block fails with
/// the checksum error and publishes nothing; an aligned one needs no lower bytes.
#[test]
fn partial_write_over_a_damaged_block() {
    let d = tmpdir("partial-crc");
    let (base, top) = (d.join("base.cow"), d.join("top.cow"));
    create_image(&base, 1 << 20, 65536).unwrap();
    {
        let disk = Disk::open(&base, &OpenOptions::new()).unwrap();
        disk.write(0, &[1; 131072], WriteFlags::default()).unwrap();
        disk.flush().unwrap();
    }
    create_child(&top, &base).unwrap();
    let off = Disk::open(&base, &OpenOptions::new().access(Access::ReadOnly))
        .unwrap()
        .geometry()
        .block_offset(0);
    let mut bytes = std::fs::read(&base).unwrap();
    bytes[off as usize + 30000] ^= 0xff;
    std::fs::write(&base, &bytes).unwrap();
    let disk = Disk::open(&top, &OpenOptions::new()).unwrap();
    let e = disk.write(10, &[2], WriteFlags::default()).unwrap_err();
    assert!(matches!(e, IoError::Checksum { block: 0, .. }), "{e}");
    assert_eq!(disk.top_state(0), BlockState::Absent);
    disk.write(4096, &[3; 4096], WriteFlags::default()).unwrap();
    assert_eq!(disk.top_state(0), BlockState::Partial);
    let mut b = vec![0u8; 4096];
    disk.read(4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 3));
    assert!(matches!(
        disk.read(0, &mut b),
        Err(IoError::Checksum { block: 0, .. })
    ));
    // Sealing needs the damaged block's bytes: refused, the top stays as it was.
    assert!(disk.fill_partial_blocks().is_err());
    assert_eq!(disk.top_state(0), BlockState::Partial);
    drop(disk);
    std::fs::remove_dir_all(&d).unwrap();
}

/// A top written by format 1.0 has no bitmap area: its first writes copy whole blocks up
/// (partial mode or not), and the file keeps its length.
#[test]
fn a_format_1_0_top_copies_blocks_up() {
    let d = tmpdir("v10");
    let (base, tmp, top) = (d.join("base.cow"), d.join("tmp.cow"), d.join("top.cow"));
    base_of_0xaa(&base);
    let mut h = create_child(&tmp, &base).unwrap();
    h.minor = 0;
    h.geometry = h.geometry.without_sub_blocks();
    let f = std::fs::File::create_new(&top).unwrap();
    layer::create_on(&FileStorage::new(f), &top, &h).unwrap();
    let len = std::fs::metadata(&top).unwrap().len();
    {
        let disk = Disk::open(&top, &OpenOptions::new()).unwrap();
        assert_eq!(disk.copy_up_mode(), CopyUp::Partial);
        disk.write(100, &[1; 10], WriteFlags::default()).unwrap();
        assert_eq!(disk.top_state(0), BlockState::Data);
        assert_eq!(disk.copy_ups(), 1);
        disk.flush().unwrap();
    }
    assert_eq!(std::fs::metadata(&top).unwrap().len(), len);
    let disk = Disk::open(&top, &OpenOptions::new().access(Access::ReadOnly)).unwrap();
    let mut b = vec![0u8; 4096];
    disk.read(0, &mut b).unwrap();
    assert!(b[..100].iter().chain(&b[110..]).all(|&x| x == 0xaa) && b[100..110] == [1; 10]);
    std::fs::remove_dir_all(&d).unwrap();
}
