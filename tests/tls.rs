//! TLS and mTLS on the listener (SPEC §6), with certificates made in the test (rcgen); reloads
//! on SIGHUP, and a bad file at start.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::*;
use engage::proto;
use engage::proto::event_service_client::EventServiceClient;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A CA and what it signed, as PEM.
struct Pki {
    ca: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap().pem();
        Self {
            ca,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate for `names`: (certificate, key).
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes the server's files into `dir`: (cert, key).
fn server_files(dir: &Path, pki: &Pki) -> (PathBuf, PathBuf) {
    let (cert, key) = pki.leaf(&["localhost"]);
    let (c, k) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

async fn tls_channel(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

async fn works(channel: Channel) -> Result<(), tonic::Status> {
    EventServiceClient::new(channel)
        .track_event(proto::TrackEventRequest {
            event: Some(event("u", "visit", &[])),
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_grpc_and_refuses_plaintext() {
    let pki = Pki::new();
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = server_files(files.path(), &pki);
    let server = TestServer::start_with(|a| {
        a.tls_cert = Some(cert);
        a.tls_key = Some(key);
    })
    .await;
    works(tls_channel(server.addr, &pki.ca, None).await.unwrap())
        .await
        .expect("over TLS");
    // A client that does not trust the server's CA is refused at the handshake.
    let other = Pki::new();
    let refused = match tls_channel(server.addr, &other.ca, None).await {
        Ok(c) => works(c).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client trusting another CA got through");
    // Plaintext gRPC to a TLS listener gets nowhere.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Ok(c) => works(c).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "plaintext went through a TLS listener");
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new();
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = server_files(files.path(), &pki);
    let ca_file = files.path().join("clients.pem");
    std::fs::write(&ca_file, &pki.ca).unwrap();
    let server = TestServer::start_with(|a| {
        a.tls_cert = Some(cert);
        a.tls_key = Some(key);
        a.tls_client_ca = Some(ca_file);
    })
    .await;
    let client = pki.leaf(&["worker"]);
    works(tls_channel(server.addr, &pki.ca, Some(&client)).await.unwrap())
        .await
        .expect("a client with a certificate from the CA");
    for identity in [None, Some(Pki::new().leaf(&["rogue"]))] {
        let refused = match tls_channel(server.addr, &pki.ca, identity.as_ref()).await {
            Ok(c) => works(c).await.is_err(),
            Err(_) => true,
        };
        assert!(
            refused,
            "a client without a good certificate got through ({})",
            identity.is_some()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_certificates_keeping_open_connections_and_a_bad_file_keeps_the_old() {
    let first = Pki::new();
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = server_files(files.path(), &first);
    let data = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn_with(
        data.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let old = tls_channel(server.addr, &first.ca, None).await.unwrap();
    works(old.clone()).await.unwrap();
    // A new certificate from another CA.
    let second = Pki::new();
    server_files(files.path(), &second);
    let hup = || {
        assert!(std::process::Command::new("kill")
            .args(["-HUP", &server.child.id().to_string()])
            .status()
            .unwrap()
            .success())
    };
    hup();
    server.log.wait_for(|l| l.contains("TLS files reloaded"));
    works(tls_channel(server.addr, &second.ca, None).await.unwrap())
        .await
        .expect("new connections get the new certificate");
    works(old.clone())
        .await
        .expect("the connection opened before stays");
    // A broken file: the previous configuration stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    hup();
    server.log.wait_for(|l| l.contains("TLS files not reloaded"));
    works(tls_channel(server.addr, &second.ca, None).await.unwrap())
        .await
        .expect("the previous certificate stays in force");
}

#[test]
fn a_bad_tls_file_at_start_is_an_error_naming_it() {
    let files = tempfile::tempdir().unwrap();
    let cert = files.path().join("broken-cert.pem");
    let key = files.path().join("broken-key.pem");
    std::fs::write(&cert, "garbage").unwrap();
    std::fs::write(&key, "garbage").unwrap();
    let data = tempfile::tempdir().unwrap();
    match start_or_exit(
        data.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    ) {
        Outcome::Started(_) => panic!("started with a broken certificate"),
        Outcome::Exited(status, stderr) => {
            assert!(!status.success());
            assert!(stderr.contains("broken-cert.pem"), "{stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
    let keys = files.path().join("missing-keys.json");
    match start_or_exit(data.path(), &["--api-keys-file", keys.to_str().unwrap()]) {
        Outcome::Started(_) => panic!("started with a missing keys file"),
        Outcome::Exited(_, stderr) => assert!(stderr.contains("missing-keys.json"), "{stderr}"),
    }
}
