//! A real PostgreSQL for the tests and the benchmark: `initdb` and
//! `postgres` from the installed binaries, on a free loopback port, in a
//! temporary directory, under the harness's watchdog; or the server named
//! by `MUTEXTREE_POSTGRES_URL`.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (CI, a
//! container), `initdb` and `postgres` run as the unprivileged user
//! `nobody` through `setpriv`, in a directory handed over to that user.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{free_port, temp_dir, RunningServer, ServerSpec, SharedServer};

/// `postgres`, `initdb` and `pg_isready`, from Debian's `postgresql`.
pub const SPEC: ServerSpec = ServerSpec {
    store: "postgres",
    url_variable: "MUTEXTREE_POSTGRES_URL",
    binary: "postgres",
    search: &["/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin"],
    install: "apt-get install postgresql",
};

static SERVER: SharedServer = SharedServer::new();

/// The server shared by this test binary, started on first use, as a
/// `postgres://` URL (or `MUTEXTREE_POSTGRES_URL`), as the store's config,
/// `mutextree::connect` and the command line take it.
pub fn url() -> String {
    SERVER.url(&SPEC, || {
        let server = Postgres::create(&Settings::default())?;
        let url = server.url();
        Ok((url, server.running))
    })
}

/// How a started server runs; the default is the tests' server.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `fsync`: off for the tests (a killed server still keeps every
    /// commit, since the WAL is written before a commit is acknowledged;
    /// only a crash of the machine would lose it), on for the benchmark.
    pub fsync: bool,
    /// Extra `-c name=value` settings.
    pub extra: Vec<String>,
    /// Whether [`Postgres::restart`] will be used: the first server then
    /// logs to a directory of its own, so that stopping it leaves the data.
    pub restartable: bool,
}

/// A server the test started, and where its files are.
#[derive(Debug)]
pub struct Postgres {
    /// The server process, under its watchdog.
    pub running: RunningServer,
    /// The directory holding `data/` and the Unix socket; removed with the
    /// server whose `RunningServer::dir` it is.
    pub base: PathBuf,
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    settings: Settings,
}

impl Postgres {
    /// `initdb` in a fresh directory, then the server on a free port; it
    /// and its directory go away with the test process.
    pub fn create(settings: &Settings) -> Result<Postgres, String> {
        let bin = bin_dir()?;
        let base = temp_dir("postgres")?;
        let user = Unprivileged::if_root()?;
        if let Some(user) = &user {
            user.hand_over(&base)?;
        }
        let data = base.join("data");
        let mut initdb =
            user.as_ref().map_or_else(|| Command::new(bin.join("initdb")), |u| u.command(&bin.join("initdb")));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        let output = initdb.output().map_err(|e| format!("cannot run initdb: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "initdb failed: {}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let run_dir = if settings.restartable { base.join("run-1") } else { base.clone() };
        Postgres::start(base, run_dir, free_port(), settings)
    }

    /// Starts the server on the data directory under `base`, logging to
    /// `run_dir/server.log`; `run_dir` is removed when this server stops.
    pub fn start(base: PathBuf, run_dir: PathBuf, port: u16, settings: &Settings) -> Result<Postgres, String> {
        let bin = bin_dir()?;
        std::fs::create_dir_all(&run_dir).map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
        let user = Unprivileged::if_root()?;
        let mut args: Vec<OsString> = Vec::new();
        let program = match &user {
            Some(user) => {
                args.extend(user.setpriv_args());
                args.push(bin.join("postgres").into());
                which("setpriv")?
            }
            None => bin.join("postgres"),
        };
        let mut server_args: Vec<OsString> = vec!["-D".into(), base.join("data").into()];
        server_args.extend(["-p".into(), port.to_string().into(), "-k".into(), base.clone().into()]);
        let mut settings_list = vec![
            "listen_addresses=127.0.0.1".to_owned(),
            "max_connections=1000".to_owned(),
            "shared_buffers=128MB".to_owned(),
            format!("fsync={}", if settings.fsync { "on" } else { "off" }),
        ];
        settings_list.extend(settings.extra.iter().cloned());
        for setting in settings_list {
            server_args.push("-c".into());
            server_args.push(setting.into());
        }
        args.extend(server_args);
        let mut running = RunningServer::spawn(&program, args, port, run_dir)?;
        running.wait_until_listening(Duration::from_secs(60))?;
        wait_until_ready(&bin, port, &running)?;
        Ok(Postgres { running, base, port, settings: settings.clone() })
    }

    /// `postgres://postgres@127.0.0.1:…/postgres`.
    pub fn url(&self) -> String {
        url_for(self.port)
    }

    /// Kills the server (`kill -9`, as a crash) and starts a new one on the
    /// same port and data directory. This one's own run directory must not
    /// be `base`.
    pub fn restart(self) -> Result<Postgres, String> {
        let stopped = self.stop();
        stopped.start_again()
    }

    /// Kills the server (`kill -9`, as a crash) and starts a new one on the
    /// same port and data directory, logging to a fresh run directory, so
    /// that it can crash again; whoever started it removes `base` at the
    /// end.
    pub fn crash_and_restart(self) -> Result<Postgres, String> {
        let Stopped { base, port, settings } = self.stop();
        let run_dir = base.join(format!("run-{:08x}", fastrand::u32(..)));
        Postgres::start(base, run_dir, port, &settings)
    }

    /// Kills the server (`kill -9`, as a crash), keeping its data.
    ///
    /// PostgreSQL's child processes run in sessions of their own, so
    /// killing the server's process group ends only the postmaster; the
    /// children would linger (attached to its shared memory, which stops a
    /// new server from starting) until they notice. They are killed too, by
    /// their process ids, as a crash of the whole server would.
    pub fn stop(self) -> Stopped {
        let Postgres { running, base, port, settings } = self;
        assert_ne!(running.dir, base, "the data directory would be removed with the server");
        let postmaster = std::fs::read_to_string(base.join("data/postmaster.pid"))
            .ok()
            .and_then(|pid_file| pid_file.lines().next().and_then(|line| line.trim().parse::<u32>().ok()));
        let children = postmaster.map(children_of).unwrap_or_default();
        running.stop();
        for child in &children {
            let _ = Command::new("kill").args(["-9", &child.to_string()]).status();
        }
        let started = Instant::now();
        while children.iter().any(|child| Path::new(&format!("/proc/{child}")).exists())
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        Stopped { base, port, settings }
    }
}

/// A server that was killed, and what it takes to start it again.
#[derive(Debug)]
pub struct Stopped {
    base: PathBuf,
    port: u16,
    settings: Settings,
}

impl Stopped {
    /// A new server on the same port and data directory (after crash
    /// recovery); it removes the directory when it stops.
    pub fn start_again(self) -> Result<Postgres, String> {
        Postgres::start(self.base.clone(), self.base, self.port, &self.settings)
    }
}

/// The processes whose parent is `pid`, from `/proc`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            // `pid (name) state ppid ...`; the name may hold spaces, so
            // count from the last `)`.
            std::fs::read_to_string(format!("/proc/{candidate}/stat")).ok().is_some_and(|stat| {
                stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// The connection string of a server of the tests' on `port`.
pub fn url_for(port: u16) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

/// The directory of the installed `postgres`, which holds `initdb` and
/// `pg_isready` too (a `postgres` on PATH may be a link to it).
pub fn bin_dir() -> Result<PathBuf, String> {
    let found = SPEC.find_binary()?;
    let postgres = std::fs::canonicalize(&found).map_err(|e| format!("cannot resolve {}: {e}", found.display()))?;
    Ok(postgres.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn which(program: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| format!("`{program}` (util-linux) is needed to run PostgreSQL as a user other than root"))
}

/// Waits until the server accepts sessions (it listens before it has
/// finished starting up or recovering).
fn wait_until_ready(bin: &Path, port: u16, running: &RunningServer) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
            .status()
            .map_err(|e| format!("cannot run pg_isready: {e}"))?;
        if ready.success() {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!("PostgreSQL did not accept sessions within 60 s; its log:\n{}", running.log()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The user PostgreSQL runs as when the tests run as root.
struct Unprivileged {
    uid: u32,
    gid: u32,
}

impl Unprivileged {
    fn if_root() -> Result<Option<Self>, String> {
        let me = std::fs::metadata("/proc/self").map_err(|e| format!("cannot read /proc/self: {e}"))?;
        if me.uid() != 0 {
            return Ok(None);
        }
        let id = |flag: &str| -> Result<u32, String> {
            let output =
                Command::new("id").args([flag, "nobody"]).output().map_err(|e| format!("cannot run id: {e}"))?;
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse()
                .map_err(|_| "running as root, and there is no user `nobody` to run PostgreSQL as".to_owned())
        };
        Ok(Some(Unprivileged { uid: id("-u")?, gid: id("-g")? }))
    }

    fn hand_over(&self, dir: &Path) -> Result<(), String> {
        std::os::unix::fs::chown(dir, Some(self.uid), Some(self.gid))
            .map_err(|e| format!("cannot hand {} over to uid {}: {e}", dir.display(), self.uid))
    }

    fn setpriv_args(&self) -> Vec<OsString> {
        [format!("--reuid={}", self.uid), format!("--regid={}", self.gid), "--clear-groups".to_owned(), "--".to_owned()]
            .map(OsString::from)
            .into()
    }

    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(which("setpriv").unwrap_or_else(|message| panic!("{message}")));
        command.args(self.setpriv_args()).arg(program);
        command
    }
}
