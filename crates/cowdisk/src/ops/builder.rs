//! Writing a whole new layer file in bulk (import, flatten, squash): blocks go into a
//! temp file beside the target; `finish` syncs data, then the map, optionally seals,
//! and renames the file into place without replacing anything. Until then the target
//! name does not exist; a builder dropped unfinished deletes its temp file.

use std::path::{Path, PathBuf};

use cowdisk_core::create::rename_noreplace;
use cowdisk_core::layer::{commit_seal, create_on, read_header};
use cowdisk_core::AllocMap;
use cowdisk_core::{BlockState, FileStorage, Header, Storage};

use super::exists;
use crate::error::{Error, Result};
use crate::failpoint;
use cowdisk_core::layer::prepare_seal;

/// Data stored by a [`LayerBuilder`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    /// Blocks stored as data.
    pub data_blocks: u64,
    /// Bytes of block data written.
    pub bytes: u64,
}

/// A new layer being written.
pub struct LayerBuilder {
    written: Written,
    target: PathBuf,
    tmp: Option<PathBuf>,
    storage: FileStorage,
    header: Header,
    map: AllocMap,
    tag: &'static str,
}

impl LayerBuilder {
    /// Starts a layer that will be installed at `target` (which must not exist).
    /// `tag` names the temp file (`.TARGET.TAG-UUID.tmp`) and the failpoints.
    pub fn create(target: &Path, header: Header, tag: &'static str) -> Result<LayerBuilder> {
        if exists(target) {
            return Err(Error::invalid(target, "already exists"));
        }
        // Locked while we write it, so a later run can tell it from a killed run's.
        let (tmp, file) = super::temp::create_locked(target, tag)?;
        let storage = FileStorage::new(file);
        if let Err(e) = create_on(&storage, &tmp, &header) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        let map = AllocMap::new(&header.geometry);
        Ok(LayerBuilder {
            written: Written::default(),
            target: target.to_path_buf(),
            tmp: Some(tmp),
            storage,
            header,
            map,
            tag,
        })
    }

    /// What has been stored so far (for the command's report).
    pub fn written(&self) -> Written {
        self.written
    }

    /// The new layer's header (UUID, geometry, parent).
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn tmp_path(&self) -> &Path {
        self.tmp.as_deref().unwrap_or(&self.target)
    }

    /// Stores `data` (the block's bytes, at most one block) as block `b`.
    pub fn write_block(&mut self, b: u64, data: &[u8]) -> Result<()> {
        let off = self.header.geometry.block_offset(b);
        self.storage
            .write_at(data, off)
            .map_err(|e| Error::os(self.tmp_path(), "write block", e))?;
        self.map.set(b, BlockState::Data);
        self.written.data_blocks += 1;
        self.written.bytes += data.len() as u64;
        if self.written.data_blocks == 1 {
            failpoint::hit(&format!("{}.after_first_block", self.tag));
        }
        Ok(())
    }

    /// Marks block `b` as a whiteout (reads zeros, hides lower layers).
    pub fn whiteout(&mut self, b: u64) {
        self.map.set(b, BlockState::Zero);
    }

    /// Syncs data then map, seals if asked, renames into place. Returns the final header.
    pub fn finish(mut self, seal: bool) -> Result<Header> {
        let tmp = self.tmp_path().to_path_buf();
        let g = self.header.geometry;
        let pending = self.map.take_dirty();
        self.storage
            .sync()
            .map_err(|e| Error::os(&tmp, "sync data", e))?;
        self.map
            .write_back(&self.storage, &g, &pending)
            .map_err(|(_, e)| Error::os(&tmp, "write allocation map", e))?;
        failpoint::hit(&format!("{}.after_temp", self.tag));
        if seal {
            let loaded = read_header(&self.storage, &tmp)?;
            let digest = prepare_seal(&self.storage, &tmp, &loaded.header, &self.map)?;
            self.header = commit_seal(&self.storage, &tmp, &loaded, digest)?;
            failpoint::hit(&format!("{}.after_seal", self.tag));
        }
        rename_noreplace(&tmp, &self.target)?;
        self.tmp = None;
        failpoint::hit(&format!("{}.after_rename", self.tag));
        Ok(self.header.clone())
    }
}

impl Drop for LayerBuilder {
    fn drop(&mut self) {
        if let Some(t) = self.tmp.take() {
            let _ = std::fs::remove_file(t);
        }
    }
}
