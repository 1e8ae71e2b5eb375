//! Real NBD clients against the `memserve` example. The checks live in `common::checks` and
//! take the server command as a parameter, so they can be reused for `cowdisk serve`.

mod common;

use common::{checks, memserve};

#[test]
fn nbdinfo_size_list_map() {
    checks::nbdinfo(memserve);
}

#[test]
fn qemu_img_and_qemu_io() {
    checks::qemu(memserve);
}

#[test]
fn nbdcopy_round_trip_multi_conn() {
    checks::nbdcopy(memserve);
}

#[test]
fn fio_verify() {
    checks::fio(memserve);
}

#[test]
fn nbd_client_list() {
    checks::nbd_client_list(memserve);
}

#[test]
fn negative_requests_via_libnbd() {
    checks::negative(memserve);
}

#[test]
fn unix_socket_clients() {
    checks::unix_socket(memserve);
}
