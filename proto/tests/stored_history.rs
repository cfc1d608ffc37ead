//! The registry's stored history format (`interpose.registry.store.v1`) reads what registries
//! wrote before it was generated: `FrozenRun` and `FrozenStoredPacket` are the hand-written
//! structs registry-svc used until then, kept here unchanged as the reference.

use prost::Message;
use prost_types::Timestamp;
use proto::{
    common::{Direction, Packet},
    registry_store::{Run, StoredPacket},
};

#[derive(Clone, PartialEq, prost::Message)]
struct FrozenRun {
    #[prost(message, repeated, tag = "1")]
    packets: Vec<FrozenStoredPacket>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct FrozenStoredPacket {
    #[prost(uint64, tag = "1")]
    conn_id: u64,
    #[prost(uint64, tag = "2")]
    seq: u64,
    #[prost(int32, tag = "3")]
    direction: i32,
    #[prost(message, optional, tag = "4")]
    ts: Option<Timestamp>,
    #[prost(bytes = "vec", tag = "5")]
    data: Vec<u8>,
    #[prost(bool, tag = "6")]
    modified: bool,
    #[prost(uint64, tag = "7")]
    log_offset: u64,
    #[prost(uint64, tag = "8")]
    log_len: u64,
    #[prost(bytes = "vec", tag = "9")]
    original: Vec<u8>,
    #[prost(bool, tag = "10")]
    dropped: bool,
    #[prost(uint64, tag = "11")]
    recorded: u64,
    #[prost(uint64, tag = "12")]
    segment: u64,
}

fn frozen_run() -> FrozenRun {
    let logged = FrozenStoredPacket {
        conn_id: 7,
        seq: 3,
        direction: Direction::S2c as i32,
        ts: Some(Timestamp {
            seconds: 1_700_000_000,
            nanos: 42,
        }),
        data: Vec::new(),
        modified: true,
        log_offset: 1 << 33,
        log_len: 16_384,
        original: b"as received\0".to_vec(),
        dropped: true,
        recorded: 99,
        segment: 12,
    };
    let inline = FrozenStoredPacket {
        seq: 4,
        data: b"inline payload".to_vec(),
        log_offset: 0,
        log_len: 0,
        ..logged.clone()
    };
    FrozenRun {
        packets: vec![logged, inline],
    }
}

#[test]
fn generated_run_reads_and_writes_the_frozen_format_byte_for_byte() {
    let frozen = frozen_run();
    let bytes = frozen.encode_to_vec();
    let run = Run::decode(bytes.as_slice()).unwrap();
    let p = &run.packets[0];
    assert_eq!(
        (p.conn_id, p.seq, p.direction(), p.modified, p.dropped),
        (7, 3, Direction::S2c, true, true)
    );
    assert_eq!(
        p.ts.map(|t| (t.seconds, t.nanos)),
        Some((1_700_000_000, 42))
    );
    assert_eq!(
        (p.log_offset, p.log_len, p.recorded, p.segment),
        (1 << 33, 16_384, 99, 12)
    );
    assert_eq!(&p.original[..], b"as received\0");
    assert!(p.data.is_empty());
    assert_eq!(&run.packets[1].data[..], b"inline payload");
    // Written back, the bytes are the same: old and new registries share one store.
    assert_eq!(run.encode_to_vec(), bytes);
    assert_eq!(FrozenRun::decode(bytes.as_slice()).unwrap(), frozen);
}

#[test]
fn runs_from_before_the_payload_log_read_as_packets_with_inline_payloads() {
    // Such runs held `common.Packet`s, whose tags 1 to 6 `StoredPacket` shares.
    #[derive(Clone, PartialEq, prost::Message)]
    struct PacketRun {
        #[prost(message, repeated, tag = "1")]
        packets: Vec<Packet>,
    }
    let old = PacketRun {
        packets: vec![Packet {
            conn_id: 5,
            seq: 1,
            direction: Direction::C2s as i32,
            data: b"hello".to_vec().into(),
            modified: false,
            ..Default::default()
        }],
    };
    let run = Run::decode(old.encode_to_vec().as_slice()).unwrap();
    let want = StoredPacket {
        conn_id: 5,
        seq: 1,
        direction: Direction::C2s as i32,
        data: b"hello".to_vec().into(),
        ..Default::default()
    };
    assert_eq!(run.packets, vec![want]);
}
