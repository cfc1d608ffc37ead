//! Conversions between `std::time::SystemTime` and `google.protobuf.Timestamp`: prost-types'
//! own, clamped to the epoch (records never predate 1970, and a bad value must not panic).

use std::time::{SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;

/// The timestamp of `t`; times before 1970 clamp to the epoch.
pub fn to_timestamp(t: SystemTime) -> Timestamp {
    Timestamp::from(t.max(UNIX_EPOCH))
}

/// The current time as a timestamp.
pub fn now() -> Timestamp {
    to_timestamp(SystemTime::now())
}

/// The `SystemTime` of a timestamp; out-of-range values clamp to the epoch.
pub fn from_timestamp(ts: &Timestamp) -> SystemTime {
    SystemTime::try_from(*ts)
        .ok()
        .filter(|t| *t >= UNIX_EPOCH)
        .unwrap_or(UNIX_EPOCH)
}

/// Nanoseconds since the epoch (saturating), a compact key for ordering.
pub fn unix_nanos(ts: &Timestamp) -> u64 {
    let secs = u64::try_from(ts.seconds).unwrap_or(0);
    let nanos = u64::try_from(ts.nanos).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn round_trip_keeps_nanoseconds() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let ts = to_timestamp(t);
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 123_456_789));
        assert_eq!(from_timestamp(&ts), t);
        assert_eq!(unix_nanos(&ts), 1_700_000_000_123_456_789);
    }

    #[test]
    fn negative_and_out_of_range_clamp() {
        let ts = Timestamp {
            seconds: -5,
            nanos: -1,
        };
        assert_eq!(from_timestamp(&ts), UNIX_EPOCH);
        assert_eq!(unix_nanos(&ts), 0);
    }
}
