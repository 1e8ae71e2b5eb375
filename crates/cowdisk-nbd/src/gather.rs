//! READs planned as pieces that must be read into memory ([`ReadPiece::Direct`], from
//! files opened for direct I/O): each piece is read into its place in the reply buffer.

use std::os::fd::BorrowedFd;

use crate::reply::DATA_ALIGN;
use crate::{Backend, BackendError, BackendErrorKind, ReadPiece};

/// Whether a plan has pieces that cannot be sent from their file.
pub(crate) fn has_direct(pieces: &[ReadPiece<'_>]) -> bool {
    pieces.iter().any(|p| matches!(p, ReadPiece::Direct { .. }))
}

/// Reads the bytes `pieces` stand for (the read at disk offset `offset`) into `data`, which
/// is exactly as long as the pieces, one `pread` per piece.
pub(crate) fn read_into(
    b: &dyn Backend,
    offset: u64,
    pieces: &[ReadPiece<'_>],
    data: &mut [u8],
) -> Result<(), BackendError> {
    let mut pos = 0usize;
    for p in pieces {
        let n = usize::try_from(p.bytes()).unwrap_or(usize::MAX);
        let Some(dst) = pos.checked_add(n).and_then(|end| data.get_mut(pos..end)) else {
            return Err(BackendError::new(
                BackendErrorKind::Io,
                "backend planned a read of the wrong length",
            ));
        };
        match *p {
            ReadPiece::Zeros(_) => dst.fill(0),
            ReadPiece::File { fd, offset, .. } => pread_full(fd, dst, offset)?,
            ReadPiece::Direct { fd, offset, .. } => pread_direct(fd, dst, offset)?,
            ReadPiece::Staged {
                fd,
                offset: file_offset,
                tag,
                token,
                ..
            } => {
                pread_full(fd, dst, file_offset)?;
                // The cache dropped them meanwhile: the backend reads them again.
                if !b.staged_valid(tag, token) {
                    b.read(offset + pos as u64, dst)?;
                }
            }
        }
        pos += n;
    }
    Ok(())
}

/// `pread` until `dst` is full; a file shorter than planned is an error.
fn pread_full(fd: BorrowedFd<'_>, dst: &mut [u8], offset: u64) -> Result<(), BackendError> {
    let mut done = 0;
    while done < dst.len() {
        match rustix::io::pread(fd, &mut dst[done..], offset + done as u64) {
            Ok(0) => {
                return Err(BackendError::new(
                    BackendErrorKind::Io,
                    format!("layer file ends before offset {}", offset + done as u64),
                ))
            }
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                return Err(BackendError::new(
                    BackendErrorKind::Io,
                    format!("read at layer file offset {}: {e}", offset + done as u64),
                ))
            }
        }
    }
    Ok(())
}

/// A direct read needs aligned memory: where `dst` is not, it goes through a bounce buffer.
fn pread_direct(fd: BorrowedFd<'_>, dst: &mut [u8], offset: u64) -> Result<(), BackendError> {
    let aligned = |n: usize| n.is_multiple_of(DATA_ALIGN);
    if aligned(dst.as_ptr() as usize) && aligned(dst.len()) {
        return pread_full(fd, dst, offset);
    }
    let mut bounce = vec![0u8; dst.len().next_multiple_of(DATA_ALIGN) + DATA_ALIGN];
    let skip = bounce.as_ptr().align_offset(DATA_ALIGN);
    let area = &mut bounce[skip..skip + dst.len().next_multiple_of(DATA_ALIGN)];
    pread_full(fd, area, offset)?;
    dst.copy_from_slice(&area[..dst.len()]);
    Ok(())
}
