//! `cowdisk serve`: exports images over NBD (wired to cowdisk-nbd).

use std::path::PathBuf;

/// Arguments of `cowdisk serve`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  cowdisk serve disk.cow --socket /run/disk.sock\n  nbdinfo 'nbd+unix:///?socket=/run/disk.sock'")]
pub struct ServeArgs {
    /// Images to export (each as an export named after its file name).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// TCP address to listen on (default 127.0.0.1:10809; port 0 picks a free one).
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "socket")]
    pub listen: Option<String>,
    /// Unix socket to listen on (created with mode 0600).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Refuse writes (the top layer is opened read-only too).
    #[arg(long)]
    pub read_only: bool,
    /// Export name (only with a single image).
    #[arg(long, value_name = "NAME")]
    pub export_name: Option<String>,
}

/// Runs the server until SIGINT/SIGTERM. Returns the process exit code.
pub fn run(args: &ServeArgs) -> Result<(), String> {
    let _ = args;
    Err("serve: not wired yet".into())
}
