//! Row-level authorization decides as PostgreSQL does: on random policies
//! (permissive and restrictive, on claims, on columns, on the role; read
//! by join or class by class), random column grants, random claims and
//! random changes, what each class of subscribers receives
//! ([`pgpubsub::views`]) is what a `SELECT` as that role with its claims
//! shows of the old and the new row, by the rules of the module docs, and
//! never a column the role may not read. Several classes of the role are
//! decided together, one of them at times with claims its policy fails
//! on: that one fails alone.
//!
//! Also: a listener sees what its own role may, live (enter, leave, a
//! delete with its old row), and nothing else.

use std::sync::Arc;
use std::time::Duration;

use pgpubsub::hub::Shared;
use pgpubsub::views::{Viewer, Views};
use pgpubsub::{Cursor, Event, ListenerOptions, LogConn};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};

use crate::common::{self, TestDb};

/// A row of `t`: every column but the key nullable.
#[derive(Debug, Clone)]
struct Row {
    tenant: Option<i32>,
    level: Option<i32>,
    note: Option<String>,
    secret: Option<String>,
}

fn row() -> impl Strategy<Value = Row> {
    let small = prop::option::weighted(0.85, 0..4i32);
    let note =
        prop::option::weighted(0.85, prop_oneof![Just("x".to_string()), Just("y".to_string()), Just(String::new())]);
    (small.clone(), small, note.clone(), note).prop_map(|(tenant, level, note, secret)| Row {
        tenant,
        level,
        note,
        secret,
    })
}

/// A policy's USING expression.
fn qual() -> impl Strategy<Value = String> {
    prop_oneof![
        // Read by join (the claims as PostgREST spells them; an equality,
        // then an inequality).
        Just("tenant = (current_setting('request.jwt.claims', true)::json ->> 'tenant')::int".to_string()),
        Just("level <= (current_setting('request.jwt.claims', true)::json ->> 'tenant')::int".to_string()),
        // Class by class: functions that read the claims where the
        // statement cannot see them (one declared IMMUTABLE, wrongly), and
        // a subquery (an InitPlan).
        Just("tenant = rv_tenant()".to_string()),
        Just("tenant = rv_tenant_declared_immutable()".to_string()),
        Just("tenant = (SELECT (current_setting('request.jwt.claims', true)::json ->> 'tenant')::int)".to_string()),
        (0..4i32).prop_map(|k| format!("level < {k}")),
        Just("note IS DISTINCT FROM 'x'".to_string()),
        Just("t.secret = 'y'".to_string()),
        Just("level IS NULL".to_string()),
        Just("true".to_string()),
        Just("NULL::boolean".to_string()),
    ]
}

/// One case: policies (permissive?, for the role or for PUBLIC, FOR SELECT
/// or ALL, USING), the columns granted, the classes' claims, the change.
#[derive(Debug, Clone)]
struct Case {
    rls: bool,
    policies: Vec<(bool, bool, bool, String)>,
    columns: Vec<&'static str>,
    claims: Vec<String>,
    op: &'static str,
    old: Row,
    new: Row,
}

fn case() -> impl Strategy<Value = Case> {
    let policy = (prop::bool::weighted(0.7), any::<bool>(), any::<bool>(), qual());
    let columns = prop::sample::subsequence(vec!["tenant", "level", "note", "secret"], 0..=4);
    (
        prop::bool::weighted(0.85),
        prop::collection::vec(policy, 0..4),
        columns,
        prop::collection::vec(claims(), 1..5),
        prop_oneof![Just("INSERT"), Just("UPDATE"), Just("UPDATE"), Just("DELETE")],
        row(),
        row(),
    )
        .prop_map(|(rls, policies, columns, claims, op, old, new)| Case {
            rls,
            policies,
            columns,
            claims,
            op,
            old,
            new,
        })
}

/// A class's claims: a tenant, none, or one a policy's cast fails on.
fn claims() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (0..4i32).prop_map(|t| json!({"tenant": t}).to_string()),
        1 => Just(json!({"tenant": null}).to_string()),
        1 => Just(json!({"tenant": "x"}).to_string()),
    ]
}

/// Whether `role` with `claims` sees `r` by `SELECT`; `None`: the SELECT
/// fails (a policy's cast on a bad claim).
async fn visible(client: &tokio_postgres::Client, role: &str, claims: &str, r: &Row) -> Option<bool> {
    client.batch_execute("DELETE FROM t").await.unwrap();
    client
        .execute("INSERT INTO t VALUES (1, $1, $2, $3, $4)", &[&r.tenant, &r.level, &r.note, &r.secret])
        .await
        .unwrap();
    let tx = format!("BEGIN; SET LOCAL ROLE {role}; SELECT set_config('request.jwt.claims', '{claims}', true);");
    client.batch_execute(&tx).await.unwrap();
    let n = client.query_one("SELECT count(*) FROM t WHERE id = 1", &[]).await.ok().map(|r| r.get::<_, i64>(0));
    client.batch_execute("ROLLBACK").await.unwrap();
    n.map(|n| n == 1)
}

fn json_of(r: &Row) -> Value {
    json!({"id": 1, "tenant": r.tenant, "level": r.level, "note": r.note, "secret": r.secret})
}

#[test]
fn a_class_receives_what_its_select_would_show() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let db = rt.block_on(TestDb::new());
    let client = rt.block_on(db.client());
    let role = common::unique("rv_role");
    rt.block_on(client.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, tenant int, level int, note text, secret text);
         CREATE ROLE {role} NOLOGIN;
         CREATE FUNCTION rv_tenant() RETURNS int STABLE LANGUAGE sql
             AS $$ SELECT (current_setting('request.jwt.claims', true)::json ->> 'tenant')::int $$;
         CREATE FUNCTION rv_tenant_declared_immutable() RETURNS int IMMUTABLE LANGUAGE plpgsql
             AS $$ BEGIN RETURN (current_setting('request.jwt.claims', true)::json ->> 'tenant')::int; END $$;"
    )))
    .unwrap();
    let log = LogConn::new(db.config.clone(), Duration::from_secs(10));
    let mut runner = TestRunner::new(Config { cases: 160, failure_persistence: None, ..Config::default() });
    // How many cases showed a row and withheld another, or removed columns:
    // the test is only as good as its share of cases that discern.
    let (kinds, stripped) = (std::cell::RefCell::new(std::collections::HashSet::new()), std::cell::Cell::new(0));
    let result = runner.run(&case(), |c| {
        rt.block_on(async {
            // The table's policies and grants for this case.
            let mut setup = format!(
                "DROP TABLE IF EXISTS t; CREATE TABLE t (id int PRIMARY KEY, tenant int, level int, note text, secret text);
                 {} ROW LEVEL SECURITY;",
                if c.rls { "ALTER TABLE t ENABLE" } else { "ALTER TABLE t DISABLE" }
            );
            for (i, (permissive, to_role, select_only, using)) in c.policies.iter().enumerate() {
                setup += &format!(
                    "CREATE POLICY p{i} ON t AS {} FOR {} TO {} USING ({using});",
                    if *permissive { "PERMISSIVE" } else { "RESTRICTIVE" },
                    if *select_only { "SELECT" } else { "ALL" },
                    if *to_role { role.as_str() } else { "PUBLIC" },
                );
            }
            setup += &format!("GRANT SELECT (id{}) ON t TO {role};", c.columns.iter().map(|c| format!(", {c}")).collect::<String>());
            client.batch_execute(&setup).await.unwrap();
            let (old, new) = match c.op {
                "INSERT" => (None, Some(&c.new)),
                "UPDATE" => (Some(&c.old), Some(&c.new)),
                _ => (Some(&c.old), None),
            };
            // What SELECT shows each class of the old and the new row.
            let mut selects = Vec::new();
            for claims in &c.claims {
                let old_seen = match old {
                    Some(r) => visible(&client, &role, claims, r).await,
                    None => Some(false),
                };
                let new_seen = match new {
                    Some(r) => visible(&client, &role, claims, r).await,
                    None => Some(false),
                };
                selects.push(old_seen.zip(new_seen));
            }

            // The event as the log holds it, and as each class receives it:
            // every class of the role asks at once (one statement decides
            // for those that wait while the first runs).
            let text = json!({
                "seq": 1, "txid": 1, "kind": "change", "channel": "t", "time": "2026-01-01T00:00:00Z",
                "op": c.op, "schema": "public", "table": "t", "key": {"id": 1},
                "new": new.map(json_of), "old": old.map(json_of),
            })
            .to_string();
            let event = Arc::new(Shared::new(Event::decode("t", text).unwrap(), Cursor::default()));
            let views = Views::new();
            let classes: Vec<_> =
                c.claims.iter().map(|claims| views.class(Viewer::role(&role, Some(claims.clone())))).collect();
            let got = futures_util::future::join_all(classes.iter().map(|class| class.see(&log, std::slice::from_ref(&event)))).await;

            for ((claims, select), got) in c.claims.iter().zip(&selects).zip(got) {
                let Some((old_seen, new_seen)) = *select else {
                    // The SELECT fails for these claims: the class may fail
                    // (or decide, where its policies read the row first);
                    // the others are unaffected, checked by their own turn.
                    continue;
                };
                let got = match got {
                    Ok(got) => got,
                    // The statement may read the bad claim where the SELECT
                    // did not (the order of a policy's terms): it fails,
                    // it never shows a row.
                    Err(_) if claims.contains("\"x\"") => continue,
                    Err(e) => return Err(TestCaseError::fail(format!("{claims}: {e}"))),
                };
                let expect = match (c.op, old_seen, new_seen) {
                    ("INSERT", _, true) => Some(("INSERT", None, true, false)),
                    ("UPDATE", true, true) => Some(("UPDATE", None, true, true)),
                    ("UPDATE", false, true) => Some(("UPDATE", Some("enter"), true, false)),
                    ("UPDATE", true, false) => Some(("UPDATE", Some("leave"), false, false)),
                    ("DELETE", true, _) => Some(("DELETE", None, false, true)),
                    _ => None,
                };
                kinds.borrow_mut().insert(format!("{expect:?}"));
                let Some((op, view, has_new, has_old)) = expect else {
                    prop_assert!(got.is_empty(), "{}: withheld: {:?}", claims, got.first().map(|s| s.event.json().to_string()));
                    continue;
                };
                prop_assert_eq!(got.len(), 1, "{}", claims);
                let v: Value = serde_json::from_str(got[0].event.json()).unwrap();
                prop_assert_eq!(v["op"].as_str(), Some(op));
                prop_assert_eq!(v["view"].as_str(), view, "{}", claims);
                prop_assert_eq!(!v["new"].is_null(), has_new, "{}", v);
                prop_assert_eq!(!v["old"].is_null(), has_old, "{}", v);
                prop_assert_eq!(&v["key"], &json!({"id": 1}));
                // Exactly the columns granted, with the row's own values.
                let mut allowed = vec!["id"];
                allowed.extend(&c.columns);
                for (side, row) in [("new", new), ("old", old)] {
                    let Some(shown) = v[side].as_object() else { continue };
                    let mut names: Vec<&str> = shown.keys().map(String::as_str).collect();
                    names.sort_unstable();
                    let mut want = allowed.clone();
                    want.sort_unstable();
                    prop_assert_eq!(&names, &want, "{} of {}", side, v);
                    let full = json_of(row.unwrap());
                    for (k, value) in shown {
                        prop_assert_eq!(value, &full[k]);
                    }
                    if want.len() < 5 {
                        stripped.set(stripped.get() + 1);
                    }
                }
            }
            Ok(())
        })
    });
    rt.block_on(client.batch_execute(&format!("DROP TABLE t; DROP ROLE {role}"))).unwrap();
    result.unwrap();
    let kinds = kinds.into_inner();
    assert!(kinds.len() >= 6, "too few kinds of outcome: {kinds:?}");
    assert!(stripped.get() > 10, "columns were removed in only {} cases", stripped.get());
}

/// A listener (the library's reader, and `listen`'s) sees what its own
/// role may: its rows, a row entering and leaving, a delete with the old
/// row, and never another's row. The last row, its own, is the fence.
#[tokio::test]
async fn a_listener_sees_what_its_own_role_may() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let (me, them) = (common::unique("rv_me"), common::unique("rv_them"));
    let ch = common::channel("docs");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {me} LOGIN; CREATE ROLE {them} LOGIN;
             CREATE TABLE docs (id int PRIMARY KEY, owner text NOT NULL, body text);
             ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON docs FOR SELECT USING (owner = current_user);
             GRANT SELECT ON docs TO {me}, {them};
             GRANT USAGE ON SCHEMA pubsub TO {me};
             GRANT SELECT ON pubsub.events, pubsub.retention TO {me};
             SELECT pubsub.watch('docs', '{ch}');"
        ))
        .await
        .unwrap();
    let mut config = db.config.clone();
    config.pg_mut().user(&me);
    let mut listener = pgpubsub::Listener::connect(&config, &[ch.clone()], ListenerOptions::default()).await.unwrap();
    admin
        .batch_execute(&format!(
            "INSERT INTO docs VALUES (1, '{me}', 'mine'), (2, '{them}', 'theirs');
             UPDATE docs SET owner = '{me}' WHERE id = 2;
             UPDATE docs SET owner = '{them}' WHERE id = 1;
             UPDATE docs SET body = 'still theirs' WHERE id = 1;
             DELETE FROM docs WHERE id = 2;
             INSERT INTO docs VALUES (3, '{me}', 'fence');"
        ))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.last().map(|(_, _, id, _)| *id) != Some(3) {
        let e = common::next(&mut listener).await;
        let c = e.change().unwrap();
        let row = c.new.as_ref().or(c.old.as_ref()).map(|r| serde_json::from_str::<Value>(r.get()).unwrap());
        let key: Value = serde_json::from_str(c.key.as_ref().unwrap().get()).unwrap();
        got.push((c.op.as_str(), c.view, key["id"].as_i64().unwrap(), row.map(|r| r["body"].clone())));
    }
    use pgpubsub::View::{Enter, Leave};
    assert_eq!(
        got,
        vec![
            ("INSERT", None, 1, Some(json!("mine"))),
            ("UPDATE", Some(Enter), 2, Some(json!("theirs"))),
            ("UPDATE", Some(Leave), 1, None),
            ("DELETE", None, 2, Some(json!("theirs"))),
            ("INSERT", None, 3, Some(json!("fence"))),
        ]
    );
    drop(listener);
    admin.batch_execute(&format!("DROP TABLE docs; REVOKE ALL ON SCHEMA pubsub FROM {me}; REVOKE ALL ON ALL TABLES IN SCHEMA pubsub FROM {me}; DROP ROLE {me}, {them}")).await.unwrap();
}

/// A listener's connection plans no sequential or bitmap scan (its page
/// read, planned once, must walk the log's index), but the policies it
/// evaluates to decide what its role may see are the application's: they
/// run with the server's usual planner settings. A policy that shows a row
/// only under those settings is the witness; row 2, shown always, the fence.
#[tokio::test]
async fn a_listeners_decisions_plan_as_the_applications_queries_do() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let me = common::unique("rv_plan");
    let ch = common::channel("plans");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {me} LOGIN;
             CREATE TABLE planned (id int PRIMARY KEY);
             ALTER TABLE planned ENABLE ROW LEVEL SECURITY;
             CREATE POLICY usual ON planned FOR SELECT USING (
                 id = 2 OR (current_setting('enable_seqscan') = 'on' AND current_setting('enable_bitmapscan') = 'on'));
             GRANT SELECT ON planned TO {me};
             GRANT USAGE ON SCHEMA pubsub TO {me};
             GRANT SELECT ON pubsub.events, pubsub.retention TO {me};
             SELECT pubsub.watch('planned', '{ch}');"
        ))
        .await
        .unwrap();
    let mut config = db.config.clone();
    config.pg_mut().user(&me);
    let mut listener = pgpubsub::Listener::connect(&config, &[ch.clone()], ListenerOptions::default()).await.unwrap();
    admin.batch_execute("INSERT INTO planned VALUES (1); INSERT INTO planned VALUES (2);").await.unwrap();
    let mut ids = Vec::new();
    while ids.last() != Some(&2) {
        let e = common::next(&mut listener).await;
        let key: Value = serde_json::from_str(e.change().unwrap().key.as_ref().unwrap().get()).unwrap();
        ids.push(key["id"].as_i64().unwrap());
    }
    assert_eq!(ids, [1, 2], "row 1 is visible to a SELECT by the role, so to its listener");
    drop(listener);
    admin.batch_execute(&format!("DROP TABLE planned; REVOKE ALL ON SCHEMA pubsub FROM {me}; REVOKE ALL ON ALL TABLES IN SCHEMA pubsub FROM {me}; DROP ROLE {me}")).await.unwrap();
}

/// Two subscribers of one class read the same event at different
/// positions (one replaying, one live): the decision made for the first
/// copy is handed to the second at the second's position, never lost
/// (the feed matches what it asked by seq and position).
#[tokio::test]
async fn a_decision_reused_for_another_copy_keeps_that_copys_position() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let role = common::unique("rv_pos");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} NOLOGIN;
             CREATE TABLE t (id int PRIMARY KEY, tenant int, secret text);
             ALTER TABLE t ENABLE ROW LEVEL SECURITY;
             CREATE POLICY mine ON t FOR SELECT TO {role}
                 USING (tenant = (current_setting('request.jwt.claims', true)::json ->> 'tenant')::int);
             GRANT SELECT (id, tenant) ON t TO {role};"
        ))
        .await
        .unwrap();
    let log = LogConn::new(db.config.clone(), Duration::from_secs(10));
    let text = json!({
        "seq": 7, "txid": 3, "kind": "change", "channel": "t", "time": "2026-01-01T00:00:00Z",
        "op": "INSERT", "schema": "public", "table": "t", "key": {"id": 1},
        "new": {"id": 1, "tenant": 1, "secret": "s"}, "old": null,
    })
    .to_string();
    let at = |seq| Cursor { txid: 3, seq };
    let replayed = Arc::new(Shared::new(Event::decode("t", text.clone()).unwrap(), at(7)));
    let live = Arc::new(Shared::new(Event::decode("t", text).unwrap(), at(9)));
    let views = Views::new();
    let class = views.class(Viewer::role(&role, Some(json!({"tenant": 1}).to_string())));
    let first = class.see(&log, std::slice::from_ref(&replayed)).await.unwrap();
    let second = class.see(&log, std::slice::from_ref(&live)).await.unwrap();
    assert_eq!(views.statements(), 1, "the second copy reuses the decision");
    for (got, want) in [(first, at(7)), (second, at(9))] {
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].position, want);
        assert!(!got[0].event.json().contains("secret"), "{}", got[0].event.json());
    }
    admin.batch_execute(&format!("DROP TABLE t; DROP ROLE {role}")).await.unwrap();
}
