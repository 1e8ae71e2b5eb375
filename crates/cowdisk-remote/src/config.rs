//! Store configuration the way S3 tools read it: `AWS_*` variables first, then the
//! profile (`AWS_PROFILE`, default `default`) in the shared credentials and config
//! files; no credentials at all means anonymous (unsigned) requests, for public buckets.
//!
//! Secrets live only in [`rusty_s3::Credentials`] and are never formatted: `Debug` of
//! [`StoreConfig`] prints whether credentials are set, not what they are.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rusty_s3::{Credentials, UrlStyle};
use url::Url;

use crate::error::{RemoteError, Result};

/// Where the store is and how to sign for it.
#[derive(Clone)]
pub struct StoreConfig {
    /// Scheme, host and port (and optional base path) of the S3 API.
    pub endpoint: Url,
    /// Path-style for custom endpoints (most self-hosted servers), virtual-host for AWS.
    pub style: UrlStyle,
    /// Region used in the signature.
    pub region: String,
    /// `None`: anonymous requests.
    pub credentials: Option<Credentials>,
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("endpoint", &self.endpoint.as_str())
            .field("region", &self.region)
            .field("signed", &self.credentials.is_some())
            .finish()
    }
}

/// Looks up a variable; an injectable environment keeps tests off the process's.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn cfg_err(field: impl Into<String>, reason: impl Into<String>) -> RemoteError {
    RemoteError::Config {
        field: field.into(),
        reason: reason.into(),
    }
}

impl StoreConfig {
    /// From the process environment and the shared files.
    pub fn from_env() -> Result<StoreConfig> {
        StoreConfig::from(&|k: &str| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// From `env` and the shared files it points at.
    pub fn from(env: Env<'_>) -> Result<StoreConfig> {
        let explicit_profile = env("AWS_PROFILE");
        let profile = explicit_profile.clone().unwrap_or_else(|| "default".into());
        let home = env("HOME").map(PathBuf::from);
        let files = |var: &str, rel: &str| {
            env(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(rel)))
        };
        let creds_file = files("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
        let config_file = files("AWS_CONFIG_FILE", ".aws/config");
        let from_creds = read_section(creds_file.as_deref(), &profile)?;
        let section = if profile == "default" {
            "default".to_string()
        } else {
            format!("profile {profile}")
        };
        let from_config = read_section(config_file.as_deref(), &section)?;
        if explicit_profile.is_some() && from_creds.is_none() && from_config.is_none() {
            return Err(cfg_err(
                "AWS_PROFILE",
                format!(
                    "profile {profile:?} is in neither the shared credentials nor the config file"
                ),
            ));
        }
        let prof = |k: &str| {
            from_creds
                .as_ref()
                .and_then(|m| m.get(k))
                .or_else(|| from_config.as_ref().and_then(|m| m.get(k)))
                .cloned()
        };
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| prof("region"))
            .unwrap_or_else(|| "us-east-1".into());
        let credentials = credentials(env, &prof)?;
        let custom = env("AWS_ENDPOINT_URL_S3")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| prof("endpoint_url"));
        let (endpoint, style) = match custom {
            Some(e) => (parse_endpoint(&e)?, UrlStyle::Path),
            None => (
                parse_endpoint(&format!("https://s3.{region}.amazonaws.com"))?,
                UrlStyle::VirtualHost,
            ),
        };
        Ok(StoreConfig {
            endpoint,
            style,
            region,
            credentials,
        })
    }
}

/// Access key and secret from the environment, else from the profile; both or neither.
fn credentials(env: Env<'_>, prof: &dyn Fn(&str) -> Option<String>) -> Result<Option<Credentials>> {
    let (key, secret, token, origin) =
        match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (None, None) => (
                prof("aws_access_key_id"),
                prof("aws_secret_access_key"),
                prof("aws_session_token"),
                "profile field aws_access_key_id / aws_secret_access_key",
            ),
            (k, s) => (
                k,
                s,
                env("AWS_SESSION_TOKEN"),
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
            ),
        };
    match (key, secret) {
        (None, None) => Ok(None),
        (Some(k), Some(s)) => Ok(Some(match token {
            Some(t) => Credentials::new_with_token(k, s, t),
            None => Credentials::new(k, s),
        })),
        _ => Err(cfg_err(origin, "only one of the pair is set")),
    }
}

fn parse_endpoint(e: &str) -> Result<Url> {
    let bad = |reason: &str| cfg_err("endpoint URL", reason);
    let url = Url::parse(e).map_err(|_| bad("is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("scheme must be http or https"));
    }
    if url.host_str().is_none() {
        return Err(bad("has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
        return Err(bad("must not carry user info or a query"));
    }
    Ok(url)
}

/// The `[section]` of an INI-style shared file, or `None` if the file or the section is
/// missing. Values are trimmed; comments (`#`, `;`) and blank lines are skipped.
fn read_section(path: Option<&Path>, section: &str) -> Result<Option<HashMap<String, String>>> {
    let Some(path) = path else { return Ok(None) };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RemoteError::io(path, "read", e)),
    };
    Ok(parse_section(&text, section))
}

fn parse_section(text: &str, section: &str) -> Option<HashMap<String, String>> {
    let mut found = None;
    let mut current: Option<&str> = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.trim());
            if current == Some(section) {
                found.get_or_insert_with(HashMap::new);
            }
            continue;
        }
        if current == Some(section) {
            if let (Some(map), Some((k, v))) = (found.as_mut(), line.split_once('=')) {
                map.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn environment_wins_and_is_never_printed() {
        let env = env_of(&[
            ("AWS_ACCESS_KEY_ID", "AKIDSECRETISH"),
            ("AWS_SECRET_ACCESS_KEY", "sup3rs3cret"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("HOME", "/nonexistent"),
        ]);
        let c = StoreConfig::from(&env).unwrap();
        assert_eq!(c.region, "us-east-1");
        assert!(matches!(c.style, UrlStyle::Path));
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("sup3rs3cret") && !dbg.contains("AKIDSECRETISH"),
            "{dbg}"
        );
    }

    #[test]
    fn profiles_from_shared_files() {
        let dir = std::env::temp_dir().join(format!("cowdisk-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let creds = dir.join("credentials");
        let config = dir.join("config");
        std::fs::write(&creds, "[default]\naws_access_key_id=a\naws_secret_access_key=b\n[dev]\naws_access_key_id = k\naws_secret_access_key = s\naws_session_token = t\n").unwrap();
        std::fs::write(
            &config,
            "[profile dev]\nregion = eu-west-3\nendpoint_url = https://store.example:8443\n",
        )
        .unwrap();
        let c = creds.to_str().unwrap();
        let f = config.to_str().unwrap();
        let env = env_of(&[
            ("AWS_PROFILE", "dev"),
            ("AWS_SHARED_CREDENTIALS_FILE", c),
            ("AWS_CONFIG_FILE", f),
        ]);
        let cfg = StoreConfig::from(&env).unwrap();
        assert_eq!(cfg.region, "eu-west-3");
        assert_eq!(cfg.endpoint.as_str(), "https://store.example:8443/");
        let cr = cfg.credentials.unwrap();
        assert_eq!((cr.key(), cr.token()), ("k", Some("t")));
        let env = env_of(&[
            ("AWS_PROFILE", "nope"),
            ("AWS_SHARED_CREDENTIALS_FILE", c),
            ("AWS_CONFIG_FILE", f),
        ]);
        let e = StoreConfig::from(&env).unwrap_err().to_string();
        assert!(e.contains("AWS_PROFILE") && e.contains("nope"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn anonymous_and_half_configured() {
        let cfg = StoreConfig::from(&env_of(&[("HOME", "/nonexistent")])).unwrap();
        assert!(cfg.credentials.is_none());
        assert!(matches!(cfg.style, UrlStyle::VirtualHost));
        let e = StoreConfig::from(&env_of(&[
            ("AWS_ACCESS_KEY_ID", "x"),
            ("HOME", "/nonexistent"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("only one of the pair"), "{e}");
        let e = StoreConfig::from(&env_of(&[("AWS_ENDPOINT_URL", "ftp://x"), ("HOME", "/n")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("endpoint URL"), "{e}");
    }
}
