//! One module per command group (`squash`, `snapshot`, `reset`, `rebase` are in
//! [`layers`]; `import`, `export`, `flatten` in [`transfer`]). [`dispatch`] is the one
//! place that runs pending-operation recovery: once per image, before the command.

pub mod check;
pub mod create;
pub mod diff;
pub mod inspect;
pub mod layers;
pub mod live;
pub mod remote;
pub mod transfer;

use std::io::Write;
use std::path::Path;

use crate::cli::{Cli, Command};
use crate::error::Result;
use crate::ops::{recover, replay_journal, Recovery};
use crate::EXIT_OK;

/// Runs `recover` on `image` and says on stderr what it did.
fn recover_noisy(image: &Path) -> Result<()> {
    if let Some(j) = replay_journal(image)? {
        let _ = writeln!(
            std::io::stderr(),
            "cowdisk: {}: replayed the flushed writes in {}",
            image.display(),
            j.display()
        );
    }
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

/// The existing images `command` opens, whose interrupted operations must be finished
/// or undone first. `create` opens only its parent; `import` reads a raw file.
pub fn recovery_targets(command: &Command) -> Vec<&Path> {
    match command {
        // A remote parent is an immutable object: nothing to recover.
        Command::Create(a) => a
            .backing
            .iter()
            .map(|p| p.as_path())
            .filter(|p| !cowdisk_remote::is_remote(&p.to_string_lossy()))
            .collect(),
        Command::Push(a) => vec![&a.image],
        Command::Pull(_) => Vec::new(),
        Command::Info(a) | Command::Map(a) => vec![&a.image],
        Command::Check(a) => vec![&a.image],
        Command::Snapshot(a) => vec![&a.image],
        Command::Reset(a) => vec![&a.image],
        Command::Squash(a) => vec![&a.image],
        Command::Rebase(a) => vec![&a.image],
        Command::Flatten(a) | Command::Export(a) => vec![&a.image],
        Command::Import(_) => Vec::new(),
        Command::Serve(a) => a.images.iter().map(|p| p.as_path()).collect(),
        // Served images: their server owns them.
        Command::Stats(_) | Command::Exports(_) | Command::UblkRemove(_) => Vec::new(),
        Command::Diff(a) => vec![&a.image],
    }
}

/// Runs the parsed command; returns the exit code. The one place recovery runs: once
/// per image per invocation, before the command opens anything, so no command (and no
/// command added later) opens a half-finished chain or recovers twice.
pub fn dispatch(cli: &Cli) -> Result<i32> {
    // A served image's command goes to its server, which holds the image.
    if let Some(code) = live::route(&cli.command)? {
        return Ok(code);
    }
    let mut done: Vec<&Path> = Vec::new();
    for image in recovery_targets(&cli.command) {
        if !done.contains(&image) {
            recover_noisy(image)?;
            done.push(image);
        }
    }
    run_command(cli)
}

/// Runs the command itself; recovery has already run.
fn run_command(cli: &Cli) -> Result<i32> {
    let show = !cli.quiet;
    match &cli.command {
        Command::Create(a) => create::run(a)?,
        Command::Info(a) => inspect::info(&a.image, a.json, a.force_share)?,
        Command::Map(a) => inspect::map(&a.image, a.json, a.force_share)?,
        Command::Check(a) => {
            let opts = check::Options {
                repair: a.repair,
                discard_unreferenced: a.discard_unreferenced,
                show,
            };
            return check::run(&a.image, &opts, a.json);
        }
        Command::Snapshot(a) => layers::snapshot(&a.image, &a.snapshot, a.json)?,
        Command::Reset(a) => layers::reset(&a.image, a.json)?,
        Command::Squash(a) => layers::squash(&a.image, (a.layers, a.rate), show, a.json)?,
        Command::Rebase(a) => layers::rebase(&a.image, &a.backing, a.json)?,
        Command::Flatten(a) => transfer::flatten(&a.image, &a.output, show, a.json)?,
        Command::Export(a) => transfer::export(&a.image, &a.output, show, a.json)?,
        Command::Import(a) => transfer::import(&a.raw, &a.image, a.block_size, show, a.json)?,
        Command::Serve(a) => crate::serve::run(a)?,
        Command::UblkRemove(a) => crate::serve::ublk_remove(a)?,
        Command::Push(a) => remote::push(a)?,
        Command::Pull(a) => remote::pull(a)?,
        Command::Stats(a) => live::stats(a)?,
        Command::Exports(a) => live::exports(a)?,
        Command::Diff(a) => diff::run(a)?,
    }
    Ok(EXIT_OK)
}
