//! Power loss with a flush journal (FORMAT.md §Flush journal): the crash matrix of
//! crash.rs (every sync point, each crashed in every mode, the durable-value oracle) on
//! workloads whose flushes mostly go to the journal, with partial blocks. Also: a crash
//! during replay, a journal that damage ends early, and one whose records cannot be
//! right.
//!
//! `COWDISK_SEED` sets the seed of the random parts (printed).

mod common;

use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::crash::{enumerate_crashes, exec, open, run, verify, Level, Op, Start};
use common::seed;
use cowdisk_core::format::journal::{Record, RecordKind, RECORD_HEADER};
use cowdisk_core::sim::{CrashMode, SimWorld};
use cowdisk_core::{Access, CopyUp, Disk, JournalOpener, OpenError, Storage, WriteFlags};

/// Writes into blocks the top mostly holds already, frequent flushes, a few whiteouts
/// and whole-block writes (which make the next flush a full one).
fn journal_workload(seed: u64, n: usize, size: u64, bs: u64) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let blocks = size / bs;
    (0..n)
        .map(|i| {
            let b = rng.gen_range(0..blocks);
            let seed = seed ^ (i as u64 + 1) << 20;
            match rng.gen_range(0..100) {
                // Mostly within a sub-block or two, so partial blocks stay partial.
                0..=64 => {
                    let a = rng.gen_range(0..bs);
                    let len = rng.gen_range(1..=(bs - a).min(6000));
                    let fua = rng.gen_bool(0.05);
                    Op::Write {
                        off: b * bs + a,
                        len,
                        seed,
                        fua,
                    }
                }
                65 => Op::Write {
                    off: b * bs,
                    len: bs,
                    seed,
                    fua: false,
                },
                66 => Op::Discard {
                    off: b * bs,
                    len: bs,
                },
                67 => Op::Zeroes {
                    off: b * bs + 100,
                    len: 300,
                    no_hole: false,
                    fua: false,
                },
                _ => Op::Flush,
            }
        })
        .collect()
}

fn journal_start(blocks: u64, bs: u32, seed: u64, journal: u64) -> Start {
    let mut start = Start::new(blocks, bs, seed);
    start.copy_up = CopyUp::Partial;
    start.journal = journal;
    start
}

/// How many of the workload's flushes went to the journal (no crash).
fn journal_flushes(start: &Start, ops: &[Op]) -> u64 {
    let world = start.world();
    let disk = open(&world, start).unwrap();
    for op in ops {
        exec(&disk, op).unwrap();
    }
    disk.journal_flushes()
}

#[test]
fn every_sync_point_with_a_flush_journal() {
    let salt = seed("every_sync_point_with_a_flush_journal");
    // Name, blocks, block size, journal bytes, ops, least share of flushes journaled.
    let cases: [(&str, u64, u32, u64, usize, u64); 3] = [
        ("64K blocks, 1 MiB journal", 12, 65536, 1 << 20, 200, 3),
        // Fills after a flush or two: full flushes retire it often.
        ("64K blocks, 40 KiB journal", 12, 65536, 40 << 10, 200, 4),
        (
            "128K blocks, 256 KiB journal",
            8,
            131072,
            256 << 10,
            150,
            10,
        ),
    ];
    let mut total = 0;
    for (i, (name, blocks, bs, journal, n, share)) in cases.into_iter().enumerate() {
        let start = journal_start(blocks, bs, 5000 + i as u64, journal);
        let ops = journal_workload(40 + i as u64, n, start.size, start.bs);
        let flushes = ops.iter().filter(|o| o.commits()).count() as u64;
        let j = journal_flushes(&start, &ops);
        println!("{name}: {j} of {flushes} flushes went to the journal");
        assert!(
            j >= flushes / share,
            "{name}: only {j} of {flushes} flushes journaled"
        );
        total += enumerate_crashes(name, &start, &ops, 8, salt.wrapping_add(i as u64));
    }
    println!("{total} crash images checked");
}

/// Power lost again while the replay's full flush runs: the next open replays again and
/// every block still reads what the oracle allows.
#[test]
fn a_crash_during_replay_replays_again() {
    let salt = seed("a_crash_during_replay_replays_again");
    let mut rng = StdRng::seed_from_u64(salt);
    let start = journal_start(12, 65536, 6000, 1 << 20);
    let ops = journal_workload(50, 160, start.size, start.bs);
    let (world, _) = run(&start, &ops, None);
    let syncs = world.syncs();
    let mut checked = 0;
    for _ in 0..40 {
        let k = rng.gen_range(syncs / 2..syncs);
        let (world, oracle) = run(&start, &ops, Some(k));
        // A first crash that reorders leaves a block mixing unacknowledged writes (the
        // later kept, the earlier lost): from then on only bytes are checked.
        let (first_mode, first_exact) = match rng.gen_range(0..3) {
            0 => (CrashMode::DropAll, true),
            1 => (CrashMode::KeepAll, true),
            _ => (CrashMode::Reorder(rng.gen()), false),
        };
        let first = world.after_crash(first_mode);
        // Count the replay's syncs, then lose power before each of them.
        let probe = first.after_crash(CrashMode::KeepAll);
        let s0 = probe.syncs();
        drop(open(&probe, &start).unwrap());
        for j in 0..probe.syncs() - s0 {
            let again = first.after_crash(CrashMode::KeepAll);
            again.crash_before_sync(again.syncs() + j);
            let _ = open(&again, &start);
            assert!(again.crashed(), "replay had fewer syncs than counted");
            for mode in [CrashMode::DropAll, CrashMode::Reorder(rng.gen())] {
                let after = again.after_crash(mode);
                let level = match mode {
                    CrashMode::DropAll if first_exact => Level::Exact,
                    _ => Level::Bytes,
                };
                if let Err(e) = verify(&start, &after, &oracle, level, true) {
                    panic!("crash at sync {k} ({first_mode:?}), again at replay sync {j}, {mode:?}: {e} (COWDISK_SEED={salt})");
                }
                checked += 1;
            }
        }
    }
    println!("{checked} crash images checked");
    assert!(checked > 40);
}

/// A crashed disk whose journal holds acknowledged flushes, one record each, and the
/// blocks of those records in order (the blocks held below: they go partial).
fn crashed_with_records(start: &Start) -> (Arc<SimWorld>, Vec<u64>) {
    let world = start.world();
    let disk = open(&world, start).unwrap();
    // Every block partial, then the flush that commits them (full), then writes into
    // their holes with client flushes (journaled).
    for b in 0..start.size / start.bs {
        disk.write(b * start.bs, &[1; 4096], WriteFlags::default())
            .unwrap();
    }
    disk.client_flush().unwrap();
    let partial: Vec<u64> = (0..start.size / start.bs)
        .filter(|&b| disk.top_state(b) == cowdisk_core::BlockState::Partial)
        .collect();
    assert!(partial.len() >= 4, "{partial:?}");
    for &b in &partial {
        disk.write(b * start.bs + 4096, &[2; 4096], WriteFlags::default())
            .unwrap();
        disk.client_flush().unwrap();
    }
    assert_eq!(disk.journal_flushes(), partial.len() as u64);
    (world.after_crash(CrashMode::DropAll), partial)
}

fn open_plain(world: &Arc<SimWorld>, access: Access) -> Result<Disk, OpenError> {
    let w = world.clone();
    let opener: JournalOpener = Arc::new(move |_: &Path, _| Ok(w.file(2) as Arc<dyn Storage>));
    Disk::open_storages_journaled(
        (world.file(1) as Arc<dyn Storage>, "top".into()),
        vec![(world.file(0) as Arc<dyn Storage>, "base".into())],
        access,
        Some((opener, 0)),
    )
}

#[test]
fn replay_restores_journaled_flushes_and_refuses_read_only_opens() {
    let start = journal_start(8, 16384, 6100, 1 << 20);
    let (after, partial) = crashed_with_records(&start);
    let e = open_plain(&after, Access::ReadOnly)
        .err()
        .expect("read-only open refused");
    assert!(e.to_string().contains("writable open replays"), "{e}");
    let e = Disk::open_storages(
        (after.file(1) as Arc<dyn Storage>, "top".into()),
        vec![(after.file(0) as Arc<dyn Storage>, "base".into())],
        Access::ReadWrite,
    )
    .err()
    .expect("refused without the journal");
    assert!(e.to_string().contains("not given"), "{e}");
    // A writable open without a journal of its own replays it, then reads every write.
    let disk = open_plain(&after, Access::ReadWrite).unwrap();
    let mut buf = vec![0u8; 8192];
    for &b in &partial {
        disk.read(b * start.bs, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 1), "block {b}");
        assert!(buf[4096..].iter().all(|&x| x == 2), "block {b}");
    }
    drop(disk);
    // Replayed and retired: a read-only open now needs no journal at all.
    let ro = Disk::open_storages(
        (after.file(1) as Arc<dyn Storage>, "top".into()),
        vec![(after.file(0) as Arc<dyn Storage>, "base".into())],
        Access::ReadOnly,
    )
    .unwrap();
    ro.read(partial[0] * start.bs + 4096, &mut buf[..4096])
        .unwrap();
    assert!(buf[..4096].iter().all(|&x| x == 2));
}

/// A write that fills a partial block leaves it partial, so its flush still goes to the
/// journal, and once the epoch is live so does a flush of a write into a data block
/// alone. After power loss the replay restores both, and its full flush makes the filled
/// blocks data.
#[test]
fn fills_and_data_writes_in_a_live_epoch_go_to_the_journal() {
    use cowdisk_core::BlockState;
    let start = journal_start(8, 16384, 6200, 1 << 20);
    let bs = start.bs as usize;
    let world = start.world();
    let disk = open(&world, &start).unwrap();
    let none = WriteFlags::default();
    // Block 0 whole (data), 4 KiB of each other one (partial where the base holds it).
    disk.write(0, &vec![7; bs], none).unwrap();
    for b in 1..8 {
        disk.write(b * start.bs, &[1; 4096], none).unwrap();
    }
    disk.client_flush().unwrap();
    assert_eq!(disk.journal_flushes(), 0, "first writes flush in full");
    let partial: Vec<u64> = (1..8)
        .filter(|&b| disk.top_state(b) == BlockState::Partial)
        .collect();
    assert!(partial.len() >= 4, "{partial:?}");
    for &b in &partial {
        disk.write(b * start.bs + 4096, &vec![2; bs - 4096], none)
            .unwrap();
        disk.client_flush().unwrap();
        assert_eq!(disk.top_state(b), BlockState::Partial, "filled block {b}");
    }
    disk.write(100, &[9; 50], none).unwrap();
    disk.client_flush().unwrap();
    assert_eq!(disk.journal_flushes(), partial.len() as u64 + 1);
    let after = world.after_crash(CrashMode::DropAll);
    drop(disk);
    let disk = open(&after, &start).unwrap();
    let mut buf = vec![0u8; bs];
    for &b in &partial {
        disk.read(b * start.bs, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 1), "block {b}");
        assert!(buf[4096..].iter().all(|&x| x == 2), "block {b}");
        assert_eq!(
            disk.top_state(b),
            BlockState::Data,
            "block {b} after replay"
        );
    }
    disk.read(0, &mut buf).unwrap();
    let mut want = vec![7u8; bs];
    want[100..150].fill(9);
    assert!(buf == want, "data block 0");
}

/// The journal's records in order: `(offset, header bytes)`.
fn records(journal: &[u8]) -> Vec<(usize, [u8; RECORD_HEADER])> {
    let mut out: Vec<(usize, [u8; RECORD_HEADER])> = Vec::new();
    let mut pos = 0;
    let at = |pos: usize| {
        let h: [u8; RECORD_HEADER] = journal.get(pos..pos + RECORD_HEADER)?.try_into().ok()?;
        Record::decode(&h).map(|r| (r, h))
    };
    loop {
        // Batches start at multiples of 4 KiB.
        let Some((r, h)) = at(pos).or_else(|| {
            pos = pos.next_multiple_of(4096);
            at(pos)
        }) else {
            return out;
        };
        if out
            .last()
            .is_some_and(|(_, p): &(usize, [u8; RECORD_HEADER])| {
                Record::decode(p).unwrap().seq + 1 != r.seq
            })
        {
            return out;
        }
        out.push((pos, h));
        pos += RECORD_HEADER + r.len as usize;
    }
}

#[test]
fn damage_ends_the_journal_where_it_starts() {
    let start = journal_start(8, 16384, 6200, 1 << 20);
    let (after, partial) = crashed_with_records(&start);
    let mut j = after.durable(2);
    let recs = records(&j);
    assert_eq!(recs.len(), partial.len());
    // Garble the data of record `cut`: the ones before it replay, it and later do not.
    let cut = partial.len() / 2;
    j[recs[cut].0 + RECORD_HEADER + 10] ^= 0xff;
    let w = SimWorld::new();
    w.from_bytes(after.durable(0));
    w.from_bytes(after.durable(1));
    w.from_bytes(j);
    let disk = open_plain(&w, Access::ReadWrite).unwrap();
    let mut buf = vec![0u8; 4096];
    for (i, &b) in partial.iter().enumerate() {
        disk.read(b * start.bs + 4096, &mut buf).unwrap();
        assert_eq!(buf.iter().all(|&x| x == 2), i < cut, "block {b}");
    }
}

#[test]
fn a_record_that_cannot_be_right_is_refused_with_nothing_written() {
    let start = journal_start(8, 16384, 6300, 1 << 20);
    let (after, _) = crashed_with_records(&start);
    let mut j = after.durable(2);
    let (pos, h) = records(&j)[3];
    let mut r = Record::decode(&h).unwrap();
    assert_eq!(r.kind, RecordKind::Partial);
    r.block = 1 << 40;
    let data = j[pos + RECORD_HEADER..pos + RECORD_HEADER + r.len as usize].to_vec();
    j[pos..pos + RECORD_HEADER].copy_from_slice(&r.encode(&data));
    let w = SimWorld::new();
    w.from_bytes(after.durable(0));
    w.from_bytes(after.durable(1));
    w.from_bytes(j);
    let top = w.live(1);
    let e = open_plain(&w, Access::ReadWrite).err().expect("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("top.journal") && msg.contains("record 3") && msg.contains("beyond"),
        "{msg}"
    );
    assert_eq!(w.live(1), top, "the top was written");
}

/// Threads writing into their own partial blocks, each write followed by its thread's
/// client flush, while the others write and flush: after power loss every block reads
/// what its thread last wrote (each of those writes was flushed before the next).
#[test]
fn concurrent_writers_and_journal_flushes_lose_nothing() {
    let salt = seed("concurrent_writers_and_journal_flushes_lose_nothing");
    let start = journal_start(16, 65536, 6400, 4 << 20);
    let bs = start.bs;
    for round in 0..4u64 {
        let world = start.world();
        let disk = Arc::new(open(&world, &start).unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let disk = disk.clone();
                let mut rng = StdRng::seed_from_u64(salt ^ round << 8 ^ t);
                std::thread::spawn(move || {
                    // Blocks t, t + 4, t + 8, t + 12; their content as written.
                    let mut mine: Vec<(u64, Vec<u8>)> = (0..4)
                        .map(|k| {
                            let b = t + 4 * k;
                            let mut v = vec![0u8; bs as usize];
                            disk.read(b * bs, &mut v).unwrap();
                            (b, v)
                        })
                        .collect();
                    for i in 0..60u64 {
                        let k = rng.gen_range(0..4);
                        let a = rng.gen_range(0..bs - 1);
                        let len = rng.gen_range(1..=(bs - a).min(5000));
                        let mut data = vec![0u8; len as usize];
                        common::pattern(salt ^ t << 40 ^ i, &mut data);
                        let (b, v) = &mut mine[k];
                        disk.write(*b * bs + a, &data, WriteFlags::default())
                            .unwrap();
                        v[a as usize..(a + len) as usize].copy_from_slice(&data);
                        disk.client_flush().unwrap();
                    }
                    mine
                })
            })
            .collect();
        let expect: Vec<_> = threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert!(
            disk.journal_flushes() > 20,
            "{} journal flushes",
            disk.journal_flushes()
        );
        drop(disk);
        for mode in [
            CrashMode::DropAll,
            CrashMode::Torn {
                sector: 4096,
                seed: salt ^ round,
            },
        ] {
            let after = world.after_crash(mode);
            let disk = open(&after, &start).unwrap();
            let mut got = vec![0u8; bs as usize];
            for (b, v) in &expect {
                disk.read(b * bs, &mut got).unwrap();
                assert!(
                    got == *v,
                    "round {round}, {mode:?}: block {b} (COWDISK_SEED={salt})"
                );
            }
        }
    }
}

/// A top whose blocks are all data: a flush of whole-block overwrites alone is a full
/// one, a flush of small overwrites opens an epoch and goes to the journal, and once it
/// is live whole blocks go there too. After power loss the replay restores them all.
#[test]
fn small_overwrites_of_data_blocks_go_to_the_journal_whole_blocks_do_not() {
    let start = journal_start(8, 16384, 6500, 1 << 20);
    let bs = start.bs as usize;
    let world = start.world();
    let disk = open(&world, &start).unwrap();
    let none = WriteFlags::default();
    let mut want = vec![0u8; 8 * bs];
    let mut put = |disk: &Disk, off: usize, data: &[u8]| {
        disk.write(off as u64, data, none).unwrap();
        want[off..off + data.len()].copy_from_slice(data);
    };
    for b in 0..8 {
        put(&disk, b * bs, &vec![b as u8 + 1; bs]);
    }
    disk.client_flush().unwrap();
    put(&disk, 2 * bs, &vec![20; bs]);
    disk.client_flush().unwrap();
    assert_eq!(
        disk.journal_flushes(),
        0,
        "whole blocks alone flush in full"
    );
    put(&disk, 3 * bs + 5000, &[30; 4096]);
    disk.client_flush().unwrap();
    assert_eq!(disk.journal_flushes(), 1, "a small overwrite is journaled");
    put(&disk, 4 * bs, &vec![40; bs]);
    disk.client_flush().unwrap();
    put(&disk, 5 * bs + 100, &[50; 300]);
    disk.client_flush().unwrap();
    assert_eq!(
        disk.journal_flushes(),
        3,
        "the live epoch takes whole blocks too"
    );
    let after = world.after_crash(CrashMode::DropAll);
    drop(disk);
    let disk = open(&after, &start).unwrap();
    let mut got = vec![0u8; 8 * bs];
    disk.read(0, &mut got).unwrap();
    assert!(got == want, "after replay");
}

/// Small overwrites of a top whose blocks are all data, with flushes, the odd whole-block
/// write and whiteout: every journal epoch is opened by writes into data blocks alone.
/// The crash matrix of `every_sync_point_with_a_flush_journal` on it.
#[test]
fn every_sync_point_with_data_block_overwrites_in_the_journal() {
    let salt = seed("every_sync_point_with_data_block_overwrites_in_the_journal");
    let start = journal_start(8, 65536, 6600, 256 << 10);
    let bs = start.bs;
    let mut ops: Vec<Op> = (0..8)
        .map(|b| Op::Write {
            off: b * bs,
            len: bs,
            seed: 7 << 40 | b,
            fua: false,
        })
        .collect();
    ops.push(Op::Flush);
    ops.extend(
        journal_workload(60, 150, start.size, bs)
            .into_iter()
            // Partial blocks need a block the top does not hold: none here, but a
            // whiteout followed by a small write would make one.
            .filter(|op| !matches!(op, Op::Discard { .. })),
    );
    let flushes = ops.iter().filter(|o| o.commits()).count() as u64;
    let j = journal_flushes(&start, &ops);
    println!("{j} of {flushes} flushes went to the journal");
    assert!(j >= flushes / 3, "only {j} of {flushes} flushes journaled");
    let n = enumerate_crashes("data blocks, 256 KiB journal", &start, &ops, 8, salt);
    println!("{n} crash images checked");
}
