//! Sealing in time proportional to the data: like `cowdisk_core::layer::prepare_seal`
//! (same CRC area layout, same digest), but CRC pages whose 1024 blocks hold no data
//! are not written. Readers only use the stored CRC of data blocks (the digest, open
//! and `check` all skip the others), so those pages may stay holes, and sealing an
//! empty 1 TiB layer writes nothing but its header.

use std::path::Path;

use cowdisk_core::chain::open_layer_file;
use cowdisk_core::format::{DigestBuilder, PAGE_SIZE};
use cowdisk_core::layer::{commit_seal, load_map, read_header};
use cowdisk_core::map::AllocMap;
use cowdisk_core::{Access, BlockState, FileStorage, Header, LayerState, Storage};

use crate::error::{Error, Result};

/// Blocks whose CRCs share one 4 KiB page of the CRC area.
const PER_PAGE: u64 = PAGE_SIZE / 4;

/// Computes and stores the block CRCs of data blocks (synced) and returns the digest.
pub fn prepare_seal(st: &dyn Storage, path: &Path, h: &Header, map: &AllocMap) -> Result<u32> {
    let g = &h.geometry;
    let mut digest = DigestBuilder::new(&h.uuid, g);
    let mut block = vec![0u8; g.block_size as usize];
    let mut crcs = vec![0u8; PAGE_SIZE as usize];
    for chunk in 0..g.blocks.div_ceil(PER_PAGE) {
        let first = chunk * PER_PAGE;
        let n = (g.blocks - first).min(PER_PAGE);
        let words = (first / 32) as usize..(first + n).div_ceil(32) as usize;
        if words
            .clone()
            .all(|w| map.word(w) & 0x5555_5555_5555_5555 == 0)
        {
            for b in first..first + n {
                digest.block(map.get(b), 0);
            }
            continue;
        }
        crcs.fill(0);
        for b in first..first + n {
            let state = map.get(b);
            let mut crc = 0;
            if state == BlockState::Data {
                let len = g.block_len(b);
                st.read_at(&mut block[..len], g.block_offset(b))
                    .map_err(|e| Error::os(path, "read block", e))?;
                crc = crc32fast::hash(&block[..len]);
            }
            digest.block(state, crc);
            let i = ((b - first) * 4) as usize;
            crcs[i..i + 4].copy_from_slice(&crc.to_le_bytes());
        }
        st.write_at(&crcs[..(n * 4) as usize], g.crc_offset + first * 4)
            .map_err(|e| Error::os(path, "write block CRCs", e))?;
    }
    st.sync().map_err(|e| Error::os(path, "sync", e))?;
    Ok(digest.finish())
}

/// Seals the writable layer at `path` (exclusive lock); no-op if already sealed.
pub fn seal_file(path: &Path) -> Result<()> {
    let (file, _) = open_layer_file(path, Access::ReadWrite)?;
    let st = FileStorage::new(file);
    let loaded = read_header(&st, path)?;
    if loaded.header.state == LayerState::Sealed {
        return Ok(());
    }
    let (map, _) = load_map(&st, path, &loaded.header.geometry)?;
    let digest = prepare_seal(&st, path, &loaded.header, &map)?;
    commit_seal(&st, path, &loaded, digest)?;
    Ok(())
}
