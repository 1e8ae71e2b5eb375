//! A queue's worker threads: the engine is synchronous, so a queue whose requests ran one
//! after the other on its own thread would answer a deep queue (fio at qd16, a file
//! system's writeback) one request at a time, however many of them wait on the page
//! cache or a copy-up. Workers run them in parallel; the queue thread keeps the ring.
//!
//! A request's buffer travels with it: the queue thread lends the `&mut` slice of that
//! tag's buffer to the worker and gets it back with the result, so no two threads can
//! touch one buffer, and the kernel does not touch it while the request is ours.
//! A worker that finishes pushes its result and writes a byte to a pipe; the queue
//! thread has a poll on the pipe in its ring, so a completion wakes it from its wait for
//! the kernel's next request.

use std::io::{PipeReader, PipeWriter, Read, Write};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::request::Request;
use crate::{Failure, Target};

/// A request handed to a worker, with the buffer it reads into or writes from.
pub(crate) struct Job<'b> {
    pub tag: u16,
    pub req: Request,
    pub buf: &'b mut [u8],
}

/// A request done: its result (bytes moved or a negative errno) and the buffer back.
pub(crate) struct Done<'b> {
    pub tag: u16,
    pub res: i32,
    pub buf: &'b mut [u8],
}

/// The side the queue thread holds.
pub(crate) struct Pool<'b> {
    /// Dropping it (with the pool) ends the workers once the jobs handed out are done.
    jobs: Sender<Job<'b>>,
    done: Arc<Mutex<Vec<Done<'b>>>>,
    wake: PipeReader,
    /// Requests handed out and not yet taken back.
    pub in_flight: usize,
}

/// Runs a request, turning a panic in the target into an EIO for that request: a panic
/// must not take a thread down and leave the device waiting for an answer.
pub(crate) fn run(req: Request, target: &dyn Target, buf: &mut [u8]) -> i32 {
    std::panic::catch_unwind(AssertUnwindSafe(|| req.run(target, buf)))
        .unwrap_or_else(|_| Failure::Io.errno())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<'b> Pool<'b> {
    /// Starts `threads` workers in `scope`; they end once the pool is dropped and the
    /// jobs handed out are done.
    pub fn start<'s>(
        scope: &'s std::thread::Scope<'s, '_>,
        threads: usize,
        target: &'s dyn Target,
    ) -> std::io::Result<Pool<'b>>
    where
        'b: 's,
    {
        let (wake, waker) = std::io::pipe()?;
        let (jobs, rx) = channel::<Job<'b>>();
        let rx = Arc::new(Mutex::new(rx));
        let done = Arc::new(Mutex::new(Vec::new()));
        let waker = Arc::new(waker);
        for _ in 0..threads {
            let (rx, done, waker) = (rx.clone(), done.clone(), waker.clone());
            std::thread::Builder::new()
                .name("cowdisk-ublk-w".into())
                .spawn_scoped(scope, move || worker(&rx, &done, &waker, target))?;
        }
        Ok(Pool {
            jobs,
            done,
            wake,
            in_flight: 0,
        })
    }

    /// The pipe the queue thread polls.
    pub fn wake_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.wake.as_fd()
    }

    /// Hands a request to the workers; the job comes back if they are gone.
    pub fn submit(&mut self, job: Job<'b>) -> Result<(), Job<'b>> {
        self.jobs.send(job).map_err(|e| e.0)?;
        self.in_flight += 1;
        Ok(())
    }

    /// After the pipe polled readable: empties it, then takes every finished request.
    /// The pipe is emptied first so a completion pushed after the take leaves a byte
    /// behind and wakes the queue again. They are appended to `out` (a vector the caller
    /// keeps, so a wake-up allocates nothing).
    pub fn take_done(&mut self, out: &mut Vec<Done<'b>>) {
        // One read cannot block: the poll said there are bytes, and only this thread
        // reads. Fewer than `in_flight` bytes can be waiting, each worker writing one
        // per request; the buffer holds a whole queue's worth.
        let mut bytes = [0u8; 1024];
        let _ = (&self.wake).read(&mut bytes);
        let before = out.len();
        out.append(&mut lock(&self.done));
        self.in_flight -= out.len() - before;
    }
}

fn worker<'b>(
    rx: &Mutex<Receiver<Job<'b>>>,
    done: &Mutex<Vec<Done<'b>>>,
    mut waker: &PipeWriter,
    target: &dyn Target,
) {
    loop {
        // Held only while waiting for the next job: one worker waits, the rest queue
        // behind the lock, and a job goes to exactly one of them.
        let job = lock(rx).recv();
        let Ok(Job { tag, req, buf }) = job else {
            return;
        };
        let res = run(req, target, buf);
        lock(done).push(Done { tag, res, buf });
        // Cannot block: at most two bytes per request of the queue are ever unread
        // (one per completion, and one a drain may have left behind), far below a
        // pipe's capacity.
        let _ = waker.write(&[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Reads fill the buffer with the offset's low byte after a pause, counting how many
    /// run at once; a read at offset 666 panics.
    #[derive(Default)]
    struct Slow {
        now: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }

    impl Target for Slow {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Failure> {
            use std::sync::atomic::Ordering::SeqCst;
            assert_ne!(offset, 666, "a target bug");
            let n = self.now.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(n, SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            self.now.fetch_sub(1, SeqCst);
            buf.fill(offset as u8);
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), Failure> {
            Err(Failure::ReadOnly)
        }
        fn flush(&self) -> Result<(), Failure> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), Failure> {
            Err(Failure::ReadOnly)
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), Failure> {
            Err(Failure::ReadOnly)
        }
    }

    #[test]
    fn requests_run_in_parallel_and_come_back_with_their_buffers() {
        let mut bufs = vec![vec![0u8; 512]; 8];
        let target = Slow::default();
        let mut got = Vec::new();
        std::thread::scope(|scope| {
            let mut pool = Pool::start(scope, 8, &target).unwrap();
            for (tag, buf) in bufs.iter_mut().enumerate() {
                let offset = if tag == 5 { 666 } else { tag as u64 };
                let req = Request::Read { offset, len: 512 };
                let tag = tag as u16;
                assert!(pool.submit(Job { tag, req, buf }).is_ok());
            }
            assert_eq!(pool.in_flight, 8);
            let mut done = Vec::new();
            while pool.in_flight > 0 {
                pool.take_done(&mut done);
                for d in done.drain(..) {
                    got.push((d.tag, d.res, d.buf[0]));
                }
            }
        });
        let most = target.most.load(std::sync::atomic::Ordering::SeqCst);
        assert!(most >= 2, "at most {most} request(s) ran at once");
        got.sort();
        for (tag, res, byte) in got {
            if tag == 5 {
                assert_eq!(res, -libc::EIO, "a panic is an EIO for its request");
            } else {
                assert_eq!((res, byte), (512, tag as u8));
            }
        }
    }
}
