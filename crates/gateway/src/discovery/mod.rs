//! Discovery: workers found beyond the static `[[workers]]` list.
//!
//! - `discovery.workers_file`: a TOML (`[[workers]]` tables) or JSON (a list of worker tables) file
//!   whose workers join the fleet. Read by every reload ([`specs::fleet_specs`], like the keys file: read
//!   once, then built from what was checked) and watched: a change reloads.
//! - DNS: a worker URL `dns+http://NAME:PORT` stands for every address NAME resolves to (a Kubernetes
//!   headless Service answers with one address per ready pod). Names are resolved with tokio's
//!   resolver (the system's, as `getaddrinfo`) every `discovery.interval_ms`; the answers are kept in
//!   [`AppState::resolved`], which every reload expands the worker list with.
//!
//! Either way the fleet changes only through [`reload::update`]: a new answer or file triggers a
//! reload of the config in force, whose build step sees the new worker list and rebuilds the fleet
//! carrying kept workers over; in-flight requests finish on the workers they started on. The pure
//! part (expansion, folding answers, parsing) is in [`expand`].

pub mod expand;
pub mod specs;

use crate::reload;
use crate::state::AppState;
use expand::{DnsName, Resolved};
use specs::read_workers_file;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Longest one DNS lookup may take before it counts as failed (and the old answer is kept).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the workers file is checked for changes (as the config file: polled, no watcher crate).
const FILE_POLL: Duration = reload::POLL_INTERVAL;

/// Resolves every `dns+` name of the config in force (the workers file's too, when it reads) and
/// stores the answers. Returns whether they changed. Lookups run one after the other, each bounded.
pub async fn refresh(app: &AppState) -> bool {
    let config = Arc::clone(&app.snapshot.load().config);
    let file_workers = {
        let config = Arc::clone(&config);
        tokio::task::spawn_blocking(move || read_workers_file(&config)).await.ok().and_then(Result::ok)
    };
    let names = expand::dns_names(config.workers.iter().chain(file_workers.iter().flatten()));
    let mut answers = Vec::with_capacity(names.len());
    for name in &names {
        answers.push((name.clone(), lookup(name).await));
    }
    let old = app.resolved.load_full();
    let next = expand::next_resolved(&old, &names, answers);
    if next == *old {
        return false;
    }
    log_changes(&old, &next);
    app.resolved.store(Arc::new(next));
    true
}

/// Every address `name` resolves to, or why not.
async fn lookup(name: &DnsName) -> Result<Vec<IpAddr>, String> {
    let query = (name.host.as_str(), name.port);
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(query)).await {
        Ok(Ok(addrs)) => Ok(addrs.map(|a| a.ip()).collect()),
        Ok(Err(e)) => {
            tracing::warn!(name = %name, error = %e, "DNS lookup failed; keeping the last answer");
            Err(e.to_string())
        }
        Err(_) => {
            tracing::warn!(name = %name, timeout = ?LOOKUP_TIMEOUT, "DNS lookup timed out; keeping the last answer");
            Err("timed out".into())
        }
    }
}

/// One line per name whose answer changed.
fn log_changes(old: &Resolved, next: &Resolved) {
    let names: BTreeSet<&DnsName> = old.keys().chain(next.keys()).collect();
    for name in names {
        let (before, after) = (old.get(name).map(Vec::as_slice).unwrap_or_default(), next.get(name));
        let after = after.map(Vec::as_slice).unwrap_or_default();
        let (added, removed) = expand::diff(before, after);
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(name = %name, ?added, ?removed, addresses = after.len(), "DNS answer changed");
        }
    }
}

/// Resolves the config's names once and rebuilds the fleet with the answers (so the gateway starts
/// with its discovered workers), then keeps discovering in the background until shutdown: the workers
/// file is checked every second, names are resolved every `discovery.interval_ms`.
pub async fn start(app: &Arc<AppState>) {
    if refresh(app).await {
        rebuild(app, "DNS").await;
    }
    tokio::spawn(run(Arc::clone(app)));
}

/// The background loop of [`start`].
async fn run(app: Arc<AppState>) {
    // The file's state is unknown at first (and whenever a reload names another file): its first read
    // counts as a change, so nothing written between the last build and that read is missed. A
    // rebuild that finds nothing new changes nothing.
    let mut last_file: reload::FileState = None;
    let mut watched = None;
    let mut next_lookup =
        tokio::time::Instant::now() + Duration::from_millis(app.snapshot.load().config.discovery.interval_ms);
    loop {
        let interval = Duration::from_millis(app.snapshot.load().config.discovery.interval_ms);
        next_lookup = next_lookup.min(tokio::time::Instant::now() + interval);
        let wake = next_lookup.min(tokio::time::Instant::now() + FILE_POLL);
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
        }
        let config = Arc::clone(&app.snapshot.load().config);
        if config.discovery.workers_file != watched {
            watched = config.discovery.workers_file.clone();
            last_file = None;
        }
        if let Some(path) = &watched {
            let now = file_state(path.clone()).await;
            if now != last_file {
                match &now {
                    None => {
                        tracing::warn!(file = %path.display(), "workers file unreadable; keeping the workers in force")
                    }
                    Some(_) => {
                        tracing::debug!(file = %path.display(), "workers file changed");
                        rebuild(&app, "workers file").await;
                    }
                }
                last_file = now;
            }
        }
        if tokio::time::Instant::now() >= next_lookup {
            next_lookup = tokio::time::Instant::now() + interval;
            if refresh(&app).await {
                rebuild(&app, "DNS").await;
            }
        }
    }
}

/// [`reload::file_state`] off the async threads.
async fn file_state(path: std::path::PathBuf) -> reload::FileState {
    tokio::task::spawn_blocking(move || reload::file_state(&path)).await.ok().flatten()
}

/// Reloads the config in force, so its build step sees the new worker list. A failure (an invalid
/// workers file) keeps the fleet in force and is logged.
async fn rebuild(app: &Arc<AppState>, trigger: &str) {
    match reload::update(app, |c| Ok(c.clone())).await {
        Ok(_) => tracing::debug!(trigger, "discovery applied"),
        Err(e) => tracing::error!(trigger, error = %e, "discovery change rejected; the workers in force keep serving"),
    }
}
