//! The intercept configuration compiled for one proxy node, without I/O: which packets to
//! hold, and the replace rules the proxy applies itself. Matching allocates nothing; only a
//! rule that matches builds new bytes, and never more than the packet's length plus
//! [`MAX_GROWTH`]: the output's size is computed before anything is allocated, and a packet
//! the rules would grow further is left as it was ([`Rewrite::Skipped`]).

use proto::{
    common::Direction,
    intercept::{InterceptConfig, ReplaceRule},
};

/// The most the replace rules, all together, may grow one packet (4 MiB). While the rules
/// run, a packet of `n` bytes costs at most two buffers of `n` + `MAX_GROWTH` bytes.
pub const MAX_GROWTH: usize = 4 << 20;

/// What the replace rules did to a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// No rule changed it.
    Unchanged,
    /// The rules made these bytes.
    Rewritten(Vec<u8>),
    /// A rule would have grown it beyond its length plus [`MAX_GROWTH`]: left as received
    /// (no rule applied), for the caller to count.
    Skipped,
}

/// A replacement would be larger than the limit it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// The size the output would have had.
    pub would_be: u128,
}

/// The connection a packet belongs to, as the filters see it.
#[derive(Debug, Clone, Copy)]
pub struct ConnMeta<'a> {
    /// The connection ID.
    pub id: u64,
    /// Target host as the client named it (DNS name or IP literal).
    pub dst_host: &'a str,
    /// Target port.
    pub dst_port: u16,
}

/// A target-host filter: `example.com` (exact) or `*.example.com` (any subdomain, not the
/// domain itself). Case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// The suffix with its leading dot, e.g. `.example.com`.
    Suffix(String),
}

impl HostPattern {
    /// Parses one pattern.
    pub fn new(s: &str) -> Self {
        match s.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => Self::Suffix(suffix.to_ascii_lowercase()),
            _ => Self::Exact(s.to_ascii_lowercase()),
        }
    }

    /// Whether `host` matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.as_bytes();
        match self {
            Self::Exact(h) => host.eq_ignore_ascii_case(h.as_bytes()),
            Self::Suffix(s) => {
                host.len() > s.len()
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

/// Target filters shared by the hold filter and the rules: empty lists match anything.
#[derive(Debug, Clone, Default)]
struct Target {
    direction: Option<Direction>,
    hosts: Vec<HostPattern>,
    ports: Vec<u32>,
}

impl Target {
    fn new(direction: i32, hosts: &[String], ports: &[u32]) -> Self {
        Self {
            direction: match Direction::try_from(direction) {
                Ok(Direction::C2s) => Some(Direction::C2s),
                Ok(Direction::S2c) => Some(Direction::S2c),
                _ => None,
            },
            hosts: hosts.iter().map(|h| HostPattern::new(h)).collect(),
            ports: ports.to_vec(),
        }
    }

    fn matches(&self, conn: &ConnMeta<'_>, dir: Direction) -> bool {
        self.direction.is_none_or(|d| d == dir)
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(conn.dst_host)))
            && (self.ports.is_empty() || self.ports.contains(&u32::from(conn.dst_port)))
    }
}

/// Which packets to hold.
#[derive(Debug, Clone)]
struct HoldFilter {
    target: Target,
    conn_ids: Vec<u64>,
    /// The bytes to look for, compiled once (a SIMD search: it runs over every packet).
    contains: Option<memchr::memmem::Finder<'static>>,
}

/// One replace rule.
#[derive(Debug, Clone)]
struct Rule {
    target: Target,
    pattern: Vec<u8>,
    replacement: Vec<u8>,
}

/// The configuration as this node applies it.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    hold: Option<HoldFilter>,
    rules: Vec<Rule>,
}

impl Compiled {
    /// Compiles `config` for the proxy named `node`: hold filters apply only when intercept
    /// is on and the node filter (if any) names this node.
    pub fn new(config: &InterceptConfig, node: &str) -> Self {
        let for_us = config.nodes.is_empty() || config.nodes.iter().any(|n| n == node);
        let hold = (config.enabled && for_us).then(|| HoldFilter {
            target: Target::new(config.direction, &config.hosts, &config.ports),
            conn_ids: config.conn_ids.clone(),
            contains: (!config.contains.is_empty())
                .then(|| memchr::memmem::Finder::new(&config.contains).into_owned()),
        });
        let mut rules: Vec<&ReplaceRule> = config
            .rules
            .iter()
            .filter(|r| !r.pattern.is_empty())
            .collect();
        rules.sort_by_key(|r| r.id);
        Self {
            hold,
            rules: rules
                .into_iter()
                .map(|r| Rule {
                    target: Target::new(r.direction, &r.hosts, &r.ports),
                    pattern: r.pattern.clone(),
                    replacement: r.replacement.clone(),
                })
                .collect(),
        }
    }

    /// The same configuration without holding (the service is unreachable): rules stay.
    pub fn without_hold(&self) -> Self {
        Self {
            hold: None,
            rules: self.rules.clone(),
        }
    }

    /// Whether any packet could need attention (a hold filter or a rule): when not, the
    /// relay skips every check.
    pub fn is_active(&self) -> bool {
        self.hold.is_some() || !self.rules.is_empty()
    }

    /// Applies the rules for this connection and direction in order, never growing the
    /// packet by more than [`MAX_GROWTH`] (see [`Rewrite::Skipped`]).
    pub fn rewrite(&self, conn: &ConnMeta<'_>, dir: Direction, data: &[u8]) -> Rewrite {
        let limit = data.len().saturating_add(MAX_GROWTH);
        let mut out: Option<Vec<u8>> = None;
        for r in &self.rules {
            if !r.target.matches(conn, dir) {
                continue;
            }
            let current = out.as_deref().unwrap_or(data);
            match replace_all(current, &r.pattern, &r.replacement, limit) {
                Ok(Some(next)) => out = Some(next),
                Ok(None) => {}
                Err(TooLarge { .. }) => return Rewrite::Skipped,
            }
        }
        match out {
            Some(o) if o.as_slice() != data => Rewrite::Rewritten(o),
            _ => Rewrite::Unchanged,
        }
    }

    /// Whether a packet (after the rules) should be held.
    pub fn holds(&self, conn: &ConnMeta<'_>, dir: Direction, data: &[u8]) -> bool {
        self.hold.as_ref().is_some_and(|f| {
            f.target.matches(conn, dir)
                && (f.conn_ids.is_empty() || f.conn_ids.contains(&conn.id))
                && f.contains.as_ref().is_none_or(|c| c.find(data).is_some())
        })
    }
}

/// The first position at or after `from` where `needle` (non-empty) occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    let rest = haystack.get(from..)?;
    memchr::memmem::find(rest, needle).map(|i| i + from)
}

/// Replaces each non-overlapping occurrence of `pattern` (non-empty), left to right, with
/// `replacement`; `Ok(None)` when `pattern` does not occur. The output's size is counted
/// first: when it would pass `limit` bytes, nothing is allocated and the answer is
/// [`TooLarge`].
pub fn replace_all(
    data: &[u8],
    pattern: &[u8],
    replacement: &[u8],
    limit: usize,
) -> Result<Option<Vec<u8>>, TooLarge> {
    let Some(first) = find(data, pattern, 0) else {
        return Ok(None);
    };
    let mut count: u128 = 0;
    let mut next = Some(first);
    while let Some(i) = next {
        count += 1;
        next = find(data, pattern, i + pattern.len());
    }
    // Occurrences do not overlap, so they take at most `data.len()` bytes.
    let would_be =
        data.len() as u128 - count * pattern.len() as u128 + count * replacement.len() as u128;
    if would_be > limit as u128 {
        return Err(TooLarge { would_be });
    }
    let mut at = first;
    let mut out = Vec::with_capacity(would_be as usize);
    let mut copied = 0;
    loop {
        out.extend_from_slice(&data[copied..at]);
        out.extend_from_slice(replacement);
        copied = at + pattern.len();
        match find(data, pattern, copied) {
            Some(next) => at = next,
            None => break,
        }
    }
    out.extend_from_slice(&data[copied..]);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CONN: ConnMeta<'static> = ConnMeta {
        id: 7,
        dst_host: "Api.Example.com",
        dst_port: 443,
    };

    fn on() -> InterceptConfig {
        InterceptConfig {
            enabled: true,
            ..Default::default()
        }
    }

    #[test]
    fn host_patterns() {
        assert!(HostPattern::new("api.example.COM").matches("API.example.com"));
        assert!(!HostPattern::new("example.com").matches("api.example.com"));
        let wild = HostPattern::new("*.example.com");
        assert!(wild.matches("api.example.com"));
        assert!(wild.matches("a.b.Example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("badexample.com"));
        // Multi-byte host names do not split a character.
        assert!(!wild.matches("é"));
    }

    #[test]
    fn off_holds_nothing_and_is_inactive() {
        let c = Compiled::new(&InterceptConfig::default(), "n");
        assert!(!c.is_active());
        assert!(!c.holds(&CONN, Direction::C2s, b"x"));
        let c = Compiled::new(&on(), "n");
        assert!(c.is_active());
        assert!(c.holds(&CONN, Direction::S2c, b""));
        assert!(!c.without_hold().is_active());
    }

    #[test]
    fn every_filter_must_match() {
        let cfg = InterceptConfig {
            direction: Direction::C2s as i32,
            hosts: vec!["*.example.com".into()],
            ports: vec![443],
            nodes: vec!["lab1".into()],
            conn_ids: vec![7],
            contains: b"\0key".to_vec(),
            ..on()
        };
        let c = Compiled::new(&cfg, "lab1");
        assert!(c.holds(&CONN, Direction::C2s, b"a\0key=1"));
        assert!(!c.holds(&CONN, Direction::S2c, b"a\0key=1"));
        assert!(!c.holds(&CONN, Direction::C2s, b"a key=1"));
        let other_port = ConnMeta {
            dst_port: 80,
            ..CONN
        };
        assert!(!c.holds(&other_port, Direction::C2s, b"\0key"));
        let other_host = ConnMeta {
            dst_host: "example.org",
            ..CONN
        };
        assert!(!c.holds(&other_host, Direction::C2s, b"\0key"));
        let other_conn = ConnMeta { id: 8, ..CONN };
        assert!(!c.holds(&other_conn, Direction::C2s, b"\0key"));
        // Another node: nothing held, and nothing to check at all.
        assert!(!Compiled::new(&cfg, "lab2").is_active());
    }

    #[test]
    fn rules_apply_in_id_order_and_by_target() {
        let cfg = InterceptConfig {
            rules: vec![
                ReplaceRule {
                    id: 2,
                    pattern: b"bb".to_vec(),
                    replacement: b"C".to_vec(),
                    ..Default::default()
                },
                ReplaceRule {
                    id: 1,
                    direction: Direction::C2s as i32,
                    pattern: b"a".to_vec(),
                    replacement: b"bb".to_vec(),
                    ports: vec![443],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let c = Compiled::new(&cfg, "n");
        assert!(c.is_active());
        assert_eq!(
            c.rewrite(&CONN, Direction::C2s, b"xax"),
            Rewrite::Rewritten(b"xCx".to_vec())
        );
        assert_eq!(c.rewrite(&CONN, Direction::S2c, b"xax"), Rewrite::Unchanged);
        assert_eq!(
            c.rewrite(&CONN, Direction::S2c, b"bb"),
            Rewrite::Rewritten(b"C".to_vec())
        );
        assert_eq!(c.rewrite(&CONN, Direction::C2s, b"zzz"), Rewrite::Unchanged);
        // Rules survive the service going away; holding does not.
        assert_ne!(
            c.without_hold().rewrite(&CONN, Direction::S2c, b"bb"),
            Rewrite::Unchanged
        );
    }

    const ANY: usize = usize::MAX;

    #[test]
    fn replace_all_edges() {
        assert_eq!(
            replace_all(b"aaa", b"aa", b"b", ANY),
            Ok(Some(b"ba".to_vec()))
        );
        assert_eq!(replace_all(b"abc", b"abc", b"", ANY), Ok(Some(Vec::new())));
        assert_eq!(replace_all(b"ab", b"abc", b"x", ANY), Ok(None));
        assert_eq!(replace_all(b"", b"a", b"x", ANY), Ok(None));
        assert_eq!(
            replace_all(b"a\0b", b"\0", b"\0\0", ANY),
            Ok(Some(b"a\0\0b".to_vec()))
        );
        // The limit is on the output, checked before allocating: exactly at it is fine.
        assert_eq!(
            replace_all(b"aa", b"a", b"bb", 4),
            Ok(Some(b"bbbb".to_vec()))
        );
        assert_eq!(
            replace_all(b"aa", b"a", b"bbb", 5),
            Err(TooLarge { would_be: 6 })
        );
    }

    #[test]
    fn an_amplifying_rule_is_skipped_without_allocating_its_output() {
        // The attack of the report: 1 MiB per `A`, 10,000 `A`s would make 10 GB.
        let cfg = InterceptConfig {
            rules: vec![ReplaceRule {
                id: 1,
                pattern: b"A".to_vec(),
                replacement: vec![b'x'; 1 << 20],
                ..Default::default()
            }],
            ..Default::default()
        };
        let c = Compiled::new(&cfg, "n");
        let attack = vec![b'A'; 10_000];
        assert_eq!(c.rewrite(&CONN, Direction::C2s, &attack), Rewrite::Skipped);
        // Four fit in the 4 MiB of growth (each adds 1 MiB - 1 byte); five do not.
        assert!(matches!(
            c.rewrite(&CONN, Direction::C2s, b"AAAA"),
            Rewrite::Rewritten(o) if o.len() == 4 << 20
        ));
        // Chained rules: the bound is on the packet as received, not on each step.
        let chained = InterceptConfig {
            rules: vec![
                ReplaceRule {
                    id: 1,
                    pattern: b"A".to_vec(),
                    replacement: vec![b'B'; 1024],
                    ..Default::default()
                },
                ReplaceRule {
                    id: 2,
                    pattern: b"B".to_vec(),
                    replacement: vec![b'C'; 1024],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let c = Compiled::new(&chained, "n");
        assert!(
            matches!(c.rewrite(&CONN, Direction::C2s, b"AAA"), Rewrite::Rewritten(o) if o.len() == 3 << 20)
        );
        assert_eq!(c.rewrite(&CONN, Direction::C2s, b"AAAAA"), Rewrite::Skipped);
    }

    /// The reference: the standard library's string replace over bytes mapped one-to-one
    /// to chars (Latin-1).
    fn reference(data: &[u8], pattern: &[u8], replacement: &[u8]) -> Vec<u8> {
        let s = |b: &[u8]| b.iter().map(|&c| char::from(c)).collect::<String>();
        s(data)
            .replace(&s(pattern), &s(replacement))
            .chars()
            .map(|c| u8::try_from(u32::from(c)).unwrap_or(0))
            .collect()
    }

    proptest! {
        #[test]
        fn replace_all_matches_the_reference(
            data in proptest::collection::vec(0u8..4, 0..64),
            pattern in proptest::collection::vec(0u8..4, 1..4),
            replacement in proptest::collection::vec(any::<u8>(), 0..6),
        ) {
            let want = reference(&data, &pattern, &replacement);
            match replace_all(&data, &pattern, &replacement, ANY).unwrap() {
                Some(got) => prop_assert_eq!(got, want),
                None => {
                    prop_assert!(find(&data, &pattern, 0).is_none());
                    prop_assert_eq!(data, want);
                }
            }
        }
    }
}
