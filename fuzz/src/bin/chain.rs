//! AFL++ entry point for the `chain` target ([`cowdisk_fuzz::chain`]).
fn main() {
    afl::fuzz!(|data: &[u8]| cowdisk_fuzz::chain::run(data));
}
