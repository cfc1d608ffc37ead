//! Matching connection records against a `ConnectionFilter`, shared by list, watch and stats.

use proto::{common::Connection, registry::ConnectionFilter};

/// True when `c` passes every filter that is set.
pub fn matches(f: &ConnectionFilter, c: &Connection) -> bool {
    (f.status == 0 || f.status == c.status)
        && (f.closed_by == 0 || f.closed_by == c.closed_by)
        && (f.close_kind == 0 || f.close_kind == c.close_kind)
        && (f.dst_host.is_empty() || f.dst_host.eq_ignore_ascii_case(&c.dst_host))
        && (f.dst_port == 0 || f.dst_port == c.dst_port)
        && (f.node.is_empty() || f.node == c.node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::common::{ClosedBy, ConnStatus};

    #[test]
    fn every_set_field_must_match() {
        let c = Connection {
            id: 1,
            node: "lab1".into(),
            dst_host: "Example.com".into(),
            dst_port: 443,
            status: ConnStatus::Disconnected as i32,
            closed_by: ClosedBy::Server as i32,
            ..Default::default()
        };
        assert!(matches(&ConnectionFilter::default(), &c));
        let f = ConnectionFilter {
            dst_host: "example.COM".into(),
            dst_port: 443,
            node: "lab1".into(),
            closed_by: ClosedBy::Server as i32,
            ..Default::default()
        };
        assert!(matches(&f, &c));
        for f in [
            ConnectionFilter {
                status: ConnStatus::Active as i32,
                ..Default::default()
            },
            ConnectionFilter {
                closed_by: ClosedBy::Client as i32,
                ..Default::default()
            },
            ConnectionFilter {
                dst_port: 80,
                ..Default::default()
            },
            ConnectionFilter {
                node: "lab2".into(),
                ..Default::default()
            },
            ConnectionFilter {
                dst_host: "other".into(),
                ..Default::default()
            },
        ] {
            assert!(!matches(&f, &c), "{f:?}");
        }
    }
}
