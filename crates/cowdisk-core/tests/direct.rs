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
