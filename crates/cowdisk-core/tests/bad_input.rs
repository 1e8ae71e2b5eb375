//! Bad input (docs/reliability.md I1-I4, I6-I9, I11-I15): damaged, crafted or mislinked
//! layer files must give the exact typed error, never a panic or hang, and nothing may
//! be written to any file.
//!
//! Header and map cases run in-process on [`common::Frozen`] storages (which refuse and
//! count every write), with CRCs recomputed where a case needs semantically wrong but
//! well-checksummed metadata. Chain cases use real files in a temp folder and compare
//! every file's bytes before and after.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use cowdisk_core::layer::{self, NewLayer};
use cowdisk_core::sim::SimWorld;
use cowdisk_core::{
    create_child, create_image, Access, Disk, FormatError, OpenError, OpenOptions, ParentRef,
    Storage, WriteFlags,
};

const BS: u32 = 4096;

/// A standalone layer image with data, a whiteout-free map flushed twice (both map
/// slots valid) and, if `sealed`, both header slots valid.
fn image(size: u64, sealed: bool) -> Vec<u8> {
    let world = SimWorld::new();
    let chain = SimChain::new(world.clone(), size, BS);
    {
        let d = chain.open(Access::ReadWrite);
        d.write(0, &[0x11; 3 * BS as usize], WriteFlags::default())
            .unwrap();
        d.flush().unwrap();
        d.write(5 * u64::from(BS) + 1, &[0x22; 10], WriteFlags::default())
            .unwrap();
        d.flush().unwrap();
    }
    if sealed {
        layer::seal(&*world.file(0), Path::new("l0")).unwrap();
    }
    world.live(0)
}

/// Opens `bytes` as a standalone layer; returns the result and asserts no write.
fn open_bytes(bytes: Vec<u8>, access: Access) -> Result<Disk, OpenError> {
    let st = Frozen::whole(bytes);
    let r = Disk::open_storages(
        (st.clone() as Arc<dyn Storage>, "img".into()),
        vec![],
        access,
    );
    assert_eq!(
        st.writes.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "open wrote to the file"
    );
    r
}

#[track_caller]
fn format_err(r: Result<Disk, OpenError>) -> FormatError {
    match r {
        Err(OpenError::Format { source, .. }) => source,
        Err(e) => panic!("expected a format error, got {e:?}"),
        Ok(_) => panic!("expected a format error, the image opened"),
    }
}

#[track_caller]
fn field_err(r: Result<Disk, OpenError>) -> &'static str {
    match format_err(r) {
        FormatError::Field { field, .. } => field,
        e => panic!("expected a field error, got {e:?}"),
    }
}

#[test]
fn reference_images_open() {
    open_bytes(image(1 << 20, false), Access::ReadWrite).unwrap();
    open_bytes(image(1 << 20, true), Access::ReadOnly).unwrap();
}

/// I1: truncation at every byte of the first 64 KiB (headers, map pages, CRC area and
/// the first data blocks), and at random points through the data area.
#[test]
fn truncation_at_every_offset() {
    for sealed in [false, true] {
        let img = Arc::new(image(1 << 20, sealed));
        let access = if sealed {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let full = img.len();
        let mut points: Vec<usize> = (0..65536).collect();
        points.extend((65536..full).step_by(4093));
        points.push(full - 1);
        for n in points {
            let st = Frozen::new(img.clone(), n);
            let r = Disk::open_storages(
                (st.clone() as Arc<dyn Storage>, "img".into()),
                vec![],
                access,
            );
            match r {
                Err(OpenError::Format {
                    source: FormatError::Truncated { len, .. },
                    ..
                }) => {
                    assert_eq!(len, n as u64)
                }
                Err(e) => panic!("truncated at {n}: {e:?}"),
                Ok(_) => panic!("truncated at {n}: opened"),
            }
            assert_eq!(st.writes.load(std::sync::atomic::Ordering::SeqCst), 0);
        }
    }
}

/// I2: wrong magic, future major version, unknown incompatible feature (named).
#[test]
fn magic_version_features() {
    let img = image(1 << 20, false);
    let mut b = img.clone();
    b[0] ^= 0xff;
    assert_eq!(
        format_err(open_bytes(b, Access::ReadWrite)),
        FormatError::BadMagic
    );

    // A raw file that is not a layer at all (I11).
    assert_eq!(
        format_err(open_bytes(vec![0x55; 100_000], Access::ReadOnly)),
        FormatError::BadMagic
    );
    assert_eq!(
        format_err(open_bytes(vec![0; 100_000], Access::ReadOnly)),
        FormatError::BadMagic
    );

    let mut b = img.clone();
    edit_header(&mut b, 0, |h| put_u16(h, hdr::MAJOR, 2));
    assert_eq!(
        format_err(open_bytes(b, Access::ReadWrite)),
        FormatError::UnsupportedVersion {
            major: 2,
            minor: cowdisk_core::format::VERSION_MINOR
        }
    );
    let mut b = img.clone();
    edit_header(&mut b, 0, |h| put_u16(h, hdr::MAJOR, 0));
    assert!(matches!(
        format_err(open_bytes(b, Access::ReadWrite)),
        FormatError::UnsupportedVersion { major: 0, .. }
    ));

    // A higher minor only adds compatible features: accepted.
    let mut b = img.clone();
    edit_header(&mut b, 0, |h| put_u16(h, hdr::MINOR, 9));
    open_bytes(b, Access::ReadWrite).unwrap();

    // Bit 0 is `flush_journal` (crash_journal.rs): a top with it and no journal is refused
    // for that.
    let mut b = img.clone();
    edit_header(&mut b, 0, |h| put_u64(h, hdr::INCOMPAT, 1));
    let e = open_bytes(b, Access::ReadWrite).err().expect("refused");
    assert!(matches!(e, OpenError::Journal { .. }), "{e:?}");
    for bit in [1u32, 5, 63] {
        let mut b = img.clone();
        edit_header(&mut b, 0, |h| put_u64(h, hdr::INCOMPAT, 1 << bit));
        match format_err(open_bytes(b, Access::ReadWrite)) {
            FormatError::UnknownIncompatFeatures(names) => {
                assert!(names.contains(&format!("bit {bit}")), "{names}")
            }
            e => panic!("incompat bit {bit}: {e:?}"),
        }
    }
}

/// I3: byte flips with the CRC left stale; one slot damaged falls back to the other.
#[test]
fn header_crc_mismatch() {
    let img = image(1 << 20, false);
    for off in [16, 64, 72, 152, 1000, 4091] {
        let mut b = img.clone();
        b[off] ^= 0x40;
        assert!(
            matches!(
                format_err(open_bytes(b, Access::ReadWrite)),
                FormatError::HeaderCrc { .. }
            ),
            "flip at {off}"
        );
    }
    // Sealed: both slots hold headers. Damage one: the other is used; both: error.
    let sealed = image(1 << 20, true);
    let mut b = sealed.clone();
    b[4096 + 64] ^= 1;
    open_bytes(b.clone(), Access::ReadOnly).unwrap();
    b[64] ^= 1;
    assert!(matches!(
        format_err(open_bytes(b, Access::ReadOnly)),
        FormatError::HeaderCrc { .. }
    ));
    // The CRC field itself.
    let mut b = img;
    b[hdr::CRC] ^= 1;
    assert!(matches!(
        format_err(open_bytes(b, Access::ReadWrite)),
        FormatError::HeaderCrc { .. }
    ));
}

/// I4/I6/I10: semantically wrong fields with recomputed CRCs.
#[test]
fn wrong_fields_with_valid_crc() {
    let img = image(1 << 20, false);
    let case = |f: &dyn Fn(&mut [u8])| {
        let mut b = img.clone();
        edit_header(&mut b, 0, f);
        field_err(open_bytes(b, Access::ReadWrite))
    };
    for bs in [
        0u32,
        1,
        3,
        512,
        2048,
        4095,
        6144,
        1 << 21,
        1 << 31,
        u32::MAX,
    ] {
        assert_eq!(
            case(&|h| put_u32(h, hdr::BLOCK_SIZE, bs)),
            "block_size",
            "block size {bs}"
        );
    }
    // (1 << 44) + 512 at 4 KiB blocks is one block more than MAX_BLOCKS.
    for vs in [
        0u64,
        1,
        511,
        513,
        (1 << 44) + 512,
        (1 << 50) + 512,
        1 << 62,
        u64::MAX,
    ] {
        assert_eq!(
            case(&|h| put_u64(h, hdr::VIRTUAL_SIZE, vs)),
            "virtual_size",
            "virtual size {vs}"
        );
    }
    // The next update would wrap the generation to 0 and lose to the other slot.
    assert_eq!(
        case(&|h| put_u64(h, hdr::GENERATION, u64::MAX)),
        "generation"
    );
    assert_eq!(case(&|h| put_u32(h, hdr::SLOT_SIZE, 512)), "header_size");
    assert_eq!(case(&|h| put_u32(h, hdr::STATE, 2)), "state");
    assert_eq!(case(&|h| put_u64(h, hdr::MAP_OFFSET, 4096)), "map_offset");
    for mp in [0u64, 2, 1 << 40, u64::MAX] {
        assert_eq!(
            case(&|h| put_u64(h, hdr::MAP_PAGES, mp)),
            "map_pages",
            "map pages {mp}"
        );
    }
    assert_eq!(case(&|h| put_u64(h, hdr::CRC_OFFSET, 0)), "crc_offset");
    for d in [0u64, 4096, 1 << 20, u64::MAX] {
        assert_eq!(
            case(&|h| put_u64(h, hdr::DATA_OFFSET, d)),
            "data_offset",
            "data offset {d}"
        );
    }
    assert_eq!(case(&|h| h[hdr::PARENT_UUID] = 1), "parent_uuid");

    // Parent references (I10): set with a plausible UUID so only the path is wrong.
    let long = vec![b'a'; 1025];
    let huge = vec![b'b'; 3000];
    // References that reach elsewhere ("../x", "/etc/passwd") are well-formed; opening
    // refuses them by identity (see `special_files_as_parent`).
    let paths: [&[u8]; 7] = [b"a\0b", b"a\nb", b"a//b", b"x/", b"\xff\xfe", &long, &huge];
    for p in paths {
        let mut b = img.clone();
        set_parent_path(&mut b, 0, p);
        edit_header(&mut b, 0, |h| {
            h[hdr::PARENT_UUID..hdr::PARENT_UUID + 16].fill(7)
        });
        let f = field_err(open_bytes(b, Access::ReadWrite));
        assert!(
            f == "parent_path" || f == "parent_path_len",
            "{:?}: {f}",
            String::from_utf8_lossy(p)
        );
    }
}

/// I6: a header declaring a huge disk (16 TiB, 2^32 blocks, ~264k map pages) in a small
/// file is refused by length before any map is allocated.
#[test]
fn huge_declared_size_small_file() {
    let mut b = image(1 << 20, false);
    let g = cowdisk_core::Geometry::new(1 << 44, BS).unwrap();
    edit_header(&mut b, 0, |h| {
        put_u64(h, hdr::VIRTUAL_SIZE, 1 << 44);
        put_u64(h, hdr::MAP_PAGES, g.map_pages);
        put_u64(h, hdr::CRC_OFFSET, g.crc_offset);
        put_u64(h, hdr::DATA_OFFSET, g.data_offset);
    });
    assert!(matches!(
        format_err(open_bytes(b, Access::ReadOnly)),
        FormatError::Truncated { .. }
    ));
}

/// Map pages: entry value 3 (partial) where it is not allowed, entries beyond the last block, one slot damaged
/// (the other is used), both slots damaged.
#[test]
fn map_page_damage() {
    // 20 blocks: entries 20.. of page 0 are beyond the last block.
    let img = image(20 * u64::from(BS), false);
    let active = active_page_slot(&img, 0);

    // Entry 3 (partial) is a writable top's alone, and its bitmap names only sub-blocks
    // inside the block.
    let sealed = image(20 * u64::from(BS), true);
    let mut b = sealed.clone();
    let s_active = active_page_slot(&sealed, 0);
    set_map_entry(&mut b, 0, s_active, 7, 3);
    assert!(matches!(
        format_err(open_bytes(b, Access::ReadOnly)),
        FormatError::MapEntry { block: 7, .. }
    ));
    let mut b = img.clone();
    set_map_entry(&mut b, 0, active, 7, 3);
    open_bytes(b.clone(), Access::ReadWrite).expect("a partial block holding no sub-block");
    let g = cowdisk_core::Geometry::new(20 * u64::from(BS), BS)
        .unwrap()
        .with_sub_blocks();
    let mut bitmaps = vec![0u8; 4064];
    bitmaps[28..32].copy_from_slice(&(!g.sub_full(7)).to_le_bytes());
    let at = g.sub_page_offset(0, 0) as usize;
    cowdisk_core::format::encode_sub_page(&mut b[at..at + 4096], 0, 1, &bitmaps);
    assert!(matches!(
        format_err(open_bytes(b, Access::ReadWrite)),
        FormatError::MapEntry { block: 7, .. }
    ));
    for beyond in [20usize, 31, 32, 1000, 16255] {
        for v in [1u8, 2] {
            let mut b = img.clone();
            set_map_entry(&mut b, 0, active, beyond, v);
            match format_err(open_bytes(b, Access::ReadWrite)) {
                FormatError::MapEntry { block, .. } => assert_eq!(block, beyond as u64),
                e => panic!("entry {beyond}: {e:?}"),
            }
        }
    }
    // Wrong page index with a valid CRC counts as damage.
    let mut b = img.clone();
    let o = page_offset(0, active);
    put_u32(&mut b, o + 4, 1);
    reseal_page(&mut b, 0, active);
    let d = open_bytes(b, Access::ReadOnly).unwrap();
    let mut buf = vec![0u8; 10];
    d.read(5 * u64::from(BS) + 1, &mut buf).unwrap();
    assert_eq!(
        buf, [0; 10],
        "fell back to the older slot, which predates the second write"
    );

    // A sequence at its maximum (the next flush would wrap to 0) counts as damage too.
    let mut b = img.clone();
    put_u64(&mut b, page_offset(0, active) + 8, u64::MAX);
    reseal_page(&mut b, 0, active);
    let d = open_bytes(b, Access::ReadOnly).unwrap();
    let mut buf = vec![0u8; 10];
    d.read(5 * u64::from(BS) + 1, &mut buf).unwrap();
    assert_eq!(buf, [0; 10], "fell back to the older slot");

    // One slot damaged (CRC stale): the other (older) slot is used.
    let mut b = img.clone();
    b[page_offset(0, active) + 40] ^= 1;
    let d = open_bytes(b.clone(), Access::ReadOnly).unwrap();
    let mut buf = vec![0u8; 4096];
    d.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0x11; 4096]);
    // Both damaged.
    b[page_offset(0, 1 - active) + 40] ^= 1;
    assert!(matches!(
        format_err(open_bytes(b, Access::ReadWrite)),
        FormatError::MapPage { page: 0, .. }
    ));
    // Both slots with bad magic.
    let mut b = img;
    b[page_offset(0, 0)] = b'X';
    b[page_offset(0, 1)] = b'X';
    assert!(matches!(
        format_err(open_bytes(b, Access::ReadWrite)),
        FormatError::MapPage { page: 0, .. }
    ));
}

/// I1/I3/I4 fuzz-style: random pokes anywhere in the metadata never panic and never
/// write; each outcome is either an open or a typed error.
#[test]
fn random_metadata_pokes_never_panic() {
    use rand::{Rng, SeedableRng};
    let s = seed("random_metadata_pokes_never_panic");
    let mut rng = rand::rngs::StdRng::seed_from_u64(s);
    let imgs = [
        image(20 * u64::from(BS), false),
        image(20 * u64::from(BS), true),
    ];
    for i in 0..3000 {
        let mut b = imgs[i % 2].clone();
        for _ in 0..rng.gen_range(1..=8) {
            let off = rng.gen_range(0..24576);
            b[off] = rng.gen();
        }
        if rng.gen_bool(0.5) {
            reseal_header(&mut b[..4096]);
            reseal_header(&mut b[4096..8192]);
            reseal_page(&mut b, 0, 0);
            reseal_page(&mut b, 0, 1);
        }
        let r = std::panic::catch_unwind(|| {
            open_bytes(b.clone(), Access::ReadOnly).map(|d| {
                // A poke may shrink the virtual size: read what the disk has.
                let mut buf = vec![0u8; (20 * u64::from(BS)).min(d.size()) as usize];
                // A sealed image's blocks are checked against its (poked) CRC area: a
                // checksum error is the only failure a read may have.
                if let Err(e) = d.read(0, &mut buf) {
                    assert!(matches!(e, cowdisk_core::IoError::Checksum { .. }), "{e}");
                }
            })
        });
        assert!(r.is_ok(), "poke set {i} panicked (COWDISK_SEED={s})");
    }
}

// ---------------------------------------------------------------- file-based chains

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("cowdisk-bad-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn p(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// Contents of every regular file (symlinks and FIFOs skipped), by name.
    fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        let mut m = BTreeMap::new();
        for e in std::fs::read_dir(&self.0).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                m.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                );
            }
        }
        m
    }
    /// base.cow (data, sealed) <- top.cow (writable).
    fn chain(&self) -> (PathBuf, PathBuf) {
        let base = self.p("base.cow");
        let top = self.p("top.cow");
        create_image(&base, 1 << 20, BS).unwrap();
        {
            let d = Disk::open(&base, &OpenOptions::new()).unwrap();
            d.write(0, &[0xab; 8192], WriteFlags::default()).unwrap();
            d.flush().unwrap();
        }
        create_child(&top, &base).unwrap();
        (base, top)
    }
    /// Edits the newest header slot of a file and re-seals its CRC.
    fn edit(&self, path: &Path, f: impl Fn(&mut [u8])) {
        let mut b = std::fs::read(path).unwrap();
        let gen = |s: usize| {
            let h = &b[s * 4096..(s + 1) * 4096];
            if h[..8] == *b"COWDISK\0" {
                u64::from_le_bytes(h[hdr::GENERATION..hdr::GENERATION + 8].try_into().unwrap())
            } else {
                0
            }
        };
        let slot = if gen(1) > gen(0) { 1 } else { 0 };
        edit_header(&mut b, slot, f);
        std::fs::write(path, b).unwrap();
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The newest valid header slot of a layer file, as bytes.
fn newest_header(path: &Path) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    let s = if b[4096..4104] == *b"COWDISK\0"
        && u64::from_le_bytes(b[4096 + 16..4096 + 24].try_into().unwrap())
            > u64::from_le_bytes(b[16..24].try_into().unwrap())
    {
        4096
    } else {
        0
    };
    b[s..s + 4096].to_vec()
}

fn uuid_of(path: &Path) -> [u8; 16] {
    newest_header(path)[hdr::UUID..hdr::UUID + 16]
        .try_into()
        .unwrap()
}

fn digest_of(path: &Path) -> u32 {
    get_u32(&newest_header(path), hdr::SEAL_DIGEST)
}

/// Points `path`'s parent reference at `name` with identity `uuid` and the digest
/// `name` has (if it is a layer file).
fn set_parent(dir: &Dir, path: &Path, name: &str, uuid: [u8; 16]) {
    let target = dir.p(name);
    let digest = if target.is_file() {
        digest_of(&target)
    } else {
        0
    };
    dir.edit(path, |h| {
        put_u16(h, hdr::PARENT_LEN, name.len() as u16);
        h[hdr::PARENT_PATH..hdr::PARENT_PATH + 1024].fill(0);
        h[hdr::PARENT_PATH..hdr::PARENT_PATH + name.len()].copy_from_slice(name.as_bytes());
        h[hdr::PARENT_UUID..hdr::PARENT_UUID + 16].copy_from_slice(&uuid);
        put_u32(h, hdr::PARENT_DIGEST, digest);
    });
}

/// Opens `path` and expects a chain error whose reason contains `needle`; checks no
/// file in the folder changed.
#[track_caller]
fn expect_chain_err(dir: &Dir, path: &Path, access: Access, needle: &str) {
    let before = dir.snapshot();
    match Disk::open(path, &OpenOptions::new().access(access)) {
        Err(OpenError::Chain { reason, .. }) => {
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
        }
        Err(e) => panic!("expected a chain error ({needle}), got {e:?}"),
        Ok(_) => panic!("expected a chain error ({needle}), the chain opened"),
    }
    assert!(dir.snapshot() == before, "a file changed");
}

/// I8: cycles A->A, A->B->A, via symlink, via hard link, and the same layer twice (I15).
#[test]
fn chain_cycles() {
    // A -> A.
    let dir = Dir::new("cycle1");
    let a = dir.p("a.cow");
    create_image(&a, 1 << 20, BS).unwrap();
    set_parent(&dir, &a, "a.cow", uuid_of(&a));
    expect_chain_err(&dir, &a, Access::ReadWrite, "loop");
    expect_chain_err(&dir, &a, Access::ReadOnly, "loop");

    // top -> base -> top.
    let dir = Dir::new("cycle2");
    let (base, top) = dir.chain();
    set_parent(&dir, &base, "top.cow", uuid_of(&top));
    expect_chain_err(&dir, &top, Access::ReadOnly, "loop");

    // top -> base -> link (symlink to top).
    let dir = Dir::new("cycle3");
    let (base, top) = dir.chain();
    std::os::unix::fs::symlink("top.cow", dir.p("link.cow")).unwrap();
    set_parent(&dir, &base, "link.cow", uuid_of(&top));
    expect_chain_err(&dir, &top, Access::ReadOnly, "loop");

    // top -> base -> hard link of top.
    let dir = Dir::new("cycle4");
    let (base, top) = dir.chain();
    std::fs::hard_link(&top, dir.p("hard.cow")).unwrap();
    set_parent(&dir, &base, "hard.cow", uuid_of(&top));
    expect_chain_err(&dir, &top, Access::ReadOnly, "loop");

    // The same layer twice under different inodes (a copy): caught by UUID.
    let dir = Dir::new("cycle5");
    let (base, top) = dir.chain();
    std::fs::copy(&base, dir.p("copy.cow")).unwrap();
    set_parent(&dir, &base, "copy.cow", uuid_of(&base));
    expect_chain_err(&dir, &top, Access::ReadOnly, "loop");
}

/// I8: a 1,000-layer chain opens and reads correctly (each layer holds one block).
#[test]
fn thousand_layer_chain() {
    const LAYERS: usize = 1000;
    let blocks = 64u64;
    let size = blocks * u64::from(BS);
    let mut chain = SimChain::new(SimWorld::new(), size, BS);
    let mut model = vec![0u8; size as usize];
    for i in 0..LAYERS {
        if i % 100 == 0 || i == LAYERS - 1 {
            let d = chain.open(Access::ReadWrite);
            let b = (i as u64 * 7) % blocks;
            let off = b * u64::from(BS) + i as u64 % 100;
            let data = vec![(i % 251) as u8 + 1; 1000];
            d.write(off, &data, WriteFlags::default()).unwrap();
            if i == 500 {
                d.discard(0, u64::from(BS), WriteFlags::default()).unwrap();
                model[..BS as usize].fill(0);
            }
            model[off as usize..off as usize + 1000].copy_from_slice(&data);
            d.flush().unwrap();
        }
        if i + 1 < LAYERS {
            chain.push_layer();
        }
    }
    let dir = Dir::new("deep");
    for (st, name) in &chain.layers {
        std::fs::write(dir.0.join(name), chain.world.live(st.id())).unwrap();
    }
    let top = dir.0.join(&chain.layers[LAYERS - 1].1);
    let before = dir.snapshot();
    for access in [Access::ReadOnly, Access::ReadWrite] {
        let started = std::time::Instant::now();
        let d = Disk::open(&top, &OpenOptions::new().access(access)).unwrap();
        println!(
            "opened {LAYERS} layers ({access:?}) in {:?}",
            started.elapsed()
        );
        assert_eq!(d.depth(), LAYERS);
        let mut got = vec![0u8; size as usize];
        d.read(0, &mut got).unwrap();
        assert!(got == model, "1,000-layer chain reads wrong");
    }
    assert!(dir.snapshot() == before, "opening changed a file");
}

/// I12, I9, I7: missing parent, modified parent, replaced parent, mismatched block
/// size, unsealed parent.
#[test]
fn parent_identity() {
    // Missing.
    let dir = Dir::new("missing");
    let (base, top) = dir.chain();
    std::fs::remove_file(&base).unwrap();
    match Disk::open(&top, &OpenOptions::new()) {
        Err(OpenError::ParentMissing { parent, .. }) => assert_eq!(parent, base),
        r => panic!("missing parent: {:?}", r.err()),
    }

    // Modified after the child was made, through the engine: unseal, write, reseal.
    let dir = Dir::new("modified");
    let (base, top) = dir.chain();
    dir.edit(&base, |h| put_u32(h, hdr::STATE, 0));
    {
        let d = Disk::open(&base, &OpenOptions::new()).unwrap();
        d.write(100, &[1, 2, 3], WriteFlags::default()).unwrap();
        let digest = d.prepare_seal().unwrap();
        d.commit_seal(digest).unwrap();
    }
    expect_chain_err(&dir, &top, Access::ReadWrite, "changed");

    // Modified by editing the map (page CRC recomputed): the stored digest no longer
    // matches the contents.
    let dir = Dir::new("modmap");
    let (base, top) = dir.chain();
    let mut b = std::fs::read(&base).unwrap();
    let slot = active_page_slot(&b, 0);
    set_map_entry(&mut b, 0, slot, 9, 1);
    std::fs::write(&base, &b).unwrap();
    let before = dir.snapshot();
    match Disk::open(&top, &OpenOptions::new()) {
        Err(OpenError::Format {
            source: FormatError::SealDigest { .. },
            path,
        }) => assert_eq!(path, base),
        r => panic!("edited parent map: {:?}", r.err()),
    }
    assert!(dir.snapshot() == before);

    // Seal digest in the header changed (CRC recomputed).
    let dir = Dir::new("moddigest");
    let (base, top) = dir.chain();
    dir.edit(&base, |h| h[hdr::SEAL_DIGEST] ^= 1);
    expect_chain_err(&dir, &top, Access::ReadWrite, "changed");

    // Replaced by another image of the same shape: UUID mismatch.
    let dir = Dir::new("replaced");
    let (base, top) = dir.chain();
    std::fs::remove_file(&base).unwrap();
    create_image(&base, 1 << 20, BS).unwrap();
    let st = cowdisk_core::FileStorage::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&base)
            .unwrap(),
    );
    layer::seal(&st, &base).unwrap();
    drop(st);
    expect_chain_err(&dir, &top, Access::ReadWrite, "UUID");

    // Block size mismatch and an unsealed parent: children made by hand.
    let dir = Dir::new("mismatch");
    let base = dir.p("base.cow");
    create_image(&base, 1 << 20, BS).unwrap();
    let raw = std::fs::read(&base).unwrap();
    let uuid = cowdisk_core::Uuid(raw[hdr::UUID..hdr::UUID + 16].try_into().unwrap());
    let make_child = |name: &str, bs: u32, digest: u32| {
        let p = dir.p(name);
        let parent = Some(ParentRef {
            path: "base.cow".into(),
            uuid,
            digest,
        });
        let h = NewLayer {
            virtual_size: 1 << 20,
            block_size: bs,
            parent,
        }
        .header(&p)
        .unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        layer::create_on(&cowdisk_core::FileStorage::new(f), &p, &h).unwrap();
        p
    };
    let unsealed = make_child("unsealed.cow", BS, 0);
    expect_chain_err(&dir, &unsealed, Access::ReadWrite, "not sealed");
    let st = cowdisk_core::FileStorage::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&base)
            .unwrap(),
    );
    let (_, digest) = layer::seal(&st, &base).unwrap();
    drop(st);
    let wrong_bs = make_child("bs.cow", 8192, digest);
    expect_chain_err(&dir, &wrong_bs, Access::ReadWrite, "block size");
    // The parent larger than its child.
    let small = dir.p("small.cow");
    {
        let parent = Some(ParentRef {
            path: "base.cow".into(),
            uuid,
            digest,
        });
        let h = NewLayer {
            virtual_size: 1 << 19,
            block_size: BS,
            parent,
        }
        .header(&small)
        .unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&small)
            .unwrap();
        layer::create_on(&cowdisk_core::FileStorage::new(f), &small, &h).unwrap();
    }
    expect_chain_err(&dir, &small, Access::ReadWrite, "larger");
    let ok = make_child("ok.cow", BS, digest);
    Disk::open(&ok, &OpenOptions::new()).unwrap();
    // The same rules hold when the parent is already open through a shared cache (as in
    // `cowdisk serve ok.cow small.cow`): the child smaller than its parent is still refused
    // (it used to open, and a copy-up into its short last block panicked).
    let cache = Arc::new(cowdisk_core::LowerCache::new());
    let _held = Disk::open(&ok, &OpenOptions::new().cache(cache.clone())).unwrap();
    match Disk::open(&small, &OpenOptions::new().cache(cache)) {
        Err(OpenError::Chain { reason, .. }) => assert!(reason.contains("larger"), "{reason}"),
        other => panic!("small.cow over a cached parent: {:?}", other.map(drop)),
    }
}

/// I11, I10: a FIFO, a directory or an escaping symlink as parent: refused, no hang.
#[test]
fn special_files_as_parent() {
    let dir = Dir::new("special");
    let (_base, top) = dir.chain();
    let status = std::process::Command::new("mkfifo")
        .arg(dir.p("fifo"))
        .status()
        .expect("mkfifo must be installed");
    assert!(status.success(), "mkfifo failed");
    std::fs::create_dir(dir.p("folder")).unwrap();
    let outside = Dir::new("special-outside");
    outside.chain();
    std::os::unix::fs::symlink(outside.p("base.cow"), dir.p("escape.cow")).unwrap();
    let top_uuid = uuid_of(&dir.p("base.cow"));
    // Without image roots the symlink leads to another chain's base: a cowdisk layer,
    // but not the one recorded, so its identity refuses it. With a root it never opens.
    let root = vec![dir.p("")];
    for (name, want, roots) in [
        ("fifo", "not regular", vec![]),
        ("folder", "not regular", vec![]),
        ("escape.cow", "expects", vec![]),
        ("escape.cow", "outside every image root", root.clone()),
        ("fifo", "not regular", root),
    ] {
        set_parent(&dir, &top, name, top_uuid);
        let before = dir.snapshot();
        let top2 = top.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = OpenOptions::new()
                .image_roots(&roots)
                .and_then(|o| Disk::open(&top2, &o).map(drop));
            let _ = tx.send(r);
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{name}: open hangs"));
        match (r, want) {
            (Err(OpenError::NotRegular { path }), "not regular") => assert_eq!(path, dir.p(name)),
            (Err(OpenError::Chain { reason, .. }), want) => {
                assert!(reason.contains(want), "{reason}")
            }
            (r, _) => panic!("{name}: {:?}", r.err()),
        }
        assert!(dir.snapshot() == before, "{name}: a file changed");
    }
}

/// I13, I14: a second writer, and a parent opened for writing while a child is open.
#[test]
fn locking() {
    let dir = Dir::new("locks");
    let (base, top) = dir.chain();
    let d = Disk::open(&top, &OpenOptions::new()).unwrap();
    let before = dir.snapshot();
    assert!(matches!(
        Disk::open(&top, &OpenOptions::new()),
        Err(OpenError::Locked { .. })
    ));
    assert!(matches!(
        Disk::open(&top, &OpenOptions::new().access(Access::ReadOnly)),
        Err(OpenError::Locked { .. })
    ));
    assert!(matches!(
        Disk::open(&base, &OpenOptions::new()),
        Err(OpenError::Locked { .. })
    ));
    // Other readers of the base are fine.
    Disk::open(&base, &OpenOptions::new().access(Access::ReadOnly)).unwrap();
    assert!(dir.snapshot() == before);
    drop(d);
    // Lock released with the disk.
    Disk::open(&top, &OpenOptions::new()).unwrap();
}

/// Regression: a new layer with an invalid parent reference (here 5,000 bytes, which
/// does not fit the header slot) must be refused when its header is built, not panic
/// while encoding it.
#[test]
fn new_layer_with_invalid_reference_is_refused() {
    let world = SimWorld::new();
    for bad in [
        "x".repeat(5000),
        "x".repeat(1025),
        "a//b".into(),
        "up/".into(),
        "a\nb".into(),
        String::new(),
    ] {
        let parent = Some(ParentRef {
            path: bad.clone(),
            uuid: cowdisk_core::Uuid([1; 16]),
            digest: 0,
        });
        let r = NewLayer {
            virtual_size: 1 << 20,
            block_size: BS,
            parent,
        }
        .header(Path::new("child"));
        match r {
            Err(OpenError::Invalid { .. }) => {}
            Err(e) => panic!("{}-byte reference: {e:?}", bad.len()),
            Ok(h) => {
                let st = world.create();
                let done =
                    std::panic::catch_unwind(|| layer::create_on(&*st, Path::new("child"), &h));
                panic!(
                    "{}-byte reference accepted (create_on panicked: {})",
                    bad.len(),
                    done.is_err()
                );
            }
        }
    }
}
