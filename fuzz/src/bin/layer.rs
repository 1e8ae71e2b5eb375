//! AFL++ entry point for the `layer` target ([`cowdisk_fuzz::layer`]).
fn main() {
    afl::fuzz!(|data: &[u8]| cowdisk_fuzz::layer::run(data));
}
