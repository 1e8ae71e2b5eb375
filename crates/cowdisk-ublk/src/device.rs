//! The device's life: add it to the driver, run one thread per queue, start it, wait
//! for a stop request (or for the queues to end on their own), remove it, flush.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkFlags, UblkIORes};

use crate::pool::{self, Job, Pool};
use crate::request::Request;
use crate::{Device, Options, ServeError, SharedTarget, Target};

const CONTROL: &str = "/dev/ublk-control";

/// Asks a running [`serve`] to remove its device and return; clones share the request.
/// Safe to call from any thread, before or after the device is up.
#[derive(Clone, Default)]
pub struct Stop(Arc<(Mutex<bool>, Condvar)>);

impl Stop {
    /// A stop not yet requested.
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Requests the stop.
    pub fn request(&self) {
        let (flag, cv) = &*self.0;
        *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// Waits up to `timeout` for the request; true once it was made.
    fn wait(&self, timeout: Duration) -> bool {
        let (flag, cv) = &*self.0;
        let g = flag.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = cv
            .wait_timeout_while(g, timeout, |stop| !*stop)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

fn check(opts: &Options) -> Result<(), ServeError> {
    if !(1..=32).contains(&opts.queues) {
        return Err(ServeError::Options("queues must be 1-32"));
    }
    if !(1..=1024).contains(&opts.depth) {
        return Err(ServeError::Options("depth must be 1-1024"));
    }
    if !(1..=64).contains(&opts.threads) {
        return Err(ServeError::Options("threads must be 1-64"));
    }
    if opts.max_io_bytes < 4096
        || !opts.max_io_bytes.is_multiple_of(4096)
        || opts.max_io_bytes > 1 << 30
    {
        return Err(ServeError::Options(
            "the largest request must be a multiple of 4096 up to 1 GiB",
        ));
    }
    if !opts.discard_granularity.is_power_of_two() || opts.discard_granularity < 4096 {
        return Err(ServeError::Options(
            "discard granularity must be a power of two of at least 4096",
        ));
    }
    Ok(())
}

/// The block-layer limits and attributes of the device.
fn set_params(dev: &mut UblkDev, target: &dyn Target, opts: &Options) {
    let size = target.size();
    dev.tgt.dev_size = size;
    // A volatile cache and FUA: the kernel then sends FLUSH (the engine's durable flush)
    // and FUA writes, so fsync and journal commits reach the image's metadata.
    let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    let mut types = sys::UBLK_PARAM_TYPE_BASIC;
    if target.read_only() {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    } else {
        types |= sys::UBLK_PARAM_TYPE_DISCARD;
    }
    // Discards and write-zeroes carry no data: large ones cost one request, and the
    // engine turns whole blocks into whiteouts. 1 GiB bounds the time one takes.
    let max_zero_sectors = (1u32 << 30) >> 9;
    dev.tgt.params = sys::ublk_params {
        types,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors: opts.max_io_bytes >> 9,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_granularity: opts.discard_granularity,
            max_discard_sectors: max_zero_sectors,
            max_write_zeroes_sectors: max_zero_sectors,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
}

/// Serves `target` as a new `/dev/ublkbN` until `stop` is requested (or the device is
/// removed by someone else), then removes the device and flushes the target.
/// `started` runs once the device exists, with its path. Requests failing in the target
/// complete with its errno; a panic in the target is an `EIO` for that request.
pub fn serve(
    target: SharedTarget,
    opts: &Options,
    stop: &Stop,
    started: impl FnOnce(&Device) + Send + Sync + 'static,
) -> Result<(), ServeError> {
    if !Path::new(CONTROL).exists() {
        return Err(ServeError::NoDriver);
    }
    check(opts)?;
    if target.size() < 512 {
        return Err(ServeError::TooSmall(target.size()));
    }
    let driver = |op| move |e| ServeError::driver(op, e);
    let ctrl = UblkCtrlBuilder::default()
        .name("cowdisk")
        .id(-1)
        .nr_queues(opts.queues)
        .depth(opts.depth)
        .io_buf_bytes(opts.max_io_bytes)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(driver("add"))?;
    // Queue threads still serving; when it drops to zero the device went away under us.
    let running = Arc::new(AtomicUsize::new(usize::from(opts.queues)));
    let threads = usize::from(opts.threads);
    let queue = {
        let (target, running) = (target.clone(), running.clone());
        move |qid: u16, dev: &UblkDev| {
            serve_queue(qid, dev, &*target, threads);
            running.fetch_sub(1, SeqCst);
        }
    };
    let stop_wait = stop.clone();
    let until_stopped = move |ctrl: &UblkCtrl| {
        let id = ctrl.dev_info().dev_id;
        started(&Device {
            id,
            path: PathBuf::from(ctrl.get_bdev_path()),
        });
        while !stop_wait.wait(Duration::from_millis(200)) && running.load(SeqCst) > 0 {}
        // Stops the device: the kernel fails what is queued, aborts the queues' commands
        // (their threads return) and removes /dev/ublkbN. Fails only if already stopped.
        let _ = ctrl.kill_dev();
    };
    let params = |dev: &mut UblkDev| {
        set_params(dev, &*target, opts);
        Ok(())
    };
    ctrl.run_target(params, queue, until_stopped)
        .map_err(driver("start"))?;
    // Every request was answered before the queues ended; make the writes durable
    // before the device number is released (dropping `ctrl` deletes the device).
    let flushed = target.flush().map_err(ServeError::Flush);
    drop(ctrl);
    flushed
}

/// Removes device `id` left behind by a server that died (SIGKILL, crash): the driver has
/// then failed its I/O and removed `/dev/ublkbN`, but `/dev/ublkcN` stays, its number taken,
/// until someone deletes it. Refused for a device that is live or waiting for recovery
/// (its server, or one recovering it, still owns it).
pub fn remove_dead(id: u32) -> Result<(), ServeError> {
    if !Path::new(CONTROL).exists() {
        return Err(ServeError::NoDriver);
    }
    let n = i32::try_from(id).map_err(|_| ServeError::Options("no such device number"))?;
    let ctrl = UblkCtrl::new_simple(n).map_err(|e| ServeError::driver("find", e))?;
    ctrl.read_dev_info()
        .map_err(|e| ServeError::driver("query", e))?;
    let info = ctrl.dev_info();
    // A device being set up is DEAD until it starts: its server is alive, though.
    let server_alive =
        info.ublksrv_pid > 0 && Path::new(&format!("/proc/{}", info.ublksrv_pid)).exists();
    if u32::from(info.state) != sys::UBLK_S_DEV_DEAD || server_alive {
        return Err(ServeError::NotDead {
            id,
            pid: info.ublksrv_pid,
        });
    }
    ctrl.del_dev()
        .map_err(|e| ServeError::driver("delete", e))?;
    Ok(())
}

/// One queue: fetches requests into this queue's buffers and answers them, until the
/// device stops. With one thread the queue thread runs each request itself, in order;
/// with more, a [`Pool`] of `threads` workers runs them in parallel.
fn serve_queue(qid: u16, dev: &UblkDev, target: &dyn Target, threads: usize) {
    let mut bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            eprintln!("cowdisk: ublk queue {qid}: cannot start: {e}");
            return;
        }
    };
    // The buffers' memory does not move with the Vec; the driver keeps their addresses.
    let slices = bufs.iter_mut().map(|b| Some(b.as_mut_slice())).collect();
    std::thread::scope(|scope| {
        let pool = if threads > 1 {
            match Pool::start(scope, threads, target) {
                Ok(p) => Some(p),
                Err(e) => {
                    eprintln!(
                        "cowdisk: ublk queue {qid}: no worker threads ({e}): one request at a time"
                    );
                    None
                }
            }
        } else {
            None
        };
        let mut q = Queue {
            qid,
            target,
            slices,
            pool,
            done: Vec::new(),
        };
        q.arm(&queue);
        queue.wait_and_handle_io(move |uq: &UblkQueue, tag: u16, ctx: &UblkIOCtx| {
            q.handle(uq, tag, ctx);
        });
    });
}

/// What a queue thread keeps between requests.
struct Queue<'b, 't> {
    qid: u16,
    target: &'t dyn Target,
    /// Each tag's buffer, `None` while a worker has it.
    slices: Vec<Option<&'b mut [u8]>>,
    pool: Option<Pool<'b>>,
    /// Finished requests being answered, kept so a wake-up allocates nothing.
    done: Vec<pool::Done<'b>>,
}

/// The user data of the poll on the workers' pipe: a target I/O, so libublk hands its
/// completion to the handler rather than counting it as a ublk command.
fn poll_user_data() -> u64 {
    UblkIOCtx::build_user_data(0, 0, 0, true)
}

impl<'b> Queue<'b, '_> {
    /// Polls the workers' pipe (once: a poll is re-armed after each wake-up).
    fn arm(&self, uq: &UblkQueue) {
        let Some(pool) = &self.pool else { return };
        let fd = io_uring::types::Fd(pool.wake_fd().as_raw_fd());
        let sqe = io_uring::opcode::PollAdd::new(fd, libc::POLLIN as u32)
            .build()
            .user_data(poll_user_data());
        if let Err(e) = uq.ublk_submit_sqe_sync(sqe) {
            eprintln!(
                "cowdisk: ublk queue {}: cannot poll for completions: {e}",
                self.qid
            );
        }
    }

    fn handle(&mut self, uq: &UblkQueue, tag: u16, ctx: &UblkIOCtx) {
        if ctx.is_tgt_io() {
            // The poll's result is the ready events, or a negative errno (then nothing
            // is read: the pipe may be empty, and a read would block the queue).
            self.finish_done(uq, ctx.result() > 0);
            return;
        }
        let iod = *uq.get_iod(tag);
        let req = Request::decode(iod.op_flags, iod.start_sector, iod.nr_sectors);
        let Some(buf) = self.slices.get_mut(usize::from(tag)).and_then(Option::take) else {
            return;
        };
        // A request that waits for no other (the only one of its wake-up, none with the
        // workers) runs here: a hand-off would only add two thread switches to its
        // latency. Flushes and the like may take long and always go to a worker.
        let idle = self.pool.as_ref().is_none_or(|p| p.in_flight == 0);
        let alone = idle && ctx.is_first_cqe() && ctx.is_last_cqe() && req.is_data();
        let buf = match &mut self.pool {
            Some(pool) if !alone => match pool.submit(Job { tag, req, buf }) {
                Ok(()) => return,
                // The workers are gone (they never should be): answer it here.
                Err(job) => job.buf,
            },
            _ => buf,
        };
        let res = pool::run(req, self.target, buf);
        self.finish(uq, tag, buf, res);
    }

    /// The workers finished something: answers every finished request, polls again.
    fn finish_done(&mut self, uq: &UblkQueue, readable: bool) {
        let Some(pool) = &mut self.pool else { return };
        let mut done = std::mem::take(&mut self.done);
        if readable {
            pool.take_done(&mut done);
        }
        let idle = pool.in_flight == 0;
        for d in done.drain(..) {
            self.finish(uq, d.tag, d.buf, d.res);
        }
        self.done = done;
        // A stopping queue gets no new requests: once idle, nothing is left to wake for.
        if !(uq.is_stopping() && idle) {
            self.arm(uq);
        }
    }

    /// Completes a request and takes its buffer back for the tag's next one.
    fn finish(&mut self, uq: &UblkQueue, tag: u16, buf: &'b mut [u8], res: i32) {
        if let Err(e) =
            uq.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(res)))
        {
            eprintln!(
                "cowdisk: ublk queue {}: cannot complete a request: {e}",
                self.qid
            );
        }
        if let Some(slot) = self.slices.get_mut(usize::from(tag)) {
            *slot = Some(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_before_the_driver_is_asked() {
        assert!(check(&Options::default()).is_ok());
        let bad = [
            Options {
                queues: 0,
                ..Options::default()
            },
            Options {
                depth: 0,
                ..Options::default()
            },
            Options {
                threads: 0,
                ..Options::default()
            },
            Options {
                max_io_bytes: 1000,
                ..Options::default()
            },
            Options {
                discard_granularity: 512,
                ..Options::default()
            },
        ];
        for o in bad {
            assert!(matches!(check(&o), Err(ServeError::Options(_))), "{o:?}");
        }
    }

    #[test]
    fn a_stop_requested_early_is_not_lost() {
        let s = Stop::new();
        assert!(!s.wait(Duration::from_millis(1)));
        s.clone().request();
        assert!(s.wait(Duration::from_secs(5)));
    }
}
