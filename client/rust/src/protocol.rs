//! The wire protocol (`docs/protocol.md`): one JSON object per line; requests tagged
//! by `op`, replies by `reply`, both carrying the request's `id`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorCode;

/// The protocol version this crate speaks (sent in `hello`).
pub const PROTOCOL_VERSION: u32 = 1;
/// The longest `note` a lease may carry, in characters.
pub const MAX_NOTE: usize = 1024;
/// The longest `client` name sent in `hello`, in characters.
pub const MAX_CLIENT: usize = 256;
/// The shortest TTL a lease may ask for, in seconds.
pub const MIN_TTL: f64 = 1.0;
/// The longest TTL a lease may ask for, in seconds (a day).
pub const MAX_TTL: f64 = 86400.0;
/// The most leases one `status` reply carries.
pub const MAX_STATUS_LEASES: u32 = 1000;
/// The longest reply line this client accepts (a `status` page is the largest).
pub(crate) const MAX_REPLY_LINE: usize = 16 << 20;

fn is_false(value: &bool) -> bool {
    !*value
}

/// A request without its id (added by [`Envelope`] when it is sent).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum Request {
    Hello {
        version: u32,
        client: String,
    },
    Lease {
        count: u16,
        #[serde(skip_serializing_if = "Option::is_none")]
        ttl: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        #[serde(skip_serializing_if = "is_false")]
        detach: bool,
    },
    Release {
        token: String,
    },
    Renew {
        token: String,
    },
    Detach {
        token: String,
    },
    Reclaim {
        token: String,
    },
    Status {
        #[serde(skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        after: Option<u16>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    Metrics {},
    Ping {},
}

#[derive(Serialize)]
struct Envelope<'a> {
    id: u64,
    #[serde(flatten)]
    request: &'a Request,
}

/// The request as one line, newline included.
pub(crate) fn encode(id: u64, request: &Request) -> String {
    let mut line = serde_json::to_string(&Envelope { id, request })
        .expect("a request always serialises");
    line.push('\n');
    line
}

/// A reply: its id (null when the broker could not read the request) and its body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub id: Option<u64>,
    pub id_null: bool,
    pub body: Body,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "reply", rename_all = "lowercase")]
pub(crate) enum Body {
    Hello {
        pid: u32,
    },
    Granted {
        ports: Vec<u16>,
        token: String,
        ttl: f64,
        #[serde(default)]
        expires: Option<f64>,
    },
    Released {
        ports: Vec<u16>,
    },
    Renewed {
        #[serde(default)]
        expires: Option<f64>,
    },
    Detached {
        ports: Vec<u16>,
        expires: f64,
    },
    Reclaimed {
        ports: Vec<u16>,
    },
    Status(Status),
    Metrics {
        text: String,
    },
    Pong {},
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default)]
        largest: Option<u64>,
    },
}

/// Read one reply line (without its newline).
pub(crate) fn decode(line: &[u8]) -> Result<Reply, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON ({e})"))?;
    let (id, id_null) = match value.get("id") {
        Some(Value::Null) | None => (None, true),
        Some(id) => (id.as_u64(), false),
    };
    let body = Body::deserialize(value).map_err(|e| format!("{e}"))?;
    Ok(Reply { id, id_null, body })
}

/// The answer to `status`: a summary of the whole range and one page of leases.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct Status {
    /// The port range as the broker sees it, over every lease.
    pub summary: Summary,
    /// Leases sorted by first port (at most the query's `limit`).
    pub leases: Vec<LeaseInfo>,
    /// More leases follow: ask again with `after` set to the last lease's first port.
    #[serde(default)]
    pub more: bool,
}

/// The `summary` of a `status` reply.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct Summary {
    /// First and last port the broker grants from.
    pub range: (u16, u16),
    /// Leases held, in all.
    pub leases: u64,
    /// Ports held by leases.
    pub ports_held: u64,
    /// Ports free.
    pub ports_free: u64,
    /// The largest count a lease could be granted now.
    pub largest_free_run: u64,
    /// Open client connections.
    pub clients: u64,
    /// The broker's default TTL in seconds.
    pub ttl: f64,
    /// Why part of the range is never granted (ephemeral or reserved ports), if so.
    #[serde(default)]
    pub notice: Option<String>,
}

/// One lease as `status` shows it (never its token).
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct LeaseInfo {
    /// Its ports.
    pub ports: Vec<u16>,
    /// `attached`, `detached` or `orphaned`.
    pub state: String,
    /// The holder's pid.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The holder's uid.
    #[serde(default)]
    pub uid: Option<u32>,
    /// The holder's gid.
    #[serde(default)]
    pub gid: Option<u32>,
    /// The holder's user name.
    #[serde(default)]
    pub user: Option<String>,
    /// The holder's command line (cut to 256 characters).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// The lease's note (cut to 256 characters).
    #[serde(default)]
    pub note: Option<String>,
    /// When it was granted (Unix seconds).
    pub granted: f64,
    /// When an unbound lease expires (Unix seconds).
    #[serde(default)]
    pub expires: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_encode_as_the_protocol_says() {
        let line = encode(
            7,
            &Request::Lease { count: 3, ttl: None, note: Some("a \"b\"".into()), detach: false },
        );
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value, serde_json::json!({"id": 7, "op": "lease", "count": 3, "note": "a \"b\""}));
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let ping: Value = serde_json::from_str(&encode(1, &Request::Ping {})).unwrap();
        assert_eq!(ping, serde_json::json!({"id": 1, "op": "ping"}));
        let status: Value =
            serde_json::from_str(&encode(2, &Request::Status { uid: None, after: Some(5), limit: None }))
                .unwrap();
        assert_eq!(status, serde_json::json!({"id": 2, "op": "status", "after": 5}));
    }

    #[test]
    fn replies_decode_and_unknown_codes_are_kept() {
        let r = decode(br#"{"reply":"granted","id":2,"ports":[20000,20001],"token":"ab","ttl":120.0}"#)
            .unwrap();
        assert_eq!(r.id, Some(2));
        assert!(matches!(r.body, Body::Granted { ref ports, .. } if ports == &[20000, 20001]));
        let r = decode(br#"{"reply":"error","id":null,"code":"quota","message":"m"}"#).unwrap();
        assert!(r.id_null);
        assert!(matches!(r.body, Body::Error { code: ErrorCode::Quota, .. }));
        let r = decode(br#"{"reply":"error","id":3,"code":"new-code","message":"m","extra":1}"#).unwrap();
        assert!(matches!(r.body, Body::Error { code: ErrorCode::Other(ref c), .. } if c == "new-code"));
        assert!(decode(br#"{"reply":"pong","id":1}"#).is_ok());
        assert!(decode(b"not json").is_err());
    }

    #[test]
    fn every_code_round_trips() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(code.as_str()), code);
        }
    }
}
