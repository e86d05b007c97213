//! The command-line client (`engage track`, `timeline`, `triggers`, `tail`, `stats`, `users`,
//! `erase`): the real binary run against a real server, its output and exit codes checked.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::*;
use engage::proto;

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `engage ARGS` against `server` (through ENGAGE_SERVER), with `env` set.
async fn engage(server: &std::net::SocketAddr, args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_engage"))
        .args(args)
        .env("ENGAGE_SERVER", server.to_string())
        .env_remove("ENGAGE_KEY")
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run engage");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ok(server: &std::net::SocketAddr, args: &[&str]) -> String {
    let r = engage(server, args, &[]).await;
    assert_eq!(r.code, 0, "engage {args:?}: {}", r.stderr);
    r.stdout
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).expect(l)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn track_timeline_and_erase() {
    let server = TestServer::start().await;
    define(&server, "price", proto::AttributeType::Number).await;
    let a = &server.addr;
    let out = ok(
        a,
        &[
            "track",
            "ann",
            "product_purchased",
            "price=39.5",
            "sku=A1",
            "--id",
            "e1",
        ],
    )
    .await;
    assert!(out.starts_with("stored event e1 (#1)"), "{out}");
    let out = ok(
        a,
        &["track", "ann", "product_purchased", "price=39.5", "--id", "e1"],
    )
    .await;
    assert!(out.starts_with("duplicate of event e1 (#1)"), "{out}");
    ok(a, &["track", "ann", "page_viewed", "path=/home"]).await;
    // Newest first, typed values as people read them.
    let out = ok(a, &["timeline", "ann"]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("page_viewed") && lines[0].contains("path=\"/home\""),
        "{out}"
    );
    assert!(lines[1].contains("price=39.5 sku=\"A1\""), "{out}");
    let events = json_lines(&ok(a, &["timeline", "ann", "--name", "product_purchased", "--json"]).await);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["eventId"], "e1");
    assert_eq!(events[0]["attributes"]["price"]["numberValue"], 39.5);
    // The API agrees.
    assert_eq!(timeline(&mut server.events().await, "ann").await.len(), 2);

    let out = ok(a, &["erase", "ann"]).await;
    assert_eq!(out.trim(), "erased 2 events of \"ann\"");
    assert!(timeline(&mut server.events().await, "ann").await.is_empty());
    assert_eq!(ok(a, &["timeline", "ann"]).await.trim(), "no events");

    // Errors: one line, and an exit code by kind.
    let r = engage(a, &["track", "ann", ""], &[]).await;
    assert_eq!(r.code, 5);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.starts_with("engage: INVALID_ARGUMENT: event.name"),
        "{}",
        r.stderr
    );
    let r = engage(a, &["track", "ann", "x", "novalue"], &[]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = engage(a, &["track"], &[]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    // A value is sent as written: an undefined attribute keeps it as text.
    ok(a, &["track", "bob", "signup", "zip=02134"]).await;
    let e = json_lines(&ok(a, &["timeline", "bob", "--json"]).await);
    assert_eq!(e[0]["attributes"]["zip"]["stringValue"], "02134");
    let r = engage(
        a,
        &[
            "track",
            "ann",
            "x",
            "--server",
            "http://127.0.0.1:1",
            "--ca",
            "/nonexistent",
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 2, "TLS options over http:// refused: {}", r.stderr);
    let r = engage(a, &["track", "ann", "x", "--server", "127.0.0.1:1"], &[]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.starts_with("engage: UNAVAILABLE"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn triggers_are_created_from_a_file_listed_paused_resumed_and_deleted() {
    let server = TestServer::start().await;
    let a = &server.addr;
    let dir = tempfile::TempDir::new().unwrap();
    let file = dir.path().join("trigger.json");
    // The JSON grpcurl takes (field names as in the proto or in camelCase).
    std::fs::write(
        &file,
        r#"{"name": "Welcome", "event_name": "signed_up",
            "action": {"type": "send_email", "payloadTemplate": "hi {{ user_id }}"}}"#,
    )
    .unwrap();
    let out = ok(a, &["triggers", "create", "-f", file.to_str().unwrap()]).await;
    assert!(out.starts_with("created trigger "), "{out}");
    let listed = json_lines(&ok(a, &["triggers", "list", "--json"]).await);
    assert_eq!(listed.len(), 1);
    let id = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(listed[0]["action"]["payloadTemplate"], "hi {{ user_id }}");
    let out = ok(a, &["triggers", "list"]).await;
    assert!(
        out.contains(&id) && out.contains("on signed_up") && !out.contains("[paused]"),
        "{out}"
    );

    ok(a, &["triggers", "pause", &id]).await;
    let t = server
        .triggers()
        .await
        .get_trigger(proto::GetTriggerRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(t.paused, "paused through the API");
    assert!(ok(a, &["triggers", "list"]).await.contains("[paused]"));
    assert_eq!(
        fired(&mut server.events().await, event("u", "signed_up", &[])).await,
        0
    );
    ok(a, &["triggers", "resume", &id]).await;
    assert_eq!(
        fired(&mut server.events().await, event("u", "signed_up", &[])).await,
        1
    );
    let got: serde_json::Value = serde_json::from_str(&ok(a, &["triggers", "get", &id]).await).unwrap();
    assert_eq!(got["name"], "Welcome");

    ok(a, &["triggers", "delete", &id]).await;
    let r = engage(a, &["triggers", "get", &id], &[]).await;
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.starts_with("engage: NOT_FOUND"), "{}", r.stderr);
    // A file that is not a trigger: a usage error naming the file.
    std::fs::write(&file, r#"{"nmae": 1}"#).unwrap();
    let r = engage(a, &["triggers", "create", "-f", file.to_str().unwrap()], &[]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("trigger.json"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_follows_actions_and_a_named_consumer_resumes_where_it_acknowledged() {
    let server = TestServer::start().await;
    let a = &server.addr;
    create_trigger(
        &mut server.triggers().await,
        trigger("buy", "email", "{{ user_id }}"),
    )
    .await
    .unwrap();
    let mut events = server.events().await;
    for u in ["a", "b", "c"] {
        fired(&mut events, event(u, "buy", &[])).await;
    }
    let first = json_lines(
        &ok(
            a,
            &[
                "tail",
                "--consumer",
                "mailer",
                "--from",
                "earliest",
                "--limit",
                "2",
                "--json",
            ],
        )
        .await,
    );
    let users: Vec<&str> = first.iter().map(|x| x["userId"].as_str().unwrap()).collect();
    assert_eq!(users, ["a", "b"]);
    // Acknowledged as printed: the consumer resumes after b.
    let next = json_lines(&ok(a, &["tail", "--consumer", "mailer", "--limit", "1", "--json"]).await);
    assert_eq!(next[0]["userId"], "c");
    let out = ok(a, &["tail", "--from", "earliest", "--limit", "1"]).await;
    assert!(out.starts_with("#1 ") && out.contains("user \"a\""), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_draw_a_chart_and_users_answer_a_filter() {
    let server = TestServer::start().await;
    let a = &server.addr;
    define(&server, "price", proto::AttributeType::Number).await;
    let mut events = server.events().await;
    for (u, p) in [("a", 10.0), ("a", 20.0), ("b", 5.0)] {
        fired(&mut events, event(u, "product_purchased", &[("price", n(p))])).await;
    }
    let out = ok(a, &["stats", "product_purchased", "--last", "3h"]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "product_purchased");
    // Three or four hourly buckets (the current one included), the last holding the events.
    assert!((4..=6).contains(&lines.len()), "{out}");
    assert!(
        lines[lines.len() - 2].contains('█') && lines[lines.len() - 2].ends_with(" 3"),
        "{out}"
    );
    assert_eq!(lines[lines.len() - 1], "total 3");
    let sum = json_lines(
        &ok(
            a,
            &[
                "stats",
                "product_purchased",
                "--last",
                "1d",
                "--by",
                "day",
                "--aggregate",
                "sum",
                "--attribute",
                "price",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(sum[0]["total"], 35.0);
    let r = engage(a, &["stats", "product_purchased", "--last", "soon"], &[]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);

    let dir = tempfile::TempDir::new().unwrap();
    let filter = dir.path().join("filter.json");
    std::fs::write(
        &filter,
        r#"{"history": {"event_name": "product_purchased", "aggregate": "AGGREGATE_COUNT", "op": "OPERATOR_GTE", "value": 2}}"#,
    )
    .unwrap();
    let out = ok(a, &["users", "--filter", filter.to_str().unwrap()]).await;
    assert_eq!(out, "1 users match\na\n");
    let pages = json_lines(&ok(a, &["users", "--filter", filter.to_str().unwrap(), "--json"]).await);
    assert_eq!(pages[0]["totalCount"], "1");
    assert_eq!(pages[0]["userIds"][0], "a");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_come_from_the_flag_or_the_environment() {
    let (server, _dir, ingest, read, _admin) = keyed_server(|_| {}).await;
    let a = &server.addr;
    let r = engage(a, &["timeline", "ann"], &[]).await;
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.starts_with("engage: UNAUTHENTICATED"), "{}", r.stderr);
    let r = engage(a, &["erase", "ann", "--key", &read], &[]).await;
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.starts_with("engage: PERMISSION_DENIED"), "{}", r.stderr);
    let r = engage(a, &["timeline", "ann"], &[("ENGAGE_KEY", read.as_str())]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = engage(a, &["track", "ann", "visit", "--key", &ingest], &[]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
}
