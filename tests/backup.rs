//! Backup of a running server and restore: a backup is consistent at one durable sequence
//! while ingest goes on, and a restored directory answers what the server answered then.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;
use engage::proto;

fn engage(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_engage"))
        .args(args)
        .output()
        .expect("run engage");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn users() -> Vec<String> {
    (0..25).map(|u| format!("user-{u:02}")).collect()
}

/// Every event of every user and every fired action, as (sequence, text) sorted by sequence.
async fn everything(server: &ChildServer) -> (Vec<(u64, String)>, Vec<(u64, String)>) {
    let mut c = server.events().await;
    let mut events = Vec::new();
    for u in users() {
        for e in timeline(&mut c, &u).await {
            let mut attrs: Vec<_> = e
                .attributes
                .iter()
                .map(|(k, v)| format!("{k}={:?}", v.value))
                .collect();
            attrs.sort();
            events.push((
                e.sequence,
                format!(
                    "{} {} {} {:?} {:?}",
                    e.event_id, e.user_id, e.name, e.occurred_at, attrs
                ),
            ));
        }
    }
    events.sort();
    let mut a = proto::action_service_client::ActionServiceClient::new(server.channel().await);
    // "": every user's actions, through paging.
    let mut actions: Vec<(u64, String)> = user_actions(&mut a, "")
        .await
        .into_iter()
        .map(|x| {
            (
                x.sequence,
                format!("{} {} {} {}", x.action_id, x.user_id, x.event_id, x.payload),
            )
        })
        .collect();
    actions.sort();
    (events, actions)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_taken_while_ingest_goes_on_restores_to_exactly_its_sequence() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = data_dir(&tmp);
    // Small slices: the backup takes many, and the writers' calls land between them, on keys
    // already copied (mirrored into the backup) and on keys not yet copied. Without the mirror
    // the comparison below fails.
    let server = ChildServer::spawn_with(&dir, &["--backup-slice-keys", "300"]);
    let mut t = proto::trigger_service_client::TriggerServiceClient::new(server.channel().await);
    create_trigger(
        &mut t,
        trigger("buy", "email", "{{ user_id }} bought {{ event.attributes.n }}"),
    )
    .await
    .unwrap();
    let mut c = server.events().await;
    for b in 0..4 {
        let events = (0..500)
            .map(|i| event(&users()[(b * 500 + i) % 25], "buy", &[("n", n(i as f64))]))
            .collect();
        c.track_events(proto::TrackEventsRequest { events })
            .await
            .unwrap();
    }
    // Writers keep going while the backup is taken.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let writer = {
        let mut c = server.events().await;
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !*stopped.borrow_and_update() {
                let events = (0..50)
                    .map(|i| event(&users()[i % 25], "buy", &[("n", n(i as f64))]))
                    .collect();
                c.track_events(proto::TrackEventsRequest { events })
                    .await
                    .unwrap();
                sent += 50;
            }
            sent
        })
    };
    let backup_dir = tmp.path().join("backup");
    let (ok, out, err) = {
        let dir = dir.display().to_string();
        let to = backup_dir.display().to_string();
        tokio::task::spawn_blocking(move || engage(&["backup", "--data-dir", &dir, "--to", &to]))
            .await
            .unwrap()
    };
    assert!(ok, "engage backup failed: {err}");
    let description: serde_json::Value = serde_json::from_str(out.trim()).expect("the backup's description");
    let (event_seq, action_seq) = (
        description["event_seq"].as_u64().expect("event_seq"),
        description["action_seq"].as_u64().expect("action_seq"),
    );
    let slices = description["slices"].as_u64().expect("slices");
    assert!(slices > 1, "the backup was one slice: {description}");
    let _ = stop.send(true);
    let sent = writer.await.unwrap();
    assert!(sent > 0);
    assert!(event_seq >= 2000, "{description}");
    let (events, actions) = everything(&server).await;
    assert!(events.len() as u64 > event_seq, "ingest went on after the backup");
    drop(c);
    drop(t);
    assert!(server.terminate().success());

    let restored = tmp.path().join("restored");
    let (ok, _, err) = engage(&[
        "restore",
        "--from",
        &backup_dir.display().to_string(),
        "--data-dir",
        &restored.display().to_string(),
    ]);
    assert!(ok, "engage restore failed: {err}");
    let server = ChildServer::spawn(&restored);
    let (r_events, r_actions) = everything(&server).await;
    // Exactly what was durable at the backup's sequence, gap-free, and the same as answered then.
    let want_events: Vec<_> = events.into_iter().filter(|(s, _)| *s <= event_seq).collect();
    let want_actions: Vec<_> = actions.into_iter().filter(|(s, _)| *s <= action_seq).collect();
    assert_eq!(r_events.len() as u64, event_seq);
    assert_eq!(r_events, want_events);
    assert_eq!(r_actions.len() as u64, action_seq);
    assert_eq!(r_actions, want_actions);
    // The restored server goes on from there.
    let mut c = server.events().await;
    assert_eq!(
        track(&mut c, event("user-00", "buy", &[]))
            .await
            .unwrap()
            .sequence,
        event_seq + 1
    );
    // A restore refuses a non-empty directory, and a backup one.
    let (ok, _, err) = engage(&[
        "restore",
        "--from",
        &backup_dir.display().to_string(),
        "--data-dir",
        &restored.display().to_string(),
    ]);
    assert!(!ok && err.contains("missing or empty"), "{err}");
}
