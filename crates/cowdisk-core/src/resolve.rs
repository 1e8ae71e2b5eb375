//! Resolution: which layer answers each block. Pure bookkeeping, no data I/O.
//!
//! Sealed layers never change, so the answer for the whole lower chain is computed
//! once at open into a [`ResolvedMap`]; a read then costs one top-map lookup plus one
//! resolved lookup whatever the chain's depth.

use crate::format::BlockState;
use crate::map::AllocMap;

const CHUNK: u64 = 4096;
const WHITEOUT: u16 = 0x8000;
// Layer codes (depth + 1) must stay below the whiteout bit.
const _: () = assert!((crate::format::MAX_CHAIN_DEPTH as u64) < WHITEOUT as u64);

/// Who answers a block below the top layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowerOwner {
    /// No lower layer holds it: zeros.
    Nothing,
    /// Lower layer `i` (0 = directly below the top) holds its data.
    Data(usize),
    /// Lower layer `i` has a whiteout for it: zeros.
    Zero(usize),
}

/// Per-block owner among the sealed layers, stored sparsely: chunks with no owner
/// take no memory, so a big, mostly empty base costs little.
#[derive(Debug, Default)]
pub struct ResolvedMap {
    chunks: Vec<Option<Box<[u16]>>>,
}

impl ResolvedMap {
    /// Memory the chunk index takes for `blocks` blocks, before any chunk is made.
    pub fn index_bytes(blocks: u64) -> u64 {
        blocks.div_ceil(CHUNK) * 8
    }

    /// Builds the map from lower layers' allocation maps, top-most first.
    pub fn build(blocks: u64, maps: &[&AllocMap]) -> ResolvedMap {
        let mut chunks: Vec<Option<Box<[u16]>>> =
            (0..blocks.div_ceil(CHUNK)).map(|_| None).collect();
        for (i, map) in maps.iter().enumerate() {
            let code = (i + 1) as u16;
            map.for_each_word(|wi, w| {
                for j in 0..32u64 {
                    let v = (w >> (2 * j)) & 3;
                    let b = wi as u64 * 32 + j;
                    if v == 0 || b >= blocks {
                        continue;
                    }
                    let chunk = chunks[(b / CHUNK) as usize]
                        .get_or_insert_with(|| vec![0u16; CHUNK as usize].into());
                    let e = &mut chunk[(b % CHUNK) as usize];
                    if *e == 0 {
                        *e = if v == BlockState::Data as u64 {
                            code
                        } else {
                            code | WHITEOUT
                        };
                    }
                }
            });
        }
        ResolvedMap { chunks }
    }

    /// Calls `f` for each block with an owner, in order, skipping empty chunks.
    pub fn for_each_owned<E>(
        &self,
        mut f: impl FnMut(u64, LowerOwner) -> Result<(), E>,
    ) -> Result<(), E> {
        for (ci, chunk) in self.chunks.iter().enumerate() {
            let Some(c) = chunk else { continue };
            for (j, &e) in c.iter().enumerate() {
                if e != 0 {
                    let b = ci as u64 * CHUNK + j as u64;
                    f(b, self.get(b))?;
                }
            }
        }
        Ok(())
    }

    /// The end of the run of blocks from `b` in a chunk no layer holds (`b` itself if
    /// its chunk holds something).
    pub fn unheld_until(&self, b: u64) -> u64 {
        match self.chunks.get((b / CHUNK) as usize) {
            Some(Some(_)) => b,
            _ => (b / CHUNK + 1) * CHUNK,
        }
    }

    /// The owner of block `b`.
    #[inline]
    pub fn get(&self, b: u64) -> LowerOwner {
        let e = match self.chunks.get((b / CHUNK) as usize) {
            Some(Some(c)) => c[(b % CHUNK) as usize],
            _ => 0,
        };
        if e == 0 {
            LowerOwner::Nothing
        } else if e & WHITEOUT != 0 {
            LowerOwner::Zero(usize::from(e & !WHITEOUT) - 1)
        } else {
            LowerOwner::Data(usize::from(e) - 1)
        }
    }
}

/// What a range of the virtual disk reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappingKind {
    /// Data held by the layer at `depth` (0 = top).
    Data {
        /// Depth of the owning layer.
        depth: u32,
    },
    /// A whiteout in the layer at `depth`: zeros.
    Zero {
        /// Depth of the layer holding the whiteout.
        depth: u32,
    },
    /// No layer holds it: zeros.
    Unallocated,
}

/// A run of the virtual disk with one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Virtual offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// What it reads as.
    pub kind: MappingKind,
}

/// Kind of one block given its top state and lower owner. A partial block's sub-blocks
/// the top lacks read as the owner below; its own ones the caller maps to the top.
#[inline]
pub fn block_kind(top: BlockState, lower: impl FnOnce() -> LowerOwner) -> MappingKind {
    match top {
        BlockState::Data => MappingKind::Data { depth: 0 },
        BlockState::Zero => MappingKind::Zero { depth: 0 },
        BlockState::Absent | BlockState::Partial => match lower() {
            LowerOwner::Nothing => MappingKind::Unallocated,
            LowerOwner::Data(i) => MappingKind::Data {
                depth: i as u32 + 1,
            },
            LowerOwner::Zero(i) => MappingKind::Zero {
                depth: i as u32 + 1,
            },
        },
    }
}
