//! Operating the binary: the flag tables of README's "Operate" section are
//! generated from the binaries' own `--help`, so they cannot drift (the
//! test fails when they differ, and `NATTER_BLESS=1 cargo test -p natter
//! --test cluster operate` rewrites them); `natter migrate`; refusals in a
//! pod.

use std::process::Command;
use std::time::Duration;

use super::{Node, drop_schemas, env, free_port};

/// (heading, `natter` arguments before `--help`, the separate binary).
const COMMANDS: &[(&str, &[&str], &str)] = &[
    ("natter serve", &["serve"], ""),
    ("natter sessions", &["sessions"], "natter-sessions"),
    ("natter chats", &["chats"], "natter-chats"),
    ("natter messages", &["messages"], "natter-messages"),
    ("natter assistant", &["assistant"], "natter-assistant"),
    ("natter edge", &["edge"], "natter-edge"),
    ("natter health", &["health"], ""),
    ("natter migrate", &["migrate"], ""),
];

struct Flag {
    name: String,
    env: String,
    default: String,
    about: String,
}

fn flags(args: &[&str]) -> Vec<Flag> {
    let output = Command::new(env!("CARGO_BIN_EXE_natter")).args(args).arg("--help").output().expect("natter --help");
    let help = String::from_utf8(output.stdout).expect("utf-8 help");
    let mut flags: Vec<Flag> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim();
        if let Some(rest) =
            trimmed.strip_prefix("--").filter(|_| line.starts_with("      --") || line.starts_with("  -"))
        {
            let name = rest.split([' ', '=']).next().unwrap_or_default().to_owned();
            let mut flag = Flag { name, env: String::new(), default: String::new(), about: String::new() };
            // Short help puts the text on the flag's line, after two or more
            // spaces: `--addr <ADDR>  What it is [default: x]`.
            if let Some((_, text)) = rest.split_once("  ") {
                let mut text = text.trim();
                while let Some(open) = text.rfind(" [").filter(|_| text.ends_with(']')) {
                    let note = &text[open + 2..text.len() - 1];
                    if let Some(env) = note.strip_prefix("env: ") {
                        flag.env = env.split('=').next().unwrap_or_default().to_owned();
                    } else if let Some(default) = note.strip_prefix("default: ") {
                        flag.default = default.to_owned();
                    }
                    text = text[..open].trim_end();
                }
                flag.about = text.to_owned();
            }
            flags.push(flag);
        } else if let Some(flag) = flags.last_mut() {
            if let Some(env) = trimmed.strip_prefix("[env: ") {
                flag.env = env.split('=').next().unwrap_or_default().to_owned();
            } else if let Some(default) = trimmed.strip_prefix("[default: ") {
                flag.default = default.trim_end_matches(']').to_owned();
            } else if flag.about.is_empty() && !trimmed.is_empty() {
                flag.about = trimmed.to_owned();
            }
        }
    }
    flags.retain(|f| f.name != "help" && f.name != "version");
    flags
}

fn generated() -> String {
    let mut out = String::new();
    for (heading, args, binary) in COMMANDS {
        out.push_str(&format!("#### `{heading}`"));
        if !binary.is_empty() {
            out.push_str(&format!(" (also `{binary}`)"));
        }
        out.push_str("\n\n| flag | environment | default | meaning |\n|---|---|---|---|\n");
        for f in flags(args) {
            let cell = |s: &str| if s.is_empty() { String::new() } else { format!("`{}`", s.replace('|', "\\\\|")) };
            out.push_str(&format!(
                "| `--{}` | {} | {} | {} |\n",
                f.name,
                cell(&f.env),
                cell(&f.default),
                f.about.replace('|', "\\\\|")
            ));
        }
        out.push('\n');
    }
    out
}

#[test]
fn readme_operate_tables_match_the_binaries() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md");
    let (start, end) = ("<!-- operate:start -->\n", "<!-- operate:end -->");
    let from = readme.find(start).expect("operate:start marker") + start.len();
    let to = readme.find(end).expect("operate:end marker");
    let want = generated();
    if std::env::var_os("NATTER_BLESS").is_some() {
        std::fs::write(path, format!("{}{want}{}", &readme[..from], &readme[to..])).expect("write README.md");
        return;
    }
    assert!(
        readme[from..to] == want,
        "README's Operate tables differ from --help; run NATTER_BLESS=1 cargo test -p natter --test cluster operate\n{want}"
    );
}

/// In a Kubernetes pod, a split service refuses the deploy files'
/// placeholder credential or database password (anyone who read them holds
/// it) and says which secret to replace. (That it only warns elsewhere is
/// natter-kit's unit test: a process that starts would have to be stopped.)
#[test]
fn a_placeholder_secret_is_refused_in_a_pod() {
    let placeholder = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/dev-secrets/service-credential");
    let dir = tempfile::tempdir().expect("temp dir");
    let credential = dir.path().join("credential");
    std::fs::write(&credential, "q3Vx9mZ2c1bKp0LrT8wYh4nJ6sFgA5dE\n").expect("write credential");
    let placeholder_url = "postgres://natter:REPLACE-ME-natter-database-password@127.0.0.1:1/natter";
    let cases: [(&[&str], &str); 2] = [
        (
            &["--service-credential-file", placeholder],
            "the service credential (--service-credential-file) is the placeholder",
        ),
        (
            &["--service-credential-file", credential.to_str().expect("utf-8 path"), "--database-url", placeholder_url],
            "the database URL (--database-url) is the placeholder",
        ),
    ];
    for (flags, refusal) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_natter"))
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .args(["sessions", "--listen", "127.0.0.1:0", "--internal-listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(flags)
            .output()
            .expect("run natter");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "started with a placeholder: {stderr}");
        assert!(stderr.contains(refusal), "{stderr}");
    }
}

/// `natter migrate ARGS` with `RUST_LOG=warn`: (whether it succeeded,
/// stdout, stderr).
fn migrate(args: &[&str]) -> (bool, String, String) {
    migrate_logging(args, Some("warn"))
}

/// `natter migrate ARGS` with `RUST_LOG` set to `log` (`None`: unset, the
/// default filter): (whether it succeeded, stdout, stderr).
fn migrate_logging(args: &[&str], log: Option<&str>) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_natter"));
    command.arg("migrate").args(args);
    match log {
        Some(log) => command.env("RUST_LOG", log),
        None => command.env_remove("RUST_LOG"),
    };
    let output = command.output().expect("run natter migrate");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("utf-8 output");
    (output.status.success(), text(output.stdout), text(output.stderr))
}

/// The report's lines for a store of `service` migrated from nothing on
/// `engine` ("sqlite" or "postgres"): `applied VERSION DESCRIPTION` for
/// each file of its migrations (the messages service's own per engine
/// too), in version order, as sqlx names them (the file name after the
/// version, `_` read as a space).
fn all_applied(service: &str, engine: &str) -> Vec<String> {
    let root = format!("{}/../{service}/migrations", env!("CARGO_MANIFEST_DIR"));
    let mut migrations: Vec<(i64, String)> = [root.clone(), format!("{root}/{engine}")]
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .filter_map(|entry| {
            let name = entry.expect("a migration file").file_name().into_string().expect("utf-8 name");
            let (version, rest) = name.strip_suffix(".sql")?.split_once('_')?;
            Some((version.parse().ok()?, rest.replace('_', " ")))
        })
        .collect();
    migrations.sort();
    migrations.into_iter().map(|(version, description)| format!("applied {version:04} {description}")).collect()
}

/// The report's section of `service`: its heading line (`service:
/// location`) and the lines below it.
fn section<'a>(report: &'a str, service: &str) -> (&'a str, Vec<&'a str>) {
    let mut lines = report.lines().skip_while(|l| !l.starts_with(&format!("{service}: ")));
    let heading = lines.next().unwrap_or_else(|| panic!("no {service} store in the report:\n{report}"));
    (heading, lines.take_while(|l| l.starts_with("  ")).map(str::trim).collect())
}

/// What `natter migrate` reports for each store on a fresh database: every
/// migration applied, then the messages store's backfills; a second run
/// reports every store up to date and runs nothing.
fn assert_migrates_once(engine: &str, store_args: &[&str], location: impl Fn(&str) -> String) {
    let (ok, first, stderr) = migrate(store_args);
    assert!(ok, "natter migrate failed: {stderr}\n{first}");
    for service in ["sessions", "chats", "messages"] {
        let (heading, lines) = section(&first, service);
        assert_eq!(heading, format!("{service}: {}", location(service)));
        let applied: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("applied ")).collect();
        assert_eq!(applied, all_applied(service, engine), "{service} on {engine}");
    }
    let (_, backfills) = section(&first, "messages");
    for name in ["nfc_text", "chat_details_text", "reaction_forms"] {
        assert!(backfills.contains(&format!("backfill {name}: 0 rewritten").as_str()), "{backfills:?}");
    }
    let (ok, second, stderr) = migrate(store_args);
    assert!(ok, "the second natter migrate failed: {stderr}\n{second}");
    for service in ["sessions", "chats", "messages"] {
        assert_eq!(section(&second, service).1, ["up to date"], "{service}, the second time:\n{second}");
    }
}

/// `natter migrate` on SQLite in a fresh data directory creates and
/// migrates the three stores and says so, a second run finds nothing to
/// do, and `natter serve` starts on what it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_on_sqlite_reports_the_migrations_once_and_serve_starts_on_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let data_dir = data.to_str().expect("utf-8 path");
    assert_migrates_once("sqlite", &["--data-dir", data_dir], |service| {
        data.join(format!("{service}.db")).display().to_string()
    });
    let node = Node::start("serve", free_port(), vec!["--data-dir".into(), data_dir.into()]);
    node.channel().await;
}

/// The same on PostgreSQL (NATTER_TEST_DATABASE_URL; a server that is set
/// but out of reach fails the test), in schemas of the test's own: the
/// report names each schema, then `natter serve` starts on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_on_postgres_reports_the_migrations_once_and_serve_starts_on_them() {
    let Some(db) = env("NATTER_TEST_DATABASE_URL") else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL is not set");
        return;
    };
    let prefix = format!("m{}_", uuid::Uuid::new_v4().simple());
    let store = ["--database-url", db.as_str(), "--database-schema-prefix", prefix.as_str()];
    assert_migrates_once("postgres", &store, |service| format!("{db}, schema {prefix}{service}"));
    // At the default log level, a store found in place says nothing of
    // it: PostgreSQL's NOTICE "schema ... already exists, skipping", once
    // per store at every start, is no news.
    let (ok, _, logged) = migrate_logging(&store, None);
    assert!(ok, "{logged}");
    assert!(!logged.contains("already exists"), "a NOTICE logged at the default level:\n{logged}");
    let node = Node::start("serve", free_port(), store.map(str::to_owned).into());
    node.channel().await;
    drop(node);
    drop_schemas(&db, &prefix).await;
}

/// A store `natter migrate` does not know is refused before anything is
/// touched, naming the ones it knows; one it cannot reach fails naming it.
#[test]
fn migrate_refuses_an_unknown_service_and_names_a_store_that_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().expect("utf-8 path");
    let (ok, _, stderr) = migrate(&["--data-dir", data_dir, "--service", "chats,assistant"]);
    assert!(!ok, "an unknown service was accepted");
    assert!(stderr.contains("invalid value 'assistant' for '--service"), "{stderr}");
    assert!(stderr.contains("possible values: sessions, chats, messages"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "nothing is created before the flags are checked");

    let closed = format!("postgres://natter:s3cr3t@127.0.0.1:{}/natter", free_port());
    let (ok, _, stderr) = migrate(&["--database-url", &closed, "--service", "chats"]);
    assert!(!ok, "a store out of reach was reported migrated");
    assert!(stderr.contains("migrating the chats store (postgres://natter@127.0.0.1:"), "{stderr}");
    assert!(!stderr.contains("s3cr3t"), "the password is not shown: {stderr}");
}

/// Starts `natter serve` with `args` on 127.0.0.1:`port`, its stderr
/// piped, killed if dropped.
fn spawn_serve(port: u16, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_natter"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start natter")
}

/// Waits (`patience` at most) for `child` to exit: whether it succeeded
/// and its stderr; `None` if it was still running (killed then).
async fn exited(child: tokio::process::Child, patience: Duration) -> Option<(bool, String)> {
    let output = tokio::time::timeout(patience, child.wait_with_output()).await.ok()?;
    let output = output.expect("natter ran");
    Some((output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned()))
}

/// Starts `natter serve` with `args` on a port of its own and waits (20 s
/// at most) for it to exit: whether it succeeded and its stderr; `None` if
/// it was still running (killed then).
async fn exits(args: &[&str]) -> Option<(bool, String)> {
    exited(spawn_serve(free_port(), args), Duration::from_secs(20)).await
}

/// A second `natter serve` without NATS on the PostgreSQL stores of a
/// first: it would keep exact caches (memberships, tokens) that the first
/// one's writes never evict, so a member the first removed would go on
/// reading through it. It refuses to start instead, naming the schema and
/// the fix, and so does one with NATS beside it; the first serves on. Once
/// the first has stopped, a new one starts on the same stores (a rollout
/// with strategy: Recreate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_stores_of_one_without_nats_refuses_to_start() {
    let Some(db) = env("NATTER_TEST_DATABASE_URL") else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL is not set");
        return;
    };
    let prefix = format!("i{}_", uuid::Uuid::new_v4().simple());
    let store = ["--database-url", db.as_str(), "--database-schema-prefix", prefix.as_str()];
    let mut first = Node::start("serve", free_port(), store.map(str::to_owned).into());
    let channel = first.channel().await;

    let Some((ok, stderr)) = exits(&store).await else { panic!("a second natter serve without NATS started") };
    assert!(!ok, "the second natter serve exited 0: {stderr}");
    let schema = format!("schema {prefix}sessions of this database and this one has no --nats-url");
    assert!(stderr.contains(&schema) && stderr.contains("strategy: Recreate"), "{stderr}");
    if let Some(nats) = env("NATTER_TEST_NATS_URL") {
        let on_nats = [&store[..], &["--nats-url", nats.as_str()]].concat();
        let Some((ok, stderr)) = exits(&on_nats).await else { panic!("a natter serve on NATS started beside it") };
        assert!(!ok && stderr.contains(&format!("{prefix}sessions of this database without --nats-url")), "{stderr}");
    }
    super::user(&channel, "still-served").await;

    first.terminate();
    let again = Node::start("serve", free_port(), store.map(str::to_owned).into());
    again.channel().await;
    drop(again);
    drop_schemas(&db, &prefix).await;
}

/// The backend holding the instance lock of `schema` at `db` once
/// `held` accepts it (15 s at most).
async fn lock_holder(db: &str, schema: &str, held: impl Fn(Option<i32>) -> bool) -> Option<i32> {
    let waited = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let holder = natter_db::postgres::InstanceLock::holder(db, schema).await.expect("pg_locks");
            if held(holder) {
                return holder;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    waited.await.unwrap_or_else(|_| panic!("the instance lock of {schema} never came to the holder expected"))
}

/// Ends backend `pid`'s session, as a failover, `idle_session_timeout` or
/// an administrator's `pg_terminate_backend` does.
async fn terminate_backend(conn: &mut sqlx::PgConnection, pid: i32) {
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(conn).await.unwrap();
    assert!(ended, "backend {pid} was not there to end");
}

/// A `natter serve` without NATS on PostgreSQL whose instance lock's
/// session ends under it (terminated here) takes the lock again, so a
/// second one is still refused, and serves on. When another process took
/// the lock as the session ended (it was queued for it), the first can no
/// longer be alone on its stores: it stops by itself and exits non-zero
/// naming the schema, instead of serving stale caches beside the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_nats_takes_its_lost_lock_again_or_stops_if_another_took_it() {
    use sqlx::Connection as _;
    let Some(db) = env("NATTER_TEST_DATABASE_URL") else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL is not set");
        return;
    };
    let prefix = format!("l{}_", uuid::Uuid::new_v4().simple());
    let store = ["--database-url", db.as_str(), "--database-schema-prefix", prefix.as_str()];
    let schema = format!("{prefix}sessions");
    let port = free_port();
    let server = spawn_serve(port, &store);
    let channel = super::healthy(&format!("http://127.0.0.1:{port}")).await.expect("natter serve started");
    let mut admin = sqlx::PgConnection::connect(&db).await.unwrap();

    let first = lock_holder(&db, &schema, |h| h.is_some()).await.expect("held");
    terminate_backend(&mut admin, first).await;
    let again = lock_holder(&db, &schema, |h| h.is_some_and(|h| h != first)).await.expect("held again");
    let Some((ok, stderr)) = exits(&store).await else { panic!("a second natter serve without NATS started") };
    assert!(!ok && stderr.contains(&format!("schema {schema} of this database")), "{stderr}");
    super::user(&channel, "still-served").await;

    // Another process queues for the lock; PostgreSQL grants it to that
    // one as the holder's session ends, before any retry of the server's.
    let mut other = sqlx::PgConnection::connect(&db).await.unwrap();
    let other_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut other).await.unwrap();
    let key = natter_db::postgres::instance_lock_key(&schema);
    let queued = tokio::spawn(async move {
        sqlx::query("SELECT pg_advisory_lock($1)").bind(key).execute(&mut other).await.unwrap();
        other
    });
    tokio::time::timeout(Duration::from_secs(15), async {
        let waiting = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND NOT granted)";
        while !sqlx::query_scalar::<_, bool>(waiting).bind(other_pid).fetch_one(&mut admin).await.unwrap() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the other process queues for the lock");
    terminate_backend(&mut admin, again).await;
    let other = tokio::time::timeout(Duration::from_secs(15), queued).await.expect("the other has it").unwrap();
    let Some((ok, stderr)) = exited(server, Duration::from_secs(30)).await else {
        panic!("natter serve kept serving after another process took its stores")
    };
    assert!(!ok, "natter serve exited 0 after losing its stores: {stderr}");
    assert!(stderr.contains(&format!("lost the instance lock of schema {schema}")), "{stderr}");
    other.close().await.unwrap();
    admin.close().await.unwrap();
    drop_schemas(&db, &prefix).await;
}

/// `natter migrate` on the data directory of a running `natter serve`
/// (SQLite) refuses, naming the directory and the server's process id,
/// and touches nothing; once the server stopped, it migrates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_to_run_beside_a_server_on_its_data_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let data_dir = data.to_str().expect("utf-8 path");
    let mut server = Node::start("serve", free_port(), vec!["--data-dir".into(), data_dir.into()]);
    server.channel().await;
    let pid = server.child.as_ref().expect("running").id();

    let (ok, report, stderr) = migrate(&["--data-dir", data_dir]);
    assert!(!ok, "natter migrate ran beside the server: {report}");
    assert!(stderr.contains("natter migrate needs the stores it migrates to itself"), "{stderr}");
    let named =
        format!("another natter process (pid {pid}) is using the sessions store in the data directory {data_dir}");
    assert!(stderr.contains(&named), "{stderr}");
    assert!(report.is_empty(), "reported as migrated: {report}");

    server.terminate();
    let (ok, report, stderr) = migrate(&["--data-dir", data_dir]);
    assert!(ok, "natter migrate failed once the server stopped: {stderr}");
    assert_eq!(section(&report, "sessions").1, ["up to date"], "{report}");
}

/// A second `natter serve` on the data directory of a running one (SQLite,
/// the default): it would keep exact caches (memberships, tokens) that the
/// first one's writes never evict, so a member the first removed would go
/// on reading through it. It refuses to start instead, naming the data
/// directory, the first's process id and the fix, with NATS or without
/// (a SQLite file serves one process); the first serves on. Once the first
/// has stopped, a new one starts on the same directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_data_directory_of_a_running_one_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let data_dir = data.to_str().expect("utf-8 path");
    let mut first = Node::start("serve", free_port(), vec!["--data-dir".into(), data_dir.into()]);
    let channel = first.channel().await;
    let pid = first.child.as_ref().expect("running").id();

    let Some((ok, stderr)) = exits(&["--data-dir", data_dir]).await else {
        panic!("a second natter serve on the same data directory started")
    };
    assert!(!ok, "the second natter serve exited 0: {stderr}");
    let named =
        format!("another natter process (pid {pid}) is using the sessions store in the data directory {data_dir}");
    assert!(stderr.contains(&named) && stderr.contains("--data-dir of its own"), "{stderr}");
    if let Some(nats) = env("NATTER_TEST_NATS_URL") {
        let Some((ok, stderr)) = exits(&["--data-dir", data_dir, "--nats-url", nats.as_str()]).await else {
            panic!("a natter serve on NATS started on the same data directory")
        };
        assert!(!ok && stderr.contains(&named), "{stderr}");
    }
    super::user(&channel, "still-served").await;

    first.terminate();
    let again = Node::start("serve", free_port(), vec!["--data-dir".into(), data_dir.into()]);
    super::user(&again.channel().await, "served-again").await;
}

/// `natter health` (the container health check of deploy/) says why a
/// check failed, not only that it did: the address it asked and the cause
/// (tonic's own text for a refused connection is just "transport error").
#[test]
fn health_names_the_address_and_the_cause_of_a_failed_check() {
    let addr = format!("127.0.0.1:{}", free_port());
    let output =
        Command::new(env!("CARGO_BIN_EXE_natter")).args(["health", "--addr", &addr]).output().expect("run natter");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("natter health: {addr}: ")), "{stderr}");
    assert!(stderr.contains("Connection refused"), "the cause is named: {stderr}");
}

/// What `natter migrate` prints on standard output is its report alone, as
/// README's "Migrations" shows it, at the default verbosity too: its log
/// lines (the backfills' counts, PostgreSQL's notices) go to standard
/// error, so that a script or a reader of the report does not get them
/// interleaved.
#[test]
fn migrate_reports_on_stdout_and_logs_on_stderr() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let output = Command::new(env!("CARGO_BIN_EXE_natter"))
        .args(["migrate", "--data-dir"])
        .arg(&data_dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("run natter migrate");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{stderr}");
    let headings = ["sessions: ", "chats: ", "messages: "];
    for line in stdout.lines() {
        assert!(
            line.starts_with("  ") || headings.iter().any(|h| line.starts_with(h)),
            "not a line of the report: {line:?}\n{stdout}"
        );
    }
    assert!(stderr.contains("INFO"), "the log lines are on stderr: {stderr}");
}

/// A listen address another process holds (README's split-mode edge on
/// 127.0.0.1:7070 while the quick start's `natter serve` still runs there):
/// the refusal names the address and the flag and says what to do, for
/// the public listener and a split service's internal one alike, instead
/// of the operating system's bare "Address already in use".
#[test]
fn a_listen_address_in_use_is_named_with_its_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("address").to_string();
    let other = format!("127.0.0.1:{}", free_port());
    let data_dir = dir.path().to_str().expect("utf-8 path");
    let cases: [(&[&str], &str); 2] = [
        (&["serve", "--listen", &addr, "--data-dir", data_dir], "--listen"),
        (&["sessions", "--listen", &other, "--internal-listen", &addr, "--data-dir", data_dir], "--internal-listen"),
    ];
    for (args, flag) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_natter"))
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run natter");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} started on an address in use: {stderr}");
        assert!(stderr.contains(&format!("cannot listen on {addr} ({flag}): ")), "{stderr}");
        assert!(stderr.contains(&format!("stop it, or give {flag} another address")), "{stderr}");
    }
}

/// Text and edit limits that would let one message with its revisions
/// pass what one response may carry (ListMessages' `include_history`,
/// which no client could then read) stop `natter serve` at start, naming
/// both flags: more edits than the default of the longest text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_edit_limits_past_one_response_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().to_str().expect("utf-8 path");
    let (ok, stderr) = exits(&["--data-dir", data_dir, "--max-message-edits", "200"]).await.expect("it exits");
    assert!(!ok, "started: {stderr}");
    assert!(stderr.contains("--max-text-bytes 32768 with --max-message-edits 200: "), "{stderr}");
    assert!(stderr.contains("lower either flag"), "{stderr}");
}
