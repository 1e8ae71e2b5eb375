//! `push`, `pull` and `create --backing s3://…`: chains with layers in object storage
//! (the work is in `cowdisk-remote`; this is arguments and output).

use std::path::Path;

use cowdisk_remote::{pull as rpull, push as rpush, S3Url};
use serde_json::json;

use crate::cli::{PullArgs, PushArgs};
use crate::error::{Error, Result};
use crate::output::{human_size, print_json, print_lines};

/// `push`.
pub fn push(a: &PushArgs) -> Result<()> {
    let dest = S3Url::parse(&a.dest, true)?;
    let pushed = rpush::push(&crate::remote_source(), &a.image, &dest)?;
    let top = pushed.last().expect("push pushes at least one layer");
    if a.json {
        let layers: Vec<_> = pushed
            .iter()
            .map(|p| {
                json!({
                    "source": p.source.display().to_string(),
                    "url": p.url.to_string(),
                    "uploaded_bytes": p.uploaded,
                    "object_bytes": p.object_len,
                })
            })
            .collect();
        print_json(&json!({ "url": top.url.to_string(), "layers": layers }));
        return Ok(());
    }
    // Progress to stderr, the URL alone on stdout (for `URL=$(cowdisk push ...)`).
    for p in &pushed {
        let what = if p.uploaded > 0 {
            format!("uploaded {}", human_size(p.uploaded))
        } else {
            "already there".into()
        };
        eprintln!("cowdisk: {} -> {}: {what}", p.source.display(), p.url);
    }
    print_lines(&[top.url.to_string()]);
    Ok(())
}

/// `pull`.
pub fn pull(a: &PullArgs) -> Result<()> {
    let url = S3Url::parse(&a.url, false)?;
    std::fs::create_dir_all(&a.dir).map_err(|e| Error::os(&a.dir, "create folder", e))?;
    let top = rpull::pull(&crate::remote_source(), &url, &a.dir)?;
    if a.json {
        print_json(&json!({ "url": url.to_string(), "top": top.display().to_string() }));
    } else {
        print_lines(&[top.display().to_string()]);
    }
    Ok(())
}

/// `create IMAGE --backing s3://…`: fetches the object's metadata only.
pub fn create_over(image: &Path, url: &str) -> Result<cowdisk_core::Header> {
    let url = S3Url::parse(url, false)?;
    Ok(rpull::create_over_remote(
        &crate::remote_source(),
        image,
        &url,
    )?)
}
