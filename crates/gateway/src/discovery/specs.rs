//! The worker list the fleet is built from: `[[workers]]`, the workers file's tables, and each
//! `dns+http://` worker expanded to the addresses DNS last gave. A reload calls [`fleet_specs`]; the
//! discovery loop ([`crate::discovery`]) only asks for reloads, so this part names no reload.

use crate::config::{Config, WorkerConfig};
use crate::discovery::expand::{self, Resolved};
use std::path::Path;

/// Largest workers file read (a list of worker tables is a few hundred bytes per worker).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads, parses and validates `discovery.workers_file`; no file configured is no workers.
pub fn read_workers_file(config: &Config) -> Result<Vec<WorkerConfig>, String> {
    let Some(path) = &config.discovery.workers_file else { return Ok(Vec::new()) };
    let key = "discovery.workers_file";
    let text = read_bounded(path).map_err(|e| format!("{key}: {}: {e}", path.display()))?;
    let json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let workers = expand::parse_workers_file(&text, json).map_err(|e| format!("{key}: {}: {e}", path.display()))?;
    crate::config::validate_workers(&workers, key)?;
    Ok(workers)
}

/// The file's text, refused past [`MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text).map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    Ok(text)
}

/// The configured worker tables: `[[workers]]`, then the workers file's. A name in both is an error.
fn configured(config: &Config) -> Result<Vec<WorkerConfig>, String> {
    let from_file = read_workers_file(config)?;
    let mut all = config.workers.clone();
    for w in from_file {
        let name = w.display_name();
        if all.iter().any(|s| s.display_name() == name) {
            return Err(format!(
                "discovery.workers_file: worker name {:?} is also in [[workers]]",
                gateway_core::echo(&name)
            ));
        }
        all.push(w);
    }
    Ok(all)
}

/// The worker list the fleet is built from: `[[workers]]` and the workers file, each `dns+` worker
/// expanded to the addresses in `resolved`. Reads the workers file; fails when it is unreadable or
/// invalid (a reload then changes nothing).
pub fn fleet_specs(config: &Config, resolved: &Resolved) -> Result<Vec<WorkerConfig>, String> {
    Ok(expand::expand(&configured(config)?, resolved))
}
