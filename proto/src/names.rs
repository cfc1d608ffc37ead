//! The stable lower-case names of the contract's enums, as the CLI prints them and as the
//! `--json` output and the CLI's filters spell them (`c2s`, `active`, `client`, `fin`, ...).

use crate::common::{CloseKind, ClosedBy, ConnStatus, Direction};

/// An enum with a stable user-facing name for each meaningful value.
pub trait Named: Sized + Copy + 'static {
    /// Every value that has a name (the unspecified value has none).
    const ALL: &'static [Self];
    /// The name, or `None` for the unspecified value.
    fn name(self) -> Option<&'static str>;
    /// The value with this name.
    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == Some(name))
    }
}

impl Named for Direction {
    const ALL: &'static [Self] = &[Direction::C2s, Direction::S2c];
    fn name(self) -> Option<&'static str> {
        match self {
            Direction::Unspecified => None,
            Direction::C2s => Some("c2s"),
            Direction::S2c => Some("s2c"),
        }
    }
}

impl Named for ConnStatus {
    const ALL: &'static [Self] = &[ConnStatus::Active, ConnStatus::Disconnected];
    fn name(self) -> Option<&'static str> {
        match self {
            ConnStatus::Unspecified => None,
            ConnStatus::Active => Some("active"),
            ConnStatus::Disconnected => Some("disconnected"),
        }
    }
}

impl Named for ClosedBy {
    const ALL: &'static [Self] = &[ClosedBy::Client, ClosedBy::Server, ClosedBy::Proxy];
    fn name(self) -> Option<&'static str> {
        match self {
            ClosedBy::Unspecified => None,
            ClosedBy::Client => Some("client"),
            ClosedBy::Server => Some("server"),
            ClosedBy::Proxy => Some("proxy"),
        }
    }
}

impl Named for CloseKind {
    const ALL: &'static [Self] = &[CloseKind::Fin, CloseKind::Rst, CloseKind::Error];
    fn name(self) -> Option<&'static str> {
        match self {
            CloseKind::Unspecified => None,
            CloseKind::Fin => Some("fin"),
            CloseKind::Rst => Some("rst"),
            CloseKind::Error => Some("error"),
        }
    }
}

/// The name of a raw enum value as carried in a message (`i32`), or `None` when it is
/// unspecified or unknown to this build.
pub fn name_of<T: Named + TryFrom<i32>>(raw: i32) -> Option<&'static str> {
    T::try_from(raw).ok().and_then(Named::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Direction::ALL {
            assert_eq!(Direction::from_name(d.name().unwrap()), Some(*d));
        }
        for s in ConnStatus::ALL {
            assert_eq!(ConnStatus::from_name(s.name().unwrap()), Some(*s));
        }
        for c in ClosedBy::ALL {
            assert_eq!(ClosedBy::from_name(c.name().unwrap()), Some(*c));
        }
        for k in CloseKind::ALL {
            assert_eq!(CloseKind::from_name(k.name().unwrap()), Some(*k));
        }
        assert_eq!(Direction::from_name("both"), None);
        assert_eq!(name_of::<ClosedBy>(0), None);
        assert_eq!(name_of::<ClosedBy>(99), None);
        assert_eq!(name_of::<ClosedBy>(2), Some("server"));
    }
}
