//! The cowdisk command-line tool (being written).
fn main() {}
