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

/// `d` before now, in microseconds since the Unix epoch (saturating).
pub fn micros_ago(d: std::time::Duration) -> i64 {
    now_micros().saturating_sub(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Microseconds of a `google.protobuf.Duration` (sub-microsecond part
/// dropped, saturating; negative for a negative duration).
pub fn duration_micros(d: &prost_types::Duration) -> i64 {
    d.seconds.saturating_mul(1_000_000).saturating_add(i64::from(d.nanos) / 1_000)
}

/// A `google.protobuf.Duration` of `d` (saturating at its largest).
pub fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nanos: d.subsec_nanos() as i32 }
}

/// The client's deadline of a call: its `grpc-timeout` header, per the
/// gRPC over HTTP/2 protocol (grpc/doc/PROTOCOL-HTTP2.md): at most 8 ASCII
/// digits, then a unit, `H` `M` `S` `m` `u` or `n` (hours down to
/// nanoseconds). None when absent or malformed (no deadline).
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)
}

/// The duration a `grpc-timeout` header's `value` gives, as
/// [`grpc_timeout`] reads it; None when malformed.
pub fn parse_grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3_600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_read_as_the_protocol_writes_them() {
        use std::time::Duration;
        let of = |value: &str| {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("grpc-timeout", value.parse().unwrap());
            grpc_timeout(&metadata)
        };
        assert_eq!(of("2H"), Some(Duration::from_secs(7_200)));
        assert_eq!(of("90S"), Some(Duration::from_secs(90)));
        assert_eq!(of("1500m"), Some(Duration::from_millis(1_500)));
        assert_eq!(of("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "10s", "1.5S", "-1S", "10"] {
            assert_eq!(of(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }

    #[test]
    fn round_trips_including_negative() {
        for m in [0, 1, 1_700_000_000_123_456, -1, -1_500_000] {
            assert_eq!(micros(&timestamp(m)), m);
        }
    }
}
