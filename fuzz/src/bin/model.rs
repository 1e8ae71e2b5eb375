//! AFL++ entry point for the `model` target ([`cowdisk_fuzz::model`]).
fn main() {
    afl::fuzz!(|data: &[u8]| cowdisk_fuzz::model::run(data));
}
