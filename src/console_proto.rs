//! The protocol of `DIR/NAME/console.sock`.
//!
//! Shim → client: the raw bytes of the console output (first the recent output, if the client
//! asked for it, then live output), until the shim closes the connection (the vkernel ended).
//!
//! Client → shim: frames `kind u8 | len u16 LE | payload[len]`, `len` ≤ [`MAX_PAYLOAD`]:
//! - `H` hello, must come first: payload = flags u8 ([`HELLO_SEND_LOG`]);
//! - `D` data typed into the console;
//! - `W` window size: rows u16 LE | cols u16 LE.
//!
//! Unknown kinds and oversized frames end the connection.

pub const KIND_HELLO: u8 = b'H';
pub const KIND_DATA: u8 = b'D';
pub const KIND_WINSIZE: u8 = b'W';
/// Hello flag: send the recent console output before live output.
pub const HELLO_SEND_LOG: u8 = 1;
pub const MAX_PAYLOAD: usize = 4096;
pub const HEADER_LEN: usize = 3;

/// Append one frame to `out`; payloads longer than [`MAX_PAYLOAD`] are split into several
/// frames of the same kind (only meaningful for data).
pub fn encode(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    let mut chunks = payload.chunks(MAX_PAYLOAD).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[kind, 0, 0]);
        return;
    }
    for c in chunks {
        // A chunk is at most MAX_PAYLOAD (4096) bytes, so it fits in a u16.
        let len = u16::try_from(c.len()).unwrap_or(u16::MAX);
        out.push(kind);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(c);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello { send_log: bool },
    Data(Vec<u8>),
    Winsize { rows: u16, cols: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    UnknownKind(u8),
    TooLong(usize),
    BadWinsize,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::UnknownKind(k) => write!(f, "unknown console frame kind {k:#04x}"),
            DecodeError::TooLong(n) => write!(f, "console frame of {n} bytes is too long"),
            DecodeError::BadWinsize => write!(f, "window-size frame with a wrong length"),
        }
    }
}

/// Take the first complete frame off `buf`; `Ok(None)` when more bytes are needed.
pub fn decode(buf: &mut Vec<u8>) -> Result<Option<Frame>, DecodeError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let kind = header[0];
    let len = usize::from(u16::from_le_bytes([header[1], header[2]]));
    if len > MAX_PAYLOAD {
        return Err(DecodeError::TooLong(len));
    }
    if !matches!(kind, KIND_HELLO | KIND_DATA | KIND_WINSIZE) {
        return Err(DecodeError::UnknownKind(kind));
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let payload: Vec<u8> = buf.drain(..HEADER_LEN + len).skip(HEADER_LEN).collect();
    let frame = match kind {
        KIND_HELLO => Frame::Hello {
            send_log: payload.first().is_some_and(|f| f & HELLO_SEND_LOG != 0),
        },
        KIND_DATA => Frame::Data(payload),
        _ => match payload[..] {
            [r0, r1, c0, c1] => Frame::Winsize {
                rows: u16::from_le_bytes([r0, r1]),
                cols: u16::from_le_bytes([c0, c1]),
            },
            _ => return Err(DecodeError::BadWinsize),
        },
    };
    Ok(Some(frame))
}

pub fn winsize_payload(rows: u16, cols: u16) -> [u8; 4] {
    let [r0, r1] = rows.to_le_bytes();
    let [c0, c1] = cols.to_le_bytes();
    [r0, r1, c0, c1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial_frames() {
        let mut wire = Vec::new();
        encode(KIND_HELLO, &[HELLO_SEND_LOG], &mut wire);
        encode(KIND_WINSIZE, &winsize_payload(24, 80), &mut wire);
        let big = vec![7u8; MAX_PAYLOAD + 10];
        encode(KIND_DATA, &big, &mut wire);
        let mut buf = Vec::new();
        let mut frames = Vec::new();
        // Feed byte by byte: decoding must wait for whole frames.
        for b in wire {
            buf.push(b);
            while let Some(f) = decode(&mut buf).expect("valid") {
                frames.push(f);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(frames[0], Frame::Hello { send_log: true });
        assert_eq!(frames[1], Frame::Winsize { rows: 24, cols: 80 });
        assert_eq!(frames[2], Frame::Data(vec![7; MAX_PAYLOAD]));
        assert_eq!(frames[3], Frame::Data(vec![7; 10]));
        assert_eq!(frames.len(), 4);
    }

    #[test]
    fn garbage_is_refused() {
        let mut buf = vec![b'X', 0, 0];
        assert_eq!(decode(&mut buf), Err(DecodeError::UnknownKind(b'X')));
        let mut buf = vec![KIND_DATA, 0xff, 0xff];
        assert_eq!(decode(&mut buf), Err(DecodeError::TooLong(0xffff)));
        let mut buf = vec![KIND_WINSIZE, 1, 0, 9];
        assert_eq!(decode(&mut buf), Err(DecodeError::BadWinsize));
    }
}
