//! Access control (SPEC §6): keys and roles over every RPC, `engage keys`, SIGHUP reloads,
//! TLS and mTLS, rate limits, audit lines, and the refusal to listen openly without keys.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use engage::proto;
use engage::proto::event_service_client::EventServiceClient;
use prost::Message;
use tonic::Code;

/// Three keys, one per role, in a fresh keys file: (file's dir, ingest, read, admin).
fn three_keys() -> (tempfile::TempDir, std::path::PathBuf, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let ingest = create_key(&file, "web", "ingest");
    let read = create_key(&file, "worker", "read");
    let admin = create_key(&file, "ops", "admin");
    (dir, file, ingest, read, admin)
}

/// The role SPEC §6 gives a method: `ingest` for tracking, `admin` for what changes
/// configuration or erases, `read` for the rest.
fn needed(method: &str) -> &'static str {
    match method {
        "TrackEvent" | "TrackEvents" => "ingest",
        "DefineAttribute" | "CreateTrigger" | "UpdateTrigger" | "DeleteTrigger" | "DeleteUser" => "admin",
        "CreateDestination" | "UpdateDestination" | "DeleteDestination" | "RedriveDeadLetters" => "admin",
        _ => "read",
    }
}

/// Every engage method, as `/engage.v1.Service/Method`, from the descriptor set.
fn every_method() -> Vec<(String, String)> {
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for file in set.file.iter().filter(|f| f.package() == "engage.v1") {
        for service in &file.service {
            for m in &service.method {
                out.push((
                    format!("/engage.v1.{}/{}", service.name(), m.name()),
                    m.name().to_string(),
                ));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn each_role_may_call_exactly_its_rpcs() {
    let (_dir, file, ingest, read, admin) = three_keys();
    let server = TestServer::start_with(|a| a.api_keys_file = Some(file.clone())).await;
    let channel = server.channel().await;
    let methods = every_method();
    assert_eq!(methods.len(), 26);
    for (path, method) in &methods {
        let need = needed(method);
        for (role, secret) in [("ingest", &ingest), ("read", &read), ("admin", &admin)] {
            // An empty request: for an allowed call, whatever it answers is not about access.
            let result = raw_any(channel.clone(), path, Bytes::new(), Some(secret)).await;
            let allowed = role == "admin" || role == need;
            match result {
                Err(s) if !allowed => {
                    assert_eq!(s.code(), Code::PermissionDenied, "{role} {path}: {s:?}");
                    assert!(
                        s.message().contains(&format!("needs the {need} role")),
                        "{role} {path}: {}",
                        s.message()
                    );
                }
                Ok(()) if !allowed => panic!("{role} may call {path}"),
                Err(s) => assert!(
                    !matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated),
                    "{role} {path}: {s:?}"
                ),
                Ok(()) => {}
            }
        }
        for secret in [None, Some("engage_0000"), Some(&ingest[..ingest.len() - 1])] {
            let s = raw_any(channel.clone(), path, Bytes::new(), secret)
                .await
                .unwrap_err();
            assert_eq!(s.code(), Code::Unauthenticated, "{path} with {secret:?}");
            if let Some(secret) = secret {
                assert!(!s.message().contains(secret), "the credential is quoted");
            }
        }
    }
    // A bad request from a key without the role is refused for the role, not the request.
    let bad = Bytes::from_static(&[0xff, 0xff, 0xff]);
    let s = raw_any(
        channel.clone(),
        "/engage.v1.EventService/DeleteUser",
        bad,
        Some(&read),
    )
    .await
    .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    // Health and reflection need no key.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health without a key");
    // Basic auth with the secret as the user name is accepted too (what Segment SDKs send).
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{ingest}:"));
    let mut request = tonic::Request::new(proto::TrackEventRequest {
        event: Some(event("u", "visit", &[])),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Basic {basic}").parse().unwrap());
    EventServiceClient::new(channel)
        .track_event(request)
        .await
        .expect("basic auth");
}

#[test]
fn engage_keys_creates_lists_and_revokes_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sub").join("keys.json");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let f = file.to_str().unwrap();
    let (ok, out, _) = engage_keys(&["create", "--file", f, "--name", "web.site-1", "--role", "ingest"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 1, "the secret is the only line: {out:?}");
    let secret = out.trim();
    assert!(
        secret.starts_with("engage_") && secret.len() >= 7 + 64,
        "{secret}"
    );
    let second = create_key(&file, "ops", "admin");
    assert_ne!(secret, second);
    let stored = std::fs::read_to_string(&file).unwrap();
    assert!(
        !stored.contains(&secret[7..]) && !stored.contains(&second[7..]),
        "a secret is kept"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the keys file is private");
    }
    let (ok, out, err) = engage_keys(&["create", "--file", f, "--name", "ops", "--role", "read"]);
    assert!(!ok && out.is_empty() && err.contains("already exists"), "{err}");
    let (ok, _, err) = engage_keys(&["create", "--file", f, "--name", "has space", "--role", "read"]);
    assert!(!ok && err.contains("name"), "{err}");
    let (ok, out, _) = engage_keys(&["list", "--file", f]);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("web.site-1\tingest\t") && lines[1].starts_with("ops\tadmin\t"),
        "{out}"
    );
    assert!(!out.contains("engage_"), "list shows a secret: {out}");
    let (ok, _, _) = engage_keys(&["revoke", "--file", f, "--name", "web.site-1"]);
    assert!(ok);
    let (_, out, _) = engage_keys(&["list", "--file", f]);
    assert_eq!(out.lines().count(), 1);
    let (ok, _, err) = engage_keys(&["revoke", "--file", f, "--name", "web.site-1"]);
    assert!(!ok && err.contains("no key"), "{err}");
}

fn hup(server: &ChildServer) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn count_lines(log: &Log, needle: &str) -> usize {
    log.lines().iter().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_key_is_refused_after_sighup_while_an_open_stream_goes_on() {
    let (dir, file, ingest, read, admin) = three_keys();
    let data = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn_with(data.path(), &["--api-keys-file", file.to_str().unwrap()]);
    let channel = server.channel().await;
    let mut triggers = proto::trigger_service_client::TriggerServiceClient::with_interceptor(
        channel.clone(),
        Bearer(admin.clone()),
    );
    triggers
        .create_trigger(proto::CreateTriggerRequest {
            trigger: Some(trigger("visit", "x", "{{ user_id }}")),
        })
        .await
        .unwrap();
    let mut actions = proto::action_service_client::ActionServiceClient::with_interceptor(
        channel.clone(),
        Bearer(read.clone()),
    );
    let mut stream = actions
        .subscribe_actions(proto::SubscribeActionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut events = EventServiceClient::with_interceptor(channel.clone(), Bearer(ingest.clone()));
    let track = |user: &str| proto::TrackEventRequest {
        event: Some(event(user, "visit", &[])),
    };
    events.track_event(track("before")).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().user_id, "before");

    let (ok, _, _) = engage_keys(&["revoke", "--file", file.to_str().unwrap(), "--name", "worker"]);
    assert!(ok);
    // Revoked in the file, still in force until the reload.
    actions
        .list_fired_actions(proto::ListFiredActionsRequest::default())
        .await
        .expect("before the reload");
    hup(&server);
    server.log.wait_for(|l| l.contains("keys file reloaded"));
    let s = actions
        .list_fired_actions(proto::ListFiredActionsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    // The stream opened before goes on.
    events.track_event(track("after")).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().user_id, "after");

    // A keys file that fails to load keeps the keys in force.
    std::fs::write(&file, "not json").unwrap();
    hup(&server);
    server.log.wait_for(|l| l.contains("keys file not reloaded"));
    events
        .track_event(track("still"))
        .await
        .expect("the old keys stay");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn configuration_and_erasure_calls_leave_audit_lines() {
    let (_dir, file, _ingest, read, admin) = three_keys();
    let data = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn_with(data.path(), &["--api-keys-file", file.to_str().unwrap()]);
    let channel = server.channel().await;
    // A refused attempt at an erasure is audited too.
    EventServiceClient::with_interceptor(channel.clone(), Bearer(read.clone()))
        .delete_user(proto::DeleteUserRequest {
            user_id: "ann".into(),
        })
        .await
        .unwrap_err();
    let mut triggers = proto::trigger_service_client::TriggerServiceClient::with_interceptor(
        channel.clone(),
        Bearer(admin.clone()),
    );
    let created = triggers
        .create_trigger(proto::CreateTriggerRequest {
            trigger: Some(trigger("visit", "x", "")),
        })
        .await
        .unwrap()
        .into_inner();
    triggers
        .delete_trigger(proto::DeleteTriggerRequest { id: "nope".into() })
        .await
        .unwrap_err();
    let mut events = EventServiceClient::with_interceptor(channel, Bearer(admin.clone()));
    events
        .delete_user(proto::DeleteUserRequest {
            user_id: "ann".into(),
        })
        .await
        .unwrap();
    let line = server.log.wait_for(|l| {
        l.contains("\"target\":\"engage::audit\"")
            && l.contains("DeleteUser")
            && l.contains("\"outcome\":\"OK\"")
    });
    let audit: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(audit["key"], "ops");
    assert_eq!(audit["method"], "engage.v1.EventService/DeleteUser");
    assert_eq!(audit["outcome"], "OK");
    assert!(audit["resource"].as_str().unwrap().contains("ann"), "{line}");
    assert!(
        audit["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    let lines = server.log.lines();
    let create = lines
        .iter()
        .find(|l| l.contains("\"target\":\"engage::audit\"") && l.contains("CreateTrigger"))
        .expect("create audited");
    assert!(
        create.contains(&created.id) && create.contains("\"outcome\":\"OK\""),
        "{create}"
    );
    let delete = lines
        .iter()
        .find(|l| l.contains("\"target\":\"engage::audit\"") && l.contains("DeleteTrigger"))
        .expect("delete audited");
    assert!(delete.contains("\"outcome\":\"NOT_FOUND\""), "{delete}");
    let refused = lines
        .iter()
        .find(|l| l.contains("\"target\":\"engage::audit\"") && l.contains("PERMISSION_DENIED"))
        .expect("a refused erasure audited");
    assert!(
        refused.contains("\"key\":\"worker\"") && refused.contains("DeleteUser"),
        "{refused}"
    );
    assert_eq!(count_lines(&server.log, &admin[7..]), 0, "a secret was logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn over_the_rate_a_call_is_refused_whole_with_retry_info() {
    let (_dir, file, ingest, read, admin) = three_keys();
    let server = TestServer::start_with(|a| {
        a.api_keys_file = Some(file.clone());
        a.ingest_rate_per_key = 5;
        a.ingest_burst = 5;
    })
    .await;
    let channel = server.channel().await;
    let mut web = EventServiceClient::with_interceptor(channel.clone(), Bearer(ingest.clone()));
    let batch = |n: usize| proto::TrackEventsRequest {
        events: (0..n).map(|_| event("u", "visit", &[])).collect(),
    };
    web.track_events(batch(4)).await.expect("within the burst");
    // One cell is left: a batch of two takes none of it.
    let s = web.track_events(batch(2)).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().contains("retry in") && s.message().contains("web"),
        "{}",
        s.message()
    );
    use tonic_types::StatusExt;
    let retry = s.get_details_retry_info().expect("RetryInfo detail");
    let delay = retry.retry_delay.expect("a delay");
    assert!(
        delay > std::time::Duration::ZERO && delay <= std::time::Duration::from_secs(1),
        "{delay:?}"
    );
    web.track_events(batch(1)).await.expect("the last cell");
    // Never admissible whole: more than the burst.
    let s = web.track_events(batch(6)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("ingest_burst"), "{}", s.message());
    // Another key has a budget of its own.
    let mut ops = EventServiceClient::with_interceptor(channel.clone(), Bearer(admin));
    ops.track_events(batch(5)).await.expect("another key");
    let mut reader = EventServiceClient::with_interceptor(channel, Bearer(read));
    let stored = reader
        .get_user_timeline(proto::GetUserTimelineRequest {
            user_id: "u".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(stored.len(), 10, "a refused call stored nothing");
}

#[tokio::test]
async fn a_non_loopback_address_without_keys_is_refused_unless_insecure() {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = engage::server::serve(listener, args(dir.path()), std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--api-keys-file") && err.contains("--insecure"),
        "{err}"
    );
    // With --insecure it serves.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut a = args(dir.path());
    a.insecure = true;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(engage::server::serve(listener, a, async {
        let _ = stopped.await;
    }));
    let mut c = EventServiceClient::new(connect(([127, 0, 0, 1], port).into()).await);
    track(&mut c, event("u", "visit", &[])).await.unwrap();
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[test]
fn concurrent_key_creations_all_land_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let children: Vec<_> = (0..12)
        .map(|i| {
            std::process::Command::new(env!("CARGO_BIN_EXE_engage"))
                .args(["keys", "create", "--file", file.to_str().unwrap(), "--name"])
                .arg(format!("k{i}"))
                .args(["--role", "read"])
                .env_remove("ENGAGE_API_KEYS_FILE")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (_, out, _) = engage_keys(&["list", "--file", file.to_str().unwrap()]);
    let mut names: Vec<&str> = out.lines().filter_map(|l| l.split('\t').next()).collect();
    names.sort();
    let mut want: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
    want.sort();
    assert_eq!(names, want);
}
