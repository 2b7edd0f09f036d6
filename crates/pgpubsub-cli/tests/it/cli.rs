//! The binary as a user runs it.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use serde_json::Value;

use crate::common::{self, next, TestDb, WAIT};

/// The binary with a clean environment: no inherited configuration, and a
/// working directory of its own so no stray `.env` is read.
pub(crate) fn pgpubsub(db_url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgpubsub"));
    for var in ["DATABASE_URL", "PUB_SUB_CHANNEL", "DEBUG", "RUST_LOG", "PGPUBSUB_MAX_EVENT_BYTES"] {
        cmd.env_remove(var);
    }
    cmd.env("DATABASE_URL", db_url).current_dir(scratch_dir());
    cmd
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(common::unique("pgpubsub_cli"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs to completion (bounded by a timeout thread killing it).
pub(crate) fn run(mut cmd: Command) -> Output {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_output(child)
}

fn wait_output(child: Child) -> Output {
    wait_output_within(child, WAIT)
}

pub(crate) fn wait_output_within(child: Child, limit: std::time::Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if rx.recv_timeout(limit).is_err() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = tx.send(());
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Starts `listen` and returns once it reports it is listening, with its
/// stdout and the stream of its log lines.
pub(crate) fn spawn_listener(mut cmd: Command) -> (Child, std::process::ChildStdout, Receiver<String>) {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut logs = Vec::new();
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        match line {
            Ok(l) if l.contains("listening") => {
                logs.push(l);
                break;
            }
            Ok(l) => logs.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("listener never started: {logs:?}");
            }
        }
    }
    (child, stdout, rx)
}

#[tokio::test]
async fn listen_json_prints_one_object_per_event_per_line() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client.batch_execute("CREATE TABLE t (id int primary key, v text)").await.unwrap();
    let ch = common::channel("clij");
    pgpubsub::watch(&client, "t", Some(&ch)).await.unwrap();
    let mut cmd = pgpubsub(&db.url);
    cmd.args(["listen", "--json", "--count", "4", "--channel", ch.as_str()]);
    let (child, mut stdout, _) = spawn_listener(cmd);

    client.batch_execute("INSERT INTO t VALUES (1, 'a\nb'); UPDATE t SET v = 'c'; DELETE FROM t;").await.unwrap();
    pgpubsub::publish(&client, &ch, &"big ✓ ".repeat(5000)).await.unwrap();

    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let status = wait_output(child).status;
    assert!(status.success(), "{status:?}");
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4, "{out}");
    let ops: Vec<&str> = lines[..3].iter().map(|v| v["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["INSERT", "UPDATE", "DELETE"]);
    assert_eq!(lines[0]["new"]["v"], "a\nb");
    assert_eq!(lines[3]["payload"].as_str().unwrap(), "big ✓ ".repeat(5000));
}

#[tokio::test]
async fn received_at_stamps_each_line_with_when_it_was_printed() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("clir");
    let mut cmd = pgpubsub(&db.url);
    cmd.args(["listen", "--json", "--received-at", "--count", "2", "--channel", ch.as_str()]);
    let (child, mut stdout, _) = spawn_listener(cmd);
    let before = std::time::SystemTime::now();
    pgpubsub::publish(&client, &ch, "one").await.unwrap();
    pgpubsub::publish(&client, &ch, &"two ".repeat(100_000)).await.unwrap();
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    assert!(wait_output(child).status.success());
    let after = std::time::SystemTime::now();
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{out}");
    for (line, payload) in lines.iter().zip(["one".to_string(), "two ".repeat(100_000)]) {
        let at = humantime::parse_rfc3339(line["received_at"].as_str().unwrap()).unwrap();
        assert!(before <= at && at <= after, "{at:?} not within the test");
        assert_eq!(line["payload"].as_str().unwrap(), payload, "the event itself is unchanged");
    }
}

#[tokio::test]
async fn plain_and_debug_output() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("clip");
    let mut cmd = pgpubsub(&db.url);
    cmd.env("PUB_SUB_CHANNEL", ch.as_str()).args(["--count", "1"]);
    let (child, mut stdout, _) = spawn_listener(cmd);
    pgpubsub::publish(&client, &ch, "hello").await.unwrap();
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    assert!(wait_output(child).status.success());
    assert_eq!(out.lines().count(), 1);
    assert!(out.starts_with(&format!("{ch} #")) && out.trim_end().ends_with("message \"hello\""), "{out}");

    let mut cmd = pgpubsub(&db.url);
    cmd.env("PUB_SUB_CHANNEL", ch.as_str()).env("DEBUG", "true").args(["listen", "--count", "1"]);
    let (child, mut stdout, _) = spawn_listener(cmd);
    pgpubsub::publish(&client, &ch, "pretty").await.unwrap();
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    assert!(wait_output(child).status.success());
    assert!(out.lines().count() > 3, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["payload"], "pretty");
}

#[tokio::test]
async fn ctrl_c_stops_cleanly() {
    let db = TestDb::new().await;
    let mut cmd = pgpubsub(&db.url);
    cmd.args(["listen", "--channel", "quiet"]);
    let (child, _stdout, logs) = spawn_listener(cmd);
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = wait_output(child);
    // Everything it logged, up to the end of its stderr.
    let logs: Vec<String> = std::iter::from_fn(|| logs.recv_timeout(WAIT).ok()).collect();
    assert!(out.status.success(), "{:?} {logs:?}", out.status);
    assert!(logs.iter().any(|l| l.contains("stopped")), "{logs:?}");
}

#[tokio::test]
async fn sessions_carry_the_command_name_unless_the_url_gives_one() {
    let db = TestDb::new().await;
    if db.url.contains("application_name") {
        return; // DATABASE_URL names the sessions itself: nothing to default.
    }
    // The test's own sessions (the library's default name) are left out.
    let client = db.client().await;
    let sep = if db.url.contains('?') { '&' } else { '?' };
    for (url, want) in [(db.url.clone(), "pgpubsub listen"), (format!("{}{sep}application_name=mine", db.url), "mine")]
    {
        let mut cmd = pgpubsub(&url);
        cmd.args(["listen", "--channel", "named"]);
        let (mut child, _stdout, _) = spawn_listener(cmd);
        let names: Vec<String> = client
            .query(
                "SELECT DISTINCT application_name FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name <> 'pgpubsub'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(names, [want], "the listening process's sessions");
        // Its sessions end before the next process is looked at.
        let deadline = Instant::now() + WAIT;
        while client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name <> 'pgpubsub'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            > 0
        {
            assert!(Instant::now() < deadline, "the killed listener's sessions did not end");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn publish_reads_stdin_and_arrives_identical() {
    let db = TestDb::new().await;
    let ch = common::channel("clipub");
    let mut l = db.listen(&[ch.clone()]).await;
    let message = "line one\nline two ✓\n".repeat(20_000);
    let mut child = pgpubsub(&db.url)
        .args(["publish", ch.as_str(), "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(message.as_bytes()).unwrap();
    let out = wait_output(child);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seq: i64 = text(&out.stdout).trim().parse().unwrap();
    let e = next(&mut l).await;
    assert_eq!(e.seq, Some(seq));
    assert!(e.message().unwrap().payload == message);

    let out = run({
        let mut c = pgpubsub(&db.url);
        c.args(["publish", ch.as_str(), "inline"]);
        c
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(next(&mut l).await.message().unwrap().payload, "inline");
}

#[tokio::test]
async fn migrate_watch_and_status_from_the_command_line() {
    let db = TestDb::bare().await;
    let cmd = |args: &[&str]| {
        let mut c = pgpubsub(&db.url);
        c.args(args);
        run(c)
    };
    let first = cmd(&["migrate"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stdout).contains("applied 20261121000100 pubsub_log"));
    assert!(text(&cmd(&["migrate"]).stdout).contains("up to date"));

    db.client().await.batch_execute("CREATE TABLE w (id int primary key)").await.unwrap();
    let out = cmd(&["watch", "w", "--channel", "w_events"]);
    assert!(text(&out.stdout).contains("channel w_events"), "{}", text(&out.stderr));
    assert!(text(&cmd(&["watch"]).stdout).contains("w -> w_events"));
    let status = text(&cmd(&["migrate", "status"]).stdout);
    assert!(status.contains("applied  20261207000500 pubsub_row_views_plans"), "{status}");
    assert!(status.contains("pending  20261121000900 job_example (example)"), "{status}");
    assert!(status.contains("watched  w -> w_events"), "{status}");
    assert!(text(&cmd(&["unwatch", "w"]).stdout).contains("stopped watching w"));

    let down = cmd(&["migrate", "down"]);
    assert!(text(&down.stdout).contains("reverted 20261207000500 pubsub_row_views_plans"), "{}", text(&down.stderr));
}

#[tokio::test]
async fn bad_configuration_is_named() {
    let db = TestDb::new().await;
    let long = "x".repeat(64);
    // (environment, arguments, what the error must say)
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        (vec![("DEBUG", "maybe")], vec!["migrate", "status"], "DEBUG"),
        (vec![("DATABASE_URL", "postgres://u:hunter2@h:notaport/db")], vec!["migrate"], "DATABASE_URL"),
        (vec![("PUB_SUB_CHANNEL", "bad-name")], vec!["listen"], "PUB_SUB_CHANNEL"),
        (vec![], vec!["listen", "--channel", ""], "invalid channel name"),
        (vec![], vec!["publish", &long, "hi"], "longer than 63 bytes"),
        (vec![], vec!["watch", "no_such_table"], "does not exist"),
        (vec![], vec!["unwatch", "no_such_table"], "does not exist"),
        (
            vec![("DATABASE_URL", "postgres://postgres@127.0.0.1:1/postgres")],
            vec!["migrate"],
            "cannot connect to postgres@127.0.0.1:1/postgres",
        ),
    ];
    for (env, args, expect) in cases {
        let mut cmd = pgpubsub(&db.url);
        cmd.envs(env.iter().copied()).args(&args);
        let out = run(cmd);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(expect), "{args:?}: expected {expect:?} in {err}");
        assert!(!err.contains("hunter2"), "password leaked: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }

    let bare = TestDb::bare().await;
    let mut cmd = pgpubsub(&bare.url);
    cmd.args(["publish", "chan", "x"]);
    let err = text(&run(cmd).stderr);
    assert!(err.contains("run `pgpubsub migrate` first"), "{err}");
}

#[tokio::test]
async fn dot_env_is_read_and_the_environment_wins() {
    let db = TestDb::new().await;
    let dir = scratch_dir();
    std::fs::write(dir.join(".env"), format!("DATABASE_URL={}\nPUB_SUB_CHANNEL=from_dotenv\n", db.url)).unwrap();
    let client = db.client().await;
    let ch = pgpubsub::Channel::new("from_dotenv").unwrap();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgpubsub"));
    cmd.env_remove("DATABASE_URL").env_remove("PUB_SUB_CHANNEL").current_dir(&dir).args(["--count", "1"]);
    let (child, mut stdout, _) = spawn_listener(cmd);
    pgpubsub::publish(&client, &ch, "via .env").await.unwrap();
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    assert!(wait_output(child).status.success());
    assert!(out.contains("via .env"), "{out}");

    // The environment overrides .env: an unreachable URL there wins.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgpubsub"));
    cmd.env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/postgres").current_dir(&dir).args(["migrate"]);
    let out = run(cmd);
    assert!(text(&out.stderr).contains("127.0.0.1:1"), "{}", text(&out.stderr));

    // A broken .env is reported, not ignored.
    std::fs::write(dir.join(".env"), "NOT A VALID LINE\n").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgpubsub"));
    cmd.current_dir(&dir).args(["migrate", "status"]);
    let out = run(cmd);
    assert!(!out.status.success() && text(&out.stderr).contains(".env"), "{}", text(&out.stderr));
}

#[tokio::test]
async fn demo_runs_end_to_end() {
    let db = TestDb::bare().await;
    let out = run({
        let mut c = pgpubsub(&db.url);
        c.arg("demo");
        c
    });
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("9 of 9 events received"), "{stderr}");
    for needle in
        ["INSERT public.pgpubsub_demo", "UPDATE", "DELETE", "message \"hello from pgpubsub\"", "job_channel - notify"]
    {
        assert!(stdout.contains(needle), "{needle} missing in {stdout}");
    }
}

#[tokio::test]
async fn a_named_listen_resumes_after_the_process_restarts() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("named");
    let listen = |count: &str| {
        let mut c = pgpubsub(&db.url);
        c.args(["listen", "--json", "--name", "cli_svc", "--count", count, "--channel", ch.as_str()]);
        c
    };
    let read_all = |child: Child, mut stdout: std::process::ChildStdout| {
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        assert!(wait_output(child).status.success());
        out.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["payload"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };

    let (child, stdout, _) = spawn_listener(listen("2"));
    for p in ["one", "two"] {
        pgpubsub::publish(&client, &ch, p).await.unwrap();
    }
    assert_eq!(read_all(child, stdout), ["one", "two"]);

    // Published while no listener runs.
    for p in ["three", "four", "five"] {
        pgpubsub::publish(&client, &ch, p).await.unwrap();
    }
    // Read until "six": how many of "one"/"two" come again depends on how
    // far the stored cursor got, which other open transactions hold back.
    let (child, stdout, _) = spawn_listener(listen("1000"));
    pgpubsub::publish(&client, &ch, "six").await.unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str::<Value>(&line).unwrap()["payload"].as_str().unwrap().to_string());
        }
    });
    let mut got: Vec<String> = Vec::new();
    while got.last().map(String::as_str) != Some("six") {
        got.push(rx.recv_timeout(WAIT).unwrap_or_else(|_| panic!("\"six\" never came: {got:?}")));
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(wait_output(child).status.success(), "stops cleanly on Ctrl-C");
    // At least once: "one"/"two" may come again; what was missed must come, in order.
    let fresh: Vec<&str> = got.iter().map(String::as_str).filter(|p| !["one", "two"].contains(p)).collect();
    assert!(["three", "four", "five", "six"].starts_with(&fresh) && fresh.len() >= 3, "{got:?}");

    let out = run({
        let mut c = pgpubsub(&db.url);
        c.args(["prune", "--max-count", "1"]);
        c
    });
    assert!(text(&out.stdout).contains("pruned 5 events"), "{} {}", text(&out.stdout), text(&out.stderr));
    let out = run({
        let mut c = pgpubsub(&db.url);
        c.args(["prune"]);
        c
    });
    assert!(!out.status.success() && text(&out.stderr).contains("--max-age"), "{}", text(&out.stderr));
}

#[cfg(feature = "load")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_runs_end_to_end_and_reports() {
    let db = TestDb::bare().await;
    let dir = scratch_dir();
    let svg = dir.join("plot.svg");
    let out = run({
        let mut c = pgpubsub(&db.url);
        c.args([
            "load",
            "--rows",
            "600",
            "--batch",
            "20",
            "--mixed",
            "--baseline",
            "--trigger-cost",
            "--json",
            "--plot",
        ]);
        c.arg(&svg);
        c
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(r["rows"], 600);
    assert_eq!(r["events"], 1800, "insert, update and delete per row");
    let p = &r["pgpubsub"];
    assert_eq!((p["received"].as_u64(), p["distinct"].as_u64(), p["lost"].as_u64()), (Some(1800), Some(1800), Some(0)));
    assert!(p["cpu_ms"].as_f64().unwrap() > 0.0 && p["peak_rss_mb"].as_f64().unwrap() > 1.0, "{p}");
    assert!(p["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert_eq!(r["baseline"]["distinct"], 1800);
    assert!(r["ratio_rate"].as_f64().is_some());
    let runs: Vec<&str> = r["write_runs"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(runs, ["no trigger", "notify-only trigger", "pgpubsub trigger, no listener"]);
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));

    // Markdown: one table row. Large payloads travel in chunks and still arrive.
    let out = run({
        let mut c = pgpubsub(&db.url);
        c.args(["load", "--rows", "20", "--payload", "20000", "--markdown"]);
        c
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = text(&out.stdout);
    assert!(md.starts_with("| single | 4×1×20000 B | 20 |") && md.lines().count() == 1, "{md}");
    // Published messages instead of rows, past the reference threshold.
    let out = run({
        let mut c = pgpubsub(&db.url);
        c.args(["load", "--publish", "--rows", "30", "--payload", "300000", "--json"]);
        c
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    let p = &r["pgpubsub"];
    assert_eq!((p["distinct"].as_u64(), p["lost"].as_u64()), (Some(30), Some(0)), "{p}");
    assert!(p["latency_ms"]["max"].as_f64().unwrap() > 0.0, "{p}");
    // The scratch schema is gone afterwards.
    let left: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgpubsub_load'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[cfg(feature = "load")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_writer_tables_compares_four_tables_and_checks_every_row_arrived() {
    let db = TestDb::bare().await;
    let mut cmd = pgpubsub(&db.url);
    cmd.args(["load", "--scenario", "writer-tables", "--writers", "1,2", "--duration", "1s", "--publishers", "1"]);
    // Ten runs of a second each, plus their delivery.
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let out = wait_output_within(child, 6 * WAIT);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let row = |writers: &str, table: &str| {
        let head = format!("| {writers} | {table} |");
        let line = stdout.lines().find(|l| l.starts_with(&head)).unwrap_or_else(|| panic!("no {head} in {stdout}"));
        line.split('|').map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect::<Vec<_>>()
    };
    for writers in ["1", "2"] {
        assert_eq!(row(writers, "plain")[3], "1.00", "the plain table is its own baseline");
        for table in ["seed", "inline", "watched"] {
            let cells = row(writers, table);
            let (got, written) = cells[4].split_once('/').unwrap_or_else(|| panic!("{cells:?}"));
            assert!(got == written && written.parse::<u64>().unwrap() > 0, "{cells:?}");
            assert!(cells[6].parse::<f64>().unwrap() > 0.0, "p99 of {cells:?}");
        }
    }
    let publish = row("1", "publish (100 B)");
    assert_eq!(publish[4].split_once('/').map(|(a, b)| a == b), Some(true), "{publish:?}");
    assert!(stdout.contains("every row delivered"), "{stdout}");

    // The scratch schema and its events are gone afterwards.
    let client = db.client().await;
    let left: i64 = client
        .query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgpubsub_load'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);

    // A list of writer counts is for this scenario only, and said so.
    let out = run({
        let mut c = pgpubsub(&db.url);
        c.args(["load", "--writers", "1,2"]);
        c
    });
    assert!(!out.status.success() && text(&out.stderr).contains("writer-tables"), "{}", text(&out.stderr));
}

/// `listen --shape`: the rows that match `--where` (with `--columns`), a
/// `ready` record, then the changes as the shape shows them; a durable
/// listener restarted resumes without the rows.
#[tokio::test]
async fn listen_shape_prints_the_rows_then_their_changes() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("shape");
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, status text, note text); INSERT INTO t VALUES (1, 'paid', 'a'), (2, 'new', 'b')")
        .await
        .unwrap();
    pgpubsub::watch(&client, "t", Some(&ch)).await.unwrap();
    let listen = |count: &str| {
        let mut c = pgpubsub(&db.url);
        c.args(["listen", "--json", "--name", "shape_svc", "--count", count, "--shape", "t"]);
        c.args(["--where", "status = 'paid'", "--columns", "status"]);
        c
    };
    let lines = |child: Child, mut stdout: std::process::ChildStdout| {
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        assert!(wait_output(child).status.success(), "{out}");
        out.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect::<Vec<_>>()
    };
    let (child, stdout, _) = spawn_listener(listen("2"));
    client.batch_execute("UPDATE t SET status = 'paid' WHERE id = 2; UPDATE t SET note = 'x' WHERE id = 1; UPDATE t SET status = 'void' WHERE id = 1").await.unwrap();
    let got = lines(child, stdout);
    assert_eq!(
        got[0],
        serde_json::json!({"kind": "snapshot", "table": "public.t", "row": {"id": 1, "status": "paid"}})
    );
    assert_eq!((got[1]["kind"].as_str(), got[1]["rows"].as_u64()), (Some("ready"), Some(1)));
    assert_eq!(
        (got[2]["view"].as_str(), &got[2]["new"]),
        (Some("enter"), &serde_json::json!({"id": 2, "status": "paid"}))
    );
    assert_eq!(
        (got[3]["op"].as_str(), &got[3]["new"]),
        (Some("UPDATE"), &serde_json::json!({"id": 1, "status": "paid"}))
    );
    assert_eq!(got.len(), 4, "{got:?}");

    // Restarted: no rows again; changes from where it stood (at least
    // once: the last printed may come again), up to the next.
    let (child, stdout, _) = spawn_listener(listen("1000"));
    client.batch_execute("INSERT INTO t VALUES (3, 'paid', 'c')").await.unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str::<Value>(&line).unwrap());
        }
    });
    let mut got = Vec::new();
    while got.last().map(|v: &Value| v["new"]["id"].clone()) != Some(serde_json::json!(3)) {
        got.push(rx.recv_timeout(WAIT).unwrap_or_else(|_| panic!("the insert never came: {got:?}")));
    }
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert!(wait_output(child).status.success());
    assert!(got.iter().all(|v| v["kind"] == "change"), "no rows again: {got:?}");
    let tail: Vec<Option<&str>> = got[got.len() - 2..].iter().map(|v| v["view"].as_str()).collect();
    assert_eq!(tail, [Some("leave"), None], "{got:?}");
}
