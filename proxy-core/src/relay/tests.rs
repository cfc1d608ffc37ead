//! The relay over real loopback sockets: half-close, reset propagation and the hold point.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::*;
use crate::{conn::ConnState, report::Reporter};

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn classification_names_the_right_side() {
    let (e, fatal) = classify(PumpEnd::Eof, ClosedBy::Client, ClosedBy::Server);
    assert_eq!(
        e,
        ConnEnd::new(ClosedBy::Client, CloseKind::Fin, "client sent FIN")
    );
    assert!(!fatal);
    let (e, fatal) = classify(
        PumpEnd::Read(stdio::Error::from(stdio::ErrorKind::ConnectionReset)),
        ClosedBy::Server,
        ClosedBy::Client,
    );
    assert_eq!(
        e,
        ConnEnd::new(
            ClosedBy::Server,
            CloseKind::Rst,
            "server reset the connection (RST)"
        )
    );
    assert!(fatal);
    let (e, _) = classify(
        PumpEnd::Write(stdio::Error::from(stdio::ErrorKind::BrokenPipe)),
        ClosedBy::Client,
        ClosedBy::Server,
    );
    assert_eq!(e.closed_by, ClosedBy::Server);
    assert_eq!(e.kind, CloseKind::Rst);
}

/// Two connected loopback pairs: (app, proxy's client leg) and (proxy's server leg, server).
async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (b, _) = l.accept().await.expect("accept");
        (a, b)
    }
    (pair().await, pair().await)
}

/// A reporter for tests: history off, its registry never answers.
pub(crate) fn reporter() -> Reporter {
    let channel = platform::client::connect_lazy("http://127.0.0.1:1", None).expect("channel");
    let sink = std::sync::Arc::new(proto::registry::registry_client::RegistryClient::new(
        channel,
    ));
    Reporter::start(sink, "test".into(), false, 16).0
}

/// Replaces `edit` with `EDITED`, drops `drop`, forwards everything else; c2s only. Every
/// verdict is also sent on the channel.
struct Editor(tokio::sync::mpsc::UnboundedSender<Fate>);

impl Hold for Editor {
    fn check(&self, _: u64, dir: Direction, _: &Bytes) -> Check {
        if dir == Direction::C2s {
            Check::Hold { rewritten: None }
        } else {
            Check::Pass
        }
    }

    fn hold(&self, p: Waiting) -> FateFuture {
        let told = self.0.clone();
        Box::pin(async move {
            // A real hold waits for a user; this one yields once to prove the pump waits.
            tokio::task::yield_now().await;
            let v = match &p.data[..] {
                b"edit" => Fate::Replace(Bytes::from_static(b"EDITED")),
                b"drop" => Fate::Drop,
                _ => Fate::Forward,
            };
            let _ = told.send(v.clone());
            v
        })
    }
}

#[tokio::test]
async fn the_hold_point_forwards_replaces_and_drops_and_counts_what_was_received() {
    let ((mut app, mut c), (mut s, mut server)) = pairs().await;
    let state = ConnState::new(1);
    let reporter = reporter();
    let mut tap = Tap::new(&state, &reporter);
    let (told, mut verdicts) = tokio::sync::mpsc::unbounded_channel();
    tap.hold = Some(Arc::new(Editor(told)));
    let relay = relay(&mut c, &mut s, Bytes::new(), &tap, std::future::pending());
    let drive = async {
        let mut buf = [0u8; 64];
        for (send, verdict, expect) in [
            (
                &b"edit"[..],
                Fate::Replace(Bytes::from_static(b"EDITED")),
                &b"EDITED"[..],
            ),
            (b"drop", Fate::Drop, b""),
            (b"keep", Fate::Forward, b"keep"),
        ] {
            app.write_all(send).await.expect("write");
            // One packet at a time: the next write waits for this verdict.
            assert_eq!(verdicts.recv().await, Some(verdict));
            if !expect.is_empty() {
                let n = server.read(&mut buf).await.expect("read");
                assert_eq!(&buf[..n], expect);
            }
        }
        // Not held: the other direction.
        server.write_all(b"reply").await.expect("write");
        let n = app.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"reply");
        app.shutdown().await.expect("fin");
        assert_eq!(server.read(&mut buf).await.expect("read"), 0);
        server.shutdown().await.expect("fin");
    };
    let (end, ()) = tokio::time::timeout(WAIT, async { tokio::join!(relay, drive) })
        .await
        .expect("relay ended in time");
    assert_eq!(
        end,
        ConnEnd::new(ClosedBy::Client, CloseKind::Fin, "client sent FIN")
    );
    let c = state.counters();
    // Counters count what was received.
    assert_eq!(
        (c.bytes_c2s, c.packets_c2s, c.bytes_s2c, c.packets_s2c),
        (12, 3, 5, 1)
    );
}

#[tokio::test]
async fn a_reset_is_passed_on_as_a_reset() {
    let ((app, mut c), (mut s, mut server)) = pairs().await;
    let state = ConnState::new(1);
    let reporter = reporter();
    let tap = Tap::new(&state, &reporter);
    #[allow(deprecated)]
    app.set_linger(Some(Duration::ZERO)).expect("linger");
    drop(app);
    let end = tokio::time::timeout(
        WAIT,
        relay(&mut c, &mut s, Bytes::new(), &tap, std::future::pending()),
    )
    .await
    .expect("relay ended in time");
    assert_eq!(
        end,
        ConnEnd::new(
            ClosedBy::Client,
            CloseKind::Rst,
            "client reset the connection (RST)"
        )
    );
    drop((c, s));
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(WAIT, server.read(&mut buf))
        .await
        .expect("read in time");
    assert_eq!(
        r.expect_err("server sees a reset").kind(),
        stdio::ErrorKind::ConnectionReset
    );
}

/// Holds the first client packet until the test sends its verdict; passes the rest.
struct Gate(std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<Fate>>>);

impl Gate {
    fn new() -> (Arc<Self>, tokio::sync::oneshot::Sender<Fate>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Arc::new(Self(std::sync::Mutex::new(Some(rx)))), tx)
    }
}

impl Hold for Gate {
    fn check(&self, _: u64, dir: Direction, _: &Bytes) -> Check {
        let first = self.0.lock().is_ok_and(|g| g.is_some());
        if dir == Direction::C2s && first {
            Check::Hold { rewritten: None }
        } else {
            Check::Pass
        }
    }

    fn hold(&self, _: Waiting) -> FateFuture {
        let rx = self.0.lock().ok().and_then(|mut g| g.take());
        Box::pin(async move {
            match rx {
                Some(rx) => rx.await.unwrap_or(Fate::Drop),
                None => Fate::Drop,
            }
        })
    }
}

#[tokio::test]
async fn a_client_fin_while_its_packet_is_held_follows_the_packet() {
    let ((mut app, mut c), (mut s, mut server)) = pairs().await;
    let state = ConnState::new(1);
    let reporter = reporter();
    let mut tap = Tap::new(&state, &reporter);
    let (gate, verdict) = Gate::new();
    tap.hold = Some(gate);
    let relay = relay(&mut c, &mut s, Bytes::new(), &tap, std::future::pending());
    let drive = async {
        // A request, then FIN at once (`nc -N`); the server answers only after reading it.
        app.write_all(b"request").await.expect("write");
        app.shutdown().await.expect("fin");
        // The verdict comes only once the relay has read the FIN (while the packet is held),
        // so the FIN is always the one that waits behind the packet.
        tokio::time::timeout(WAIT, tap.wait_reading_ended(Direction::C2s))
            .await
            .expect("the relay read the client's FIN while the packet was held");
        let _ = verdict.send(Fate::Forward);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"request");
        server.write_all(b"response").await.expect("write");
        server.shutdown().await.expect("fin");
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"response");
    };
    let (end, ()) = tokio::time::timeout(WAIT, async { tokio::join!(relay, drive) })
        .await
        .expect("relay ended in time");
    assert_eq!(
        end,
        ConnEnd::new(ClosedBy::Client, CloseKind::Fin, "client sent FIN")
    );
}

#[tokio::test]
async fn when_both_sides_sent_fin_while_a_packet_is_held_the_connection_ends() {
    let ((mut app, mut c), (mut s, mut server)) = pairs().await;
    let state = ConnState::new(1);
    let reporter = reporter();
    let mut tap = Tap::new(&state, &reporter);
    let (gate, _verdict) = Gate::new();
    tap.hold = Some(gate);
    let relay = relay(&mut c, &mut s, Bytes::new(), &tap, std::future::pending());
    let drive = async {
        app.write_all(b"too late").await.expect("write");
        // The server closes; the client sees it and closes too. No verdict ever comes.
        server.shutdown().await.expect("fin");
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.expect("read");
        assert!(back.is_empty());
        app.shutdown().await.expect("fin");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert!(
            got.is_empty(),
            "the held packet was relayed without a verdict"
        );
    };
    let (end, ()) = tokio::time::timeout(WAIT, async { tokio::join!(relay, drive) })
        .await
        .expect("relay ended in time");
    assert_eq!(
        end,
        ConnEnd::new(ClosedBy::Server, CloseKind::Fin, "server sent FIN")
    );
}

/// Holds every packet and keeps what it was given.
#[derive(Default)]
struct Keeper(std::sync::Mutex<Vec<Waiting>>);

impl Hold for Keeper {
    fn check(&self, _: u64, _: Direction, data: &Bytes) -> Check {
        let rewritten = (&data[..] == b"rule").then(|| Bytes::from_static(b"RULE"));
        Check::Hold { rewritten }
    }

    fn hold(&self, p: Waiting) -> FateFuture {
        if let Ok(mut kept) = self.0.lock() {
            kept.push(p);
        }
        Box::pin(std::future::ready(Fate::Forward))
    }
}

#[tokio::test]
async fn the_hold_gets_the_packet_as_read_with_its_sequence_and_read_time() {
    let state = ConnState::new(7);
    let reporter = reporter();
    let keeper = Arc::new(Keeper::default());
    let mut tap = Tap::new(&state, &reporter);
    tap.hold = Some(keeper.clone());
    let (first, wait) = tap.packet(Direction::C2s, Bytes::from_static(b"abc"));
    assert!(wait.is_some(), "held");
    let (second, _) = tap.packet(Direction::S2c, Bytes::from_static(b"rule"));
    let kept = keeper.0.lock().expect("lock").clone();
    let seen: Vec<_> = kept
        .iter()
        .map(|w| (w.conn_id, w.seq, w.dir, w.ts, w.data.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (
                7,
                first.seq,
                Direction::C2s,
                first.ts,
                Bytes::from_static(b"abc")
            ),
            // The hold sees the bytes the rules made; forwarding them as held sends those.
            (
                7,
                second.seq,
                Direction::S2c,
                second.ts,
                Bytes::from_static(b"RULE")
            ),
        ]
    );
    assert_ne!(first.seq, second.seq);
    assert_eq!(second.fate, Fate::Replace(Bytes::from_static(b"RULE")));
}
