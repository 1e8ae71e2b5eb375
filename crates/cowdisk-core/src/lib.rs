//! cowdisk-core: a block-level copy-on-write virtual disk engine.
//!
//! ```text
//!             Disk  (read / write / write_zeroes / discard / flush / block_status)
//!               |
//!      +--------+-------------------------+
//!      |                                  |
//!   top layer (AllocMap, writable)     Lower (Arc, shared between clones)
//!      |                                  |  ResolvedMap: owner of each block,
//!   Storage (FileStorage | SimStorage)    |  computed once at open
//!                                      sealed layers -> Storage
//! ```
//!
//! A read resolves each block top-down: the top's data or whiteout, else the owner in
//! the resolved lower chain, else zeros. The first partial write to a block held below
//! copies the whole block up; whole-block writes and writes to unheld blocks skip the
//! copy. Deletes are whiteouts in the top. Lower layers are only ever read.
//!
//! The on-disk format is in `format` and specified byte by byte in FORMAT.md.
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

pub use chain::{
    check_link, folder_of, link_problems, open_layer_file, rebase, ChainWalk, LayerId, LayerSource,
    LinkError, LocalFiles, LowerCache, OpenOptions, OpenedLayer, WalkStop, WalkedLayer, MAX_DEPTH,
};
pub use create::{create_child, create_child_with, create_image, ReferenceStyle};
pub use disk::{
    Access, Disk, Extent, ExtentState, LayerInfo, Lower, LowerLayer, ReadPiece, WriteFlags,
    ZeroFlags,
};
pub use error::{FormatError, IoError, IoErrorKind, OpenError};
pub use format::{BlockState, Geometry, Header, LayerState, ParentRef, Uuid, DEFAULT_BLOCK_SIZE};
pub use map::{AllocMap, PendingPages, SlotFinding};
pub use map_slots::SlotEntries;
pub use resolve::{LowerOwner, Mapping, MappingKind};
pub use storage::{FileStorage, ReadStorage, Storage};
