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

/// Polls `cond` every 5 ms until it holds (a generous deadline; never a timing assertion).
async fn until(what: &str, cond: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn stalled_lookups_hold_only_their_clients_share() {
    // A lookup bound far beyond the test's own steps: the stalled lookups are still pending
    // throughout (until the resolver's own bound, two tries of 5 s, far beyond the few
    // lookups checked meanwhile); they are abandoned at the end, not awaited.
    let (dns, _silent) = stalled(2, Duration::from_secs(600));
    let dns = std::sync::Arc::new(dns);
    let a: IpAddr = "127.0.0.1".parse().unwrap();
    let b: IpAddr = "::1".parse().unwrap();
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let dns = dns.clone();
            tokio::spawn(async move { dns.lookup(a, &format!("s{i}.slow.test"), 80).await })
        })
        .collect();
    until("both lookups in progress", || dns.in_progress(a) == 2).await;

    // Beyond its share, client A is refused (without asking the silent server, so while
    // its two lookups are still pending); client B is not affected, and names from
    // /etc/hosts and IP literals resolve for A too, although the only name server is
    // silent and A's share is taken.
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
    until("B's lookup in progress", || dns.in_progress(b) == 1).await;
    assert!(
        slow.iter().all(|t| !t.is_finished()),
        "A's stalled lookups are still pending"
    );
    assert_eq!(dns.in_progress(a), 2);

    // Abandoned, the stalled lookups give the share back: a new lookup of A is admitted
    // (it reaches the silent server instead of being refused).
    for t in slow {
        t.abort();
    }
    other.abort();
    until("A's share back", || dns.in_progress(a) == 0).await;
    let again = {
        let dns = dns.clone();
        tokio::spawn(async move { dns.lookup(a, "s10.slow.test", 80).await })
    };
    until("A's new lookup admitted", || dns.in_progress(a) == 1).await;
    assert!(!again.is_finished(), "admitted, not refused");
    again.abort();
}

#[tokio::test]
async fn a_stalled_lookup_times_out_at_its_bound() {
    let (dns, _silent) = stalled(2, Duration::from_millis(1500));
    let a: IpAddr = "127.0.0.1".parse().unwrap();
    let start = std::time::Instant::now();
    let r = dns.lookup(a, "s0.slow.test", 80).await;
    // Only a lower bound: a loaded machine may take longer, never less.
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(r, Err(DnsError::TimedOut(Duration::from_millis(1500))));
    assert_eq!(dns.in_progress(a), 0);
}

#[tokio::test]
async fn abandoned_lookups_give_their_slot_back() {
    let (dns, _silent) = stalled(1, Duration::from_secs(30));
    let a: IpAddr = "127.0.0.1".parse().unwrap();
    let r = tokio::time::timeout(Duration::from_millis(200), dns.lookup(a, "x.slow.test", 1)).await;
    assert!(r.is_err(), "a silent server cannot answer");
    assert_eq!(dns.in_progress(a), 0);
}
