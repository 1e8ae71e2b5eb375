# Negative protocol checks through libnbd with strict mode off (client-side checks disabled),
# so the server itself must answer each bad request with the exact errno and stay usable.
# Usage: python3 negative.py URI READ_ONLY_URI SIZE
import errno
import sys

import nbd

uri, ro_uri, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
failed = False


def expect(name, want, fn):
    global failed
    try:
        fn()
    except nbd.Error as ex:
        if "command failed" not in (ex.string or ""):
            # libnbd's own checks say otherwise; only a server reply counts here.
            print(f"FAIL {name}: rejected client-side, not by the server ({ex})")
            failed = True
        elif ex.errnum == want:
            print(f"ok   {name}: {errno.errorcode.get(want)}")
        else:
            print(f"FAIL {name}: errnum {ex.errnum}, want {want} ({ex})")
            failed = True
        return
    print(f"FAIL {name}: no error")
    failed = True


h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.get_size() == size, h.get_size()
E, S = errno.EINVAL, errno.ENOSPC
top = 2**64 - 256
expect("read past end", E, lambda: h.pread(512, size))
expect("read straddling end", E, lambda: h.pread(1024, size - 512))
expect("read u64 overflow", E, lambda: h.pread(512, top))
expect("write past end", S, lambda: h.pwrite(b"x" * 512, size))
expect("write straddling end", S, lambda: h.pwrite(b"x" * 1024, size - 512))
expect("write u64 overflow", S, lambda: h.pwrite(b"x" * 512, top))
expect("zero past end", S, lambda: h.zero(512, size))
expect("trim past end", E, lambda: h.trim(512, size))
expect("trim u64 overflow", E, lambda: h.trim(512, top))
expect("cache past end", E, lambda: h.cache(512, size))
expect("block status past end", E, lambda: h.block_status(512, size, lambda *a: 0))
expect("33 MiB write", E, lambda: h.pwrite(bytes(33 * 2**20), 0))
expect("33 MiB read", E, lambda: h.pread(33 * 2**20, 0))
expect("zero-length read", E, lambda: h.pread(0, 0))
expect("zero-length write", E, lambda: h.pwrite(b"", 0))
expect("zero-length trim", E, lambda: h.trim(0, 0))
expect("zero-length zero", E, lambda: h.zero(0, 0))
expect("unknown flag on read", E, lambda: h.pread(512, 0, 0x100))
expect("NO_HOLE on write", E, lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_NO_HOLE))
expect("DF on write", E, lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_DF))
expect("REQ_ONE on trim", E, lambda: h.trim(512, 0, nbd.CMD_FLAG_REQ_ONE))
# Still serving on the same connection after every error.
h.pwrite(b"alive" * 100, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(500, 4096) == b"alive" * 100
h.flush()
h.shutdown()

r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(ro_uri)
assert r.is_read_only()
expect("read-only write", errno.EPERM, lambda: r.pwrite(b"x" * 512, 0))
expect("read-only trim", errno.EPERM, lambda: r.trim(512, 0))
expect("read-only zero", errno.EPERM, lambda: r.zero(512, 0))
assert r.pread(512, 0) == bytes(512)
r.shutdown()
if failed:
    sys.exit(1)
print("ALL OK")
