//! cowdisk-core: a block-level copy-on-write virtual disk engine. It owns every rule about
//! layers and chains; tools call it and re-implement none.
//!
//! ```text
//!   Disk::open(top, OpenOptions)           Disk  (read / write / write_zeroes / discard /
//!        |                                   |    flush / block_status / prepare_seal /
//!   chain: ChainWalk over a LayerSource      |    commit_seal / set_parent)
//!        |  (LocalFiles: references,   +-----+------------------------+
//!        |   identity, image roots)    |                              |
//!        v                          top layer (AllocMap, Storage)  Lower (Arc, shared
//!   link rules (check_link)                                         between clones):
//!   seal digest, loop and depth                                    sealed layers on
//!   checks, lower cache                                            ReadStorage, resolved
//!                                                                  once (owner per block)
//! ```
//!
//! A read resolves each block top-down: the top's data or whiteout, else the owner in
//! the resolved lower chain, else zeros. The first partial write to a block held below
//! writes only the sub-blocks it touches (a *partial* block, filled from below when the
//! top is sealed), or with [`CopyUp::Copy`] copies the whole block up; whole-block writes
//! and writes to unheld blocks copy nothing. Deletes are whiteouts in the top. Lower
//! layers are only ever read.
//!
//! Modules: `format` (the on-disk encoding, specified byte by byte in FORMAT.md), `layer`
//! (one layer file: headers, maps, sealing, block verification), `create` (new layer
//! files, crash-safely), and private ones: `chain` (opening, the walk, the layer-source
//! seam, rebase), `disk` (the data paths), `map`, `sub` (partial blocks), `resolve`, `storage`. The crash
//! simulator `sim` is behind the `sim` feature, for tests and fuzzing.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod chain;
pub mod create;
mod disk;
pub mod error;
pub mod format;
pub mod layer;
mod map;
mod map_slots;
mod resolve;
#[cfg(feature = "sim")]
pub mod sim;
mod storage;
mod storage_direct;
mod sub;

pub use chain::{
    check_link, folder_of, link_problems, open_layer_file, rebase, ChainWalk, LayerId, LayerSource,
    LinkError, LocalFiles, LowerCache, OpenOptions, OpenedLayer, WalkStop, WalkedLayer,
    DEFAULT_METADATA_LIMIT, MAX_DEPTH,
};
pub use create::{
    create_child, create_child_opts, create_child_with, create_image, ReferenceStyle,
};
pub use disk::{
    journal_path, Access, CopyUp, Disk, Extent, ExtentState, InPlace, JournalOpener, LayerInfo,
    Lower, LowerLayer, ReadPiece, WriteFlags, ZeroFlags,
};
pub use error::{FormatError, IoError, IoErrorKind, OpenError};
pub use format::{BlockState, Geometry, Header, LayerState, ParentRef, Uuid, DEFAULT_BLOCK_SIZE};
pub use map::{AllocMap, BlockCounts, PendingPages, SlotFinding};
pub use map_slots::SlotEntries;
pub use resolve::{LowerOwner, Mapping, MappingKind};
pub use storage::{Copied, FileStorage, ReadStorage, Storage};
pub use storage_direct::{DirectStorage, DIRECT_ALIGN};
