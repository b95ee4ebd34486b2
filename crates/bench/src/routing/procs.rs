//! The routing bench's child processes: vllm-sim workers, our gateway and the peer routers, each a real
//! process on loopback whose stdout and stderr go to one log file (read back for the address it
//! announces and, when it fails, for the reason). Stopped with SIGKILL, and killed when dropped, so no run
//! leaves one behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// A running child process and its log.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `program args` with `env` added to the environment, its output in `log` (created anew) and
    /// `dir` as working directory.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
        dir: &Path,
    ) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(log).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {name} ({}): {e}", program.display()))?;
        Ok(Proc { name: name.to_owned(), child, log: log.to_owned() })
    }

    /// Waits until the log has a line containing `marker` and returns the `http://` address on it.
    pub async fn announced_url(&mut self, marker: &str, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let url = text
                .lines()
                .filter(|l| l.contains(marker))
                .find_map(|l| l.split_whitespace().find(|w| w.starts_with("http://")).map(str::to_owned));
            if let Some(url) = url {
                return Ok(url);
            }
            self.ensure_running()?;
            anyhow::ensure!(Instant::now() < deadline, "{} announced no address within {within:?}", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An error with the end of the log if the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => anyhow::bail!("{} exited ({status}): {}", self.name, self.log_tail(5)),
            Err(e) => anyhow::bail!("{}: {e}", self.name),
        }
    }

    /// The last `n` non-empty lines of the log, joined, without terminal colours.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(n)..].join(" | ");
        strip_ansi(&tail)
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A loopback port free right now (bound and released; the child binds it a moment later).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colours() {
        assert_eq!(strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m ok"), "2026  INFO ok");
    }
}
