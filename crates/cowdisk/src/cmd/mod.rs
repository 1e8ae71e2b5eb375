//! One module per command group; [`dispatch`] runs pending-operation recovery on the
//! image before any command opens it.

pub mod check;
pub mod create;
pub mod inspect;
pub mod layers;
pub mod transfer;

use std::io::Write;
use std::path::Path;

use crate::cli::{Cli, Command};
use crate::error::Result;
use crate::ops::{recover, Recovery};
use crate::EXIT_OK;

/// Runs `recover` on `image` and says on stderr what it did.
pub fn recover_noisy(image: &Path) -> Result<()> {
    let r = recover(image)?;
    let msg = match r {
        Recovery::RolledForward(snap) => {
            format!("completed an interrupted snapshot into {}", snap.display())
        }
        Recovery::RolledBack => "undid an interrupted snapshot".into(),
        Recovery::Nothing | Recovery::Cleaned | Recovery::Busy => return Ok(()),
    };
    let _ = writeln!(std::io::stderr(), "cowdisk: {}: {msg}", image.display());
    Ok(())
}

/// Runs the parsed command; returns the exit code.
pub fn dispatch(cli: &Cli) -> Result<i32> {
    let show = !cli.quiet;
    match &cli.command {
        Command::Create(a) => {
            if let Some(p) = &a.backing {
                recover_noisy(p)?;
            }
            create::run(a)?;
        }
        Command::Info(a) => {
            recover_noisy(&a.image)?;
            inspect::info(&a.image, a.json, a.force_share)?;
        }
        Command::Map(a) => {
            recover_noisy(&a.image)?;
            inspect::map(&a.image, a.json, a.force_share)?;
        }
        Command::Check(a) => {
            recover_noisy(&a.image)?;
            return check::run(&a.image, a.repair, a.json, show);
        }
        Command::Snapshot(a) => {
            recover_noisy(&a.image)?;
            layers::snapshot(&a.image, &a.snapshot, a.json)?;
        }
        Command::Reset(a) => {
            recover_noisy(&a.image)?;
            layers::reset(&a.image, a.json)?;
        }
        Command::Squash(a) => {
            recover_noisy(&a.image)?;
            layers::squash(&a.image, a.layers, show, a.json)?;
        }
        Command::Rebase(a) => {
            recover_noisy(&a.image)?;
            layers::rebase(&a.image, &a.backing, a.json)?;
        }
        Command::Flatten(a) => {
            recover_noisy(&a.image)?;
            transfer::flatten(&a.image, &a.output, show, a.json)?;
        }
        Command::Export(a) => {
            recover_noisy(&a.image)?;
            transfer::export(&a.image, &a.output, show, a.json)?;
        }
        Command::Import(a) => transfer::import(&a.raw, &a.image, a.block_size, show, a.json)?,
        Command::Serve(a) => {
            for img in &a.images {
                recover_noisy(img)?;
            }
            crate::serve::run(a)?;
        }
    }
    Ok(EXIT_OK)
}
