//! A throwaway PostgreSQL cluster for tests and benchmarks (a dev-dependency only).
//!
//! [`Cluster::start`] runs `initdb` and `pg_ctl` in a fresh temporary directory: the server
//! listens on 127.0.0.1 only, at a free port, and its one superuser has a random password
//! (scram-sha-256, also over the private Unix socket). Dropping the [`Cluster`] stops the
//! server and deletes the directory. [`Cluster::shared`] is one cluster for a whole test
//! process, started on first use and removed when the process exits; each test takes its own
//! database from [`Cluster::create_database`], so tests running in parallel never see each
//! other's data.
//!
//! Where PostgreSQL comes from: Debian's `postgresql` package (15 on bookworm), which
//! `.ci/run` installs when no `initdb` is found. The programs are looked up with
//! `pg_config --bindir`, then under `/usr/lib/postgresql/*/bin` (highest version), then on
//! PATH. Nothing here uses the package's own cluster or its service. `initdb` and `postgres`
//! refuse to run as root, and the tests and CI run as root: then the cluster runs as `nobody`.
//!
//! Every step is bounded: a program that hangs is killed and reported with what it printed.

mod account;
mod binaries;
mod command;
mod reaper;

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use account::Account;

/// The cluster's superuser.
pub const USER: &str = "interpose_test";

/// How long `initdb` may take.
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `pg_ctl` waits for the server to accept connections (its `-t`), in seconds.
const START_WAIT_SECS: u64 = 30;
/// How long `pg_ctl` waits for the server to stop (its `-t`), in seconds.
const STOP_WAIT_SECS: u64 = 10;
/// Slack over `pg_ctl`'s own wait before it is killed.
const PG_CTL_SLACK: Duration = Duration::from_secs(10);
/// Ports tried before giving up when another process takes the free port first.
const START_ATTEMPTS: usize = 5;
/// Connection and statement bound of the administrative connection.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of the server log an error quotes.
const LOG_TAIL_LINES: usize = 20;

/// Why a cluster could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No directory holds `initdb`, `pg_ctl` and `postgres`.
    #[error(
        "no PostgreSQL server programs (initdb, pg_ctl, postgres) found; tried {tried}: install \
         Debian's `postgresql` package (`.ci/run` does)"
    )]
    NotInstalled {
        /// The directories looked in.
        tried: String,
    },
    /// A file-system or process step failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A program exited unsuccessfully.
    #[error("{what} failed ({status}): {output}")]
    Failed {
        /// The program.
        what: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },
    /// A program did not finish in time, and was killed.
    #[error("{what} did not finish within {limit:?} and was killed")]
    TimedOut {
        /// The program.
        what: String,
        /// Its time limit.
        limit: Duration,
    },
    /// The server did not start.
    #[error(
        "PostgreSQL did not start on 127.0.0.1:{port}: {cause}\n--- end of the server log ---\n{log}"
    )]
    Start {
        /// The last port tried.
        port: u16,
        /// What `pg_ctl` reported.
        cause: Box<Error>,
        /// The last lines of the server log.
        log: String,
    },
    /// An SQL statement of the fixture failed.
    #[error("`{sql}` on 127.0.0.1:{port}: {reason}")]
    Sql {
        /// The statement.
        sql: String,
        /// The server's port.
        port: u16,
        /// The server's message when it sent one, else the client's.
        reason: String,
        /// The client's error.
        source: postgres::Error,
    },
}

/// How much the server trades durability for speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `fsync`, `synchronous_commit` and `full_page_writes` off: fast, and a crash of the
    /// machine (not of the server) may lose or corrupt the data. For tests.
    Volatile,
    /// PostgreSQL's defaults: every commit is flushed to disk before it is acknowledged, as a
    /// lab's database runs. For benchmarks.
    Durable,
}

/// A running PostgreSQL server in its own temporary directory, stopped and deleted on drop.
///
/// The directory holds `data/` (the cluster), `sock/` (its Unix socket) and `postgres.log`.
#[derive(Debug)]
pub struct Cluster {
    root: PathBuf,
    bin: PathBuf,
    account: Account,
    port: u16,
    password: String,
    databases: AtomicU64,
}

impl Cluster {
    /// Starts a cluster for tests ([`Durability::Volatile`]).
    pub fn start() -> Result<Cluster, Error> {
        Cluster::start_with(Durability::Volatile)
    }

    /// Starts a cluster that flushes every commit ([`Durability::Durable`]), for benchmarks.
    pub fn start_durable() -> Result<Cluster, Error> {
        Cluster::start_with(Durability::Durable)
    }

    /// Starts a cluster with the given durability. Its directory is made in the system's
    /// temporary directory (`TMPDIR`, else /tmp), which `nobody` must be able to enter when
    /// the caller is root.
    pub fn start_with(durability: Durability) -> Result<Cluster, Error> {
        let bin = binaries::find()?;
        let password = random_password()?;
        let root = tempfile::Builder::new()
            .prefix("interpose-pg-")
            .tempdir()
            .map_err(io_error("creating the cluster's temporary directory"))?
            .keep();
        // From here on a failure drops `cluster`, which removes the directory (and stops a
        // server that did start).
        let mut cluster = Cluster {
            root,
            bin,
            account: Account::for_server(),
            port: 0,
            password,
            databases: AtomicU64::new(0),
        };
        cluster.init(durability)?;
        cluster.launch()?;
        Ok(cluster)
    }

    /// The cluster of this test process, started on first use and shared by every test in it.
    /// It is stopped and its directory removed once the process has exited (a detached watcher
    /// does that, since statics are never dropped).
    ///
    /// # Panics
    /// When the cluster cannot be started: the message says why, and every later call panics
    /// with the same message rather than trying again.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
        let shared = SHARED.get_or_init(|| {
            let cluster = Cluster::start().map_err(|error| error.to_string())?;
            reaper::watch(&cluster).map_err(|error| error.to_string())?;
            Ok(cluster)
        });
        match shared {
            Ok(cluster) => cluster,
            Err(error) => panic!("the shared PostgreSQL cluster did not start: {error}"),
        }
    }

    /// The URL of database `db` (used as written: a plain identifier) for the superuser.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// Creates a new, empty database with a name not used before in this cluster, and returns
    /// its URL. Works from inside an async runtime too (the client runs on its own thread).
    pub fn create_database(&self) -> Result<String, Error> {
        let name = format!("test_{}", self.databases.fetch_add(1, Ordering::Relaxed));
        self.admin(&format!("CREATE DATABASE {name}"))?;
        Ok(self.url(&name))
    }

    /// The port the server listens on, at 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The cluster's temporary directory, removed on drop.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The process ID of the server (its postmaster), while it runs.
    pub fn server_pid(&self) -> Option<u32> {
        let pid_file = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// The command that runs the cluster's `program` as its account.
    fn server_command(&self, program: &str) -> std::process::Command {
        let mut command = self.account.command(&self.bin.join(program));
        // The caller's directory may be closed to the account.
        command.current_dir(&self.root);
        command
    }

    /// Creates the cluster with `initdb` and writes its settings.
    fn init(&self, durability: Durability) -> Result<(), Error> {
        let give = |path: &Path| {
            self.account.give(path).map_err(io_error(&format!(
                "handing {} to the server",
                path.display()
            )))
        };
        give(&self.root)?;
        let sockets = self.root.join("sock");
        fs::create_dir(&sockets).map_err(io_error("creating the socket directory"))?;
        give(&sockets)?;
        let pwfile = self.root.join("pwfile");
        fs::write(&pwfile, &self.password).map_err(io_error("writing the password file"))?;
        give(&pwfile)?;

        let mut initdb = self.server_command("initdb");
        initdb
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", USER, "-A", "scram-sha-256", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()));
        let created = command::run("initdb", initdb, INITDB_TIMEOUT);
        let _ = fs::remove_file(&pwfile);
        created?;

        let conf = self.data_dir().join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(io_error("reading postgresql.conf"))?;
        text.push_str(&settings(&sockets, durability));
        fs::write(&conf, text).map_err(io_error("writing postgresql.conf"))
    }

    /// Starts the server on a free port, trying another when the port was taken meanwhile.
    fn launch(&mut self) -> Result<(), Error> {
        let mut attempt = 1;
        loop {
            self.port = free_port()?;
            let logged = fs::metadata(self.log_path()).map_or(0, |meta| meta.len());
            let Err(cause) = self.pg_ctl_start() else {
                return Ok(());
            };
            // A pg_ctl that gave up may leave a server still starting.
            if let Some(pid) = self.server_pid() {
                command::kill(pid);
            }
            let log = self.log_since(logged);
            if attempt < START_ATTEMPTS && port_taken(&log) {
                attempt += 1;
                continue;
            }
            return Err(Error::Start {
                port: self.port,
                cause: Box::new(cause),
                log,
            });
        }
    }

    fn pg_ctl_start(&self) -> Result<(), Error> {
        self.pg_ctl_up("start", &[])
    }

    /// `pg_ctl ACTION` (start or restart) on the cluster's port, waiting until it serves.
    fn pg_ctl_up(&self, action: &str, extra: &[&str]) -> Result<(), Error> {
        let mut pg_ctl = self.server_command("pg_ctl");
        pg_ctl
            .args([action, "-w", "-s", "-t", &START_WAIT_SECS.to_string()])
            .args(extra)
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-o", &format!("-p {}", self.port)]);
        let limit = Duration::from_secs(START_WAIT_SECS) + PG_CTL_SLACK;
        command::run(&format!("pg_ctl {action}"), pg_ctl, limit).map(drop)
    }

    /// Turns TLS on with the server certificate `cert_pem` and its key `key_pem` (PEM),
    /// restarting the server on the same port; plain connections are still taken (a client
    /// asks for TLS with `sslmode`).
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = self.data_dir().join(name);
            fs::write(&path, pem).map_err(io_error(&format!("writing {name}")))?;
            // The server refuses a key others can read.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(io_error(&format!("restricting {name}")))?;
            self.account
                .give(&path)
                .map_err(io_error(&format!("handing {name} to the server")))?;
        }
        let conf = self.data_dir().join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(io_error("reading postgresql.conf"))?;
        text.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        fs::write(&conf, text).map_err(io_error("writing postgresql.conf"))?;
        self.restart()
    }

    /// Restarts the server on the same port (fast: open sessions are ended), as an
    /// administrator restarting a lab's database would.
    pub fn restart(&self) -> Result<(), Error> {
        self.pg_ctl_up("restart", &["-m", "fast"])
    }

    /// The last lines the server logged after byte `from` of its log.
    fn log_since(&self, from: u64) -> String {
        let log = fs::read(self.log_path()).unwrap_or_default();
        let new = log.get(from as usize..).unwrap_or_default();
        let text = String::from_utf8_lossy(new);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// Stops the server (fast shutdown: open sessions are ended), or kills it if that fails.
    fn stop(&self) {
        let Some(pid) = self.server_pid() else {
            return;
        };
        let mut pg_ctl = self.server_command("pg_ctl");
        pg_ctl
            .args(["stop", "-w", "-s", "-m", "fast"])
            .args(["-t", &STOP_WAIT_SECS.to_string()])
            .arg("-D")
            .arg(self.data_dir());
        let limit = Duration::from_secs(STOP_WAIT_SECS) + PG_CTL_SLACK;
        if command::run("pg_ctl stop", pg_ctl, limit).is_err() {
            command::kill(pid);
        }
    }

    /// Runs `sql` as the superuser in database `postgres`.
    fn admin(&self, sql: &str) -> Result<(), Error> {
        let mut config = postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(USER)
            .password(&self.password)
            .dbname("postgres")
            .connect_timeout(CLIENT_TIMEOUT)
            .options(&format!(
                "-c statement_timeout={}",
                CLIENT_TIMEOUT.as_millis()
            ));
        // The blocking client runs its own runtime, which cannot start on a runtime's thread.
        let result = thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut client = config.connect(postgres::NoTls)?;
                    client.batch_execute(sql)
                })
                .join()
        });
        let result = result.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        result.map_err(|source| Error::Sql {
            sql: sql.to_owned(),
            port: self.port,
            reason: source
                .as_db_error()
                .map_or_else(|| source.to_string(), ToString::to_string),
            source,
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// The settings appended to `postgresql.conf`.
fn settings(sockets: &Path, durability: Durability) -> String {
    let sockets = sockets.display().to_string().replace('\'', "''");
    let mut text = format!(
        "\n# pg-fixture: loopback only, and room for several registry replicas' pools.\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{sockets}'\n\
         max_connections = 200\n\
         timezone = 'UTC'\n"
    );
    if durability == Durability::Volatile {
        text.push_str(
            "# Tests: no flushes to disk.\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n",
        );
    }
    text
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_error("finding a free port on 127.0.0.1"))?;
    let port = listener
        .local_addr()
        .map_err(io_error("finding a free port on 127.0.0.1"))?
        .port();
    Ok(port)
}

/// Whether the server log says the port was taken.
fn port_taken(log: &str) -> bool {
    log.contains("could not bind") || log.contains("Address already in use")
}

/// 32 random hexadecimal digits.
fn random_password() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).map_err(
        |errno| Error::Io {
            what: "reading random bytes for the password".to_owned(),
            source: errno.into(),
        },
    )?;
    // Not proto::hex: this test fixture stays free of the proto crate's server stack.
    Ok(bytes.iter().fold(String::new(), |mut hex, byte| {
        let _ = write!(hex, "{byte:02x}");
        hex
    }))
}

fn io_error(what: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: what.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatile_settings_turn_flushes_off_and_durable_keeps_them() {
        let volatile = settings(Path::new("/tmp/x/sock"), Durability::Volatile);
        assert!(volatile.contains("unix_socket_directories = '/tmp/x/sock'"));
        assert!(volatile.contains("listen_addresses = '127.0.0.1'"));
        assert!(volatile.contains("fsync = off"));
        let durable = settings(Path::new("/tmp/it's"), Durability::Durable);
        assert!(durable.contains("unix_socket_directories = '/tmp/it''s'"));
        assert!(!durable.contains("fsync"));
        assert!(!durable.contains("synchronous_commit"));
    }

    #[test]
    fn passwords_are_random_hex() {
        let (a, b) = (random_password().unwrap(), random_password().unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_server_that_does_not_start_is_reported_with_its_log() {
        let mut cluster = Cluster::start().unwrap();
        cluster.stop();
        assert_eq!(cluster.server_pid(), None);
        let conf = cluster.data_dir().join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).unwrap();
        text.push_str("max_connections = many\n");
        fs::write(&conf, text).unwrap();

        let error = cluster.launch().unwrap_err().to_string();
        assert!(error.contains("PostgreSQL did not start"), "{error}");
        assert!(error.contains("pg_ctl start failed"), "{error}");
        // The server's own words, from the end of its log.
        assert!(
            error.contains("invalid value for parameter \"max_connections\": \"many\""),
            "{error}"
        );
        let dir = cluster.dir().to_owned();
        drop(cluster);
        assert!(!dir.exists());
    }

    #[test]
    fn a_taken_port_is_recognised_in_the_log() {
        assert!(port_taken(
            "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use"
        ));
        assert!(!port_taken("FATAL:  data directory has wrong ownership"));
    }
}
