//! Redis servers for the tests: the shared standalone server, the shared
//! cluster of three masters, and servers of a test's own. Each URL is one
//! that `mutextree::connect` and the store's own options understand.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{RunningServer, ServerSpec, SharedServer};

/// `redis-server`, from Debian's `redis-server`.
pub const SPEC: ServerSpec = ServerSpec {
    store: "redis",
    url_variable: "MUTEXTREE_REDIS_URL",
    binary: "redis-server",
    search: &[],
    install: "apt-get install redis-server",
};

/// A Redis Cluster given in the environment (`redis+cluster://host:port,...`),
/// or three masters started here.
pub const CLUSTER_SPEC: ServerSpec = ServerSpec { url_variable: "MUTEXTREE_REDIS_CLUSTER_URL", ..SPEC };

/// `redis-cli`, from Debian's `redis-tools` (a dependency of the server).
const CLI_SPEC: ServerSpec = ServerSpec { binary: "redis-cli", install: "apt-get install redis-tools", ..SPEC };

/// The command line of a test Redis server: loopback only, no snapshots,
/// and whatever `extra` adds (later arguments win).
pub fn args(port: u16, dir: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> =
        ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--port"].iter().map(OsString::from).collect();
    args.push(port.to_string().into());
    args.push("--dir".into());
    args.push(dir.as_os_str().to_owned());
    args.extend(extra.iter().map(OsString::from));
    args
}

/// The shared standalone Redis server's URL.
pub fn url() -> String {
    static SERVER: SharedServer = SharedServer::new();
    SERVER.url(&SPEC, || {
        let server = SPEC.start(|port, dir| args(port, dir, &[]))?;
        Ok((format!("redis://127.0.0.1:{}/", server.port), server))
    })
}

/// The shared Redis Cluster's URL: three masters sharing the 16384 slots.
pub fn cluster_url() -> String {
    static CLUSTER: SharedServer = SharedServer::new();
    CLUSTER.url(&CLUSTER_SPEC, || {
        let mut servers = Vec::new();
        for _ in 0..3 {
            servers.push(CLUSTER_SPEC.start(|port, dir| {
                let mut args = args(port, dir, &["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]);
                args.push("--cluster-config-file".into());
                args.push(dir.join("nodes.conf").into_os_string());
                args
            })?);
        }
        let addresses: Vec<String> = servers.iter().map(|server| format!("127.0.0.1:{}", server.port)).collect();
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(addresses.iter().cloned());
        create.extend(["--cluster-replicas", "0", "--cluster-yes"].map(str::to_owned));
        cli(&create)?;
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
pub fn cli(args: &[String]) -> Result<String, String> {
    let cli = CLI_SPEC.find_binary()?;
    let output = Command::new(&cli).args(args).output().map_err(|e| format!("cannot run {}: {e}", cli.display()))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!("redis-cli {args:?} failed:\n{text}"))
    }
}

/// A new cluster agrees on its slots within a few seconds; there is no
/// event to wait for but its own report.
fn wait_for_cluster_ok(port: u16) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let info = cli(&["-p".to_owned(), port.to_string(), "cluster".to_owned(), "info".to_owned()])?;
        if info.contains("cluster_state:ok") {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!("the cluster node on port {port} is not ready after 30 s:\n{info}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Redis server of a test's own (for restarts), on `port` (a free one if
/// `None`), keeping its data in `data`, which outlives the server's own
/// directory (its watchdog removes that one when it dies).
pub fn own_server(port: Option<u16>, extra: &[&str], data: &Path) -> Result<RunningServer, String> {
    let command_line = |port: u16, dir: &Path| {
        let mut args = args(port, dir, extra);
        args.push("--dir".into());
        args.push(data.as_os_str().to_owned());
        args
    };
    match port {
        None => SPEC.start(command_line),
        Some(port) => {
            let binary = SPEC.find_binary()?;
            let dir = crate::harness::temp_dir(SPEC.store)?;
            let mut server = RunningServer::spawn(&binary, command_line(port, &dir), port, dir)?;
            server.wait_until_listening(Duration::from_secs(30))?;
            Ok(server)
        }
    }
}
