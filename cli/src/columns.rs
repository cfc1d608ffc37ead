//! The table columns of connection records (`conns list`), history packets (`history`) and
//! held packets (`held list`): what a tester scans for first.

use proto::{
    common::{CloseKind, ClosedBy, ConnStatus, Connection, Direction, Packet},
    intercept::HeldPacket,
    names::name_of,
};

use crate::{
    output::{self, endpoint, preview},
    table::{self, Column, View},
};

fn opened(c: &Connection) -> Option<std::time::SystemTime> {
    c.opened_at.as_ref().map(proto::time::from_timestamp)
}

fn client(c: &Connection, _: &View) -> String {
    let addr = endpoint(&c.src_ip, c.src_port);
    let addr = match &c.client_process {
        Some(p) => format!("{addr} {}({})", p.name, p.pid),
        None => addr,
    };
    if c.replay_of != 0 {
        format!("replay of {} {addr}", c.replay_of)
    } else {
        addr
    }
}

fn duration(c: &Connection, v: &View) -> String {
    let Some(start) = opened(c) else {
        return "-".into();
    };
    let end = c
        .closed_at
        .as_ref()
        .map(proto::time::from_timestamp)
        .unwrap_or(v.now);
    table::duration(end.duration_since(start).unwrap_or_default())
}

fn or_dash(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or("-").to_string()
}

/// Every column of `conns list`, default ones first.
pub const CONNECTION: &[Column<Connection>] = &[
    Column {
        key: "id",
        header: "ID",
        cell: |c, _| c.id.to_string(),
        shrinks: false,
        right: true,
        default: true,
        rank: 9,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "client",
        header: "CLIENT",
        cell: client,
        shrinks: true,
        right: false,
        default: true,
        rank: 6,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "target",
        header: "TARGET",
        cell: |c, _| output::target(c),
        shrinks: true,
        right: false,
        default: true,
        rank: 9,
        keeps_port: true,
        pair: None,
    },
    Column {
        key: "sni",
        header: "SNI",
        cell: |c, _| or_dash(Some(&c.sni)),
        shrinks: true,
        right: false,
        default: true,
        rank: 4,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "tls",
        header: "TLS",
        // ✗: the client spoke TLS but nothing was decrypted (passthrough, failed handshake).
        cell: |c, _| match (c.tls, c.client_tls.is_some()) {
            (true, true) => "tls".into(),
            (true, false) => "tls✗".into(),
            (false, _) => "-".into(),
        },
        shrinks: false,
        right: false,
        default: true,
        rank: 5,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "status",
        header: "STATUS",
        cell: |c, _| or_dash(name_of::<ConnStatus>(c.status)),
        shrinks: false,
        right: false,
        default: true,
        rank: 8,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "closed_by",
        header: "CLOSED BY",
        cell: |c, _| or_dash(name_of::<ClosedBy>(c.closed_by)),
        shrinks: false,
        right: false,
        default: true,
        rank: 7,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "kind",
        header: "KIND",
        cell: |c, _| or_dash(name_of::<CloseKind>(c.close_kind)),
        shrinks: false,
        right: false,
        default: true,
        rank: 3,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "c2s",
        header: "C2S",
        cell: |c, _| table::bytes(c.bytes_c2s),
        shrinks: false,
        right: true,
        default: true,
        rank: 5,
        keeps_port: false,
        pair: Some("s2c"),
    },
    Column {
        key: "s2c",
        header: "S2C",
        cell: |c, _| table::bytes(c.bytes_s2c),
        shrinks: false,
        right: true,
        default: true,
        rank: 5,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "duration",
        header: "DURATION",
        cell: duration,
        shrinks: false,
        right: true,
        default: true,
        rank: 4,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "opened",
        header: "OPENED",
        cell: |c, v| opened(c).map_or_else(|| "-".into(), |t| v.time(t)),
        shrinks: false,
        right: false,
        default: true,
        rank: 2,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "reason",
        header: "REASON",
        cell: |c, _| or_dash(Some(&c.reason)),
        shrinks: true,
        right: false,
        default: true,
        rank: 6,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "replay_of",
        header: "REPLAY OF",
        cell: |c, _| {
            if c.replay_of == 0 {
                "-".into()
            } else {
                c.replay_of.to_string()
            }
        },
        shrinks: false,
        right: true,
        default: false,
        rank: 1,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "node",
        header: "NODE",
        cell: |c, _| or_dash(Some(&c.node)),
        shrinks: true,
        right: false,
        default: false,
        rank: 1,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "alpn",
        header: "ALPN",
        cell: |c, _| or_dash(Some(&c.alpn)),
        shrinks: false,
        right: false,
        default: false,
        rank: 1,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "packets",
        header: "PACKETS",
        cell: |c, _| format!("{}/{}", c.packets_c2s, c.packets_s2c),
        shrinks: false,
        right: true,
        default: false,
        rank: 1,
        keeps_port: false,
        pair: None,
    },
];

/// One line of the `history` table: a packet, or under a modified one what was received.
pub struct HistoryLine {
    /// The packet.
    pub packet: Packet,
    /// This line shows the bytes the proxy received (under a packet an edit or a drop
    /// changed), not the packet as sent (`[dropped]` when it was not).
    pub original: bool,
    /// The packet's connection's target (`-` when its record is gone or not looked up).
    pub target: String,
}

impl HistoryLine {
    /// The lines of one packet: two when an edit or a drop changed it.
    pub fn of(p: Packet, target: String) -> impl Iterator<Item = HistoryLine> {
        let original = p.modified.then(|| HistoryLine {
            packet: p.clone(),
            original: true,
            target: String::new(),
        });
        std::iter::once(HistoryLine {
            packet: p,
            original: false,
            target,
        })
        .chain(original)
    }

    /// `cell` of the packet as sent; empty on the line of what was received.
    fn sent(&self, cell: impl Fn(&Packet) -> String) -> String {
        if self.original {
            String::new()
        } else {
            cell(&self.packet)
        }
    }
}

/// Longest data preview a cell starts from (the table cuts it further to fit).
const PREVIEW: usize = 200;

fn packet_time(p: &Packet, v: &View) -> String {
    p.ts.as_ref()
        .map_or_else(|| "-".into(), |t| v.time_us(proto::time::from_timestamp(t)))
}

/// Every column of `history`, default ones first.
pub const HISTORY: &[Column<HistoryLine>] = &[
    Column {
        key: "conn",
        header: "CONN",
        cell: |l, _| l.sent(|p| p.conn_id.to_string()),
        shrinks: false,
        right: true,
        default: true,
        rank: 9,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "seq",
        header: "SEQ",
        cell: |l, _| l.sent(|p| p.seq.to_string()),
        shrinks: false,
        right: true,
        default: true,
        rank: 8,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "dir",
        header: "DIR",
        cell: |l, _| l.sent(|p| or_dash(name_of::<Direction>(p.direction))),
        shrinks: false,
        right: false,
        default: true,
        rank: 8,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "time",
        header: "TIME",
        cell: |l, v| l.sent(|p| packet_time(p, v)),
        shrinks: false,
        right: false,
        default: true,
        rank: 5,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "len",
        header: "LEN",
        cell: |l, _| {
            if l.original {
                l.packet.original.len().to_string()
            } else {
                l.packet.data.len().to_string()
            }
        },
        shrinks: false,
        right: true,
        default: true,
        rank: 7,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "data",
        header: "DATA",
        cell: |l, _| {
            let p = &l.packet;
            if l.original {
                format!("original: {}", preview(&p.original, PREVIEW))
            } else if p.dropped {
                "[dropped]".into()
            } else if p.modified {
                format!("[modified] {}", preview(&p.data, PREVIEW))
            } else {
                preview(&p.data, PREVIEW)
            }
        },
        shrinks: true,
        right: false,
        default: true,
        rank: 9,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "target",
        header: "TARGET",
        cell: |l, _| l.sent(|_| l.target.clone()),
        shrinks: true,
        right: false,
        default: false,
        rank: 6,
        keeps_port: true,
        pair: None,
    },
];

/// A cell of a held packet's packet (`-` when the service sent none).
fn held_cell(h: &HeldPacket, cell: impl Fn(&Packet) -> String) -> String {
    h.packet.as_ref().map_or_else(|| "-".into(), cell)
}

/// Every column of `held list`, default ones first.
pub const HELD: &[Column<HeldPacket>] = &[
    Column {
        key: "held",
        header: "HELD",
        cell: |h, _| h.held_id.to_string(),
        shrinks: false,
        right: true,
        default: true,
        rank: 9,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "conn",
        header: "CONN",
        cell: |h, _| held_cell(h, |p| p.conn_id.to_string()),
        shrinks: false,
        right: true,
        default: true,
        rank: 8,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "dir",
        header: "DIR",
        cell: |h, _| held_cell(h, |p| or_dash(name_of::<Direction>(p.direction))),
        shrinks: false,
        right: false,
        default: true,
        rank: 8,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "target",
        header: "TARGET",
        cell: |h, _| format!("{}:{}", h.dst_host, h.dst_port),
        shrinks: true,
        right: false,
        default: true,
        rank: 7,
        keeps_port: true,
        pair: None,
    },
    Column {
        key: "len",
        header: "LEN",
        // `len` is set also when the bytes are left out or no longer kept (abandoned).
        cell: |h, _| held_cell(h, |p| (h.len as usize).max(p.data.len()).to_string()),
        shrinks: false,
        right: true,
        default: true,
        rank: 6,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "status",
        header: "STATUS",
        cell: |h, _| status_text(h),
        shrinks: false,
        right: false,
        default: true,
        rank: 8,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "data",
        header: "DATA",
        cell: |h, _| held_cell(h, |p| preview(&p.data, PREVIEW)),
        shrinks: true,
        right: false,
        default: true,
        rank: 9,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "time",
        header: "TIME",
        cell: |h, v| held_cell(h, |p| packet_time(p, v)),
        shrinks: false,
        right: false,
        default: false,
        rank: 1,
        keeps_port: false,
        pair: None,
    },
    Column {
        key: "seq",
        header: "SEQ",
        cell: |h, _| held_cell(h, |p| p.seq.to_string()),
        shrinks: false,
        right: true,
        default: false,
        rank: 1,
        keeps_port: false,
        pair: None,
    },
];

/// The live status of a held packet's connection: `active`, or `closed by server`.
pub fn status_text(h: &HeldPacket) -> String {
    match (
        name_of::<ConnStatus>(h.conn_status),
        name_of::<ClosedBy>(h.closed_by),
    ) {
        (Some("disconnected"), Some(by)) => format!("closed by {by}"),
        // The proxy stopped waiting before the registry said how the connection ended.
        (Some(_), _) if h.abandoned => "abandoned".into(),
        (Some(s), _) => s.to_string(),
        _ => "-".into(),
    }
}
