//! What one export request asks for, checked: the request's fields turned into the values
//! the export run uses, with `INVALID_ARGUMENT` naming whatever is wrong.

use proto::{
    common::{CloseKind, ClosedBy, ConnStatus, Connection},
    export::{ExportRequest, Format as PbFormat},
    names::Named,
    registry::ConnectionFilter,
};
use tonic::Status;

use crate::endpoints::{Endpoints, PortMap};
use protocols::{
    capture::Format,
    frames::{Ending, Side},
};

/// A checked export request.
#[derive(Debug, Clone)]
pub struct Plan {
    pub format: Format,
    /// Explicit connection IDs; empty for "every connection".
    pub conn_ids: Vec<u64>,
    /// A record filter with at least one field set.
    pub filter: Option<ConnectionFilter>,
    /// Opened-at range, nanoseconds since the epoch: `since <= t < until`.
    pub since: Option<u64>,
    pub until: Option<u64>,
    pub ports: Vec<PortMap>,
    pub original: bool,
    pub initial_seq: Option<u32>,
    /// Live export (pcapng only): keep streaming as packets are recorded.
    pub follow: bool,
}

impl Plan {
    /// Checks `req`.
    pub fn from_request(req: ExportRequest) -> Result<Self, Status> {
        let format = match PbFormat::try_from(req.format) {
            Ok(PbFormat::Unspecified | PbFormat::Pcap) => Format::Pcap,
            Ok(PbFormat::Pcapng) => Format::PcapNg,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown format {}",
                    req.format
                )));
            }
        };
        let ports = req
            .decrypted_ports
            .iter()
            .map(|m| match (port(m.from), port(m.to)) {
                (Some(from), Some(to)) => Ok(PortMap { from, to }),
                _ => Err(Status::invalid_argument(format!(
                    "decrypted port map {}={}: ports must be 1 to 65535",
                    m.from, m.to
                ))),
            })
            .collect::<Result<_, _>>()?;
        let filter = req.filter.filter(|f| *f != ConnectionFilter::default());
        if req.follow {
            check_follow(format, filter.as_ref())?;
        }
        Ok(Self {
            format,
            conn_ids: req.conn_ids,
            filter,
            since: req.since.as_ref().map(proto::time::unix_nanos),
            until: req.until.as_ref().map(proto::time::unix_nanos),
            ports,
            original: req.original,
            initial_seq: req.initial_seq,
            follow: req.follow,
        })
    }

    /// Whether a connection first seen with `record` (`None`: cleared) is exported: the
    /// requested IDs, or the filter's fields (only those a live export can decide).
    pub fn wants(&self, id: u64, record: Option<&Connection>) -> bool {
        if !self.conn_ids.is_empty() {
            return self.conn_ids.contains(&id);
        }
        let Some(f) = &self.filter else {
            return true;
        };
        record.is_some_and(|c| {
            (f.dst_host.is_empty() || f.dst_host.eq_ignore_ascii_case(&c.dst_host))
                && (f.dst_port == 0 || f.dst_port == c.dst_port)
                && (f.node.is_empty() || f.node == c.node)
        })
    }

    /// Whether a connection opened at `t` is in the requested time range.
    pub fn in_range(&self, t: u64) -> bool {
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t < u)
    }

    /// The initial sequence numbers (client, server) of connection `id`.
    pub fn isn(&self, id: u64) -> (u32, u32) {
        match self.initial_seq {
            Some(isn) => (isn, isn),
            None => {
                let h = splitmix64(id);
                (h as u32, (h >> 32) as u32)
            }
        }
    }
}

/// A live export writes pcapng, and can filter only on what a connection shows when it is
/// first seen.
fn check_follow(format: Format, filter: Option<&ConnectionFilter>) -> Result<(), Status> {
    if format != Format::PcapNg {
        return Err(Status::invalid_argument(
            "follow writes pcapng only: set format FORMAT_PCAPNG",
        ));
    }
    let Some(f) = filter else { return Ok(()) };
    let ending = [
        ("status", f.status),
        ("closed_by", f.closed_by),
        ("close_kind", f.close_kind),
    ];
    match ending.iter().find(|(_, v)| *v != 0) {
        Some((name, _)) => Err(Status::invalid_argument(format!(
            "follow cannot filter on {name}: it is not known when a connection is first seen"
        ))),
        None => Ok(()),
    }
}

fn port(p: u32) -> Option<u16> {
    u16::try_from(p).ok().filter(|&p| p != 0)
}

/// A well-mixed 64-bit hash of the ID, so ISNs differ per connection but stay reproducible.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How a recorded connection ended, as the stream's last frames show it.
pub fn ending(c: &Connection) -> Ending {
    let closed = c.status == ConnStatus::Disconnected as i32 || c.closed_at.is_some();
    if !closed {
        return Ending::Open;
    }
    // The proxy stands in for the server as far as the client can tell.
    let side = match ClosedBy::try_from(c.closed_by) {
        Ok(ClosedBy::Client) => Side::Client,
        _ => Side::Server,
    };
    match CloseKind::try_from(c.close_kind) {
        Ok(CloseKind::Rst | CloseKind::Error) => Ending::Rst(side),
        _ => Ending::Fin(side),
    }
}

/// The pcapng comment on a connection's first frame.
pub fn comment(id: u64, record: Option<&Connection>, ends: &Endpoints) -> String {
    let Some(c) = record else {
        return format!(
            "interpose connection {id}; record cleared: placeholder addresses and ports"
        );
    };
    let name = |v: Option<&'static str>| v.unwrap_or("-");
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let closed = match ClosedBy::try_from(c.closed_by).ok().and_then(Named::name) {
        None => "still active".to_string(),
        Some(by) => format!(
            "closed by {by} ({}); reason: {}",
            name(CloseKind::try_from(c.close_kind).ok().and_then(Named::name)),
            or_dash(&c.reason)
        ),
    };
    let mut s = format!(
        "interpose connection {id}; node {}; target {}:{}; tls {}; sni {}; alpn {}; {closed}",
        or_dash(&c.node),
        c.dst_host,
        c.dst_port,
        match (c.tls, c.client_tls.is_some()) {
            (true, true) => "decrypted",
            (true, false) => "not decrypted",
            (false, _) => "no",
        },
        or_dash(&c.sni),
        or_dash(&c.alpn),
    );
    if let Some(orig) = ends.original_port {
        s.push_str(&format!(
            "; server port {orig} shown as {} (decrypted)",
            ends.server.port()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::export::PortMap as PbPortMap;

    #[test]
    fn bad_format_and_port_maps_are_refused_by_name() {
        let e = Plan::from_request(ExportRequest {
            format: 9,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("format 9"));
        let e = Plan::from_request(ExportRequest {
            decrypted_ports: vec![PbPortMap { from: 443, to: 0 }],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.message().contains("443=0"), "{}", e.message());
    }

    #[test]
    fn follow_needs_pcapng_and_a_filter_it_can_decide() {
        let e = Plan::from_request(ExportRequest {
            follow: true,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("pcapng"), "{}", e.message());
        let e = Plan::from_request(ExportRequest {
            follow: true,
            format: PbFormat::Pcapng as i32,
            filter: Some(ConnectionFilter {
                dst_port: 80,
                closed_by: ClosedBy::Client as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.message().contains("closed_by"), "{}", e.message());
        let plan = Plan::from_request(ExportRequest {
            follow: true,
            format: PbFormat::Pcapng as i32,
            filter: Some(ConnectionFilter {
                dst_host: "Example.com".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        let c = |host: &str| Connection {
            dst_host: host.into(),
            ..Default::default()
        };
        assert!(plan.wants(1, Some(&c("example.COM"))));
        assert!(!plan.wants(1, Some(&c("other.org"))));
        assert!(
            !plan.wants(1, None),
            "a cleared record never matches a filter"
        );
    }

    #[test]
    fn isns_differ_per_connection_unless_forced() {
        let plan = Plan::from_request(ExportRequest::default()).unwrap();
        assert_ne!(plan.isn(1), plan.isn(2));
        assert_eq!(plan.isn(1), plan.isn(1));
        let forced = Plan::from_request(ExportRequest {
            initial_seq: Some(u32::MAX - 10),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(forced.isn(3), (u32::MAX - 10, u32::MAX - 10));
    }

    #[test]
    fn endings_follow_the_record() {
        let mut c = Connection {
            status: ConnStatus::Active as i32,
            ..Default::default()
        };
        assert_eq!(ending(&c), Ending::Open);
        c.status = ConnStatus::Disconnected as i32;
        c.closed_by = ClosedBy::Client as i32;
        c.close_kind = CloseKind::Fin as i32;
        assert_eq!(ending(&c), Ending::Fin(Side::Client));
        c.closed_by = ClosedBy::Server as i32;
        c.close_kind = CloseKind::Rst as i32;
        assert_eq!(ending(&c), Ending::Rst(Side::Server));
        c.closed_by = ClosedBy::Proxy as i32;
        c.close_kind = CloseKind::Error as i32;
        assert_eq!(ending(&c), Ending::Rst(Side::Server));
    }
}
