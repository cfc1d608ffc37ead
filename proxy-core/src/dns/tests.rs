//! The resolver against a name server that never answers (a UDP socket nobody reads).

use super::*;

#[test]
fn numeric_hosts_never_reach_dns() {
    let ip = |s: &str| numeric_host(s).map(|a| a.to_string());
    assert_eq!(ip("127.0.0.1").as_deref(), Some("127.0.0.1"));
    assert_eq!(ip("::1").as_deref(), Some("::1"));
    assert_eq!(ip("::ffff:127.0.0.1").as_deref(), Some("::ffff:127.0.0.1"));
    // The inet_aton shorthands getaddrinfo accepts: every spelling of loopback stays
    // recognisable as loopback (so CONNECT to the proxy's own ports is still refused).
    assert_eq!(ip("127.1").as_deref(), Some("127.0.0.1"));
    assert_eq!(ip("127.0.1").as_deref(), Some("127.0.0.1"));
    assert_eq!(ip("2130706433").as_deref(), Some("127.0.0.1"));
    assert_eq!(ip("0x7f.1").as_deref(), Some("127.0.0.1"));
    assert_eq!(ip("0177.0.0.01").as_deref(), Some("127.0.0.1"));
    assert_eq!(ip("0x7f000001").as_deref(), Some("127.0.0.1"));
    assert_eq!(ip("10.0x10000").as_deref(), Some("10.1.0.0"));
    for name in [
        "localhost",
        "example.com",
        "1.2.3.4.5",
        "256.1",
        "1.256.0.0",
        "4294967296",
        "127..1",
        "0x",
        "08.1",
        "",
        "1e3",
    ] {
        assert_eq!(numeric_host(name), None, "{name}");
    }
}

#[test]
fn server_addresses_default_to_port_53() {
    assert_eq!(
        server_addr("127.0.0.1"),
        Ok("127.0.0.1:53".parse().unwrap())
    );
    assert_eq!(server_addr("[::1]:5353"), Ok("[::1]:5353".parse().unwrap()));
    assert!(server_addr("dns.example").is_err());
}

/// A resolver asking only a socket that never answers.
fn stalled(per_client: usize, timeout: Duration) -> (Dns, std::net::UdpSocket) {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let dns = Dns::new(&DnsConfig {
        servers: vec![silent.local_addr().expect("addr")],
        timeout,
        per_client,
    })
    .expect("resolver");
    (dns, silent)
}

#[tokio::test]
async fn stalled_lookups_time_out_and_hold_only_their_clients_share() {
    let (dns, _silent) = stalled(2, Duration::from_millis(1500));
    let dns = std::sync::Arc::new(dns);
    let a: IpAddr = "127.0.0.1".parse().unwrap();
    let b: IpAddr = "::1".parse().unwrap();
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let dns = dns.clone();
            tokio::spawn(async move {
                let start = std::time::Instant::now();
                (
                    dns.lookup(a, &format!("s{i}.slow.test"), 80).await,
                    start.elapsed(),
                )
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(5), async {
        while dns.in_progress(a) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("both lookups in progress");

    // Beyond its share, client A is refused at once; client B is not affected, and names
    // from /etc/hosts and IP literals resolve for A too, although the only name server is
    // silent and A's share is taken.
    let start = std::time::Instant::now();
    assert_eq!(
        dns.lookup(a, "s9.slow.test", 80).await,
        Err(DnsError::TooMany {
            client: a,
            limit: 2
        })
    );
    assert_eq!(
        dns.lookup(a, "127.1", 80).await,
        Ok(vec!["127.0.0.1:80".parse().unwrap()])
    );
    for host in ["localhost", "LocalHost.", "app.localhost"] {
        let local = dns.lookup(a, host, 8080).await.expect(host);
        assert!(
            !local.is_empty()
                && local
                    .iter()
                    .all(|s| s.ip().is_loopback() && s.port() == 8080),
            "{host}: {local:?}"
        );
    }
    let other = {
        let dns = dns.clone();
        tokio::spawn(async move { dns.lookup(b, "b.slow.test", 80).await })
    };
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        other.await.expect("join"),
        Err(DnsError::TimedOut(Duration::from_millis(1500)))
    );

    for t in slow {
        let (r, took) = t.await.expect("join");
        assert_eq!(r, Err(DnsError::TimedOut(Duration::from_millis(1500))));
        assert!(took >= Duration::from_millis(1400), "{took:?}");
        assert!(took < Duration::from_secs(4), "{took:?}");
    }
    assert_eq!(dns.in_progress(a), 0);
    // The share is back: a new lookup is not refused (it times out like the others).
    let again = dns.lookup(a, "s10.slow.test", 80).await;
    assert_eq!(again, Err(DnsError::TimedOut(Duration::from_millis(1500))));
}

#[tokio::test]
async fn abandoned_lookups_give_their_slot_back() {
    let (dns, _silent) = stalled(1, Duration::from_secs(30));
    let a: IpAddr = "127.0.0.1".parse().unwrap();
    let r = tokio::time::timeout(Duration::from_millis(200), dns.lookup(a, "x.slow.test", 1)).await;
    assert!(r.is_err(), "a silent server cannot answer");
    assert_eq!(dns.in_progress(a), 0);
}
