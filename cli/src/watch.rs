//! The human lines of `conns watch`: one time, the event, the record's ID and target, and
//! what the event says (who connected, what an update changed, how it closed), cut to the
//! terminal's width.

use proto::{
    common::{CloseKind, ClosedBy, Connection},
    names::name_of,
};

use crate::{
    output::{endpoint, target},
    table,
};

/// Width of the target column (longer targets are cut in the middle: the port stays).
const TARGET: usize = 22;

/// The header line above the events.
pub fn header() -> String {
    format!(
        "{:<12} {:<8} {:>6} {:<TARGET$} DETAIL",
        "TIME", "EVENT", "ID", "TARGET"
    )
}

/// `line` cut with an ellipsis to `width` characters (not cut without a width: piped).
pub fn fit(line: String, width: Option<usize>) -> String {
    match width {
        Some(w) if line.chars().count() > w => {
            let mut cut: String = line.chars().take(w.saturating_sub(1)).collect();
            cut.push('…');
            cut
        }
        _ => line,
    }
}

/// The time of day an event was seen, UTC, to the millisecond.
fn now() -> String {
    chrono::Utc::now().format("%H:%M:%S%.3f").to_string()
}

fn start(event: &str, id: u64, target: &str) -> String {
    format!(
        "{} {:<8} {id:>6} {:<TARGET$}",
        now(),
        event.to_uppercase(),
        table::cut_keeping_port(target, TARGET)
    )
}

/// The client side of a record: address, process, TLS.
fn client(c: &Connection) -> String {
    let mut s = format!("from {}", endpoint(&c.src_ip, c.src_port));
    if c.replay_of != 0 {
        s = format!("replay of {} {s}", c.replay_of);
    }
    if let Some(p) = &c.client_process {
        s.push_str(&format!(" {}({})", p.name, p.pid));
    }
    if c.tls {
        s.push_str(" tls");
        if !c.sni.is_empty() {
            s.push_str(&format!(" sni={}", c.sni));
        }
    }
    s
}

/// How a record closed: closer, kind, bytes each way, reason.
fn closed(c: &Connection) -> String {
    let by = name_of::<ClosedBy>(c.closed_by).unwrap_or("-");
    let kind = name_of::<CloseKind>(c.close_kind).unwrap_or("-");
    let mut s = format!(
        "by {by} {kind}, c2s {} s2c {}",
        table::bytes(c.bytes_c2s),
        table::bytes(c.bytes_s2c)
    );
    if !c.reason.is_empty() {
        s.push_str(&format!(": {}", c.reason));
    }
    s
}

/// What an update changed, compared with the version seen before.
fn changes(c: &Connection, before: Option<&Connection>) -> String {
    let Some(b) = before else {
        return client(c);
    };
    let mut out = Vec::new();
    if c.client_process != b.client_process
        && let Some(p) = &c.client_process
    {
        out.push(format!("process {}({})", p.name, p.pid));
    }
    if c.dst_ip != b.dst_ip && !c.dst_ip.is_empty() {
        out.push(format!("address {}", endpoint(&c.dst_ip, c.dst_port)));
    }
    if c.tls != b.tls && c.tls {
        out.push("tls".into());
    }
    if c.sni != b.sni && !c.sni.is_empty() {
        out.push(format!("sni={}", c.sni));
    }
    if c.alpn != b.alpn && !c.alpn.is_empty() {
        out.push(format!("alpn={}", c.alpn));
    }
    if c.client_tls != b.client_tls
        && let Some(t) = &c.client_tls
    {
        out.push(format!("client {} {}", t.version, t.cipher));
    }
    if c.upstream_tls != b.upstream_tls
        && let Some(t) = &c.upstream_tls
    {
        out.push(format!("upstream {} {}", t.version, t.cipher));
    }
    if c.upstream_insecure && !b.upstream_insecure {
        out.push("upstream not verified".into());
    }
    if (c.bytes_c2s, c.bytes_s2c) != (b.bytes_c2s, b.bytes_s2c) {
        out.push(format!(
            "c2s {} s2c {}",
            table::bytes(c.bytes_c2s),
            table::bytes(c.bytes_s2c)
        ));
    }
    if out.is_empty() {
        "no visible change".into()
    } else {
        out.join(", ")
    }
}

/// The line of an upsert seen as `event` (`snapshot`, `opened`, `updated`, `closed`).
pub fn line(
    event: &str,
    c: &Connection,
    before: Option<&Connection>,
    width: Option<usize>,
) -> String {
    let disconnected = c.status == proto::common::ConnStatus::Disconnected as i32;
    let detail = match event {
        "updated" => changes(c, before),
        "closed" => closed(c),
        _ if disconnected => format!("closed {}", closed(c)),
        _ => client(c),
    };
    fit(
        format!("{} {detail}", start(event, c.id, &target(c))),
        width,
    )
}

/// The line of a cleared record.
pub fn cleared(id: u64, width: Option<usize>) -> String {
    fit(
        format!("{} record removed", start("cleared", id, "")),
        width,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::common::{ClientProcess, ConnStatus};

    fn conn() -> Connection {
        Connection {
            id: 12345,
            src_ip: "127.0.0.1".into(),
            src_port: 50001,
            dst_host: "a-rather-long-host-name.example.test".into(),
            dst_ip: "127.0.0.1".into(),
            dst_port: 8443,
            status: ConnStatus::Active as i32,
            ..Default::default()
        }
    }

    #[test]
    fn lines_fit_and_keep_the_port_and_updates_say_what_changed() {
        let before = conn();
        let mut after = conn();
        after.client_process = Some(ClientProcess {
            pid: 4242,
            name: "curl".into(),
        });
        let l = line("updated", &after, Some(&before), Some(80));
        assert!(l.chars().count() <= 80, "{l}");
        assert!(l.contains("UPDATED") && l.contains("12345"), "{l}");
        assert!(l.contains(":8443"), "{l}");
        assert!(l.contains("process curl(4242)"), "{l}");
        assert!(header().chars().count() <= 80);
        let wide = line("opened", &before, None, None);
        assert!(wide.contains("from 127.0.0.1:50001"), "{wide}");
        let mut replay = conn();
        replay.replay_of = 7;
        let l = line("opened", &replay, None, None);
        assert!(l.contains("replay of 7 from 127.0.0.1:50001"), "{l}");
    }
}
