//! The fixture against the real PostgreSQL programs: clusters start, serve separate databases
//! to real clients, and leave no process or directory behind.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed expectation fails the test"
)]

use std::fs;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use pg_fixture::{Cluster, USER};
use postgres::{Client, NoTls};

/// What the server said, or the client's error.
fn message(error: &postgres::Error) -> String {
    error
        .as_db_error()
        .map_or_else(|| error.to_string(), ToString::to_string)
}

/// Connects to `url`, bounded.
fn connect(url: &str) -> Result<Client, postgres::Error> {
    let mut config: postgres::Config = url.parse()?;
    config.connect_timeout(Duration::from_secs(10));
    config.connect(NoTls)
}

/// Whether process `pid` exists and has not exited (a zombie has).
fn alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold anything.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    state != Some('Z')
}

/// Waits up to `limit` for `done`.
fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// The user ID process `pid` runs as.
fn uid_of(pid: u32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("Uid:"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Writes `value` into a new table of database `url` and reads it back.
fn write_and_read(url: &str, value: &str) {
    let mut client = connect(url).unwrap();
    client
        .batch_execute("CREATE TABLE mark (value text NOT NULL)")
        .unwrap();
    client
        .execute("INSERT INTO mark (value) VALUES ($1)", &[&value])
        .unwrap();
    let rows = client.query("SELECT value FROM mark", &[]).unwrap();
    let values: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(values, [value]);
}

#[test]
fn a_cluster_serves_separate_databases_and_is_removed_on_drop() {
    let cluster = Cluster::start().unwrap();
    let (a, b) = (
        cluster.create_database().unwrap(),
        cluster.create_database().unwrap(),
    );
    assert_ne!(a, b);
    assert!(a.starts_with(&format!(
        "postgres://{USER}:{}@127.0.0.1:{}/",
        cluster.password(),
        cluster.port()
    )));
    write_and_read(&a, "in a");
    // b is a different database: a's table is not there, and b takes its own.
    let error = connect(&b)
        .unwrap()
        .query("SELECT value FROM mark", &[])
        .unwrap_err();
    assert!(
        message(&error).contains("\"mark\" does not exist"),
        "{error}"
    );
    write_and_read(&b, "in b");

    let (dir, pid) = (cluster.dir().to_owned(), cluster.server_pid().unwrap());
    assert!(dir.join("data/PG_VERSION").is_file());
    assert!(alive(pid));
    drop(cluster);
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        eventually(Duration::from_secs(10), || !alive(pid)),
        "the server (PID {pid}) still runs"
    );
}

#[test]
fn tests_get_a_fast_server_and_benchmarks_a_durable_one() {
    let settings = |url: &str| -> Vec<String> {
        let mut client = connect(url).unwrap();
        [
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "max_connections",
        ]
        .iter()
        .map(|name| {
            let row = client.query_one(&format!("SHOW {name}"), &[]).unwrap();
            row.get(0)
        })
        .collect()
    };
    let shared = Cluster::shared();
    assert_eq!(
        settings(&shared.create_database().unwrap()),
        ["off", "off", "off", "200"]
    );
    let durable = Cluster::start_durable().unwrap();
    assert_eq!(
        settings(&durable.create_database().unwrap()),
        ["on", "on", "on", "200"]
    );
}

#[test]
fn the_server_runs_unprivileged_on_loopback_and_wants_the_password() {
    let cluster = Cluster::shared();
    let pid = cluster.server_pid().unwrap();
    let expected_uid = if rustix::process::geteuid().is_root() {
        65534 // nobody
    } else {
        rustix::process::geteuid().as_raw()
    };
    assert_eq!(uid_of(pid), expected_uid);

    let url = cluster.create_database().unwrap();
    let mut client = connect(&url).unwrap();
    let row = client
        .query_one(
            "SELECT host(inet_server_addr()), inet_server_port(), current_user, \
             current_setting('listen_addresses')",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "127.0.0.1");
    assert_eq!(row.get::<_, i32>(1), i32::from(cluster.port()));
    assert_eq!(row.get::<_, String>(2), USER);
    assert_eq!(row.get::<_, String>(3), "127.0.0.1");

    let wrong = url.replace(cluster.password(), "not-the-password");
    let Err(error) = connect(&wrong) else {
        panic!("a wrong password was accepted");
    };
    assert!(
        message(&error).contains("password authentication failed"),
        "{error}"
    );
}

/// Several tests at once, each with its own database on the one shared cluster.
fn use_the_shared_cluster(value: &str) -> String {
    let url = Cluster::shared().create_database().unwrap();
    write_and_read(&url, value);
    url
}

#[test]
fn the_shared_cluster_serves_parallel_tests_1() {
    use_the_shared_cluster("one");
}

#[test]
fn the_shared_cluster_serves_parallel_tests_2() {
    use_the_shared_cluster("two");
}

#[test]
fn the_shared_cluster_serves_parallel_threads() {
    let urls: Vec<String> = thread::scope(|scope| {
        let workers: Vec<_> = (0..6)
            .map(|i| scope.spawn(move || use_the_shared_cluster(&format!("thread {i}"))))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut distinct = urls.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), urls.len(), "{urls:?}");
    assert!(std::ptr::eq(Cluster::shared(), Cluster::shared()));
}

#[tokio::test]
async fn create_database_works_inside_an_async_runtime() {
    let url = Cluster::shared().create_database().unwrap();
    // The test's own blocking client cannot run on the runtime's thread.
    tokio::task::spawn_blocking(move || write_and_read(&url, "async"))
        .await
        .unwrap();
}

/// Set for the child process of the next test.
const CHILD: &str = "PG_FIXTURE_SHARED_CHILD";

#[test]
#[ignore = "run by the_shared_cluster_is_removed_when_its_process_exits in a child process"]
fn shared_cluster_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let cluster = Cluster::shared();
    use_the_shared_cluster("child");
    println!("dir={}", cluster.dir().display());
    println!("pid={}", cluster.server_pid().unwrap());
}

#[test]
fn the_shared_cluster_is_removed_when_its_process_exits() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "shared_cluster_child",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Read to the end: this also shows that neither the server nor the watcher holds on to
    // the test's output.
    let mut stdout = child.stdout.take().unwrap();
    let (done, printed) = mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        let _ = done.send(text);
    });
    let text = printed.recv_timeout(Duration::from_secs(120)).unwrap();
    assert!(child.wait().unwrap().success(), "{text}");
    let field = |name: &str| {
        let line = text.lines().find_map(|line| line.strip_prefix(name));
        line.unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    };
    let dir = field("dir=");
    let pid: u32 = field("pid=").parse().unwrap();

    assert!(
        eventually(Duration::from_secs(30), || !alive(pid)),
        "the child's server (PID {pid}) still runs"
    );
    assert!(
        eventually(Duration::from_secs(10), || fs::metadata(&dir).is_err()),
        "{dir} is left"
    );
}
