//! `push`, `pull` and `create --backing s3://…`: chains with layers in object storage
//! (the work is in `cowdisk-remote`; this is arguments and output).

use std::path::Path;

use cowdisk_remote::{pull as rpull, push as rpush, S3Url};
use serde_json::json;

use crate::cli::{PullArgs, PushArgs};
use crate::error::{Error, Result};
use crate::output::{human_size, print_json, print_lines};

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
