//! The gRPC contract of DistCache, package `distcache.v1`.
//!
//! `Cache` is the service applications call; `Peer` is node-to-node only. The `.proto` files under
//! `proto/distcache/v1/` are the source of truth and document every message and field; this crate holds the
//! generated tonic bindings and the encoded file descriptor set that the node serves through gRPC reflection,
//! so `grpcurl` works without the `.proto` files.

/// Generated messages, clients and servers of `distcache.v1`.
pub mod v1 {
    #![allow(clippy::pedantic, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("distcache.v1");
}

/// Encoded `FileDescriptorSet` of `distcache.v1` (and its imports), for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/distcache_descriptor.bin"));

/// Converts a protobuf duration into a `std::time::Duration`; negative or out-of-range values give `None`.
pub fn to_std_duration(d: &prost_types::Duration) -> Option<std::time::Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    if nanos >= 1_000_000_000 {
        return None;
    }
    Some(std::time::Duration::new(secs, nanos))
}

/// Converts a `std::time::Duration` into a protobuf duration, saturating at the protobuf maximum.
pub fn from_std_duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Reason: subsec_nanos() < 1e9 always fits in i32.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_round_trip() {
        let d = std::time::Duration::from_millis(1500);
        assert_eq!(to_std_duration(&from_std_duration(d)), Some(d));
        assert_eq!(to_std_duration(&prost_types::Duration { seconds: -1, nanos: 0 }), None);
    }
}
