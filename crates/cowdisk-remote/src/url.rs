//! `s3://BUCKET/KEY` locations: parsing untrusted text into a bucket and a key, and
//! resolving a parent reference stored in an object against the object that holds it.

use std::fmt;

use crate::error::RemoteError;

/// The scheme every remote location starts with.
pub const SCHEME: &str = "s3://";

/// Longest key S3 accepts (bytes).
const MAX_KEY: usize = 1024;

/// A bucket and a key (or key prefix). Displays as `s3://bucket/key`; never holds
/// an endpoint or credentials, so it is safe in every message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Url {
    /// Bucket name (S3 naming rules: 3-63 of `a-z0-9.-`).
    pub bucket: String,
    /// Object key or prefix, without a leading `/`; may be empty for a prefix.
    pub key: String,
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.bucket, self.key)
    }
}

/// True if `s` names a remote location (to choose the remote code path).
pub fn is_remote(s: &str) -> bool {
    s.starts_with(SCHEME)
}

impl S3Url {
    /// Parses `s3://BUCKET/KEY`; `prefix_ok` allows an empty key or one ending in `/`
    /// (push targets), otherwise the key must name an object.
    pub fn parse(s: &str, prefix_ok: bool) -> Result<S3Url, RemoteError> {
        let bad = |reason: &str| RemoteError::BadUrl {
            url: printable(s),
            reason: reason.to_string(),
        };
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("does not start with s3://"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        check_bucket(bucket).map_err(bad)?;
        if key.len() > MAX_KEY {
            return Err(bad("key is longer than 1024 bytes"));
        }
        if key.chars().any(char::is_control) {
            return Err(bad("key contains a control character"));
        }
        if key.starts_with('/') || key.split('/').any(|c| c == "." || c == "..") {
            return Err(bad("key has a leading '/' or a '.' or '..' component"));
        }
        if !prefix_ok && (key.is_empty() || key.ends_with('/')) {
            return Err(bad("names no object (the key is empty or ends in '/')"));
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The key of object `name` under this location taken as a prefix.
    pub fn child(&self, name: &str) -> S3Url {
        let key = if self.key.is_empty() || self.key.ends_with('/') {
            format!("{}{name}", self.key)
        } else {
            format!("{}/{name}", self.key)
        };
        S3Url {
            bucket: self.bucket.clone(),
            key,
        }
    }

    /// The folder-like prefix this object sits in (its key up to the last `/`).
    pub fn dir(&self) -> S3Url {
        let key = match self.key.rfind('/') {
            Some(i) => self.key[..=i].to_string(),
            None => String::new(),
        };
        S3Url {
            bucket: self.bucket.clone(),
            key,
        }
    }

    /// Resolves a parent reference read from this object: a full `s3://` URL as it is,
    /// a bare name as a sibling object. Anything else (paths with `/`) is refused, so a
    /// crafted object can only point at objects, never at local files.
    pub fn resolve(&self, reference: &str) -> Result<S3Url, RemoteError> {
        if is_remote(reference) {
            return S3Url::parse(reference, false);
        }
        if reference.is_empty() || reference.contains('/') || reference == "." || reference == ".."
        {
            return Err(RemoteError::BadUrl {
                url: printable(reference),
                reason: format!("is not a sibling object name (in {self})"),
            });
        }
        Ok(self.dir().child(reference))
    }

    /// The object's last key component.
    pub fn name(&self) -> &str {
        self.key.rsplit('/').next().unwrap_or("")
    }

    /// True if `self` lies under the location `root` (same bucket, key prefix).
    pub fn is_under(&self, root: &S3Url) -> bool {
        let prefix = if root.key.is_empty() || root.key.ends_with('/') {
            root.key.clone()
        } else {
            format!("{}/", root.key)
        };
        self.bucket == root.bucket && self.key.starts_with(&prefix)
    }
}

/// Bucket naming rules (the DNS-safe subset every S3 server accepts).
fn check_bucket(b: &str) -> Result<(), &'static str> {
    if b.len() < 3 || b.len() > 63 {
        return Err("bucket name must be 3 to 63 characters");
    }
    if !b
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
    {
        return Err("bucket name may hold only a-z, 0-9, '.' and '-'");
    }
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !edge(b.as_bytes()[0]) || !edge(b.as_bytes()[b.len() - 1]) {
        return Err("bucket name must start and end with a letter or digit");
    }
    Ok(())
}

/// `s` for an error message: bounded and without control characters.
fn printable(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_resolve() {
        let u = S3Url::parse("s3://my-bucket/images/a.cdlayer", false).unwrap();
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.key, "images/a.cdlayer");
        assert_eq!(u.to_string(), "s3://my-bucket/images/a.cdlayer");
        assert_eq!(u.resolve("b.cdlayer").unwrap().key, "images/b.cdlayer");
        assert_eq!(u.resolve("s3://other/x").unwrap().bucket, "other");
        assert!(u.resolve("../x").is_err());
        assert!(u.resolve("/etc/passwd").is_err());
        assert!(u.is_under(&S3Url::parse("s3://my-bucket/images", true).unwrap()));
        assert!(!u.is_under(&S3Url::parse("s3://my-bucket/imag", true).unwrap()));
        assert_eq!(S3Url::parse("s3://bkt", true).unwrap().child("x").key, "x");
    }

    #[test]
    fn bad_urls_name_the_cause() {
        for (s, why) in [
            ("http://b/k", "s3://"),
            ("s3://BUCKET/k", "a-z"),
            ("s3://ab/k", "3 to 63"),
            ("s3://bkt/", "names no object"),
            ("s3://bkt/a/../b", "'..'"),
            ("s3://bkt/a\nb", "control"),
        ] {
            let e = S3Url::parse(s, false).unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
    }
}
