//! How records and packets look to a user: the stable `--json` objects (field names from
//! DESIGN.md), TSV rows and readable table lines.

use std::time::SystemTime;

use base64::Engine;
use proto::{
    common::{CloseKind, ClosedBy, ConnStatus, Connection, Direction, Packet},
    names::name_of,
    time::from_timestamp,
};
use serde::Serialize;
use serde_json::{Value, json};

/// RFC 3339 with microseconds, UTC.
pub fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    ts.map(|t| humantime::format_rfc3339_micros(from_timestamp(t)).to_string())
}

/// The client process of a connection in JSON.
#[derive(Serialize)]
pub struct ProcessJson<'a> {
    pub pid: u32,
    pub name: &'a str,
}

/// One TLS leg of a connection in JSON.
#[derive(Serialize)]
pub struct TlsLegJson<'a> {
    pub version: &'a str,
    pub cipher: &'a str,
    pub alpn: &'a str,
}

impl<'a> From<&'a proto::common::TlsLeg> for TlsLegJson<'a> {
    fn from(l: &'a proto::common::TlsLeg) -> Self {
        Self {
            version: &l.version,
            cipher: &l.cipher,
            alpn: &l.alpn,
        }
    }
}

/// A connection as its stable JSON object (field names from DESIGN.md).
#[derive(Serialize)]
pub struct ConnJson<'a> {
    pub id: u64,
    pub node: &'a str,
    pub src_ip: &'a str,
    pub src_port: u32,
    pub dst_host: &'a str,
    pub dst_ip: &'a str,
    pub dst_port: u32,
    pub status: Option<&'static str>,
    pub closed_by: Option<&'static str>,
    pub close_kind: Option<&'static str>,
    pub reason: &'a str,
    pub tls: bool,
    pub sni: &'a str,
    pub alpn: &'a str,
    pub opened_at: Option<String>,
    pub closed_at: Option<String>,
    pub bytes_c2s: u64,
    pub bytes_s2c: u64,
    pub packets_c2s: u64,
    pub packets_s2c: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_process: Option<ProcessJson<'a>>,
    /// What the client-facing TLS leg negotiated (absent for plain connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<TlsLegJson<'a>>,
    /// What the upstream TLS leg negotiated (absent for plain connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<TlsLegJson<'a>>,
    /// Upstream certificate verification was off (`--upstream-insecure`).
    pub upstream_insecure: bool,
    /// How the client reached the proxy: `socks5` or `http` (HTTP CONNECT); empty in older
    /// records.
    pub ingress: &'a str,
    /// The upstream proxy relayed through, as a URL without credentials; empty when direct.
    pub upstream: &'a str,
    /// The connection this one replays (absent when it is not a replay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<u64>,
    /// The last packet before a late TLS handshake (STARTTLS, SSLRequest); absent when TLS
    /// began with the first byte or was not intercepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_after_seq: Option<u64>,
}

impl<'a> From<&'a Connection> for ConnJson<'a> {
    fn from(c: &'a Connection) -> Self {
        Self {
            id: c.id,
            node: &c.node,
            src_ip: &c.src_ip,
            src_port: c.src_port,
            dst_host: &c.dst_host,
            dst_ip: &c.dst_ip,
            dst_port: c.dst_port,
            status: name_of::<ConnStatus>(c.status),
            closed_by: name_of::<ClosedBy>(c.closed_by),
            close_kind: name_of::<CloseKind>(c.close_kind),
            reason: &c.reason,
            tls: c.tls,
            sni: &c.sni,
            alpn: &c.alpn,
            opened_at: rfc3339(c.opened_at.as_ref()),
            closed_at: rfc3339(c.closed_at.as_ref()),
            bytes_c2s: c.bytes_c2s,
            bytes_s2c: c.bytes_s2c,
            packets_c2s: c.packets_c2s,
            packets_s2c: c.packets_s2c,
            client_process: c.client_process.as_ref().map(|p| ProcessJson {
                pid: p.pid,
                name: &p.name,
            }),
            client_tls: c.client_tls.as_ref().map(TlsLegJson::from),
            upstream_tls: c.upstream_tls.as_ref().map(TlsLegJson::from),
            upstream_insecure: c.upstream_insecure,
            ingress: &c.ingress,
            upstream: &c.upstream,
            replay_of: (c.replay_of != 0).then_some(c.replay_of),
            tls_after_seq: (c.tls_after_seq != 0).then_some(c.tls_after_seq),
        }
    }
}

/// A connection as a JSON value.
pub fn conn_json(c: &Connection) -> Value {
    serde_json::to_value(ConnJson::from(c)).unwrap_or(Value::Null)
}

/// A history packet as its stable JSON object; a modified packet also has `original_b64`
/// (the bytes received; `data_b64` holds the ones sent).
pub fn packet_json(p: &Packet) -> Value {
    let mut v = json!({
        "conn_id": p.conn_id,
        "seq": p.seq,
        "direction": name_of::<Direction>(p.direction),
        "ts": rfc3339(p.ts.as_ref()),
        "len": p.data.len(),
        "data_b64": base64::engine::general_purpose::STANDARD.encode(&p.data),
        "modified": p.modified,
        "dropped": p.dropped,
    });
    if p.modified {
        v["original_b64"] = json!(base64::engine::general_purpose::STANDARD.encode(&p.original));
    }
    v
}

/// The TSV header matching [`conn_tsv`].
pub const TSV_HEADER: &str = "id\tnode\tsrc_ip\tsrc_port\tdst_host\tdst_ip\tdst_port\tstatus\t\
closed_by\tclose_kind\treason\ttls\tsni\talpn\topened_at\tclosed_at\tbytes_c2s\tbytes_s2c\t\
packets_c2s\tpackets_s2c\tclient_process";

/// One TSV row; tabs and newlines inside fields become spaces.
pub fn conn_tsv(c: &Connection) -> String {
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    let process = c
        .client_process
        .as_ref()
        .map(|p| format!("{} ({})", p.name, p.pid))
        .unwrap_or_default();
    [
        c.id.to_string(),
        clean(&c.node),
        c.src_ip.clone(),
        c.src_port.to_string(),
        clean(&c.dst_host),
        c.dst_ip.clone(),
        c.dst_port.to_string(),
        name_of::<ConnStatus>(c.status).unwrap_or("").into(),
        name_of::<ClosedBy>(c.closed_by).unwrap_or("").into(),
        name_of::<CloseKind>(c.close_kind).unwrap_or("").into(),
        clean(&c.reason),
        c.tls.to_string(),
        clean(&c.sni),
        clean(&c.alpn),
        rfc3339(c.opened_at.as_ref()).unwrap_or_default(),
        rfc3339(c.closed_at.as_ref()).unwrap_or_default(),
        c.bytes_c2s.to_string(),
        c.bytes_s2c.to_string(),
        c.packets_c2s.to_string(),
        c.packets_s2c.to_string(),
        clean(&process),
    ]
    .join("\t")
}

/// `ip:port`, with brackets around IPv6.
pub fn endpoint(ip: &str, port: u32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// A connection's target: `host:port` as the client named it, or the address it reached.
pub fn target(c: &Connection) -> String {
    if c.dst_host.is_empty() || c.dst_host == c.dst_ip {
        endpoint(&c.dst_ip, c.dst_port)
    } else {
        format!("{}:{}", c.dst_host, c.dst_port)
    }
}

/// Bytes as text a terminal can show: printable ASCII kept, everything else escaped.
pub fn preview(data: &[u8], max: usize) -> String {
    let mut s: String = data
        .iter()
        .take(max)
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    if data.len() > max {
        s.push('…');
    }
    s
}

/// The current time, for watch lines.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_contract_fields_and_nulls_while_active() {
        let c = Connection {
            id: 3,
            status: ConnStatus::Active as i32,
            src_ip: "127.0.0.1".into(),
            src_port: 5000,
            ..Default::default()
        };
        let v = conn_json(&c);
        assert_eq!(v["id"], 3);
        assert_eq!(v["status"], "active");
        assert_eq!(v["closed_by"], Value::Null);
        assert_eq!(v["close_kind"], Value::Null);
        assert_eq!(v["closed_at"], Value::Null);
        // Optional objects are absent for a plain connection with no known process.
        for absent in ["client_process", "client_tls", "upstream_tls"] {
            assert!(v.get(absent).is_none(), "{absent}");
        }
        let keys: Vec<&str> = v
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let mut want = [
            "id",
            "node",
            "src_ip",
            "src_port",
            "dst_host",
            "dst_ip",
            "dst_port",
            "status",
            "closed_by",
            "close_kind",
            "reason",
            "tls",
            "sni",
            "alpn",
            "opened_at",
            "closed_at",
            "bytes_c2s",
            "bytes_s2c",
            "packets_c2s",
            "packets_s2c",
            "upstream_insecure",
            "ingress",
            "upstream",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
    }

    #[test]
    fn tsv_rows_match_the_header_and_escape_tabs() {
        let c = Connection {
            id: 1,
            reason: "a\tb\nc".into(),
            ..Default::default()
        };
        let row = conn_tsv(&c);
        assert_eq!(row.split('\t').count(), TSV_HEADER.split('\t').count());
        assert!(row.contains("a b c"));
    }

    #[test]
    fn modified_packets_carry_the_original_bytes() {
        let plain = packet_json(&Packet {
            data: b"a".to_vec().into(),
            ..Default::default()
        });
        assert!(plain.get("original_b64").is_none());
        assert_eq!(plain["dropped"], false);
        let dropped = packet_json(&Packet {
            modified: true,
            dropped: true,
            original: b"hi".to_vec().into(),
            ..Default::default()
        });
        assert_eq!(dropped["original_b64"], "aGk=");
        assert_eq!(dropped["dropped"], true);
        assert_eq!(dropped["len"], 0);
    }

    #[test]
    fn preview_escapes_binary() {
        assert_eq!(preview(b"GET /\r\n\x00", 100), "GET /\\r\\n\\x00");
        assert_eq!(preview(b"abcdef", 3), "abc…");
        assert_eq!(endpoint("::1", 80), "[::1]:80");
    }
}
