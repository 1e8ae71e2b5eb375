//! AFL++ entry point for the `header` target ([`cowdisk_fuzz::header`]).
fn main() {
    afl::fuzz!(|data: &[u8]| cowdisk_fuzz::header::run(data));
}
