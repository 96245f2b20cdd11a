//! Real servers for the tests: started on a free loopback port in a
//! temporary directory, once per test binary, and stopped with it.
//!
//! A store's test file describes its server with a [`ServerSpec`] and asks
//! for it through [`SharedServer::url`]: the `MUTEXTREE_<STORE>_URL` variable
//! if set (an existing server, e.g. in a developer's container), otherwise a
//! server the harness starts from the installed binary. A binary that cannot
//! be found is a test failure whose message says how to install it: a
//! missing server never passes silently.
//!
//! Stopping: statics are not dropped when a test binary exits, so every
//! server runs under a small shell watchdog that kills it (and removes its
//! directory) as soon as the test process is gone, however it ended. The
//! watchdog leads its own process group, so [`RunningServer::stop`] ends
//! both at once.

use std::ffi::OsString;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a store's server is found and started.
#[derive(Debug, Clone, Copy)]
pub struct ServerSpec {
    /// The store's name in messages: `redis`, `postgres`, `etcd`.
    pub store: &'static str,
    /// The variable naming an existing server, e.g. `MUTEXTREE_REDIS_URL`.
    pub url_variable: &'static str,
    /// The server binary, e.g. `redis-server`.
    pub binary: &'static str,
    /// Directories searched after `PATH`; a `*` matches one directory level
    /// (e.g. `/usr/lib/postgresql/*/bin`).
    pub search: &'static [&'static str],
    /// What to run to install it, e.g. `apt-get install redis-server`.
    pub install: &'static str,
}

impl ServerSpec {
    /// The URL given in the environment, if any.
    pub fn url_from_env(&self) -> Option<String> {
        std::env::var(self.url_variable).ok().filter(|url| !url.is_empty())
    }

    /// The installed server binary, or a message saying how to get it.
    pub fn find_binary(&self) -> Result<PathBuf, String> {
        let from_path =
            std::env::var_os("PATH").map(|path| std::env::split_paths(&path).collect::<Vec<_>>()).unwrap_or_default();
        let extra = self.search.iter().flat_map(|pattern| expand(pattern));
        from_path
            .into_iter()
            .chain(extra)
            .map(|dir| dir.join(self.binary))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| self.missing())
    }

    /// The message for a store that is neither given nor installed.
    pub fn missing(&self) -> String {
        format!(
            "the {store} tests need a {store} server, and none was found: `{binary}` is not on PATH{searched}, \
             and {variable} is not set.\n  Install it: {install}\n  or point the tests at a running server: \
             {variable}=...\n  or run the README's test command, which installs every store.",
            store = self.store,
            binary = self.binary,
            searched =
                if self.search.is_empty() { String::new() } else { format!(" nor in {}", self.search.join(", ")) },
            variable = self.url_variable,
            install = self.install,
        )
    }

    /// Starts the server: `args` gets the port and the data directory and
    /// returns the command line after the binary. Waits until the port
    /// accepts connections.
    pub fn start(&self, args: impl FnOnce(u16, &Path) -> Vec<OsString>) -> Result<RunningServer, String> {
        let binary = self.find_binary()?;
        let port = free_port();
        let dir = temp_dir(self.store)?;
        let mut server = RunningServer::spawn(&binary, args(port, &dir), port, dir)?;
        server.wait_until_listening(Duration::from_secs(60))?;
        Ok(server)
    }
}

/// One server per test binary, shared by all its tests.
///
/// ```text
/// static REDIS: SharedServer = SharedServer::new();
/// let url = REDIS.url(&SPEC, || { let server = SPEC.start(...)?; Ok((url_of(&server), server)) });
/// ```
#[derive(Debug)]
pub struct SharedServer {
    url: std::sync::OnceLock<Result<String, String>>,
}

impl SharedServer {
    /// Nothing started yet.
    pub const fn new() -> Self {
        SharedServer { url: std::sync::OnceLock::new() }
    }

    /// The URL from `spec`'s variable, or of the server `start` starts on
    /// first use. The server lives as long as the test binary (its watchdog
    /// stops it). Panics with `start`'s message, every time, if it failed.
    pub fn url(&self, spec: &ServerSpec, start: impl FnOnce() -> Result<(String, RunningServer), String>) -> String {
        let url = self.url.get_or_init(|| match spec.url_from_env() {
            Some(url) => Ok(url),
            None => start().map(|(url, server)| {
                // Kept running until the process ends; the watchdog stops it.
                std::mem::forget(server);
                url
            }),
        });
        match url {
            Ok(url) => url.clone(),
            Err(message) => panic!("{message}"),
        }
    }
}

impl Default for SharedServer {
    fn default() -> Self {
        SharedServer::new()
    }
}

/// Expands one `*` directory level in a search pattern.
fn expand(pattern: &str) -> Vec<PathBuf> {
    match pattern.split_once("/*/") {
        None => vec![PathBuf::from(pattern)],
        Some((base, rest)) => {
            let mut found: Vec<PathBuf> = std::fs::read_dir(base)
                .map(|entries| entries.flatten().map(|entry| entry.path().join(rest)).collect())
                .unwrap_or_default();
            // Newest version first (e.g. /usr/lib/postgresql/16 before 15).
            found.sort();
            found.reverse();
            found
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("the loopback interface can give a free port")
}

/// A fresh directory under the system's temporary directory.
pub fn temp_dir(store: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("mutextree-{store}-{}-{:08x}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// A server started by the harness; see the module docs.
#[derive(Debug)]
pub struct RunningServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its data directory (its log is `server.log` inside).
    pub dir: PathBuf,
    watchdog: Child,
}

impl RunningServer {
    /// Runs `binary args` under a watchdog, logging to `dir/server.log`.
    pub fn spawn(binary: &Path, args: Vec<OsString>, port: u16, dir: PathBuf) -> Result<Self, String> {
        const WATCHDOG: &str = r#"
            parent=$1; dir=$2; shift 2
            "$@" >"$dir/server.log" 2>&1 </dev/null &
            server=$!
            while kill -0 "$parent" 2>/dev/null && kill -0 "$server" 2>/dev/null; do sleep 0.2; done
            kill -9 "$server" 2>/dev/null
            wait "$server" 2>/dev/null
            rm -rf "$dir"
        "#;
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("watchdog")
            .arg(std::process::id().to_string())
            .arg(&dir)
            .arg(binary)
            .args(args)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        Ok(RunningServer { port, dir, watchdog })
    }

    /// Waits until the port accepts a connection; fails with the server's
    /// log if it exits or does not listen in time.
    pub fn wait_until_listening(&mut self, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return Ok(());
            }
            // The watchdog ends as soon as the server does.
            if let Ok(Some(_)) = self.watchdog.try_wait() {
                return Err(format!(
                    "the server exited before listening on port {}; its log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("the server did not listen on port {} within {limit:?}; its log:\n{}", self.port, self.log()))
    }

    /// The server's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Kills the server and its watchdog, waits until the port is closed
    /// (so a restart can take it again) and removes the directory.
    pub fn stop(mut self) {
        let group = format!("-{}", self.watchdog.id());
        let _ = Command::new("kill").args(["-9", "--", &group]).status();
        let _ = self.watchdog.wait();
        let started = Instant::now();
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok()
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOWHERE: ServerSpec = ServerSpec {
        store: "nowhere",
        url_variable: "MUTEXTREE_NOWHERE_URL",
        binary: "mutextree-no-such-server",
        search: &["/nonexistent/*/bin"],
        install: "apt-get install nowhere-server",
    };

    #[test]
    fn a_missing_server_says_how_to_install_it() {
        let message = NOWHERE.find_binary().expect_err("not installed");
        assert!(message.contains("apt-get install nowhere-server"), "{message}");
        assert!(message.contains("MUTEXTREE_NOWHERE_URL"), "{message}");
        assert!(NOWHERE.start(|_, _| Vec::new()).is_err());
    }

    #[test]
    fn a_server_starts_listens_and_stops() {
        // Any binary that listens on a port will do: Python's web server.
        let spec = ServerSpec { binary: "python3", ..NOWHERE };
        let server = spec
            .start(|port, dir| {
                ["-m", "http.server", "--bind", "127.0.0.1", "--directory"]
                    .map(OsString::from)
                    .into_iter()
                    .chain([dir.as_os_str().to_owned(), port.to_string().into()])
                    .collect()
            })
            .expect("python3 is on this machine");
        let port = server.port;
        let dir = server.dir.clone();
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok());
        server.stop();
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(), "stopped");
        assert!(!dir.exists(), "directory removed");
    }
}
