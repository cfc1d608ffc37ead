//! The record merge rules every store applies: what a record becomes when an update or a
//! close reaches it.

use proto::{
    common::{ConnStatus, Connection},
    registry::{ConnectionClosed, ConnectionUpdate, Counters},
};

fn set_counters(c: &mut Connection, n: &Counters) {
    // Counters only grow; a replayed older update must not shrink them.
    c.bytes_c2s = c.bytes_c2s.max(n.bytes_c2s);
    c.bytes_s2c = c.bytes_s2c.max(n.bytes_s2c);
    c.packets_c2s = c.packets_c2s.max(n.packets_c2s);
    c.packets_s2c = c.packets_s2c.max(n.packets_s2c);
}

/// A record as it is once `e` closed it (shared by every backend).
pub fn apply_close(c: &mut Connection, e: &ConnectionClosed) {
    c.status = ConnStatus::Disconnected as i32;
    c.closed_at = e.closed_at;
    c.closed_by = e.closed_by;
    c.close_kind = e.close_kind;
    c.reason.clone_from(&e.reason);
    if let Some(n) = &e.counters {
        set_counters(c, n);
    }
}

/// A record as it is once `u` updated it (shared by every backend).
pub fn merge_update(c: &mut Connection, u: &ConnectionUpdate) {
    fn set(dst: &mut String, src: &str) {
        if !src.is_empty() {
            *dst = src.to_string();
        }
    }
    set(&mut c.dst_ip, &u.dst_ip);
    set(&mut c.sni, &u.sni);
    set(&mut c.alpn, &u.alpn);
    c.tls |= u.tls;
    c.upstream_insecure |= u.upstream_insecure;
    if u.tls_after_seq != 0 {
        c.tls_after_seq = u.tls_after_seq;
    }
    if u.client_tls.is_some() {
        c.client_tls.clone_from(&u.client_tls);
    }
    if u.upstream_tls.is_some() {
        c.upstream_tls.clone_from(&u.upstream_tls);
    }
    if u.client_process.is_some() {
        c.client_process.clone_from(&u.client_process);
    }
    if let Some(n) = &u.counters {
        set_counters(c, n);
    }
}
