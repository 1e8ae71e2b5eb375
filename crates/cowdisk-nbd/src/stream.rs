//! One type for TCP and Unix connections, plus a reader with an overall deadline.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};

/// An accepted connection.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) {
        // Fails only if already disconnected, which is the goal anyway.
        let _ = match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        };
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(d),
            Self::Unix(s) => s.set_read_timeout(d),
        }
    }

    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_write_timeout(d),
            Self::Unix(s) => s.set_write_timeout(d),
        }
    }

    pub fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nonblocking(nb),
            Self::Unix(s) => s.set_nonblocking(nb),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
            Stream::Unix(s) => (&*s).write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads with a deadline for the whole exchange, so a client dribbling bytes (slowloris)
/// cannot hold a negotiation slot longer than the handshake timeout, nor a WRITE payload
/// longer than the payload timeout. Without a deadline, reads wait as long as it takes.
pub(crate) struct Deadline<'a> {
    stream: &'a Stream,
    deadline: Option<Instant>,
    /// Whether the socket has a read timeout set (cleared once the deadline is lifted).
    armed: bool,
}

impl<'a> Deadline<'a> {
    pub fn new(stream: &'a Stream, timeout: Duration) -> Self {
        let mut d = Self::none(stream);
        d.set(Some(timeout));
        d
    }

    /// No deadline (yet).
    pub fn none(stream: &'a Stream) -> Self {
        Self {
            stream,
            deadline: None,
            armed: false,
        }
    }

    /// Whether bytes wait on the socket right now (or it hung up): a poll that does not wait.
    pub fn readable_now(&self) -> bool {
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let mut fds = [PollFd::new(self.stream, PollFlags::IN)];
        // An error says nothing about pending bytes; treat it as "maybe" (the cautious answer).
        poll(&mut fds, Some(&zero)).map_or(true, |n| n > 0)
    }

    /// Sets a deadline `timeout` from now, or lifts it.
    pub fn set(&mut self, timeout: Option<Duration>) {
        self.deadline = timeout.map(|t| Instant::now() + t);
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
            self.armed = true;
        } else if self.armed {
            self.stream.set_read_timeout(None)?;
            self.armed = false;
        }
        let mut s = self.stream;
        s.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.stream;
        s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
