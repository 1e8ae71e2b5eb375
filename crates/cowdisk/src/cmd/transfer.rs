//! `import`, `export`, `flatten`: moving content between images and raw files. All
//! are sparse-aware (all-zero blocks are neither stored nor written) and write their
//! output under a temp name, renamed into place only when complete and synced. Each
//! first removes the temp files a killed earlier run of itself left for the same
//! target (`ops::temp`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cowdisk_core::create::rename_noreplace;
use cowdisk_core::layer::NewLayer;
use cowdisk_core::{Disk, ExtentState, Header, DEFAULT_BLOCK_SIZE};
use rustix::fs::SeekFrom;
use serde_json::{json, Value};

use super::inspect::for_each_extent;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::ops::builder::{LayerBuilder, Written};
use crate::ops::{exists, temp};
use crate::output::{allocated_bytes, layer_json, print_json, report};
use crate::progress::Progress;

/// Calls `f(block, bytes)` for every block of `disk` that holds data and is not all
/// zeros, in order.
fn for_each_data_block(
    disk: &Disk,
    image: &Path,
    label: &'static str,
    show: bool,
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let bs = u64::from(disk.block_size());
    let mut buf = vec![0u8; disk.block_size() as usize];
    let mut progress = Progress::new(label, disk.size(), show);
    for_each_extent(disk, image, |e| {
        if e.state == ExtentState::Data {
            let mut b = e.offset / bs;
            while b * bs < e.offset + e.length {
                let off = b * bs;
                let n = bs.min(disk.size() - off) as usize;
                disk.read(off, &mut buf[..n])
                    .map_err(|err| Error::disk(image, err))?;
                if buf[..n].iter().any(|&x| x != 0) {
                    f(b, &buf[..n])?;
                }
                b += 1;
            }
        }
        progress.set(e.offset + e.length);
        Ok(())
    })?;
    progress.finish();
    Ok(())
}

/// The JSON report of a standalone image built from `source` (flatten, import).
fn new_image_json(source: &Path, output: &Path, h: &Header, w: Written) -> Value {
    json!({
        "source": source.display().to_string(),
        "image": layer_json(output, h),
        "data_blocks": w.data_blocks,
        "bytes_written": w.bytes,
    })
}

/// `flatten IMAGE OUTPUT`: a standalone writable image with the same content.
pub fn flatten(image: &Path, output: &Path, show: bool, json_out: bool) -> Result<()> {
    let disk = super::inspect::open_ro(image, false)?;
    let header = NewLayer {
        virtual_size: disk.size(),
        block_size: disk.block_size(),
        parent: None,
    }
    .header(output)?;
    temp::sweep(output, "flatten")?;
    let mut builder = LayerBuilder::create(output, header, "flatten")?;
    for_each_data_block(&disk, image, "flatten", show, |b, data| {
        builder.write_block(b, data)
    })?;
    let written = builder.written();
    let h = builder.finish(false)?;
    report(
        json_out,
        || new_image_json(image, output, &h, written),
        &[format!(
            "Flattened {} into {}",
            image.display(),
            output.display()
        )],
    );
    Ok(())
}

/// `export IMAGE RAW`: a raw file of the virtual size; zero ranges are holes.
pub fn export(image: &Path, raw: &Path, show: bool, json_out: bool) -> Result<()> {
    let disk = super::inspect::open_ro(image, false)?;
    if exists(raw) {
        return Err(Error::invalid(raw, "already exists"));
    }
    temp::sweep(raw, "export")?;
    let (tmp, file) = temp::create_locked(raw, "export")?;
    let mut written = 0u64;
    let res = (|| {
        file.set_len(disk.size())
            .map_err(|e| Error::os(raw, "set length", e))?;
        let bs = u64::from(disk.block_size());
        for_each_data_block(&disk, image, "export", show, |b, data| {
            written += data.len() as u64;
            file.write_all_at(data, b * bs)
                .map_err(|e| Error::os(raw, "write", e))?;
            if written == data.len() as u64 {
                failpoint::hit("export.after_first_block");
            }
            Ok(())
        })?;
        file.sync_all().map_err(|e| Error::os(raw, "sync", e))?;
        rename_noreplace(&tmp, raw)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return res;
    }
    // Without --json export stays silent, as it always was.
    if json_out {
        print_json(&json!({
            "source": image.display().to_string(),
            "output": raw.display().to_string(),
            "virtual_size": disk.size(),
            "bytes_written": written,
            "allocated_bytes": allocated_bytes(raw),
        }));
    }
    Ok(())
}

/// Next offset at or after `pos` holding data in `file` (`len` if none).
fn next_data(file: &File, pos: u64, len: u64) -> u64 {
    match rustix::fs::seek(file, SeekFrom::Data(pos)) {
        Ok(d) => d.min(len),
        Err(rustix::io::Errno::NXIO) => len,
        Err(_) => pos, // SEEK_DATA unsupported: read everything.
    }
}

/// `import RAW IMAGE`: a new standalone writable image with the raw file's content
/// (its size rounded up to a multiple of 512 bytes).
pub fn import(
    raw: &Path,
    image: &Path,
    block_size: Option<u32>,
    show: bool,
    json_out: bool,
) -> Result<()> {
    // Non-blocking, so a FIFO is refused below instead of waiting for a writer.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(raw)
            .map_err(|e| Error::os(raw, "open", e))?
    };
    let meta = file.metadata().map_err(|e| Error::os(raw, "stat", e))?;
    if !meta.file_type().is_file() {
        return Err(Error::invalid(raw, "not a regular file"));
    }
    let len = meta.len();
    if len == 0 {
        return Err(Error::invalid(raw, "is empty"));
    }
    let size = len.div_ceil(512) * 512;
    let bs = block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    let header = NewLayer {
        virtual_size: size,
        block_size: bs,
        parent: None,
    }
    .header(image)?;
    let g = header.geometry;
    temp::sweep(image, "import")?;
    let mut builder = LayerBuilder::create(image, header, "import")?;
    let bsz = u64::from(bs);
    let mut buf = vec![0u8; bs as usize];
    let mut progress = Progress::new("import", len, show);
    let mut b = 0;
    while b < g.blocks {
        let off = b * bsz;
        let data = next_data(&file, off, len);
        if data >= off + bsz {
            b = data / bsz;
            continue;
        }
        let n = g.block_len(b);
        let have = (len.saturating_sub(off)).min(n as u64) as usize;
        buf[..n].fill(0);
        file.read_exact_at(&mut buf[..have], off)
            .map_err(|e| Error::os(raw, "read", e))?;
        if buf[..n].iter().any(|&x| x != 0) {
            builder.write_block(b, &buf[..n])?;
        }
        progress.set(off + have as u64);
        b += 1;
    }
    progress.finish();
    let written = builder.written();
    let h = builder.finish(false)?;
    report(
        json_out,
        || {
            let mut v = new_image_json(raw, image, &h, written);
            v["source_size"] = json!(len);
            v
        },
        &[format!(
            "Imported {} into {}",
            raw.display(),
            image.display()
        )],
    );
    Ok(())
}
