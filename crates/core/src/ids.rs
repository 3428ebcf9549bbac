//! Newtype identifiers. Each is a plain string or number on the wire (transparent serde) and
//! cannot be confused with another kind of id in the code.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The id of one submitted run. UUID v7, so ids sort by creation time.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid)]
pub struct RunId(Uuid);

impl RunId {
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// The lowest id a run created at `at` (or later) can have: ids are UUIDv7, whose first
    /// 48 bits are the creation time in milliseconds, so ids sort by creation time.
    pub fn first_at(at: chrono::DateTime<chrono::Utc>) -> Self {
        let millis = u64::try_from(at.timestamp_millis()).unwrap_or(0) & 0xFFFF_FFFF_FFFF;
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
        bytes[6] = 0x70;
        bytes[8] = 0x80;
        Self(Uuid::from_bytes(bytes))
    }

    /// A run id in its one written form, the hyphenated UUID (`0193…-…`, 36 characters).
    pub fn parse(text: &str) -> Option<Self> {
        let hyphens = [8, 13, 18, 23];
        let well_formed = text.len() == 36
            && text.char_indices().all(|(i, c)| {
                if hyphens.contains(&i) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            });
        well_formed
            .then(|| Uuid::parse_str(text).ok().map(Self))
            .flatten()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The identity of one worker process (or of the in-process workers of `dev`):
/// `host:pid:suffix`, unique per process start so a restarted process never
/// inherits the leases or the registration of its predecessor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(String);

impl WorkerId {
    pub fn for_this_process(role: &str) -> Self {
        let host = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".to_owned());
        let suffix: String = {
            use rand::Rng;
            let mut rng = rand::rng();
            (0..4)
                .map(|_| {
                    char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)])
                })
                .collect()
        };
        Self(format!("{host}:{}:{role}-{suffix}", std::process::id()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for WorkerId {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The fencing token of a lease. It grows by one every time a run is claimed, so a worker
/// that lost its lease holds a smaller token than the current owner and every write it
/// attempts is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FenceToken(pub i64);

impl fmt::Display for FenceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
