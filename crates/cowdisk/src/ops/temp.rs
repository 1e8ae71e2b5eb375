//! Temp files of the commands that write a whole new file (`import`, `flatten`,
//! `export`): `.TARGET.TAG-UUID.tmp` beside the target. The writer holds an exclusive
//! `flock` on it for its whole life, so a temp file nobody has locked was left by a
//! killed run: the next run of the same command for the same target removes it, and
//! `check` lists it. A locked one belongs to a live process and is never touched.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cowdisk_core::create::temp_path;
use cowdisk_core::folder_of;

use super::file_name;
use crate::error::{Error, Result};

/// The commands whose temp files are swept and reported.
pub const TAGS: [&str; 3] = ["import", "flatten", "export"];

/// Creating a temp file is retried when a sweeper removed it between our create and
/// our lock (it saw it unlocked); after this many tries something else is wrong.
const CREATE_TRIES: usize = 8;

/// A temp file nobody holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// Its path.
    pub path: PathBuf,
    /// The file name it was meant to become.
    pub target: String,
    /// The command that wrote it (one of [`TAGS`]).
    pub tag: &'static str,
    /// Its length in bytes.
    pub len: u64,
}

/// Creates a new temp file beside `target` for command `tag` and locks it. The lock is
/// held as long as the returned file is open (also after a rename into place).
pub fn create_locked(target: &Path, tag: &str) -> Result<(PathBuf, File)> {
    for _ in 0..CREATE_TRIES {
        let tmp = temp_path(target, tag);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::os(&tmp, "create", e))?;
        // Blocks only while a sweeper looks at it (it holds the lock for a moment).
        file.lock().map_err(|e| Error::os(&tmp, "lock", e))?;
        if same_file(&file, &tmp) {
            return Ok((tmp, file));
        }
        // A sweeper saw it before we locked it and removed it: take another name.
    }
    Err(Error::invalid(
        target,
        "temp files beside it keep disappearing",
    ))
}

/// True if `path` still names the file open as `file`.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), path.symlink_metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Splits a temp file name `.TARGET.TAG-UUID.tmp` (TAG one of [`TAGS`]) into target and
/// tag. Strict, so no file of the user's is ever taken for a temp file.
pub fn parse(name: &str) -> Option<(&str, &'static str)> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let cut = rest.len().checked_sub(37)?;
    let (head, uuid) = (rest.get(..cut)?, rest.get(cut + 1..)?);
    if rest.as_bytes()[cut] != b'-' || !is_uuid(uuid) {
        return None;
    }
    TAGS.iter().find_map(|&tag| {
        let target = head.strip_suffix(tag)?.strip_suffix('.')?;
        (!target.is_empty()).then_some((target, tag))
    })
}

/// `8-4-4-4-12` lowercase hex digits, as `Uuid`'s `Display` writes them.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

/// Opens `path` (regular files only, no symlinks) and tries its lock: `Some(file)` holding
/// the lock if it is a regular file nobody holds.
fn lock_if_unheld(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Never open a device or FIFO that merely carries a temp file's name.
    if !path.symlink_metadata().ok()?.is_file() {
        return None;
    }
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    file.try_lock().ok()?;
    Some(file)
}

/// The unlocked temp files in `dir`; with `only = Some((target, tag))` just that
/// command's for that target.
pub fn stale_in(dir: &Path, only: Option<(&str, &str)>) -> Vec<Stale> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((target, tag)) = parse(&name) else {
            continue;
        };
        if only.is_some_and(|o| o != (target, tag)) {
            continue;
        }
        let path = e.path();
        // Dropped at once: listing must not keep a live writer waiting.
        if let Some(f) = lock_if_unheld(&path) {
            let len = f.metadata().map_or(0, |m| m.len());
            out.push(Stale {
                target: target.to_string(),
                tag,
                len,
                path,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Removes `path` if nobody holds its lock (checked again, under our own lock).
/// Returns whether it was removed.
pub fn remove_if_stale(path: &Path) -> Result<bool> {
    let Some(f) = lock_if_unheld(path) else {
        return Ok(false);
    };
    if !same_file(&f, path) {
        return Ok(false);
    }
    std::fs::remove_file(path).map_err(|e| Error::os(path, "remove stale temp file", e))?;
    Ok(true)
}

/// Removes the stale temp files an earlier, killed run of command `tag` left for
/// `target`, before this run makes its own.
pub fn sweep(target: &Path, tag: &str) -> Result<()> {
    let name = file_name(target);
    for s in stale_in(&folder_of(target), Some((&name, tag))) {
        remove_if_stale(&s.path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_only_exact_temp_names() {
        let u = "0123abcd-0123-4567-89ab-0123456789ab";
        assert_eq!(
            parse(&format!(".a.cow.flatten-{u}.tmp")),
            Some(("a.cow", "flatten"))
        );
        assert_eq!(
            parse(&format!(".x-y.raw.export-{u}.tmp")),
            Some(("x-y.raw", "export"))
        );
        for bad in [
            format!("a.cow.flatten-{u}.tmp"),
            format!(".a.cow.squash-{u}.tmp"),
            format!(".flatten-{u}.tmp"),
            format!(".a.cow.import-{}.tmp", u.to_uppercase()),
            format!(".a.cow.import-{u}x.tmp"),
            format!(".a.cow.import-{u}"),
            ".a.cow.import-.tmp".to_string(),
            ".tmp".to_string(),
        ] {
            assert_eq!(parse(&bad), None, "{bad}");
        }
    }
}
