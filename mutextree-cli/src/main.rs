//! `mutextree`: tree locks from the shell, the way `flock(1)` serves files.
//!
//! ```text
//! mutextree --store redis://127.0.0.1:6379 run eu-west/rack-12 -- ./patch-rack.sh
//! mutextree --store redis://127.0.0.1:6379 run dc/rack-1/host-3 -s dc/images -- ./move-vm.sh
//! mutextree --store redis://127.0.0.1:6379 status eu-west
//! ```
//!
//! Every subcommand's `--help` has an example; the exit statuses are in
//! [`exit`]. `mutextree completions SHELL` and `mutextree man` print a
//! completion script and the manual page, both generated from the same
//! definitions as `--help`, so they cannot drift from it.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mutextree::backend::StoreUrl;
use mutextree::{Error, LockBackend, LockPath, Namespace};

mod admin;
mod bench;
mod exit;
mod run;
mod show;
mod waiting;

/// Tree locks from the shell: hold a lock while a command runs, see who
/// holds what, measure a store.
///
/// A lock on a path (A/B/D) protects the node and its whole subtree: it is
/// refused while the node, an ancestor or a descendant is held. Segments
/// are separated by "/"; write "\/" for a slash inside a segment.
///
/// A lock is exclusive, or shared (run -s PATH): shared locks on one branch
/// hold at once, and keep exclusive ones off the node, its ancestors and
/// its subtree. One run can lock several paths, all or nothing.
#[derive(Debug, Parser)]
#[command(name = "mutextree", version, after_help = exit::HELP)]
struct Cli {
    /// The store: memory:// (this process only), redis://host:port,
    /// redis+cluster://host:port,..., postgres://user@host/db,
    /// etcd://host:port,..., with ?namespace=NAME and the store's options.
    #[arg(long, env = "MUTEXTREE_STORE", global = true)]
    store: Option<String>,

    /// The namespace, instead of the URL's (default: mutextree).
    #[arg(long, env = "MUTEXTREE_NAMESPACE", global = true)]
    namespace: Option<String>,

    /// Say on stderr what the locks do: -v each acquisition with its
    /// refusals, each refresh, release and loss (and, for run, each lock
    /// it waits behind and how long the lock took); -vv each wake-up of a
    /// waiter too.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(run::Run),
    Status(show::Status),
    Why(show::Why),
    Release(admin::Release),
    Bench(bench::Bench),
    Completions(Completions),
    Man(Man),
}

/// Print a completion script for SHELL.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  mutextree completions bash > /etc/bash_completion.d/mutextree
  mutextree completions zsh > \"${fpath[1]}/_mutextree\"")]
struct Completions {
    /// bash, elvish, fish, powershell or zsh.
    shell: clap_complete::Shell,
}

/// Print the manual page (roff), for man(1).
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  mutextree man | man -l -
  mutextree man > /usr/local/share/man/man1/mutextree.1")]
struct Man {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    trace_to_stderr(cli.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    let mut command = cli.command;
    if let Command::Run(run) = &mut command {
        run.verbose = cli.verbose > 0;
    }
    match runtime.block_on(command.execute(cli.store.as_deref(), cli.namespace.as_deref())) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("mutextree: {error}");
            exit::for_error(&error)
        }
    }
}

/// Prints the library's spans and events on stderr for `-v` (debug: each
/// acquisition with its refusals, refresh, release and loss, as each span
/// closes) and `-vv` (trace: wake-ups too); nothing without.
fn trace_to_stderr(verbose: u8) {
    use std::io::IsTerminal;

    use tracing_subscriber::fmt::format::FmtSpan;
    use tracing_subscriber::prelude::*;

    let level = match verbose {
        0 => return,
        1 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    let printed = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_span_events(FmtSpan::CLOSE)
        .with_target(false);
    let only_ours = tracing_subscriber::filter::Targets::new().with_target("mutextree", level);
    tracing_subscriber::registry().with(printed.with_filter(only_ours)).init();
}

impl Command {
    async fn execute(self, store: Option<&str>, namespace: Option<&str>) -> Result<ExitCode, Error> {
        let place = || Place::new(store, namespace);
        match self {
            Command::Run(run) => run.execute(&place()?).await,
            Command::Status(status) => {
                let place = place()?;
                status.execute(&place.connect().await?, &place.namespace).await
            }
            Command::Why(why) => why.execute(&place()?.connect().await?).await,
            Command::Release(release) => release.execute(&place()?.connect().await?).await,
            Command::Bench(bench) => bench.execute(&place()?.url).await,
            // These describe the program and need no store.
            Command::Completions(completions) => Ok(completions.print()),
            Command::Man(Man {}) => Ok(print_man_page()),
        }
    }
}

impl Completions {
    fn print(&self) -> ExitCode {
        use clap::CommandFactory;
        clap_complete::generate(self.shell, &mut Cli::command(), "mutextree", &mut std::io::stdout());
        ExitCode::SUCCESS
    }
}

fn print_man_page() -> ExitCode {
    use clap::CommandFactory;
    match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mutextree: writing the manual page: {error}");
            ExitCode::from(exit::FAILED)
        }
    }
}

/// Where the commands work: the store's URL and the namespace in it.
#[derive(Debug)]
struct Place {
    url: String,
    namespace: String,
}

impl Place {
    /// `--store`, and `--namespace` or else the URL's `namespace` (or the
    /// default).
    fn new(store: Option<&str>, namespace: Option<&str>) -> Result<Place, Error> {
        let url = store.ok_or_else(|| Error::InvalidConfig {
            store: "mutextree",
            reason: "no store: pass --store URL or set MUTEXTREE_STORE (e.g. redis://127.0.0.1:6379)".to_owned(),
        })?;
        let namespace = match namespace {
            Some(namespace) => Namespace::new(namespace)?,
            None => StoreUrl::parse("mutextree", url)?.take_namespace()?,
        };
        Ok(Place { url: url.to_owned(), namespace: namespace.as_str().to_owned() })
    }

    /// A connection to the store, in the namespace.
    async fn connect(&self) -> Result<Arc<dyn LockBackend>, Error> {
        connect(&self.url, &self.namespace).await
    }
}

/// Connects to the store at `url`, in `namespace`.
async fn connect(url: &str, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
    note_if_memory(url);
    mutextree::connect_with(url, namespace).await
}

fn note_if_memory(url: &str) {
    static NOTED: std::sync::Once = std::sync::Once::new();
    if url.starts_with("memory://") {
        NOTED.call_once(|| {
            eprintln!("mutextree: note: memory:// locks live in this process only; other processes do not see them");
        });
    }
}

/// A path in its text form (`A/B/D`).
fn parse_path(text: &str) -> Result<LockPath, String> {
    LockPath::parse(text).map_err(|error| error.to_string())
}

/// `30s`, `500ms`, `2m`, `1h 30m`; a bare number is seconds: what store
/// URLs take too.
fn parse_duration(text: &str) -> Result<Duration, String> {
    mutextree::backend::parse_duration(text)
        .ok_or_else(|| format!("write {}", mutextree::backend::url::DURATION_EXAMPLES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_required() {
        assert_eq!(Place::new(Some("memory://"), None).expect("given").url, "memory://");
        assert!(Place::new(None, None).expect_err("no store").to_string().contains("MUTEXTREE_STORE"));
    }

    #[test]
    fn durations_read_as_in_store_urls() {
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("2 fortnights").expect_err("unknown unit").contains("1500ms"));
    }

    #[test]
    fn durations_are_humantimes_or_bare_seconds() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("NaN").is_err());
        assert!(parse_duration("soon").expect_err("not a duration").contains("a bare number is seconds"));
    }

    #[test]
    fn the_namespace_is_read_from_the_url() {
        let namespace = |store, option| Place::new(Some(store), option).expect("valid").namespace;
        assert_eq!(namespace("redis://h:1?request_timeout=1s&namespace=app", None), "app");
        assert_eq!(namespace("memory://", None), "mutextree");
        assert_eq!(namespace("memory://?namespace=app", Some("mine")), "mine");
        assert!(Place::new(Some("memory://"), Some("a b")).is_err(), "a bad --namespace is refused");
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
