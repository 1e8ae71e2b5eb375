//! Export table and per-export protocol facts (flags, block sizes, metadata contexts).

use std::sync::Arc;

use crate::wire::tflags;
use crate::Backend;

/// Context id of `base:allocation` on the wire (ids are per connection; fixed values suffice).
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;
/// Context id of `qemu:allocation-depth`.
pub(crate) const ALLOCATION_DEPTH_ID: u32 = 2;
/// Context id of the one `qemu:dirty-bitmap:NAME` a connection may select.
pub(crate) const DIRTY_BITMAP_ID: u32 = 3;
pub(crate) const DIRTY_BITMAP_PREFIX: &[u8] = b"qemu:dirty-bitmap:";
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";
pub(crate) const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// One named export.
#[derive(Clone)]
pub(crate) struct Export {
    pub name: String,
    pub description: Option<String>,
    pub backend: Arc<dyn Backend>,
}

impl Export {
    /// Transmission flags for this export; `DF` only makes sense with structured replies.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = tflags::HAS_FLAGS | tflags::SEND_CACHE | tflags::CAN_MULTI_CONN;
        if self.backend.is_read_only() {
            f |= tflags::READ_ONLY;
        } else {
            f |= tflags::SEND_FLUSH
                | tflags::SEND_FUA
                | tflags::SEND_TRIM
                | tflags::SEND_WRITE_ZEROES
                | tflags::SEND_FAST_ZERO;
        }
        if structured {
            f |= tflags::SEND_DF;
        }
        f
    }

    /// `(minimum, preferred, maximum)` for `INFO_BLOCK_SIZE`, within the protocol's rules:
    /// min a power of two (qemu refuses sizes not a multiple of it), preferred a power of two
    /// ≥ max(min, 512), maximum ≥ preferred.
    pub fn block_sizes(&self, max_payload: u32) -> (u32, u32, u32) {
        let min = if self.backend.size().is_multiple_of(512) {
            512
        } else {
            1
        };
        let max = max_payload.max(512);
        let pref = self
            .backend
            .preferred_block_size()
            .clamp(512, 1 << 30)
            .next_power_of_two()
            .min(prev_power_of_two(max));
        (min, pref, max)
    }
}

fn prev_power_of_two(v: u32) -> u32 {
    1 << (31 - v.max(1).leading_zeros())
}

/// All exports of a server and the one an empty name selects.
pub(crate) struct Exports {
    list: Vec<Export>,
    default: Option<usize>,
}

impl Exports {
    pub fn new(list: Vec<Export>, default: Option<usize>) -> Self {
        // A lone export is the default even when none was designated.
        let default = default.or((list.len() == 1).then_some(0));
        Self { list, default }
    }

    /// Looks up an export by its wire name; empty selects the default.
    pub fn find(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            return self.default;
        }
        self.list.iter().position(|e| e.name.as_bytes() == name)
    }

    /// The export at `index` (an index returned by [`Exports::find`]).
    pub fn get(&self, index: usize) -> &Export {
        &self.list[index]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Export> {
        self.list.iter()
    }

    /// The same table with `export` added.
    pub fn with(&self, export: Export) -> Exports {
        let mut list = self.list.clone();
        list.push(export);
        Exports {
            list,
            default: self.default,
        }
    }

    /// The same table without the export `name` (and without a default if it was that).
    pub fn without(&self, name: &str) -> Exports {
        let default = self.default.map(|i| self.list[i].name.clone());
        let list: Vec<Export> = self
            .list
            .iter()
            .filter(|e| e.name != name)
            .cloned()
            .collect();
        let default = default.and_then(|d| list.iter().position(|e| e.name == d));
        Exports { list, default }
    }
}

/// Which metadata contexts are selected (or matched by a LIST query).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MetaContexts {
    pub base_allocation: bool,
    pub allocation_depth: bool,
    /// The selected dirty bitmap: the backend's key for it (SET only; one per connection).
    pub dirty_bitmap: Option<u64>,
}

impl MetaContexts {
    pub const ALL: Self = Self {
        base_allocation: true,
        allocation_depth: true,
        dirty_bitmap: None,
    };

    /// Applies one query. LIST also accepts bare namespaces (`base:` → all of `base:`);
    /// SET only exact names. Unknown queries are ignored as the spec requires.
    pub fn add_query(&mut self, q: &[u8], set: bool) {
        match q {
            b"base:allocation" => self.base_allocation = true,
            b"qemu:allocation-depth" => self.allocation_depth = true,
            b"base:" if !set => self.base_allocation = true,
            b"qemu:" if !set => self.allocation_depth = true,
            _ => {}
        }
    }

    pub fn any(&self) -> bool {
        self.base_allocation || self.allocation_depth || self.dirty_bitmap.is_some()
    }

    /// `(id, name)` of the selected fixed contexts (not the dirty bitmap), in a fixed order.
    pub fn entries(&self) -> impl Iterator<Item = (u32, &'static str)> {
        let base = self
            .base_allocation
            .then_some((BASE_ALLOCATION_ID, BASE_ALLOCATION));
        let depth = self
            .allocation_depth
            .then_some((ALLOCATION_DEPTH_ID, ALLOCATION_DEPTH));
        base.into_iter().chain(depth)
    }
}
