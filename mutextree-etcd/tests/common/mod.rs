//! etcd servers for the tests, and the store as the conformance suite's
//! store under test.

#![allow(dead_code)] // each test binary uses part of this

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use conformance::harness::{free_port, temp_dir, RunningServer, ServerSpec, SharedServer};
use conformance::{TestStore, Timing};
use mutextree_core::{async_trait, Error, LockBackend};
use mutextree_etcd::{EtcdBackend, EtcdConfig};

pub(crate) const SPEC: ServerSpec = ServerSpec {
    store: "etcd",
    url_variable: "MUTEXTREE_ETCD_URL",
    binary: "etcd",
    search: &[],
    install: "apt-get install etcd-server",
};

/// etcd's time scales. Lease ttls are whole seconds from 2 s, and expired
/// leases are revoked by a sweep about every 500 ms, then committed through
/// raft: a second of slack covers that. A unit of 2 s keeps every ttl the
/// suite asks for a whole number of seconds (the model's `(k + ½)` units
/// are 3, 5 and 7 s), so nothing is rounded.
pub(crate) const TIMING: Timing = Timing { unit: Duration::from_secs(2), slack: Duration::from_secs(1) };

static SHARED: SharedServer = SharedServer::new();

/// The URL of the test binary's etcd: `MUTEXTREE_ETCD_URL`, or a server
/// started on first use.
pub(crate) fn url() -> String {
    SHARED.url(&SPEC, || {
        let binary = SPEC.find_binary()?;
        let (client_port, dir) = (free_port(), data_dir()?);
        let args = member_args("solo", client_port, free_port(), &dir, &[]);
        let mut server = RunningServer::spawn(&binary, args, client_port, dir)?;
        server.wait_until_listening(Duration::from_secs(60))?;
        Ok((client_url(server.port), server))
    })
}

/// The shared etcd as an `etcd://` URL, as `mutextree::connect` and the
/// command line take it.
pub(crate) fn connect_url() -> String {
    url().replace("http://", "etcd://")
}

/// A fresh directory for one member's data, removed by the harness's
/// watchdog with the server. On tmpfs (`/dev/shm`) where the machine has
/// one: etcd syncs every write to disk, which makes it slow on a loaded or
/// slow disk, and these tests are about locks, not about etcd's durability.
fn data_dir() -> Result<PathBuf, String> {
    let tmpfs = Path::new("/dev/shm");
    if !tmpfs.is_dir() {
        return temp_dir("etcd");
    }
    let dir = tmpfs.join(format!("mutextree-etcd-{}-{:08x}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

pub(crate) fn client_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

fn peer_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The command line of one member; `cluster` lists every member's name and
/// peer port (empty for a single member).
fn member_args(name: &str, client_port: u16, peer_port: u16, dir: &Path, cluster: &[(String, u16)]) -> Vec<OsString> {
    let initial_cluster = if cluster.is_empty() {
        format!("{name}={}", peer_url(peer_port))
    } else {
        cluster.iter().map(|(name, port)| format!("{name}={}", peer_url(*port))).collect::<Vec<_>>().join(",")
    };
    [
        "--name".to_owned(),
        name.to_owned(),
        "--data-dir".to_owned(),
        dir.join("data").display().to_string(),
        "--listen-client-urls".to_owned(),
        client_url(client_port),
        "--advertise-client-urls".to_owned(),
        client_url(client_port),
        "--listen-peer-urls".to_owned(),
        peer_url(peer_port),
        "--initial-advertise-peer-urls".to_owned(),
        peer_url(peer_port),
        "--initial-cluster".to_owned(),
        initial_cluster,
        "--initial-cluster-state".to_owned(),
        "new".to_owned(),
        "--initial-cluster-token".to_owned(),
        format!("mutextree-{}", std::process::id()),
        "--logger".to_owned(),
        "zap".to_owned(),
        "--log-level".to_owned(),
        "warn".to_owned(),
    ]
    .map(OsString::from)
    .into_iter()
    .collect()
}

/// A cluster of members on loopback, each under the harness's watchdog.
/// Each member keeps its data in a home directory of its own, outside the
/// directory its watchdog removes, so that a killed member can be started
/// again on its data.
pub(crate) struct Cluster {
    pub(crate) members: Vec<Option<RunningServer>>,
    pub(crate) client_ports: Vec<u16>,
    binary: PathBuf,
    args: Vec<Vec<OsString>>,
    homes: Vec<PathBuf>,
}

impl Cluster {
    pub(crate) fn start(size: usize) -> Result<Cluster, String> {
        let binary: PathBuf = SPEC.find_binary()?;
        let ports: Vec<(String, u16, u16)> = (0..size).map(|i| (format!("m{i}"), free_port(), free_port())).collect();
        let peers: Vec<(String, u16)> = ports.iter().map(|(name, _, peer)| (name.clone(), *peer)).collect();
        let mut cluster = Cluster {
            members: Vec::new(),
            client_ports: ports.iter().map(|(_, client, _)| *client).collect(),
            binary,
            args: Vec::new(),
            homes: Vec::new(),
        };
        for (name, client_port, peer_port) in &ports {
            let home = data_dir()?;
            cluster.args.push(member_args(name, *client_port, *peer_port, &home, &peers));
            cluster.homes.push(home);
            cluster.members.push(None);
        }
        for member in 0..size {
            cluster.members[member] = Some(cluster.spawn(member)?);
        }
        for member in cluster.members.iter_mut().flatten() {
            member.wait_until_listening(Duration::from_secs(60))?;
        }
        Ok(cluster)
    }

    /// Starts a member on its data, with a fresh run directory.
    fn spawn(&self, member: usize) -> Result<RunningServer, String> {
        let run = self.homes[member].join(format!("run-{:08x}", fastrand::u32(..)));
        std::fs::create_dir_all(&run).map_err(|e| format!("cannot create {}: {e}", run.display()))?;
        RunningServer::spawn(&self.binary, self.args[member].clone(), self.client_ports[member], run)
    }

    /// Kills a member (`kill -9`) and starts it again on its data.
    pub(crate) fn crash_and_restart(&mut self, member: usize) -> Result<(), String> {
        if let Some(running) = self.members[member].take() {
            running.stop();
        }
        let mut running = self.spawn(member)?;
        running.wait_until_listening(Duration::from_secs(60))?;
        self.members[member] = Some(running);
        Ok(())
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.client_ports.iter().map(|port| client_url(*port)).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for member in self.members.iter_mut().filter_map(Option::take) {
            member.stop();
        }
        for home in &self.homes {
            let _ = std::fs::remove_dir_all(home);
        }
    }
}

/// The index of the member that leads, once all members agree on one.
pub(crate) async fn leader(urls: &[String]) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = Vec::new();
        for url in urls {
            let status = async { etcd_client::Client::connect([url], None).await?.status().await };
            if let Ok(status) = status.await {
                let member = status.header().map_or(0, |header| header.member_id());
                seen.push((member, status.leader()));
            }
        }
        let leaders: Vec<u64> = seen.iter().map(|(_, leader)| *leader).collect();
        if seen.len() == urls.len() && leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0]) {
            if let Some(index) = seen.iter().position(|(member, _)| *member == leaders[0]) {
                return index;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "the cluster elected no leader in 60 s: {seen:?}");
        // No event tells when an election ends; the members' own status
        // is asked again shortly.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A backend on its own connection to `urls`, in `namespace`.
pub(crate) async fn backend(urls: &[String], namespace: &str) -> Result<EtcdBackend, Error> {
    EtcdConfig::new(urls.iter().cloned()).connect().await?.backend(namespace)
}

/// A fresh random namespace.
pub(crate) fn namespace() -> String {
    format!("t-{:016x}", fastrand::u64(..))
}

/// The store under the conformance suite: a fresh connection per client.
pub(crate) struct Etcd {
    url: String,
}

impl Etcd {
    pub(crate) fn shared() -> Self {
        Etcd { url: url() }
    }
}

#[async_trait]
impl TestStore for Etcd {
    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        Ok(Arc::new(backend(std::slice::from_ref(&self.url), namespace).await?))
    }

    fn timing(&self) -> Timing {
        TIMING
    }
}
