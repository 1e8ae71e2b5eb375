//! Command-line arguments (clap derive). The names and flags here are the tool's
//! public interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::serve::ServeArgs;
use crate::size::{parse_block_size, parse_size};

const EXIT_CODES: &str =
    "Exit codes: 0 success, 1 error (see stderr); `check` also returns 2 (corruption found), \
3 (problems found and repaired), 4 (only harmless leaks found).";

/// cowdisk: create, chain, inspect and serve copy-on-write disk images.
#[derive(Debug, Parser)]
#[command(name = "cowdisk", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// No progress bars (they are shown only when stderr is a terminal anyway).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Confine every parent reference to DIR (repeatable; also COWDISK_IMAGE_ROOT,
    /// colon-separated): for hosts that serve images they did not build.
    #[arg(long = "image-root", value_name = "DIR", global = true)]
    pub image_roots: Vec<PathBuf>,
    /// Refuse chains whose metadata (maps, resolution) would take more memory than SIZE
    /// [default: 1G]. Images hold about 40 bytes per 64 MiB of virtual size per layer,
    /// plus 4 KiB per 16K blocks they hold.
    #[arg(long = "max-metadata", value_name = "SIZE", global = true, value_parser = parse_size)]
    pub max_metadata: Option<u64>,
    /// Remote layers (s3:// URLs, AWS_* settings): where fetched blocks are cached, and
    /// how reads that need the store behave.
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new image, standalone (--size) or over a parent (--backing).
    #[command(
        after_help = "Examples:\n  cowdisk create base.cow --size 10G\n  cowdisk create base.cow --size 1T --block-size 1M\n  \
cowdisk create vm1.cow --backing base.cow   # seals base.cow if it was writable\n  \
cowdisk create vm2.cow --backing base.cow --json | jq -r .image.uuid\n  \
cowdisk create vm3.cow --backing s3://images/base/UUID-DIGEST.cdlayer   # fetches only metadata"
    )]
    Create(CreateArgs),
    /// Show every layer of an image's chain, top first.
    #[command(
        after_help = "Example:\n  cowdisk info vm1.cow\n  cowdisk info vm1.cow --json | jq '.layers[0].data_blocks'\n  cowdisk info -U vm1.cow   # while it is being served\n\nRemote layers (s3://): only their metadata is fetched (at open), no data blocks."
    )]
    Info(ImageJson),
    /// Show how the virtual disk maps onto layers (like `qemu-img map`).
    #[command(
        after_help = "Example:\n  cowdisk map vm1.cow\n  cowdisk map vm1.cow --json\n\nRemote layers (s3://): only their metadata is fetched, no data blocks."
    )]
    Map(ImageJson),
    /// Verify headers, maps, checksums and parent links; optionally repair the top.
    #[command(
        after_help = "Example:\n  cowdisk check vm1.cow\n  cowdisk check vm1.cow --repair --json\n\n\
Exit codes: 0 clean, 1 check could not run, 2 corruption found, 3 problems found and all repaired, \
4 only harmless leaks found (run with --repair to reclaim them).\n\
--repair only writes the top layer and never changes what the disk reads as. It keeps data that a\n\
damaged newer map slot may reference (`map_slot_newer`: flushed writes may be lost) and flags the\n\
image needs-check; --repair --discard-unreferenced accepts that loss and drops them.\n\nRemote layers (s3://): every data block is fetched (through the host cache) and verified; --json lists them in remote_layers."
    )]
    Check(CheckArgs),
    /// Freeze the image's content as a sealed layer; the image continues over it.
    #[command(after_help = "Example:\n  cowdisk snapshot vm1.cow vm1-monday.cow\n  \
# vm1.cow is now an empty writable layer over the sealed vm1-monday.cow\n\nRemote layers (s3://): nothing is fetched but their metadata; the new sealed layer is local (push it to share it).")]
    Snapshot(SnapshotArgs),
    /// Throw away the top layer's changes (back to its parent's content).
    #[command(after_help = "Example:\n  cowdisk reset vm1.cow")]
    Reset(ImageArg),
    /// Merge sealed layers below the top into one new sealed layer.
    #[command(
        after_help = "Example:\n  cowdisk squash vm1.cow             # merge every layer below vm1.cow\n  \
cowdisk squash vm1.cow --layers 2  # merge the two layers just below it\n\n\
The merged layer is written beside IMAGE as IMAGE.squash-XXXXXXXX (the first 8 hex digits of its UUID);\n\
the old layer files are left untouched and can be deleted once nothing else uses them.\n\nRemote layers (s3://): the data blocks of the remote layers merged are fetched (through the host cache, each verified);\nthe merged layer is local."
    )]
    Squash(SquashArgs),
    /// Copy an image's content into a new standalone single-layer image.
    #[command(
        after_help = "Example:\n  cowdisk flatten vm1.cow vm1-standalone.cow\n\nRemote layers (s3://): every block the image reads from them is fetched (through the host cache, each verified)."
    )]
    Flatten(SrcDst),
    /// Create an image from a raw disk file (all-zero blocks are not stored).
    #[command(after_help = "Example:\n  cowdisk import disk.raw disk.cow --block-size 64K")]
    Import(ImportArgs),
    /// Write an image's content to a new raw file (sparse: zero ranges left as holes).
    #[command(
        after_help = "Example:\n  cowdisk export vm1.cow vm1.raw\n\nRemote layers (s3://): every block the image reads from them is fetched (through the host cache, each verified)."
    )]
    Export(SrcDst),
    /// Repoint the top layer's parent reference after files were moved.
    #[command(
        after_help = "Example:\n  mv base.cow images/base.cow\n  cowdisk rebase vm1.cow --backing images/base.cow\n\n\
Refused unless the new parent is the same layer (same UUID and seal digest)."
    )]
    Rebase(RebaseArgs),
    /// Export images over NBD.
    ///
    /// Remote layers (s3://): their metadata is fetched at start; a data block is fetched
    /// on its first read or copy-up (in units of 256 KiB or more, one fetch however many
    /// clients want it, each block verified, kept in the host cache); sequential readers
    /// get readahead. --record-trace FILE writes the blocks fetched on demand; --prefetch
    /// FILE fetches a recorded trace's blocks in the background at start.
    Serve(ServeArgs),
    /// Remove a ublk device whose server died (`serve --ublk` killed: /dev/ublkcN stays,
    /// its number taken); refused while a server owns the device.
    #[command(
        name = "ublk-remove",
        after_help = "Example:\n  cowdisk ublk-remove 0    # after /dev/ublkb0's server was killed"
    )]
    UblkRemove(crate::serve::UblkRemoveArgs),
    /// Request counters of a served image (through its server's control socket).
    #[command(after_help = "Example:\n  cowdisk stats vm1.cow --json | jq .exports[0].writes")]
    Stats(StatsArgs),
    /// List the exports of a running server, given its control socket.
    #[command(after_help = "Example:\n  cowdisk exports .vm1.cow.control --json")]
    Exports(ExportsArgs),
    /// Show the extents that may have changed since a snapshot (changed-block tracking).
    #[command(
        after_help = "Example:\n  cowdisk diff vm1.cow --since snap1.cow --json\n\nAn extent is listed when a layer above SNAPSHOT holds it (data or whiteout); the same\nextents are dirty in the NBD context qemu:dirty-bitmap:SNAPSHOT of `cowdisk serve`."
    )]
    Diff(crate::cmd::diff::DiffArgs),
    /// Upload the sealed layers of an image's chain to object storage.
    #[command(after_help = PUSH_HELP)]
    Push(PushArgs),
    /// Download a remote chain as local layer files (for hosts that must run offline).
    #[command(after_help = PULL_HELP)]
    Pull(PullArgs),
}

/// Options for chains with layers in object storage (every command).
#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// Host-wide cache of remote layer blocks, shared by every process (also
    /// COWDISK_CACHE_DIR; default ~/.cache/cowdisk).
    #[arg(long, value_name = "DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Bound of that cache: least recently written layers are evicted (default 8G).
    #[arg(long, value_parser = parse_size, value_name = "SIZE", global = true)]
    pub cache_size: Option<u64>,
    /// A read that needs the store and gets no answer within SECONDS fails with EIO
    /// (other requests go on). Default 30.
    #[arg(long, value_name = "SECONDS", global = true, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub remote_deadline: Option<u64>,
    /// (serve) Write the remote blocks fetched on demand to FILE: a trace for --prefetch.
    #[arg(long, value_name = "FILE", global = true)]
    pub record_trace: Option<PathBuf>,
    /// (serve) Fetch the blocks of a trace recorded by --record-trace in the background,
    /// as each remote layer is opened (warms a cold cache before the blocks are read).
    #[arg(long, value_name = "FILE", global = true)]
    pub prefetch: Option<PathBuf>,
}

/// `push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The image whose sealed layers are pushed (a writable top is not: snapshot it first).
    pub image: PathBuf,
    /// Where: s3://BUCKET/PREFIX.
    pub dest: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// The top layer object: s3://BUCKET/KEY.
    pub url: String,
    /// The folder for the layer files (created if missing).
    pub dir: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The new image file (must not exist).
    pub image: PathBuf,
    /// Virtual size: bytes or K, M, G, T (powers of 1024); a multiple of 512.
    #[arg(long, value_parser = parse_size, required_unless_present = "backing", conflicts_with = "backing")]
    pub size: Option<u64>,
    /// Block size (4K to 1M, power of two). Default 64K.
    #[arg(long, value_parser = parse_block_size, conflicts_with = "backing")]
    pub block_size: Option<u32>,
    /// Parent image (in IMAGE's folder or below it); sealed first if writable. Or a
    /// remote layer object, s3://BUCKET/KEY (as printed by `push`).
    #[arg(long, value_name = "PARENT")]
    pub backing: Option<PathBuf>,
    /// Machine-readable output (schema in README.md, "JSON output").
    #[arg(long)]
    pub json: bool,
}

/// An image and `--json`.
#[derive(Debug, Args)]
pub struct ImageJson {
    /// The image (top layer of a chain).
    pub image: PathBuf,
    /// Machine-readable output (schema in README.md, "JSON output").
    #[arg(long)]
    pub json: bool,
    /// Inspect without taking locks, e.g. an image being served (like `qemu-img -U`);
    /// the view may lag writes that are not flushed yet.
    #[arg(short = 'U', long)]
    pub force_share: bool,
}

/// `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The image (top layer of a chain).
    pub image: PathBuf,
    /// Repair what can be repaired safely (top layer only).
    #[arg(long)]
    pub repair: bool,
    /// With --repair: also accept findings that may mean lost flushed writes
    /// (`map_slot_newer`): fall back to the older map slot for good and punch the data
    /// blocks only the damaged slot may have referenced.
    #[arg(long, requires = "repair")]
    pub discard_unreferenced: bool,
    /// Machine-readable output (schema in README.md, "JSON output").
    #[arg(long)]
    pub json: bool,
}

/// `snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The image to snapshot (stays the writable top).
    pub image: PathBuf,
    /// The new sealed layer file (must not exist; in IMAGE's folder, or below it if IMAGE
    /// has no parent).
    pub snapshot: PathBuf,
    /// Machine-readable output (schema in README.md, "JSON output").
    #[arg(long)]
    pub json: bool,
}

/// A single image.
#[derive(Debug, Args)]
pub struct ImageArg {
    /// The image (top layer of a chain).
    pub image: PathBuf,
    /// Machine-readable output (schema in README.md, "JSON output").
    #[arg(long)]
    pub json: bool,
}

/// `squash`.
#[derive(Debug, Args)]
pub struct SquashArgs {
    /// The image whose lower layers are merged.
    pub image: PathBuf,
    /// How many sealed layers just below the top to merge (default: all).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub layers: Option<u32>,
    /// Copy at most SIZE bytes of block data per second (K, M, G suffixes), leaving the
    /// disk's bandwidth to the clients of a served image.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub rate: Option<u64>,
    /// Machine-readable output (schema in README.md, "JSON output").
    #[arg(long)]
    pub json: bool,
}

/// A source image and a new output file.
#[derive(Debug, Args)]
pub struct SrcDst {
    /// The image.
    pub image: PathBuf,
    /// The output file (must not exist).
    pub output: PathBuf,
    /// Machine-readable output (schema in README.md, "JSON output").
    #[arg(long)]
    pub json: bool,
}

/// `import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The raw disk file to read.
    pub raw: PathBuf,
    /// The new image (must not exist).
    pub image: PathBuf,
    /// Block size (4K to 1M, power of two). Default 64K.
    #[arg(long, value_parser = parse_block_size)]
    pub block_size: Option<u32>,
    /// Machine-readable output (schema in README.md, "JSON output").
    #[arg(long)]
    pub json: bool,
}

/// `rebase`.
#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// The image (writable top) whose parent moved.
    pub image: PathBuf,
    /// The parent's new path.
    #[arg(long, value_name = "NEWPATH")]
    pub backing: PathBuf,
    /// Machine-readable output (schema in README.md, "JSON output").
    #[arg(long)]
    pub json: bool,
}

/// `stats IMAGE`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// A served image.
    pub image: PathBuf,
    /// Machine-readable output (docs/control.md, `stats`).
    #[arg(long)]
    pub json: bool,
}

/// `exports SOCKET`.
#[derive(Debug, Args)]
pub struct ExportsArgs {
    /// A server's control socket (`.IMAGE.control` beside a served image, or `--control`).
    pub socket: PathBuf,
    /// Machine-readable output (docs/control.md, `exports`).
    #[arg(long)]
    pub json: bool,
    /// Export IMAGE too, from now on (as --name, default its file name).
    #[arg(long, value_name = "IMAGE", conflicts_with = "remove")]
    pub add: Option<PathBuf>,
    /// Name of the export --add makes.
    #[arg(long, value_name = "NAME", requires = "add")]
    pub name: Option<String>,
    /// --add the image read-only (a sealed snapshot must be).
    #[arg(long, requires = "add")]
    pub read_only: bool,
    /// Stop exporting NAME, once its clients have disconnected (up to --timeout).
    #[arg(long, value_name = "NAME")]
    pub remove: Option<String>,
    /// With --remove: close the export's connections instead of waiting for them.
    #[arg(long, requires = "remove")]
    pub close: bool,
    /// With --remove: seconds to wait for clients (default 30, at most 3600).
    #[arg(long, value_name = "SECS", requires = "remove")]
    pub timeout: Option<u64>,
}

/// `push --help` epilogue.
pub const PUSH_HELP: &str = "Example:\n  cowdisk snapshot vm1.cow vm1-gold.cow\n  \
URL=$(cowdisk push vm1.cow s3://images/gold)\n  cowdisk create vm2.cow --backing \"$URL\"\n\n\
Uploads each sealed layer the bucket does not hold yet, as one object named by its UUID and seal\n\
digest (PREFIX/UUID-DIGEST.cdlayer): its metadata plus the data it holds, never its virtual size.\n\
An object appears only once complete. Prints the URL of the topmost sealed layer.\n\
Store settings: AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /\n\
AWS_SESSION_TOKEN or AWS_PROFILE with the shared credentials and config files; none: anonymous.";

/// `pull --help` epilogue.
pub const PULL_HELP: &str =
    "Example:\n  cowdisk pull s3://images/gold/UUID-DIGEST.cdlayer /var/lib/images\n  \
cowdisk create vm1.cow --backing /var/lib/images/UUID-DIGEST.cow\n\n\
Fetches every layer of the chain (each block verified against its CRC; blocks already in the\n\
host cache are not fetched again) and writes sparse sealed layer files named UUID-DIGEST.cow.\n\
Prints the top layer file's path.";
