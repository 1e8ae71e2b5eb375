//! Commands on served images: [`route`] sends `info`, `map`, `diff`, `check` (without `--repair`), `snapshot`, `squash`
//! and `reset` on an image
//! a running server holds to that server (through the control socket beside the image)
//! instead of failing with "in use"; `stats` and `exports` exist only that way.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::cli::{Command, ExportsArgs, StatsArgs};
use crate::control::{connect, default_socket, request};
use crate::error::{Error, Result};
use crate::output::{print_json, print_lines, report};
use crate::EXIT_OK;

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::os(p, "resolve path", e))
}

/// Runs `command` through the server holding its image, if one does: `Some(exit code)`,
/// or `None` to run it here (no server answers beside the image).
pub fn route(command: &Command) -> Result<Option<i32>> {
    let (image, mut req, json_out) = match command {
        Command::Info(a) if !a.force_share => (&a.image, json!({"command": "info"}), a.json),
        Command::Map(a) if !a.force_share => (&a.image, json!({"command": "map"}), a.json),
        Command::Diff(a) => {
            let req = json!({
                "command": "diff",
                "since": absolute(&a.since)?.display().to_string(),
            });
            (&a.image, req, a.json)
        }
        Command::Check(a) if !a.repair => (&a.image, json!({"command": "check"}), a.json),
        Command::Reset(a) => (&a.image, json!({"command": "reset"}), a.json),
        Command::Squash(a) => (
            &a.image,
            json!({"command": "squash", "layers": a.layers, "rate": a.rate}),
            a.json,
        ),
        Command::Snapshot(a) => {
            let req = json!({
                "command": "snapshot",
                "snapshot": absolute(&a.snapshot)?.display().to_string(),
                "snapshot_display": a.snapshot.display().to_string(),
            });
            (&a.image, req, a.json)
        }
        _ => return Ok(None),
    };
    let Some(stream) = connect(&default_socket(image)) else {
        return Ok(None);
    };
    req["image"] = json!(absolute(image)?.display().to_string());
    req["display"] = json!(image.display().to_string());
    let result = request(&stream, image, &req)?;
    print_result(&result, json_out);
    // `check` exits as it does offline (2, 3, 4 for what it found).
    let code = result["exit_code"].as_i64().map_or(EXIT_OK, |c| c as i32);
    Ok(Some(code))
}

/// Prints a reply carrying what the offline command would print.
fn print_result(result: &Value, json_out: bool) {
    if json_out {
        print_json(&result["document"]);
        return;
    }
    let lines: Vec<String> = result["text"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|l| l.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    print_lines(&lines);
}

fn not_served(image: &Path, socket: &Path) -> Error {
    Error::invalid(
        image,
        format!(
            "not being served (no server answers on {})",
            socket.display()
        ),
    )
}

/// `stats IMAGE`: the counters of its export.
pub fn stats(a: &StatsArgs) -> Result<()> {
    let socket = default_socket(&a.image);
    let stream = connect(&socket).ok_or_else(|| not_served(&a.image, &socket))?;
    let req = json!({
        "command": "stats",
        "image": absolute(&a.image)?.display().to_string(),
    });
    let result = request(&stream, &a.image, &req)?;
    let mut lines = Vec::new();
    for e in result["exports"].as_array().into_iter().flatten() {
        lines.push(format!("export: {}", e["name"].as_str().unwrap_or("?")));
        if let Some(o) = e.as_object() {
            for (k, v) in o {
                if k != "name" {
                    lines.push(format!("  {k}: {v}"));
                }
            }
        }
    }
    report(a.json, || result.clone(), &lines);
    Ok(())
}

/// `exports SOCKET`: what a running server exports.
pub fn exports(a: &ExportsArgs) -> Result<()> {
    let stream = connect(&a.socket).ok_or_else(|| not_served(&a.socket, &a.socket))?;
    if let Some(image) = &a.add {
        let mut req = json!({
            "command": "add_export",
            "image": absolute(image)?.display().to_string(),
            "read_only": a.read_only,
        });
        if let Some(n) = &a.name {
            req["name"] = json!(n);
        }
        request(&stream, image, &req)?;
    }
    if let Some(name) = &a.remove {
        let mut req = json!({
            "command": "remove_export",
            "export": name,
            "clients": if a.close { "close" } else { "wait" },
        });
        if let Some(t) = a.timeout {
            req["timeout_secs"] = json!(t);
        }
        request(&stream, Path::new(name), &req)?;
    }
    let result = request(&stream, &a.socket, &json!({"command": "exports"}))?;
    let mut lines = vec![format!(
        "{:<24} {:<4} {:>14} {:>5}  {}",
        "Export", "Mode", "Size", "Depth", "Image"
    )];
    for e in result["exports"].as_array().into_iter().flatten() {
        lines.push(format!(
            "{:<24} {:<4} {:>14} {:>5}  {}",
            e["name"].as_str().unwrap_or("?"),
            if e["read_only"] == json!(true) {
                "ro"
            } else {
                "rw"
            },
            e["virtual_size"].as_u64().unwrap_or(0),
            e["depth"].as_u64().unwrap_or(0),
            e["image"].as_str().unwrap_or("?"),
        ));
    }
    report(a.json, || result.clone(), &lines);
    Ok(())
}
