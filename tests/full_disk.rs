//! A full disk. sled keeps one process-wide lock for all its databases, and a database whose
//! disk filled up may hold it while its flush waits for space: so this test has a binary of
//! its own and runs the server as a child process, killed at the end.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;

/// A tmpfs of `mib` MiB mounted on a fresh directory (the tests run as root, as CI does),
/// unmounted on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(mib: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs (the tests run as root)");
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_disk_answers_503_over_http() {
    let disk = SmallDisk::mount(8);
    let server = ChildServer::spawn_with(&disk.0.path().join("data"), &["--max-message-bytes", "4194304"]);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    // Bytes zstd cannot shrink much (sled compresses what it writes): hex of a xorshift stream,
    // about 2:1, so the load still fills the disk.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut blob = || {
        (0..500)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                format!("{state:016x}")
            })
            .collect::<String>()
    };
    let mut last = (0, String::new());
    for round in 0..400 {
        let batch = json!({"batch": (0..16).map(|i| json!({"type": "track", "userId": "filler", "event": "fill",
            "messageId": format!("f{round}-{i}"), "properties": {"blob": blob()}})).collect::<Vec<_>>()});
        let request = http::Request::post(format!("http://{}/v1/batch", server.addr))
            .header("content-type", "application/json")
            .body(batch.to_string().into_bytes())
            .unwrap();
        let mut response = agent.run(request).expect("http call");
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().unwrap_or_default();
        let done = status != 200 || body.contains("rejected");
        last = (status, body);
        if done {
            break;
        }
    }
    assert_eq!(last.0, 503, "{}", last.1);
    assert!(last.1.contains("storage failed"), "{}", last.1);
    // What the operator sees: the failure, logged.
    server.log.wait_for(|l| l.contains("No space left"));
    server.crash();
}
