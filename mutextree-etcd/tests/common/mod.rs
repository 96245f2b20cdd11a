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
use mutextree_etcd::{EtcdBackend, EtcdConfig, EtcdStore};

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

/// A 3-member cluster on loopback, each member under the harness's
/// watchdog.
pub(crate) struct Cluster {
    pub(crate) members: Vec<Option<RunningServer>>,
    pub(crate) client_ports: Vec<u16>,
}

impl Cluster {
    pub(crate) fn start(size: usize) -> Result<Cluster, String> {
        let binary: PathBuf = SPEC.find_binary()?;
        let ports: Vec<(String, u16, u16)> = (0..size).map(|i| (format!("m{i}"), free_port(), free_port())).collect();
        let peers: Vec<(String, u16)> = ports.iter().map(|(name, _, peer)| (name.clone(), *peer)).collect();
        let mut members = Vec::new();
        for (name, client_port, peer_port) in &ports {
            let dir = data_dir()?;
            let args = member_args(name, *client_port, *peer_port, &dir, &peers);
            members.push(RunningServer::spawn(&binary, args, *client_port, dir)?);
        }
        for member in &mut members {
            member.wait_until_listening(Duration::from_secs(60))?;
        }
        Ok(Cluster {
            members: members.into_iter().map(Some).collect(),
            client_ports: ports.iter().map(|(_, client, _)| *client).collect(),
        })
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
    }
}

/// A backend on its own connection to `urls`, in `namespace`.
pub(crate) async fn backend(urls: &[String], namespace: &str) -> Result<EtcdBackend, Error> {
    EtcdStore::connect(EtcdConfig::new(urls.iter().cloned())).await?.namespace(namespace)
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
