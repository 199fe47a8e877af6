//! Health, TLS and mutual TLS, certificates renewed, and the bounds on connections.

use super::*;

/// The health service answers SERVING, and NOT_SERVING while the SVM
/// cannot scan: here while its one scan thread is stuck (a local scan of
/// a large file holds it, waiting for room in the mapped budget, held
/// here), then SERVING again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_service_answers_serving_while_the_svm_can_scan() {
    let server = TestServer::start(|c| {
        c.engine.threads = 1;
        c.engine.scan_timeout = Duration::from_secs(1);
        c.engine.mapped_budget = 1 << 20;
    })
    .await;
    until_health(&server, ServingStatus::Serving).await;
    let engine = Arc::clone(&server.state.engine);
    let spooled = scanserver::engine::Content::Spooled {
        file: tempfile::tempfile().unwrap(),
        size: 1 << 20,
    };
    let room = engine.reserve(&spooled).await;
    let large = tempfile::NamedTempFile::new().unwrap();
    large.as_file().set_len(33 << 20).unwrap();
    let path = large.path().to_owned();
    let held = std::thread::spawn(move || {
        engine.scan(&scanserver::engine::ScanJob::file(path));
    });
    until_health(&server, ServingStatus::NotServing).await;
    drop(room);
    held.join().unwrap();
    until_health(&server, ServingStatus::Serving).await;
}

/// Waits until the health service says `wanted` of the agent service and
/// of the server as a whole ("").
async fn until_health(server: &TestServer, wanted: ServingStatus) {
    let mut health = server.health_client().await;
    let mut said = Vec::new();
    for _ in 0..1000 {
        said.clear();
        for service in ["scanserver.v1.ProtectionServer", ""] {
            let request = tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            };
            said.push(health.check(request).await.unwrap().into_inner().status());
        }
        if said == [wanted, wanted] {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("health: {said:?}, not {wanted:?}");
}

/// An agent of `server` (over TLS) trusting the CA `certificates` made in
/// `dir`, without a certificate of its own.
fn tls_agent(dir: &Path, server: &TestServer) -> AgentOptions {
    AgentOptions {
        tls: Some(ClientTls {
            ca: Some(dir.join("ca.pem")),
            identity: None,
            domain: Some("localhost".into()),
        }),
        ..AgentOptions::for_host(format!("https://{}", server.addr))
    }
}

/// A CA, a server certificate for localhost and a client certificate, as
/// PEM files in `dir`.
fn certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let names = [
        ("server", "localhost"),
        ("client", "agent-1"),
        ("other", "vm-2"),
    ];
    for (name, san) in names {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![san.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// A connection that fails says what to check: the server's address when
/// nothing answers there, the TLS settings when the handshake fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connection_says_what_to_check() {
    let message = |connected: Result<Agent, ClientError>| match connected {
        Err(err @ ClientError::Connect { .. }) => err.to_string(),
        Err(err) => panic!("a connection error, not {err}"),
        Ok(_) => panic!("refused"),
    };
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let nobody = message(Agent::connect(&AgentOptions::for_host(format!("http://{addr}"))).await);
    assert!(
        nobody.contains("is `scanserver serve` running there?"),
        "{nobody}"
    );

    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let server = TestServer::start(|c| c.tls = Some(served_tls(dir.path()))).await;
    let other = tempfile::tempdir().unwrap();
    certificates(other.path());
    let untrusted = message(Agent::connect(&tls_agent(other.path(), &server)).await);
    assert!(
        untrusted.contains("the TLS handshake failed: --ca"),
        "{untrusted}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let tls = |client_ca: bool| TlsConfig {
        client_ca: client_ca.then(|| dir.path().join("ca.pem")),
        ..served_tls(dir.path())
    };
    let options = |server: &TestServer, identity: bool| AgentOptions {
        require_encryption: true,
        tls: Some(ClientTls {
            ca: Some(dir.path().join("ca.pem")),
            identity: identity
                .then(|| (dir.path().join("client.pem"), dir.path().join("client.key"))),
            domain: Some("localhost".into()),
        }),
        ..AgentOptions::for_host(format!("https://{}", server.addr))
    };

    let server = TestServer::start(|c| c.tls = Some(tls(false))).await;
    let agent = Agent::connect(&options(&server, false))
        .await
        .expect("TLS session");
    assert!(
        !agent.welcome().session_id.is_empty(),
        "encryption required and given"
    );

    let mutual = TestServer::start(|c| c.tls = Some(tls(true))).await;
    let agent = Agent::connect(&options(&mutual, true))
        .await
        .expect("mutual TLS session");
    let dir_files = tempfile::tempdir().unwrap();
    std::fs::write(dir_files.path().join("eicar.com"), EICAR).unwrap();
    let found = Arc::new(std::sync::Mutex::new(None));
    let sink = Arc::clone(&found);
    agent
        .scan(
            Files::local([dir_files.path().join("eicar.com")]),
            HashFirst::Auto,
            move |_, outcome| *sink.lock().unwrap() = Some(outcome.verdict.kind()),
        )
        .await
        .unwrap();
    assert_eq!(*found.lock().unwrap(), Some("infected"));

    let refused = Agent::connect(&options(&mutual, false)).await;
    assert!(
        matches!(
            refused,
            Err(ClientError::Connect { .. } | ClientError::Status(_))
        ),
        "a client without a certificate is refused"
    );
    // Counted (and logged) where operators see it: the agents refused
    // have no session to show for it.
    let failed = || mutual.svm.connections.failed_handshakes() > 0;
    until_read("a failed handshake counted", failed, true).await;
    assert_eq!(server.svm.connections.failed_handshakes(), 0);

    // VM ids taken from certificates: the client's is for "agent-1" only.
    let certified = TestServer::start(|c| {
        c.tls = Some(TlsConfig {
            vm_id_in_certificate: true,
            check_interval: std::time::Duration::ZERO,
            ..tls(true)
        })
    })
    .await;
    let as_vm = |vm_id: &str| AgentOptions {
        vm_id: vm_id.into(),
        ..options(&certified, true)
    };
    let agent = Agent::connect(&as_vm("agent-1")).await;
    let agent = agent.unwrap_or_else(|err| panic!("its own VM: {err}"));
    for other in ["vm-2", "Agent-1", "not a dns name"] {
        match Agent::connect(&as_vm(other)).await {
            Err(ClientError::Rejected { reason, message }) => {
                assert_eq!(reason, RejectReason::NotCertified, "{message}");
                assert!(message.contains(&format!("{other:?}")), "{message}");
            }
            other => panic!("another VM is refused, not {:?}", other.map(|_| ())),
        }
    }
    // Its session is its certificate's: another agent that learnt its id
    // (from a log, say) cannot use it.
    let read = |file: &str| std::fs::read(dir.path().join(file)).unwrap();
    let other_agent = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
        .identity(tonic::transport::Identity::from_pem(
            read("other.pem"),
            read("other.key"),
        ))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", certified.addr))
        .unwrap()
        .tls_config(other_agent)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let lookup = |session_id: String| LookupRequest {
        session_id,
        digests: vec![Bytes::copy_from_slice(blake3::hash(b"x").as_bytes())],
    };
    let session = agent.welcome().session_id.clone();
    let refused = ProtectionServerClient::new(channel)
        .lookup(lookup(session))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        agent.lookup(&[blake3::hash(b"x")]).await.is_ok(),
        "its own agent can"
    );

    // Settings that make no identity stop the server before it starts,
    // naming the files and why.
    std::fs::write(dir.path().join("broken.key"), "not a key").unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut config = scanserver::config::Config::default();
    config.server.state_dir = Some(state.path().to_owned());
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.tls = Some(TlsConfig {
        key: dir.path().join("broken.key"),
        ..tls(false)
    });
    let refused = scanserver::server::Server::bind(&config, shipped_engine()).await;
    let err = refused.err().expect("unusable TLS settings are refused");
    let message = err.to_string();
    assert!(
        matches!(err, ServerError::Tls(TlsError::Pem { .. }))
            && message.contains("private key")
            && message.contains("broken.key"),
        "{message}"
    );
    // A key that is not the certificate's.
    config.tls = Some(TlsConfig {
        key: dir.path().join("client.key"),
        ..tls(false)
    });
    let refused = scanserver::server::Server::bind(&config, shipped_engine()).await;
    let err = refused
        .err()
        .expect("a key of another certificate is refused");
    let message = err.to_string();
    assert!(
        matches!(err, ServerError::Tls(TlsError::KeyMismatch { .. }))
            && message.contains("server.pem")
            && message.contains("client.key"),
        "{message}"
    );
}

/// Waits until `server` counts `open` agent connections.
async fn until_connections_open(server: &TestServer, open: usize) {
    until_read("connections open", || server.svm.connections.open(), open).await;
}

/// The admin listener's Unix socket has as many places as its TCP port:
/// one connection more is closed at once, and the others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_takes_a_bounded_number_of_connections() {
    use tokio::{io::AsyncReadExt, net::UnixStream};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let server = TestServer::start(|c| {
        c.server.admin_listen = scanserver::admin::AdminAddr::Unix(socket.clone());
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..scanserver::connections::ADMIN_CONNECTIONS {
        held.push(UnixStream::connect(&socket).await.unwrap());
    }
    let mut beyond = UnixStream::connect(&socket).await.unwrap();
    let mut buf = [0; 64];
    let until_closed = async { while let Ok(1..) = beyond.read(&mut buf).await {} };
    let closed = tokio::time::timeout(Duration::from_secs(5), until_closed).await;
    assert!(closed.is_ok(), "closed at once");
    drop(held);
    // Their places come back as the server sees them closed.
    let admin = server.admin.to_string();
    let timeout = scanserver::admin::REQUEST_TIMEOUT;
    for _ in 0..500 {
        if let Ok(mut client) = scanserver::admin::connect(&admin, None, timeout).await {
            let request = proto::StatusRequest::default();
            if client.status(request).await.is_ok() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the admin socket serves no one once its connections are closed");
}

/// An agent connection with no call under way for `server.idle_timeout`
/// is closed, its place given back (its client connects again for its
/// next call); one with a session open is kept, however quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_no_call_under_way_are_closed_once_idle() {
    let server = TestServer::start(|c| {
        c.engine.scan_timeout = Duration::from_secs(1);
        c.server.idle_timeout = Duration::from_secs(2);
    })
    .await;
    let (welcome, _session) = open_session(&server, hello()).await;
    assert!(matches!(welcome, server_message::Kind::Welcome(_)));
    let mut health = server.health_client().await;
    let check = tonic_health::pb::HealthCheckRequest::default();
    health.check(check.clone()).await.unwrap();
    until_connections_open(&server, 2).await;
    let open = || server.svm.connections.open();
    until_read("connections open once the health check's is idle", open, 1).await;
    assert_eq!(server.svm.connections.idle_closed(), 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(open(), 1, "the session's connection is kept");
    assert_eq!(server.svm.sessions.len(), 1);
    health.check(check).await.unwrap();
    assert_eq!(open(), 2);
}

/// Connections beyond `server.max_connections` are closed as they are
/// accepted (with TLS, before their handshake) and counted; a connection
/// that closes gives its place back, and so does one that never speaks
/// HTTP/2 once it has been cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed() {
    use tokio::io::AsyncReadExt;
    let server = TestServer::start(|c| c.server.max_connections = Some(2)).await;
    let endpoint = Channel::from_shared(server.url()).unwrap();
    let healthy = |channel: Channel| async move {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let check = health.check(tonic_health::pb::HealthCheckRequest::default());
        matches!(
            tokio::time::timeout(Duration::from_secs(10), check).await,
            Ok(Ok(_))
        )
    };
    // Whether the server closes `tcp` within `wait` (what it sends before,
    // its HTTP/2 settings, is passed over).
    let closed = |mut tcp: tokio::net::TcpStream, wait: Duration| async move {
        let mut buf = [0; 64];
        let until_closed = async { while let Ok(1..) = tcp.read(&mut buf).await {} };
        tokio::time::timeout(wait, until_closed).await.is_ok()
    };
    // The admin listener has places of its own, as many as operators
    // need: one more is closed at once, and agents are not affected.
    let admin = server.admin.to_string();
    let mut held = Vec::new();
    for _ in 0..scanserver::connections::ADMIN_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(&admin).await.unwrap());
    }
    let beyond = tokio::net::TcpStream::connect(&admin).await.unwrap();
    assert!(
        closed(beyond, Duration::from_secs(5)).await,
        "admin: closed at once"
    );
    drop(held);

    let first = endpoint.connect().await.unwrap();
    assert!(healthy(first.clone()).await);
    let silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    until_connections_open(&server, 2).await;
    let third = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    assert!(
        closed(third, Duration::from_secs(5)).await,
        "closed at once"
    );
    assert_eq!(server.svm.connections.refused(), 1);
    let cut_off = scanserver::connections::PREFACE_WAIT + Duration::from_secs(5);
    assert!(closed(silent, cut_off).await, "cut off without a preface");
    assert_eq!(server.svm.connections.silent(), 1);
    until_connections_open(&server, 1).await;
    assert!(
        healthy(endpoint.connect().await.unwrap()).await,
        "the place was given back"
    );
    assert!(healthy(first).await, "the others were left alone");

    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let tls = TlsConfig::new(dir.path().join("server.pem"), dir.path().join("server.key"));
    let server = TestServer::start(|c| {
        c.tls = Some(tls);
        c.server.max_connections = Some(1);
    })
    .await;
    let options = tls_agent(dir.path(), &server);
    let agent = Agent::connect(&options).await.expect("a TLS session");
    assert!(Agent::connect(&options).await.is_err(), "no place left");
    assert_eq!(server.svm.connections.refused(), 1);
    agent.close().await;
    until_connections_open(&server, 0).await;
    Agent::connect(&options)
        .await
        .expect("the place was given back");
}

/// Clients that connect and say nothing hold up no one's TLS handshake
/// while connection places are left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_hold_up_no_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let tls = TlsConfig::new(dir.path().join("server.pem"), dir.path().join("server.key"));
    let server = TestServer::start(|c| c.tls = Some(tls)).await;
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let options = tls_agent(dir.path(), &server);
    let connected = tokio::time::timeout(Duration::from_secs(5), Agent::connect(&options)).await;
    assert!(matches!(connected, Ok(Ok(_))), "a session at once");
}

/// A renewed certificate, or a new client CA, is used once the files are
/// read again (by the periodic look at them, on SIGHUP for `scanserver
/// serve`, or by hand here); files that cannot be used replace nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_are_served_once_read_again() {
    let (first, renewed, served) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    certificates(first.path());
    certificates(renewed.path());
    let install = |from: &Path| {
        for file in ["server.pem", "server.key", "ca.pem"] {
            std::fs::copy(from.join(file), served.path().join(file)).unwrap();
        }
    };
    install(first.path());
    let server = TestServer::start(|c| {
        c.tls = Some(TlsConfig {
            client_ca: Some(served.path().join("ca.pem")),
            check_interval: Duration::from_secs(1),
            ..served_tls(served.path())
        })
    })
    .await;
    let tls = server.tls.as_ref().unwrap();
    // An agent trusting the server of `trusted` and presenting the client
    // certificate of `identity`, if any.
    let agent = |trusted: &Path, identity: Option<&Path>| AgentOptions {
        require_encryption: true,
        tls: Some(ClientTls {
            ca: Some(trusted.join("ca.pem")),
            identity: identity.map(|dir| (dir.join("client.pem"), dir.join("client.key"))),
            domain: Some("localhost".into()),
        }),
        ..AgentOptions::for_host(format!("https://{}", server.addr))
    };
    // A client that connects and never begins its handshake holds up no
    // one else's.
    let _silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    Agent::connect(&agent(first.path(), Some(first.path())))
        .await
        .expect("the first certificates are used");
    assert!(!tls.reload().unwrap(), "the same files change nothing");

    install(renewed.path());
    // Found by the look at the files every second, and loaded at the
    // second look.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while Agent::connect(&agent(renewed.path(), Some(renewed.path())))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed files are never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!tls.reload().unwrap(), "they are loaded already");
    assert_eq!(server.svm.tls_update_failure(), None);
    for (trusted, identity, why) in [
        (
            first.path(),
            Some(renewed.path()),
            "the first certificate is no longer served",
        ),
        (
            renewed.path(),
            Some(first.path()),
            "the first client CA no longer admits",
        ),
        (
            renewed.path(),
            None,
            "a client certificate is still required",
        ),
    ] {
        // Refused in the handshake, or (TLS 1.3: the client's certificate
        // is checked after the client considers the handshake done) by
        // the connection closing at the first request; the listener is
        // up all along.
        let refused = Agent::connect(&agent(trusted, identity)).await.err();
        let refused = refused.map(|e| scanserver::WithCauses(&e).to_string());
        assert!(
            refused
                .as_ref()
                .is_some_and(|e| !e.contains("Connection refused")),
            "{why}: {refused:?}"
        );
    }
    Agent::connect(&agent(renewed.path(), Some(renewed.path())))
        .await
        .expect("the renewed certificates are used");

    std::fs::write(served.path().join("server.key"), "not a key").unwrap();
    let err = tls.reload().unwrap_err();
    assert!(err.to_string().contains("server.key"), "{err}");
    Agent::connect(&agent(renewed.path(), Some(renewed.path())))
        .await
        .expect("the renewed certificates are still used");
    // The periodic look reports them too, until the files served are back.
    let svm = &server.svm;
    let failure = |failed: bool| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while svm.tls_update_failure().is_some() != failed {
            assert!(std::time::Instant::now() < deadline, "failed: {failed}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    failure(true).await;
    install(renewed.path());
    failure(false).await;
    // Files that stay unreadable (a renewal the server may not read) are a
    // failure too, after three looks.
    std::fs::remove_file(served.path().join("server.key")).unwrap();
    failure(true).await;
    let failure_now = svm.tls_update_failure().unwrap();
    assert!(failure_now.contains("server.key"), "{failure_now}");
    install(renewed.path());
    failure(false).await;
}
