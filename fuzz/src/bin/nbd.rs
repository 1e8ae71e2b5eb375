//! AFL++ entry point for the `nbd` target ([`cowdisk_fuzz::nbd`]).
fn main() {
    afl::fuzz!(|data: &[u8]| cowdisk_fuzz::nbd::run(data));
}
