//! The table columns of connection records (`conns list`): what a tester scans for first.

use proto::{
    common::{CloseKind, ClosedBy, ConnStatus, Connection},
    names::name_of,
};

use crate::{
    output::{self, endpoint},
    table::{self, Column, View},
};

fn opened(c: &Connection) -> Option<std::time::SystemTime> {
    c.opened_at.as_ref().map(proto::time::from_timestamp)
}

fn client(c: &Connection, _: &View) -> String {
    let addr = endpoint(&c.src_ip, c.src_port);
    match &c.client_process {
        Some(p) => format!("{addr} {}({})", p.name, p.pid),
        None => addr,
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
    },
    Column {
        key: "client",
        header: "CLIENT",
        cell: client,
        shrinks: true,
        right: false,
        default: true,
        rank: 7,
    },
    Column {
        key: "target",
        header: "TARGET",
        cell: |c, _| output::target(c),
        shrinks: true,
        right: false,
        default: true,
        rank: 9,
    },
    Column {
        key: "sni",
        header: "SNI",
        cell: |c, _| or_dash(Some(&c.sni)),
        shrinks: true,
        right: false,
        default: true,
        rank: 4,
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
    },
    Column {
        key: "status",
        header: "STATUS",
        cell: |c, _| or_dash(name_of::<ConnStatus>(c.status)),
        shrinks: false,
        right: false,
        default: true,
        rank: 8,
    },
    Column {
        key: "closed_by",
        header: "CLOSED BY",
        cell: |c, _| or_dash(name_of::<ClosedBy>(c.closed_by)),
        shrinks: false,
        right: false,
        default: true,
        rank: 7,
    },
    Column {
        key: "kind",
        header: "KIND",
        cell: |c, _| or_dash(name_of::<CloseKind>(c.close_kind)),
        shrinks: false,
        right: false,
        default: true,
        rank: 3,
    },
    Column {
        key: "c2s",
        header: "C2S",
        cell: |c, _| table::bytes(c.bytes_c2s),
        shrinks: false,
        right: true,
        default: true,
        rank: 5,
    },
    Column {
        key: "s2c",
        header: "S2C",
        cell: |c, _| table::bytes(c.bytes_s2c),
        shrinks: false,
        right: true,
        default: true,
        rank: 5,
    },
    Column {
        key: "duration",
        header: "DURATION",
        cell: duration,
        shrinks: false,
        right: true,
        default: true,
        rank: 4,
    },
    Column {
        key: "opened",
        header: "OPENED",
        cell: |c, v| opened(c).map_or_else(|| "-".into(), |t| v.time(t)),
        shrinks: false,
        right: false,
        default: true,
        rank: 2,
    },
    Column {
        key: "reason",
        header: "REASON",
        cell: |c, _| or_dash(Some(&c.reason)),
        shrinks: true,
        right: false,
        default: true,
        rank: 6,
    },
    Column {
        key: "node",
        header: "NODE",
        cell: |c, _| or_dash(Some(&c.node)),
        shrinks: true,
        right: false,
        default: false,
        rank: 1,
    },
    Column {
        key: "alpn",
        header: "ALPN",
        cell: |c, _| or_dash(Some(&c.alpn)),
        shrinks: false,
        right: false,
        default: false,
        rank: 1,
    },
    Column {
        key: "packets",
        header: "PACKETS",
        cell: |c, _| format!("{}/{}", c.packets_c2s, c.packets_s2c),
        shrinks: false,
        right: true,
        default: false,
        rank: 1,
    },
];
