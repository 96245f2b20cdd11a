//! Real Redis servers for the tests, started once per test binary: a
//! standalone server, and a three-master cluster.

#![allow(dead_code)] // Each test binary uses part of this.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conformance::harness::{RunningServer, ServerSpec, SharedServer};
use conformance::TestStore;
use mutextree_core::{async_trait, Error, LockBackend};
use mutextree_redis::{RedisBackend, RedisOptions};

pub(crate) const SPEC: ServerSpec = ServerSpec {
    store: "redis",
    url_variable: "MUTEXTREE_REDIS_URL",
    binary: "redis-server",
    search: &[],
    install: "apt-get install redis-server",
};

/// A cluster given in the environment (`redis+cluster://host:port,...`),
/// or three masters the harness starts.
pub(crate) const CLUSTER_SPEC: ServerSpec = ServerSpec { url_variable: "MUTEXTREE_REDIS_CLUSTER_URL", ..SPEC };

/// `redis-cli`, from the same package as the server.
const CLI_SPEC: ServerSpec = ServerSpec { binary: "redis-cli", ..SPEC };

/// The command line of a test server: loopback only, no snapshots, and
/// whatever `extra` adds.
pub(crate) fn server_args(port: u16, dir: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> =
        ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--port"].iter().map(OsString::from).collect();
    args.push(port.to_string().into());
    args.push("--dir".into());
    args.push(dir.as_os_str().to_owned());
    args.extend(extra.iter().map(OsString::from));
    args
}

/// The shared standalone server's URL.
pub(crate) fn standalone_url() -> String {
    static SERVER: SharedServer = SharedServer::new();
    SERVER.url(&SPEC, || {
        let server = SPEC.start(|port, dir| server_args(port, dir, &[]))?;
        Ok((format!("redis://127.0.0.1:{}/", server.port), server))
    })
}

/// The shared cluster's URL: three masters sharing the 16384 slots.
pub(crate) fn cluster_url() -> String {
    static CLUSTER: SharedServer = SharedServer::new();
    CLUSTER.url(&CLUSTER_SPEC, || {
        let mut servers = Vec::new();
        for _ in 0..3 {
            servers.push(CLUSTER_SPEC.start(|port, dir| {
                let config = dir.join("nodes.conf");
                let mut args = server_args(port, dir, &["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]);
                args.push("--cluster-config-file".into());
                args.push(config.into_os_string());
                args
            })?);
        }
        let addresses: Vec<String> = servers.iter().map(|server| format!("127.0.0.1:{}", server.port)).collect();
        redis_cli(&["--cluster", "create"], &addresses, &["--cluster-replicas", "0", "--cluster-yes"])?;
        for server in &servers {
            wait_for_cluster_ok(server.port)?;
        }
        let url = format!("redis+cluster://{}", addresses.join(","));
        let first = servers.remove(0);
        // The other two live as long as the test binary, like the first
        // (their watchdogs stop them).
        servers.into_iter().for_each(std::mem::forget);
        Ok((url, first))
    })
}

/// Runs `redis-cli`, failing with its output.
pub(crate) fn redis_cli(before: &[&str], middle: &[String], after: &[&str]) -> Result<String, String> {
    let cli = CLI_SPEC.find_binary()?;
    let output = Command::new(&cli)
        .args(before)
        .args(middle)
        .args(after)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cli.display()))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!("redis-cli {before:?} {middle:?} {after:?} failed:\n{text}"))
    }
}

/// A new cluster agrees on its slots within a few seconds; there is no
/// event to wait for but its own report.
fn wait_for_cluster_ok(port: u16) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let info = redis_cli(&["-p", &port.to_string(), "cluster", "info"], &[], &[])?;
        if info.contains("cluster_state:ok") {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!("the cluster node on port {port} is not ready after 30 s:\n{info}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A server of the tests' own (for restarts), not shared.
pub(crate) fn own_server(extra: &[&str], data: &Path) -> Result<RunningServer, String> {
    SPEC.start(|port, dir| {
        let mut args = server_args(port, dir, extra);
        // The data directory outlives the server's own directory, which its
        // watchdog removes when it dies.
        args.push("--dir".into());
        args.push(data.as_os_str().to_owned());
        args
    })
}

/// The store under test: a server (or cluster) URL; every `connect` opens
/// new connections.
pub(crate) struct Redis {
    url: String,
}

impl Redis {
    pub(crate) fn standalone() -> Self {
        Redis { url: standalone_url() }
    }

    pub(crate) fn cluster() -> Self {
        Redis { url: cluster_url() }
    }

    pub(crate) async fn backend(&self, namespace: &str) -> Result<RedisBackend, Error> {
        RedisOptions::from_url(&self.url)?.namespace(namespace)?.connect().await
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }
}

#[async_trait]
impl TestStore for Redis {
    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        Ok(Arc::new(self.backend(namespace).await?))
    }
}
