//! One stored delivery: a small JSON header (where, which id, how it went so far) followed by the
//! body bytes as they are, so a body is never escaped into or parsed out of JSON.

use serde::{Deserialize, Serialize};

use super::{NewDelivery, StoreError};

/// How many past attempts a row keeps; older ones are dropped first.
const HISTORY: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// When it ended, Unix milliseconds.
    pub at_ms: u64,
    /// HTTP status, or 0 when no answer came (connection error, timeout).
    pub status: u16,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    destination: String,
    webhook_id: String,
    content_type: String,
    created_ms: u64,
    attempts: u32,
    next_attempt_ms: u64,
    history: Vec<Attempt>,
}

/// A stored delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub destination: String,
    pub webhook_id: String,
    pub content_type: String,
    pub created_ms: u64,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub history: Vec<Attempt>,
    pub body: Vec<u8>,
}

impl Row {
    /// A delivery not attempted yet, as [`Row::encode_new`] stores it (the test of that).
    #[cfg(test)]
    fn new(d: &NewDelivery, now_ms: u64) -> Row {
        Row::from_header(Header::new(d, now_ms), d.body.to_vec())
    }

    fn from_header(h: Header, body: Vec<u8>) -> Row {
        Row {
            destination: h.destination,
            webhook_id: h.webhook_id,
            content_type: h.content_type,
            created_ms: h.created_ms,
            attempts: h.attempts,
            next_attempt_ms: h.next_attempt_ms,
            history: h.history,
            body,
        }
    }

    /// Adds a finished attempt to the count and the history.
    pub fn record(&mut self, attempt: Attempt) {
        self.attempts += 1;
        if self.history.len() >= HISTORY {
            self.history.remove(0);
        }
        self.history.push(attempt);
    }

    pub fn last_error(&self) -> Option<&Attempt> {
        self.history.last()
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(
            &Header {
                destination: self.destination.clone(),
                webhook_id: self.webhook_id.clone(),
                content_type: self.content_type.clone(),
                created_ms: self.created_ms,
                attempts: self.attempts,
                next_attempt_ms: self.next_attempt_ms,
                history: self.history.clone(),
            },
            &self.body,
        )
    }

    /// What `Row::new(d, now_ms).encode()` gives, without copying the body into a `Row` first.
    pub fn encode_new(d: &NewDelivery, now_ms: u64) -> Vec<u8> {
        encode(&Header::new(d, now_ms), &d.body)
    }

    pub fn decode(bytes: &[u8]) -> Result<Row, StoreError> {
        let corrupt = || StoreError::Unreadable;
        let len_bytes: [u8; 4] = bytes
            .get(..4)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        let header = bytes.get(4..4 + len).ok_or_else(corrupt)?;
        let h: Header = serde_json::from_slice(header).map_err(|_| corrupt())?;
        Ok(Row::from_header(h, bytes[4 + len..].to_vec()))
    }
}

impl Header {
    /// The header of a delivery not attempted yet.
    fn new(d: &NewDelivery, now_ms: u64) -> Header {
        Header {
            destination: d.destination.clone(),
            webhook_id: d.webhook_id.clone(),
            content_type: d.content_type.to_string(),
            created_ms: now_ms,
            attempts: 0,
            next_attempt_ms: 0,
            history: Vec::new(),
        }
    }
}

fn encode(header: &Header, body: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(header).expect("a header always serializes");
    let mut out = Vec::with_capacity(4 + header.len() + body.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_body_bytes() {
        let d = NewDelivery {
            destination: "a".into(),
            webhook_id: "id-0".into(),
            content_type: "application/json",
            body: bytes::Bytes::from_static(b"{\"x\":\"\\u00e9\"}\n"),
        };
        let mut row = Row::new(&d, 5);
        assert_eq!(Row::encode_new(&d, 5), row.encode());
        row.record(Attempt {
            at_ms: 6,
            status: 500,
            error: "boom".into(),
        });
        let back = Row::decode(&row.encode()).unwrap();
        assert_eq!(back, row);
        assert!(Row::decode(b"\xff\xff").is_err());
    }
}
