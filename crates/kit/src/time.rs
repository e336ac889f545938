//! Times: stored as microseconds since the Unix epoch (i64), exchanged as
//! `google.protobuf.Timestamp`.

use prost_types::Timestamp;
use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A Timestamp from microseconds since the epoch.
pub fn timestamp(micros: i64) -> Timestamp {
    Timestamp { seconds: micros.div_euclid(1_000_000), nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32 }
}

/// An optional Timestamp from optional microseconds.
pub fn timestamp_opt(micros: Option<i64>) -> Option<Timestamp> {
    micros.map(timestamp)
}

/// Microseconds since the epoch from a Timestamp (sub-microsecond part dropped,
/// saturating far outside the representable range).
pub fn micros(ts: &Timestamp) -> i64 {
    ts.seconds.saturating_mul(1_000_000).saturating_add(i64::from(ts.nanos) / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_including_negative() {
        for m in [0, 1, 1_700_000_000_123_456, -1, -1_500_000] {
            assert_eq!(micros(&timestamp(m)), m);
        }
    }
}
