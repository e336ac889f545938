//! The server under test: either one this tool spawns (`natter serve` on a
//! free port in a temporary data dir, stopped with SIGTERM at the end) or one
//! already running at `--target`. Also the Linux `/proc` reading the memory
//! figures need: a process's RSS and the pid listening on a port.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

/// Flags that keep a spawned server's per-user and per-address limits
/// switched on but out of reach: the benchmark's seeding and load come from
/// one address and a few users at far more than a person's pace, and each
/// call still pays for its limiter checks, so the figures include them. A
/// server at `--target` needs limits as high to be measured at all.
pub(crate) const LIMITS_OUT_OF_REACH: [&str; 28] = [
    "--create-session-rate",
    "1000000000/1s",
    "--create-guest-rate",
    "1000000000/1s",
    "--create-user-rate",
    "1000000000/1s",
    "--create-chat-rate",
    "1000000000/1s",
    "--send-message-rate",
    "1000000000/1s",
    "--edit-message-rate",
    "1000000000/1s",
    "--stream-open-rate",
    "1000000000/1s",
    "--typing-rate",
    "1000000000/1s",
    "--reaction-rate",
    "1000000000/1s",
    "--search-rate",
    "1000000000/1s",
    "--mark-read-rate",
    "1000000000/1s",
    "--moderation-rate",
    "1000000000/1s",
    // The `streams` scenario holds 50,000 streams for 64 users.
    "--max-streams-per-user",
    "1000000",
    // A scenario with a connection per stream opens 1,000 and more.
    "--max-connections-per-address",
    "1000000",
];

/// A server to benchmark.
pub(crate) struct Target {
    /// `http://host:port`.
    pub(crate) url: String,
    /// Its process id, when known (spawned, --server-pid, or found by port).
    pub(crate) pid: Option<u32>,
    /// Its data directory, when spawned (holds `messages.db`).
    pub(crate) data_dir: Option<PathBuf>,
    /// `host:port` of its Prometheus endpoint, when known.
    pub(crate) metrics: Option<String>,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl Target {
    /// A server that is already running at `url`.
    pub(crate) fn existing(url: String, pid: Option<u32>, metrics: Option<String>) -> Self {
        let pid = pid.or_else(|| port_of(&url).and_then(listener_pid));
        Self { url, pid, data_dir: None, metrics, child: None, _tmp: None }
    }

    /// Starts `natter serve --listen 127.0.0.1:0 --data-dir <tmp> --log-format json
    /// --metrics-listen 127.0.0.1:0` with its limits out of reach ([`LIMITS_OUT_OF_REACH`])
    /// and waits for its `natter listening` log
    /// line (30 s at most); the metrics address comes from its `serving
    /// metrics at /metrics` line. Its logs go to `natter.log` in the data dir.
    ///
    /// Errors: the binary does not start, exits, or never logs its address.
    pub(crate) async fn spawn(natter: &Path, extra: &[String]) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("natter-bench-").tempdir()?;
        let data_dir = tmp.path().join("data");
        let log_path = tmp.path().join("natter.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(natter)
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json", "--metrics-listen", "127.0.0.1:0"])
            .args(LIMITS_OUT_OF_REACH)
            .args(extra)
            .arg("--data-dir")
            .arg(&data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", natter.display()))?;
        let pid = child.id();
        let started = Instant::now();
        let addr = loop {
            let log = std::fs::read_to_string(&log_path)?;
            // The metrics line comes first (telemetry starts before serving).
            if let Some(addr) = logged_addr(&log, "natter listening") {
                break (addr, logged_addr(&log, "serving metrics at /metrics"));
            }
            if let Some(status) = child.try_wait()? {
                bail!("natter exited ({status}) before listening; log: {}", log_path.display());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("natter did not log its address within 30 s; log: {}", log_path.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (addr, metrics) = addr;
        Ok(Self {
            url: format!("http://{addr}"),
            pid,
            data_dir: Some(data_dir),
            metrics,
            child: Some(child),
            _tmp: Some(tmp),
        })
    }

    /// Stops a spawned server with SIGTERM and waits for it (15 s, then
    /// SIGKILL). A server this tool did not start is left alone.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    eprintln!("natter exited with {status} after SIGTERM");
                }
            }
            Err(_) => {
                eprintln!("natter still running 15 s after SIGTERM; killing it");
                child.kill().await?;
            }
        }
        Ok(())
    }
}

/// The `addr` field of the first JSON log line whose message is `message`
/// (`natter listening`, `serving metrics at /metrics`).
fn logged_addr(log: &str, message: &str) -> Option<String> {
    log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find_map(|v| {
        let fields = if v.get("message").is_some() { &v } else { v.get("fields")? };
        (fields.get("message")?.as_str()? == message).then(|| fields.get("addr")?.as_str().map(str::to_owned))?
    })
}

/// The port of an `http://host:port` URL.
fn port_of(url: &str) -> Option<u16> {
    url.rsplit(':').next()?.trim_end_matches('/').parse().ok()
}

/// The resident set size of a process, in bytes (VmRSS of /proc/PID/status).
///
/// Errors: no such process, or not Linux.
pub(crate) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS line")?;
    let kib: u64 = line.split_whitespace().nth(1).context("malformed VmRSS line")?.parse()?;
    Ok(kib * 1024)
}

/// CPU time a process has used so far (user + system, fields 14 and 15 of
/// /proc/PID/stat), in microseconds; None if it cannot be read.
pub(crate) fn cpu_micros(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|t| *t > 0)?;
    Some((utime + stime) * 1_000_000 / ticks)
}

/// The pid of the process with a listening TCP socket on `port`: the socket's
/// inode from /proc/net/tcp{,6}, then the process holding that inode among
/// /proc/*/fd. None when not found (or not permitted to look).
fn listener_pid(port: u16) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|f| {
        std::fs::read_to_string(f).ok()?.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(cols.get(1)?.rsplit(':').next()?, 16).ok()?;
            // State 0A is LISTEN.
            (local_port == port && *cols.get(3)? == "0A").then(|| cols.get(9).map(|s| s.to_string()))?
        })
    })?;
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|proc| {
        let pid: u32 = proc.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(proc.path().join("fd")).ok()?;
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str()))
            .then_some(pid)
    })
}

/// Raises this process's open-file limit to its hard limit (tens of
/// thousands of streams need many connections); returns the new soft limit.
pub(crate) fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write to and read from a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_listening_and_metrics_lines() {
        let log = "{\"level\":\"INFO\",\"message\":\"serving metrics at /metrics\",\"addr\":\"127.0.0.1:9464\"}\n\
                   {\"timestamp\":\"t\",\"level\":\"INFO\",\"message\":\"natter listening\",\"addr\":\"127.0.0.1:4321\"}\n";
        assert_eq!(logged_addr(log, "natter listening").as_deref(), Some("127.0.0.1:4321"));
        assert_eq!(logged_addr(log, "serving metrics at /metrics").as_deref(), Some("127.0.0.1:9464"));
        assert_eq!(logged_addr("not json\n", "natter listening"), None);
    }

    #[test]
    fn reads_ports_and_own_rss() {
        assert_eq!(port_of("http://127.0.0.1:7070"), Some(7070));
        assert_eq!(port_of("http://[::1]:80/"), Some(80));
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        let spent = cpu_micros(std::process::id()).unwrap();
        let busy = Instant::now();
        while cpu_micros(std::process::id()).unwrap() < spent + 20_000 {
            assert!(busy.elapsed() < Duration::from_secs(10), "20 ms of CPU never showed in /proc");
        }
    }
}
