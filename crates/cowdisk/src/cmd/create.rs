//! `create`: a standalone image or a child over a parent.

use cowdisk_core::{create_child_opts, create_image, ReferenceStyle, DEFAULT_BLOCK_SIZE};
use serde_json::json;

use crate::cli::CreateArgs;
use crate::error::{Error, Result};
use crate::output::{human_size, layer_json, report};

/// Creates the image.
pub fn run(a: &CreateArgs) -> Result<()> {
    let h = match (&a.backing, a.size) {
        (Some(p), _) if cowdisk_remote::is_remote(&p.to_string_lossy()) => {
            super::remote::create_over(&a.image, &p.to_string_lossy())?
        }
        // create_child refuses an existing image or an unusable reference before it
        // writes anything.
        (Some(parent), _) => create_child_opts(
            &a.image,
            parent,
            ReferenceStyle::Relative,
            &crate::open_options(),
        )?,
        (None, Some(size)) => {
            create_image(&a.image, size, a.block_size.unwrap_or(DEFAULT_BLOCK_SIZE))?
        }
        (None, None) => return Err(Error::invalid(&a.image, "give --size or --backing")),
    };
    let over = match &a.backing {
        Some(p) => format!(" over {}", p.display()),
        None => String::new(),
    };
    report(
        a.json,
        || json!({ "image": layer_json(&a.image, &h) }),
        &[format!(
            "Created {}: virtual size {}, block size {}{over}",
            a.image.display(),
            human_size(h.geometry.virtual_size),
            human_size(u64::from(h.geometry.block_size)),
        )],
    );
    Ok(())
}
