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
    Column::new("id", "ID", 9, |c: &Connection, _| c.id.to_string()).right_aligned(),
    Column::new("client", "CLIENT", 6, client).cut_to_fit(),
    Column::new("target", "TARGET", 9, |c: &Connection, _| output::target(c))
        .cut_to_fit()
        .keeps_port(),
    Column::new("sni", "SNI", 4, |c: &Connection, _| or_dash(Some(&c.sni))).cut_to_fit(),
    // ✗: the client spoke TLS but nothing was decrypted (passthrough, failed handshake).
    Column::new("tls", "TLS", 5, |c: &Connection, _| {
        match (c.tls, c.client_tls.is_some()) {
            (true, true) => "tls".into(),
            (true, false) => "tls✗".into(),
            (false, _) => "-".into(),
        }
    }),
    Column::new("status", "STATUS", 8, |c: &Connection, _| {
        or_dash(name_of::<ConnStatus>(c.status))
    }),
    Column::new("closed_by", "CLOSED BY", 7, |c: &Connection, _| {
        or_dash(name_of::<ClosedBy>(c.closed_by))
    }),
    Column::new("kind", "KIND", 3, |c: &Connection, _| {
        or_dash(name_of::<CloseKind>(c.close_kind))
    }),
    Column::new("c2s", "C2S", 5, |c: &Connection, _| {
        table::bytes(c.bytes_c2s)
    })
    .right_aligned()
    .paired_with("s2c"),
    Column::new("s2c", "S2C", 5, |c: &Connection, _| {
        table::bytes(c.bytes_s2c)
    })
    .right_aligned(),
    Column::new("duration", "DURATION", 4, duration).right_aligned(),
    Column::new("opened", "OPENED", 2, |c: &Connection, v| {
        opened(c).map_or_else(|| "-".into(), |t| v.time(t))
    }),
    Column::new("reason", "REASON", 6, |c: &Connection, _| {
        or_dash(Some(&c.reason))
    })
    .cut_to_fit(),
    Column::new("replay_of", "REPLAY OF", 1, |c: &Connection, _| {
        if c.replay_of == 0 {
            "-".into()
        } else {
            c.replay_of.to_string()
        }
    })
    .right_aligned()
    .on_request(),
    Column::new("node", "NODE", 1, |c: &Connection, _| {
        or_dash(Some(&c.node))
    })
    .cut_to_fit()
    .on_request(),
    Column::new("alpn", "ALPN", 1, |c: &Connection, _| {
        or_dash(Some(&c.alpn))
    })
    .on_request(),
    Column::new("packets", "PACKETS", 1, |c: &Connection, _| {
        format!("{}/{}", c.packets_c2s, c.packets_s2c)
    })
    .right_aligned()
    .on_request(),
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
    Column::new("conn", "CONN", 9, |l: &HistoryLine, _| {
        l.sent(|p| p.conn_id.to_string())
    })
    .right_aligned(),
    Column::new("seq", "SEQ", 8, |l: &HistoryLine, _| {
        l.sent(|p| p.seq.to_string())
    })
    .right_aligned(),
    Column::new("dir", "DIR", 8, |l: &HistoryLine, _| {
        l.sent(|p| or_dash(name_of::<Direction>(p.direction)))
    }),
    Column::new("time", "TIME", 5, |l: &HistoryLine, v| {
        l.sent(|p| packet_time(p, v))
    }),
    Column::new("len", "LEN", 7, |l: &HistoryLine, _| {
        if l.original {
            l.packet.original.len().to_string()
        } else {
            l.packet.data.len().to_string()
        }
    })
    .right_aligned(),
    Column::new("data", "DATA", 9, |l: &HistoryLine, _| {
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
    })
    .cut_to_fit(),
    Column::new("target", "TARGET", 6, |l: &HistoryLine, _| {
        l.sent(|_| l.target.clone())
    })
    .cut_to_fit()
    .on_request()
    .keeps_port(),
];

/// A cell of a held packet's packet (`-` when the service sent none).
fn held_cell(h: &HeldPacket, cell: impl Fn(&Packet) -> String) -> String {
    h.packet.as_ref().map_or_else(|| "-".into(), cell)
}

/// Every column of `held list`, default ones first.
pub const HELD: &[Column<HeldPacket>] = &[
    Column::new("held", "HELD", 9, |h: &HeldPacket, _| h.held_id.to_string()).right_aligned(),
    Column::new("conn", "CONN", 8, |h: &HeldPacket, _| {
        held_cell(h, |p| p.conn_id.to_string())
    })
    .right_aligned(),
    Column::new("dir", "DIR", 8, |h: &HeldPacket, _| {
        held_cell(h, |p| or_dash(name_of::<Direction>(p.direction)))
    }),
    Column::new("target", "TARGET", 7, |h: &HeldPacket, _| {
        format!("{}:{}", h.dst_host, h.dst_port)
    })
    .cut_to_fit()
    .keeps_port(),
    // `len` is set also when the bytes are left out or no longer kept (abandoned).
    Column::new("len", "LEN", 6, |h: &HeldPacket, _| {
        held_cell(h, |p| (h.len as usize).max(p.data.len()).to_string())
    })
    .right_aligned(),
    Column::new("status", "STATUS", 8, |h: &HeldPacket, _| status_text(h)),
    Column::new("data", "DATA", 9, |h: &HeldPacket, _| {
        held_cell(h, |p| preview(&p.data, PREVIEW))
    })
    .cut_to_fit(),
    Column::new("time", "TIME", 1, |h: &HeldPacket, v| {
        held_cell(h, |p| packet_time(p, v))
    })
    .on_request(),
    Column::new("seq", "SEQ", 1, |h: &HeldPacket, _| {
        held_cell(h, |p| p.seq.to_string())
    })
    .right_aligned()
    .on_request(),
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
