//! What the SVM's status says of the agent listener: an expired certificate, a spool that refuses uploads.

use super::*;

/// The agent listener's certificate validity is part of the SVM's status:
/// expired, not valid yet (a reason that stops scans), or expiring within
/// 14 days, each is a reason of its own; a renewed one read again clears
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_turns_the_svm_critical() {
    use scanserver::proto::SvmReason;
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let (past, expired, future) = (
        rcgen::date_time_ymd(2019, 1, 1),
        rcgen::date_time_ymd(2020, 1, 1),
        rcgen::date_time_ymd(2200, 1, 1),
    );
    let (later, soon) = (now + time::Duration::days(2), now + time::Duration::days(7));
    // The certificate `pem` (a chain) and its key, served from now on.
    let install = |pem: String, key: &rcgen::KeyPair| {
        std::fs::write(dir.path().join("server.pem"), pem).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    };
    let write_valid = |not_before, not_after| {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = not_before;
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate().unwrap();
        install(params.self_signed(&key).unwrap().pem(), &key);
    };
    let write = |not_after| write_valid(past, not_after);
    write(expired);
    let server = TestServer::start(|c| c.tls = Some(served_tls(dir.path()))).await;
    let expires = server.svm.certificate_validity().unwrap().not_after;
    assert_eq!(
        humantime::format_rfc3339_seconds(expires).to_string(),
        "2020-01-01T00:00:00Z"
    );
    let status = server.svm.status();
    assert_eq!(
        status.reasons,
        [SvmReason::CertificateExpired],
        "{status:?}"
    );

    // The reasons once the files written are read again.
    let reloaded = || {
        assert!(server.tls.as_ref().unwrap().reload().unwrap());
        server.svm.status().reasons
    };
    write(soon);
    assert_eq!(reloaded(), [SvmReason::CertificateExpiresSoon]);
    write(future);
    assert_eq!(reloaded(), []);

    // Not valid yet (a certificate issued ahead of the SVM's clock): agents
    // refuse it as they do an expired one.
    write_valid(later, future);
    assert_eq!(reloaded(), [SvmReason::CertificateNotYetValid]);
    assert!(SvmReason::CertificateNotYetValid.stops_scans());
    write(future);
    assert_eq!(reloaded(), []);

    // Served with an intermediate CA and a root: the chain is valid from
    // the last start to the first end of the certificates agents check,
    // the server's own and the intermediate's. The root is a trust anchor,
    // whose validity clients do not check.
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let ca_params = |name: &str, (not_before, not_after)| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_before = not_before;
        params.not_after = not_after;
        params
    };
    let chain_of = |root, intermediate| {
        let root = ca_params("root", root);
        let root = CertifiedIssuer::self_signed(root, KeyPair::generate().unwrap()).unwrap();
        let ca = ca_params("intermediate", intermediate);
        let ca = CertifiedIssuer::signed_by(ca, KeyPair::generate().unwrap(), &root).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.not_after = future;
        let cert = params.signed_by(&key, &ca).unwrap();
        install(format!("{}{}{}", cert.pem(), ca.pem(), root.pem()), &key);
        reloaded()
    };
    assert_eq!(
        chain_of((past, expired), (past, soon)),
        [SvmReason::CertificateExpiresSoon],
        "the intermediate expires first; the root's expiry does not count"
    );
    assert_eq!(
        chain_of((later, future), (later, future)),
        [SvmReason::CertificateNotYetValid],
        "the intermediate starts last"
    );
    assert_eq!(
        chain_of((later, future), (past, future)),
        [],
        "the root's start does not count"
    );
}

/// A spool that refuses an upload for want of room (its budget taken, not
/// one VM's share) makes the SVM Warning, `SPOOL_FULL`; a VM's share taken
/// does not (that VM's files wait, others' go on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_that_refuses_uploads_makes_the_svm_warning() {
    let server = TestServer::start(|c| {
        c.uploads.memory_threshold = 16 << 10;
        c.uploads.spool_budget = 64 << 10;
        c.uploads.spool_budget_per_vm = Some(48 << 10);
    })
    .await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    // Held, never sent: 40 KiB of the VM's 48 KiB share, and of the 64 KiB.
    tx.send(begin(&session, 1, &[1; 40 << 10], None))
        .await
        .unwrap();
    tx.send(begin(&session, 2, &[2; 40 << 10], None))
        .await
        .unwrap();
    next_error(&mut replies, 2, Code::ResourceExhausted, "share").await;
    // Two samples of the monitor, a second apart.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(server.svm.status().reasons.is_empty(), "a VM's share");

    let (other, _keep) = session_id(&server).await;
    let (other_tx, mut other_replies) = scan_stream(&server).await;
    other_tx
        .send(begin(&other, 1, &[3; 40 << 10], None))
        .await
        .unwrap();
    next_error(
        &mut other_replies,
        1,
        Code::ResourceExhausted,
        "spool is full",
    )
    .await;
    let reasons = || server.svm.status().reasons;
    until_read("the SVM Warning", reasons, vec![SvmReason::SpoolFull]).await;
    assert_eq!(server.svm.status().health, Health::Warning);
    let components = server.svm.components();
    let spool = components.iter().find(|c| c.name == "spool").unwrap();
    assert_eq!(spool.state(), proto::ComponentState::Warning, "{spool:?}");
}
