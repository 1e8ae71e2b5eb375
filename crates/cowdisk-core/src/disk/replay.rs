//! Replaying a top's flush journal at a writable open (FORMAT.md §Flush journal).
//!
//! Two walks over the file: the first finds where the epoch's records end (the first
//! place holding no next record of this top and epoch, torn or failing its CRC) and
//! refuses a record whose CRC holds but whose fields cannot be right; nothing is written
//! before it is done. The second applies each record whose block the map still has in
//! the record's state, then a full flush makes it all durable and clears the header bit.

use std::path::Path;

use super::partial::span;
use super::Disk;
use crate::error::OpenError;
use crate::format::journal::{Record, RecordKind, BATCH_ALIGN, RECORD_HEADER};
use crate::format::{BlockState, Geometry, INCOMPAT_FLUSH_JOURNAL};
use crate::storage::Storage;

use super::journal::journal_path;

impl Disk {
    /// Replays the journal if the top's header says it holds records, through the opener
    /// given with [`Disk::set_journal`]. Returns the records applied.
    pub(crate) fn replay_journal(&self) -> Result<u64, OpenError> {
        let h = self.top.header.get();
        if h.incompat & INCOMPAT_FLUSH_JOURNAL == 0 {
            return Ok(0);
        }
        let path = journal_path(&self.top.path);
        let bad = |reason: String| OpenError::Journal {
            path: path.clone(),
            reason,
        };
        if self.is_read_only() {
            return Err(bad(format!(
                "holds flushed writes of {} that a writable open replays \
                 (cowdisk serve, or cowdisk check --repair)",
                self.top.path.display()
            )));
        }
        let opener = self.journal.opener.clone().ok_or_else(|| {
            bad("the top's flushed writes are in this journal, which was not given".into())
        })?;
        let st = opener(&path, false).map_err(|e| OpenError::io(&path, "open flush journal", e))?;
        // Validated whole before anything is written, then applied.
        walk(&*st, &path, &h, &self.geometry, &mut |_, _| Ok(()))?;
        let mut applied = 0;
        walk(&*st, &path, &h, &self.geometry, &mut |r, data| {
            applied += u64::from(self.apply_record(r, data)?);
            Ok(())
        })?;
        drop(st);
        self.adopt_live_epoch(h.generation);
        self.flush()
            .map_err(|e| bad(format!("full flush after replay: {e}")))?;
        Ok(applied)
    }

    /// Writes one record into the top if its block is still in the record's state.
    fn apply_record(&self, r: &Record, data: &[u8]) -> Result<bool, OpenError> {
        let g = &self.geometry;
        let b = r.block;
        let base = g.block_offset(b);
        let st = &*self.top.storage;
        let werr = |e| OpenError::io(&self.top.path, "replay flush journal", e);
        match (r.kind, self.top.map.get(b)) {
            (RecordKind::Data, BlockState::Data) => {
                st.write_at(data, base + u64::from(r.offset))
                    .map_err(werr)?;
            }
            (RecordKind::Partial, BlockState::Partial) => {
                let sub = g.sub_size();
                self.top.sub.ensure_space(st, g, b).map_err(werr)?;
                for s in (0..32).filter(|s| r.bits >> s & 1 == 1) {
                    let at = s * sub - r.offset as usize;
                    let end = (at + sub).min(data.len());
                    st.write_at(&data[at..end], base + (s * sub) as u64)
                        .map_err(werr)?;
                }
                // The full flush after replay makes a filled block data.
                let bits = self.top.sub.bits(b) | r.bits;
                self.top.sub.set(g, b, bits);
            }
            // A later full flush changed the block (a whiteout, a fill): what it holds
            // now is newer than the record.
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// What a walk does with each record and its data.
type Apply<'a> = dyn FnMut(&Record, &[u8]) -> Result<(), OpenError> + 'a;

/// Reads the record at `pos` into `data`; `None` where there is none a crash could not
/// have left (not a record, short, too long, failing its CRC).
fn read_record(
    st: &dyn Storage,
    path: &Path,
    pos: u64,
    len: u64,
    data: &mut Vec<u8>,
) -> Result<Option<Record>, OpenError> {
    let mut hdr = [0u8; RECORD_HEADER];
    if pos + RECORD_HEADER as u64 > len {
        return Ok(None);
    }
    st.read_at(&mut hdr, pos)
        .map_err(|e| OpenError::io(path, "read flush journal", e))?;
    let Some(r) = Record::decode(&hdr) else {
        return Ok(None);
    };
    // Bounded before anything is read: the largest block a layer may have.
    let end = pos + (RECORD_HEADER as u64) + u64::from(r.len);
    if r.len > crate::format::MAX_BLOCK_SIZE || end > len {
        return Ok(None);
    }
    data.resize(r.len as usize, 0);
    st.read_at(data, pos + RECORD_HEADER as u64)
        .map_err(|e| OpenError::io(path, "read flush journal", e))?;
    Ok(Record::verify(&hdr, data).then_some(r))
}

/// Calls `f` with each record of the epoch in order, refusing one whose fields cannot be
/// right. Records follow each other within a batch; where none follows, the next batch
/// starts at the next multiple of `BATCH_ALIGN`. The epoch's records end at the first
/// place holding neither the next record of this top and epoch. Returns their count.
fn walk(
    st: &dyn Storage,
    path: &Path,
    h: &crate::format::Header,
    g: &Geometry,
    f: &mut Apply<'_>,
) -> Result<u64, OpenError> {
    let len = st
        .len()
        .map_err(|e| OpenError::io(path, "stat flush journal", e))?;
    let (mut pos, mut seq) = (0u64, 0u64);
    let mut data = Vec::new();
    loop {
        let ours = |r: &Record| r.uuid == h.uuid && r.epoch == h.generation && r.seq == seq;
        let mut found = read_record(st, path, pos, len, &mut data)?.filter(ours);
        if found.is_none() && pos % BATCH_ALIGN != 0 {
            pos = pos.next_multiple_of(BATCH_ALIGN);
            found = read_record(st, path, pos, len, &mut data)?.filter(ours);
        }
        let Some(r) = found else {
            return Ok(seq);
        };
        check_record(&r, g).map_err(|reason| OpenError::Journal {
            path: path.to_path_buf(),
            reason: format!("record {seq} at offset {pos}: {reason}"),
        })?;
        f(&r, &data)?;
        pos += (RECORD_HEADER + data.len()) as u64;
        seq += 1;
    }
}

/// A record's fields against the top's layout.
fn check_record(r: &Record, g: &Geometry) -> Result<(), String> {
    if r.block >= g.blocks {
        return Err(format!("block {} beyond the disk's {}", r.block, g.blocks));
    }
    let blen = g.block_len(r.block);
    let (lo, hi) = (r.offset as usize, r.offset as usize + r.len as usize);
    if r.len == 0 || hi > blen {
        return Err(format!("range {lo}..{hi} outside block {}", r.block));
    }
    match r.kind {
        RecordKind::Data if r.bits != 0 => Err("sub-block bits on a data record".into()),
        RecordKind::Data => Ok(()),
        RecordKind::Partial => {
            let sub = g.sub_size();
            if g.sub_pages == 0 || sub >= blen {
                return Err("partial record in a layer without partial blocks".into());
            }
            if lo % sub != 0 || (hi % sub != 0 && hi != blen) {
                return Err(format!("partial range {lo}..{hi} not on sub-blocks"));
            }
            if r.bits == 0 || r.bits & !span(lo / sub, hi.div_ceil(sub)) != 0 {
                return Err(format!("sub-block bits {:#x} outside its range", r.bits));
            }
            Ok(())
        }
    }
}
