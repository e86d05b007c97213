//! Acknowledged means durable: a server killed with SIGKILL under concurrent writers
//! loses no acknowledged event.

// Test helpers: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use engage::proto;

const WRITERS: usize = 12;
const KILL_AFTER_ACKS: usize = 1500;

/// Acknowledged events: event id → (user, sequence).
type Acked = Arc<Mutex<HashMap<String, (String, u64)>>>;

/// Runs WRITERS concurrent writers (half unary, half batches of 20) until the server dies, and
/// SIGKILLs it once KILL_AFTER_ACKS events were acknowledged.
async fn write_until_killed(child: ChildServer, round: usize, acked: Acked) {
    let count = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut client = child.events().await;
        let acked = acked.clone();
        let count = count.clone();
        let enough = enough.clone();
        tasks.push(tokio::spawn(async move {
            let user = format!("writer-{w}");
            for i in 0.. {
                let id = |k: usize| format!("r{round}-w{w}-{i}-{k}");
                let results: Vec<(String, u64)> = if w % 2 == 0 {
                    let e = event_at(&user, "crash_test", &id(0), 1_700_000_000 + i as i64);
                    match track(&mut client, e).await {
                        Ok(r) => vec![(r.event_id, r.sequence)],
                        Err(_) => return,
                    }
                } else {
                    let events = (0..20)
                        .map(|k| event_at(&user, "crash_test", &id(k), 1_700_000_000 + i as i64))
                        .collect();
                    match client.track_events(proto::TrackEventsRequest { events }).await {
                        Ok(r) => r
                            .into_inner()
                            .results
                            .into_iter()
                            .map(|r| (r.event_id, r.sequence))
                            .collect(),
                        Err(_) => return,
                    }
                };
                let n = results.len();
                {
                    let mut acked = acked.lock().unwrap();
                    for (event_id, seq) in results {
                        acked.insert(event_id, (user.clone(), seq));
                    }
                }
                if count.fetch_add(n, Ordering::SeqCst) + n >= KILL_AFTER_ACKS {
                    enough.notify_one();
                }
            }
        }));
    }
    enough.notified().await;
    child.crash();
    for t in tasks {
        t.await.unwrap();
    }
}

async fn verify(child: &ChildServer, acked: &Acked) {
    let acked = acked.lock().unwrap().clone();
    let mut c = child.events().await;
    let mut found: HashMap<String, u64> = HashMap::new();
    for w in 0..WRITERS {
        for e in timeline(&mut c, &format!("writer-{w}")).await {
            found.insert(e.event_id, e.sequence);
        }
    }
    let lost: Vec<_> = acked.keys().filter(|id| !found.contains_key(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    for (id, (_, seq)) in &acked {
        assert_eq!(found[id], *seq, "{id} kept its sequence");
    }
    // A retry of an acknowledged event is a duplicate with its original sequence.
    for (id, (user, seq)) in acked.iter().take(50) {
        let r = track(&mut c, event_at(user, "crash_test", id, 0)).await.unwrap();
        assert!(r.duplicate, "{id}");
        assert_eq!(r.sequence, *seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_concurrent_writers_loses_no_acknowledged_event() {
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = data_dir(&tmp);
    let acked: Acked = Arc::default();
    for round in 0..3 {
        // A slow background flusher, so only the explicit group-commit flush can save the acks.
        let child = ChildServer::spawn_with(&dir, &["--flush-every-ms", "60000"]);
        write_until_killed(child, round, acked.clone()).await;
        let child = ChildServer::spawn(&dir);
        verify(&child, &acked).await;
        drop(child);
    }
    assert!(acked.lock().unwrap().len() >= 3 * KILL_AFTER_ACKS);
}

/// The actions of acknowledged events survive SIGKILL, the log stays gap-free, and no action
/// exists for an event that was not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_keeps_the_actions_of_acknowledged_events() {
    use engage::proto::action_service_client::ActionServiceClient;
    use engage::proto::trigger_service_client::TriggerServiceClient;
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = data_dir(&tmp);
    let acked: Acked = Arc::default();
    let child = ChildServer::spawn_with(&dir, &["--flush-every-ms", "60000"]);
    let mut t = TriggerServiceClient::new(connect(child.addr).await);
    create_trigger(&mut t, trigger("crash_test", "notify", "{{ event.event_id }}"))
        .await
        .unwrap();
    write_until_killed(child, 0, acked.clone()).await;

    let child = ChildServer::spawn(&dir);
    let mut a = ActionServiceClient::new(connect(child.addr).await);
    let mut stream = a
        .subscribe_actions(proto::SubscribeActionsRequest {
            start: proto::StartFrom::Earliest as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut c = child.events().await;
    let mut stored = HashMap::new();
    for w in 0..WRITERS {
        for e in timeline(&mut c, &format!("writer-{w}")).await {
            stored.insert(e.event_id, e.sequence);
        }
    }
    // Every stored event fired exactly one action (the trigger matches them all).
    let mut by_event = HashMap::new();
    for expected in 1..=stored.len() as u64 {
        let action = stream.message().await.unwrap().unwrap();
        assert_eq!(action.sequence, expected, "the action log is gap-free");
        assert!(
            stored.contains_key(&action.event_id),
            "action for an unstored event"
        );
        assert_eq!(action.payload, action.event_id);
        by_event.insert(action.event_id, action.sequence);
    }
    let newest = a
        .list_fired_actions(proto::ListFiredActionsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        newest.actions[0].sequence,
        stored.len() as u64,
        "no action beyond the stored events"
    );
    let acked = acked.lock().unwrap().clone();
    for id in acked.keys() {
        assert!(
            by_event.contains_key(id),
            "the action of acknowledged event {id} was lost"
        );
    }
}
