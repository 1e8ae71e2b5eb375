//! Direct I/O (`serve --cache=none`): a chain opened with `O_DIRECT` on a real file system
//! reads and writes exactly as a flat model says, for aligned and unaligned requests, with
//! concurrent writes to different bytes of one page; the base keeps its bytes; the files
//! really are open with `O_DIRECT`.

use std::path::PathBuf;

use cowdisk_core::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 8 << 20;
const BS: u32 = 64 * 1024;

fn tmpdir(name: &str) -> PathBuf {
    // /var/tmp: a disk file system (tmpfs gained O_DIRECT only in Linux 6.6).
    let d = PathBuf::from("/var/tmp").join(format!("cowdisk-direct-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `O_DIRECT` flag of every open file of this process whose path contains `name`.
fn direct_flags(name: &str) -> Vec<bool> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target.to_string_lossy().contains(name) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap_or(0);
        out.push(flags & 0o40000 != 0);
    }
    out
}

#[test]
fn direct_io_chain_matches_the_flat_model() {
    let d = tmpdir("model");
    let (base, top) = (d.join("base.cow"), d.join("top.cow"));
    create_image(&base, SIZE, BS).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = StdRng::seed_from_u64(7);
    {
        let disk = Disk::open(&base, &OpenOptions::new()).unwrap();
        for i in 0..40u64 {
            let off = i * 200_000 % (SIZE - 70_000);
            let data: Vec<u8> = (0..70_000).map(|_| rng.gen()).collect();
            disk.write(off, &data, WriteFlags::default()).unwrap();
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        disk.flush().unwrap();
    }
    create_child(&top, &base).unwrap();
    let base_bytes = std::fs::read(&base).unwrap();
    {
        let disk = Disk::open(&top, &OpenOptions::new().direct_io(true)).unwrap();
        let flags = direct_flags("cowdisk-direct-model");
        assert!(
            flags.iter().filter(|&&f| f).count() >= 2,
            "top and base direct: {flags:?}"
        );
        for _ in 0..400 {
            let len = match rng.gen_range(0..4) {
                0 => rng.gen_range(1..600),
                1 => 4096,
                2 => rng.gen_range(1..3) * 512,
                _ => rng.gen_range(1..200_000),
            };
            let off = if rng.gen_bool(0.3) {
                rng.gen_range(0..SIZE / 4096 - 64) * 4096
            } else {
                rng.gen_range(0..SIZE - len as u64)
            };
            match rng.gen_range(0..10) {
                0 => {
                    disk.write_zeroes(off, len as u64, ZeroFlags::default())
                        .unwrap();
                    model[off as usize..off as usize + len].fill(0);
                }
                1..=5 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    disk.write(off, &data, WriteFlags::default()).unwrap();
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                }
                _ => {
                    let mut b = vec![0u8; len];
                    disk.read(off, &mut b).unwrap();
                    assert!(
                        b[..] == model[off as usize..off as usize + len],
                        "read {off}+{len}"
                    );
                }
            }
        }
        // Concurrent writes to different bytes of the same pages: none is lost.
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let disk = &disk;
                s.spawn(move || {
                    for k in 0..64u64 {
                        let off = k * 4096 + t * 512 + 3;
                        disk.write(off, &[t as u8 + 1; 100], WriteFlags::default())
                            .unwrap();
                    }
                });
            }
        });
        for t in 0..8u64 {
            for k in 0..64u64 {
                let off = (k * 4096 + t * 512 + 3) as usize;
                model[off..off + 100].fill(t as u8 + 1);
            }
        }
        disk.flush().unwrap();
    }
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "base unchanged"
    );
    // Reopened with the page cache: the same bytes.
    let disk = Disk::open(&top, &OpenOptions::new().access(Access::ReadOnly)).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    disk.read(0, &mut all).unwrap();
    assert!(all == model, "content after reopen");
    let _ = std::fs::remove_dir_all(&d);
}

/// `pwrite`s `data` (copied to an aligned buffer) through an in-place write's descriptor.
fn write_through(w: &InPlace<'_>, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; data.len() + 4096];
    let at = buf.as_ptr().align_offset(4096);
    buf[at..at + data.len()].copy_from_slice(data);
    let f = std::fs::File::from(w.fd().try_clone_to_owned().unwrap());
    f.write_all_at(&buf[at..at + data.len()], w.offset())
        .unwrap();
}

/// In-place writes are given only for aligned ranges of one block the top holds as data,
/// only with direct I/O on a writable disk, and not while another holds the block (without
/// waiting); their bytes then read back, after a flush and a reopen too, and the base keeps
/// its bytes.
#[test]
fn in_place_writes_only_into_top_data_and_their_bytes_stay() {
    let d = tmpdir("inplace");
    let (base, top) = (d.join("base.cow"), d.join("top.cow"));
    create_image(&base, SIZE, BS).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    {
        let disk = Disk::open(&base, &OpenOptions::new()).unwrap();
        let data = vec![0x5au8; 4 * BS as usize];
        disk.write(0, &data, WriteFlags::default()).unwrap();
        model[..data.len()].copy_from_slice(&data);
        disk.flush().unwrap();
        assert!(
            disk.write_in_place(0, 4096, true).is_none(),
            "no direct I/O"
        );
        assert!(!disk.writes_in_place());
    }
    create_child(&top, &base).unwrap();
    let base_bytes = std::fs::read(&base).unwrap();
    let bs = u64::from(BS);
    {
        let disk = Disk::open(&top, &OpenOptions::new().direct_io(true)).unwrap();
        assert!(disk.writes_in_place());
        // Block 0 only below, block 5 nowhere: neither is the top's yet.
        assert!(disk.write_in_place(0, 4096, true).is_none());
        assert!(disk.write_in_place(5 * bs, 4096, true).is_none());
        // A small write leaves block 0 partial (its bitmap changes with each write); blocks
        // 1 (over the base's) and 5 written whole are the top's data.
        disk.write(100, &[7u8; 10], WriteFlags::default()).unwrap();
        model[100..110].fill(7);
        assert_eq!(disk.top_state(0), BlockState::Partial);
        let whole = vec![9u8; BS as usize];
        for b in [1, 5] {
            disk.write(b * bs, &whole, WriteFlags::default()).unwrap();
            model[(b * bs) as usize..((b + 1) * bs) as usize].copy_from_slice(&whole);
        }
        for (off, len) in [
            (0, 4096),
            (bs + 100, 4096),
            (bs + 4096, 100),
            (2 * bs - 4096, 8192),
            (6 * bs, 4096),
        ] {
            assert!(
                disk.write_in_place(off, len, true).is_none(),
                "{off}+{len}: partial, unaligned, across blocks or not the top's"
            );
        }
        let mut rng = StdRng::seed_from_u64(9);
        for i in 0..64u64 {
            let block = if i % 2 == 0 { 1 } else { 5 };
            let pages = rng.gen_range(1..=4u64);
            let off = block * bs + rng.gen_range(0..=16 - pages) * 4096;
            let len = (pages * 4096) as usize;
            let w = disk
                .write_in_place(off, len, true)
                .expect("top data, aligned");
            // Held: another taker that may not wait is refused, for any range of the block.
            assert!(disk.write_in_place(block * bs, 4096, false).is_none());
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            write_through(&w, &data);
            w.finish(true);
            model[off as usize..off as usize + len].copy_from_slice(&data);
            let mut back = vec![0u8; len];
            disk.read(off, &mut back).unwrap();
            assert!(back == data, "read back {off}+{len}");
        }
        disk.flush().unwrap();
    }
    {
        let disk = Disk::open(
            &top,
            &OpenOptions::new().direct_io(true).access(Access::ReadOnly),
        )
        .unwrap();
        assert!(disk.write_in_place(0, 4096, true).is_none(), "read-only");
        let mut all = vec![0u8; SIZE as usize];
        disk.read(0, &mut all).unwrap();
        assert!(all == model, "content after reopen");
    }
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "base unchanged"
    );
    let _ = std::fs::remove_dir_all(&d);
}
