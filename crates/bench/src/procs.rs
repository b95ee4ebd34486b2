//! Child processes of the benches (a real `llm-gateway`, `vllm-sim`, nginx) and what `/proc` says about
//! them: resident memory and CPU time, each process's own.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

/// The `llm-gateway` and `vllm-sim` binaries beside this one. Under `cargo run` they are built first (a
/// no-op when fresh), so a bench never measures a stale gateway.
pub fn binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the bench binary's directory")?;
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "llm-gateway", "-p", "vllm-sim", "--bins"]);
        // The profile this bench was built with (`target/<profile>/bench`), so the gateway measured is
        // built the same way.
        match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(profile) => {
                cmd.args(["--profile", profile]);
            }
        }
        anyhow::ensure!(cmd.status()?.success(), "building llm-gateway and vllm-sim failed");
    }
    let (gw, sim) = (dir.join("llm-gateway"), dir.join("vllm-sim"));
    anyhow::ensure!(
        gw.exists() && sim.exists(),
        "{} or {} is missing: cargo build --release (or --profile dist) -p llm-gateway -p vllm-sim --bins",
        gw.display(),
        sim.display()
    );
    Ok((gw, sim))
}

/// A child process, killed with SIGKILL and reaped when dropped, so an early error leaves nothing running.
pub struct Proc {
    /// The running child.
    pub child: Child,
    out: PathBuf,
}

impl Proc {
    /// Starts `bin` with stdout to `out` and, when `log`, stderr beside it (`.log` for `.out`).
    pub fn spawn(bin: &Path, args: &[&str], out: &Path, log: bool) -> anyhow::Result<Proc> {
        let stdout = std::fs::File::create(out)?;
        let stderr = if log { Stdio::from(std::fs::File::create(out.with_extension("log"))?) } else { Stdio::null() };
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Proc { child, out: out.to_owned() })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process's `... listening on http://...` line and returns the URL.
    pub async fn listening(&mut self) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&self.out).unwrap_or_default();
            let url = text
                .lines()
                .filter(|l| l.contains("listening on"))
                .find_map(|l| l.split_whitespace().find(|w| w.starts_with("http://")));
            if let Some(url) = url {
                return Ok(url.to_owned());
            }
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("{} exited ({status}) before listening", self.out.display());
            }
            anyhow::ensure!(Instant::now() < deadline, "{} did not listen within 10 s", self.out.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, like a crash, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `VmRSS` of `pid` in kB; `None` once the process is gone (a zombie has none either).
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Clock ticks per second of `utime`/`stime` in `/proc/<pid>/stat` (`USER_HZ`: 100 on Linux, which
/// fixes it for every architecture the kernel exports to user space).
const USER_HZ: f64 = 100.0;

/// CPU time `pid` has used so far (user + system, all its threads), from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    cpu_times(pid).map(|(user, system)| user + system)
}

/// User and system CPU time `pid` has used so far (all its threads), from `/proc/<pid>/stat`.
pub fn cpu_times(pid: u32) -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After `)`: state(3) ppid(4) ... utime(14) stime(15), so utime is the 12th field here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((Duration::from_secs_f64(utime as f64 / USER_HZ), Duration::from_secs_f64(stime as f64 / USER_HZ)))
}

/// The processes whose parent is `pid` (nginx's workers under its master).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).ok().is_some_and(|stat| {
                let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
                rest.split_whitespace().nth(1).and_then(|ppid| ppid.parse::<u32>().ok()) == Some(pid)
            })
        })
        .collect()
}

/// How long `pid`'s threads waited, runnable, for a CPU, and how many times they were put on one, so
/// far (`/proc/<pid>/task/*/schedstat`: run time, run-queue wait, timeslices). The wait over the
/// slices is the mean delay from being woken to running: what a busy machine adds to each event.
pub fn sched_wait(pid: u32) -> Option<(Duration, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut sum = (Duration::ZERO, 0);
    for task in tasks.filter_map(Result::ok) {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        let mut fields = stat.split_whitespace().skip(1).map(|f| f.parse::<u64>().ok());
        if let (Some(Some(wait_ns)), Some(Some(slices))) = (fields.next(), fields.next()) {
            sum.0 += Duration::from_nanos(wait_ns);
            sum.1 += slices;
        }
    }
    Some(sum)
}
