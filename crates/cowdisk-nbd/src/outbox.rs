//! One connection's reply stream, written by one thread at a time, whole replies only.
//!
//! A thread with a small reply ready while another is writing leaves a copy in a queue and
//! goes back to work; the writing thread sends what is queued, several replies per system
//! call, before it lets go. Waiting for the writer instead cost a sleep and a wake-up per
//! reply: at queue depth 16 most replies found it busy.
//!
//! Memory stays bounded: the queue holds at most [`QUEUE_BYTES`], only replies of up to
//! [`QUEUE_REPLY`] bytes are queued, a thread finding no room waits for the writer, and at
//! most [`SPARE_BUFFERS`] small buffers are kept for reuse.

use std::io::{self, IoSlice, Write};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Largest reply left in the queue (a 16 KiB READ with its header); larger ones wait.
const QUEUE_REPLY: usize = 16 * 1024 + 64;

/// Most bytes of replies queued for the writer per connection.
const QUEUE_BYTES: usize = 64 * 1024;

/// Most spare queue buffers kept for reuse, each of at most [`SPARE_CAPACITY`] bytes: a
/// connection's queue then keeps at most 128 KiB.
const SPARE_BUFFERS: usize = 16;
const SPARE_CAPACITY: usize = 4096 + 64;

/// Most replies sent in one system call.
const BATCH: usize = 64;

pub(crate) struct Outbox<W> {
    /// Only locked by the thread that set `State::writing`, so never waited for.
    w: Mutex<W>,
    state: Mutex<State>,
    /// Signalled when the writer lets go while threads wait for it.
    idle: Condvar,
}

#[derive(Default)]
struct State {
    /// A thread holds the socket (and will write `queued` before it lets go).
    writing: bool,
    queued: Vec<Vec<u8>>,
    queued_bytes: usize,
    /// Threads waiting for `writing` to clear.
    waiting: usize,
    spare: Vec<Vec<u8>>,
}

impl<W: Write> Outbox<W> {
    pub fn new(w: W) -> Self {
        Self {
            w: Mutex::new(w),
            state: Mutex::new(State::default()),
            idle: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one whole reply: queued for the writing thread if one is busy and there is
    /// room, written by this thread otherwise. An error means this thread's write failed;
    /// the replies queued with it are lost with the connection.
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        self.send_all(&[bytes])
    }

    /// Sends whole replies, [`BATCH`] per system call when this thread writes them.
    pub fn send_all(&self, replies: &[&[u8]]) -> io::Result<()> {
        {
            let mut st = self.state();
            let bytes: usize = replies.iter().map(|r| r.len()).sum();
            if st.writing
                && replies.iter().all(|r| r.len() <= QUEUE_REPLY)
                && st.queued_bytes + bytes <= QUEUE_BYTES
            {
                for r in replies {
                    let mut b = st.spare.pop().unwrap_or_default();
                    b.clear();
                    b.extend_from_slice(r);
                    st.queued.push(b);
                }
                st.queued_bytes += bytes;
                return Ok(());
            }
        }
        self.write(|w| write_batch(w, replies))
    }

    /// Runs `f` with the socket to itself (waiting for the writing thread to let go), then
    /// writes what other threads queued meanwhile.
    pub fn write(&self, f: impl FnOnce(&mut W) -> io::Result<()>) -> io::Result<()> {
        let mut st = self.state();
        while st.writing {
            st.waiting += 1;
            st = self.idle.wait(st).unwrap_or_else(|e| e.into_inner());
            st.waiting -= 1;
        }
        st.writing = true;
        drop(st);
        let mut w = self.w.lock().unwrap_or_else(|e| e.into_inner());
        let mut res = f(&mut w);
        let mut batch: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut st = self.state();
            for b in batch.drain(..) {
                if st.spare.len() < SPARE_BUFFERS && b.capacity() <= SPARE_CAPACITY {
                    st.spare.push(b);
                }
            }
            if st.queued.is_empty() || res.is_err() {
                st.queued.clear();
                st.queued_bytes = 0;
                st.writing = false;
                if st.waiting > 0 {
                    self.idle.notify_one();
                }
                return res;
            }
            std::mem::swap(&mut batch, &mut st.queued);
            st.queued_bytes = 0;
            drop(st);
            res = write_batch(&mut *w, &batch);
        }
    }
}

/// Writes every buffer of `batch` in full, up to [`BATCH`] per system call.
fn write_batch<W: Write, B: AsRef<[u8]>>(w: &mut W, batch: &[B]) -> io::Result<()> {
    for group in batch.chunks(BATCH) {
        let mut slices: Vec<IoSlice<'_>> = group.iter().map(|b| IoSlice::new(b.as_ref())).collect();
        let mut left = &mut slices[..];
        while !left.is_empty() {
            match w.write_vectored(left) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut left, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer that takes at most `max` bytes per call and records each call.
    struct Slow {
        out: Vec<u8>,
        calls: usize,
        max: usize,
    }

    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(self.max - n);
                self.out.extend_from_slice(&b[..k]);
                n += k;
                if n == self.max {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A socket the client does not read: each write waits for a permit.
    struct Gated {
        permits: std::sync::mpsc::Receiver<()>,
        out: Vec<u8>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.permits.recv().map_err(|_| io::ErrorKind::BrokenPipe)?;
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_socket_queues_at_most_the_bound_then_senders_wait() {
        let (permit, permits) = std::sync::mpsc::channel();
        let ob = Arc::new(Outbox::new(Gated {
            permits,
            out: Vec::new(),
        }));
        let threads: Vec<_> = (0..5u8)
            .map(|t| {
                let ob = Arc::clone(&ob);
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        ob.send(&[t; 1000]).unwrap();
                    }
                })
            })
            .collect();
        // One thread is stuck writing; the others fill the queue and then wait.
        std::thread::sleep(std::time::Duration::from_millis(300));
        {
            let st = ob.state();
            assert!(st.writing);
            assert!(st.queued_bytes <= QUEUE_BYTES, "{} queued", st.queued_bytes);
            assert!(
                st.queued_bytes + 1000 > QUEUE_BYTES,
                "the queue did not fill"
            );
        }
        // The client reads again: everything goes out.
        for _ in 0..100_000 {
            let _ = permit.send(());
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ob.w.lock().unwrap().out.len(), 500 * 1000);
    }

    #[test]
    fn short_writes_still_send_whole_replies() {
        let batch: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 7 + i as usize]).collect();
        let mut w = Slow {
            out: Vec::new(),
            calls: 0,
            max: 13,
        };
        write_batch(&mut w, &batch).unwrap();
        assert_eq!(w.out, batch.concat());
    }

    #[test]
    fn replies_sent_from_many_threads_never_interleave() {
        let ob = Arc::new(Outbox::new(Slow {
            out: Vec::new(),
            calls: 0,
            max: 5,
        }));
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let ob = Arc::clone(&ob);
                std::thread::spawn(move || {
                    for i in 0..500u32 {
                        // Some too large to queue, so both ways are taken.
                        let len = if i % 50 == 0 { QUEUE_REPLY + 1 } else { 9 };
                        let mut r = vec![t; len];
                        r[1..5].copy_from_slice(&i.to_le_bytes());
                        r[5..9].copy_from_slice(&(len as u32).to_le_bytes());
                        ob.send(&r).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let w = ob.w.lock().unwrap();
        let mut seen = vec![0u32; 8];
        let mut rest = &w.out[..];
        while !rest.is_empty() {
            let t = rest[0];
            let i = u32::from_le_bytes(rest[1..5].try_into().unwrap());
            let len = u32::from_le_bytes(rest[5..9].try_into().unwrap()) as usize;
            assert!(rest[9..len].iter().all(|&b| b == t), "a reply was split");
            // Each thread's replies go out in the order it sent them.
            assert_eq!(i, seen[t as usize]);
            seen[t as usize] += 1;
            rest = &rest[len..];
        }
        assert_eq!(seen, vec![500; 8]);
        assert!(ob.state().queued.is_empty());
    }
}
