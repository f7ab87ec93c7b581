//! The crate's one error type.
//!
//! Convention (STYLE.md, "What to avoid" 6 and 7): a variant names the cause; when there is an
//! underlying error it is kept as `#[source]` and *not* repeated in the message, so a chain printer
//! shows it exactly once. Messages are short capitalised sentences without a trailing period.

/// Shorthand for results of this crate.
pub type Result<T, E = CommonError> = std::result::Result<T, E>;

/// Every error of `vkm-common`: the image/stream codec and the /proc parsers.
#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    /// The stream does not start with [`crate::image::MAGIC`].
    #[error("Not a vkmigrate image (bad magic)")]
    BadMagic,

    /// The image's format major version differs from ours.
    #[error(
        "Unsupported image format version {major}.{minor} (this build reads {}.x)",
        crate::image::FORMAT_MAJOR
    )]
    UnsupportedVersion { major: u16, minor: u16 },

    /// The image needs required features (low 32 bits of the feature word) that we do not know.
    #[error("Image needs unknown required features {0:#x}")]
    UnknownRequiredFeatures(u64),

    /// The stream ended early; `what` names the part that was being read.
    #[error("Image is truncated in the {what}")]
    Truncated { what: &'static str },

    /// A blake3 hash did not match; `what` names the checked part.
    #[error("Checksum mismatch in the {what}")]
    Checksum { what: String },

    /// A length (from the stream or handed to a writer) is above its cap.
    #[error("The {what} is too large ({len} bytes, the cap is {cap})")]
    TooLarge {
        what: &'static str,
        len: u64,
        cap: u64,
    },

    /// A frame is structurally invalid (unknown kind, non-zero reserved bytes, bad field).
    #[error("Malformed frame (kind {kind:#04x}): {reason}")]
    BadFrame { kind: u8, reason: String },

    /// The image header is structurally invalid (non-zero reserved bytes).
    #[error("Malformed image header: {reason}")]
    BadHeader { reason: &'static str },

    /// Bytes follow the end frame.
    #[error("Data follows the end frame of the image")]
    TrailingData,

    /// A writer was called with arguments it cannot encode (caller bug, nothing was written).
    #[error("Invalid argument: {reason}")]
    InvalidArgument { reason: String },

    /// An earlier I/O or format error left the reader or writer in an unknown position.
    #[error("The image stream failed earlier and cannot be used any more")]
    Poisoned,

    /// I/O failed; `step` says what we were doing.
    #[error("I/O error while {step}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The CBOR metadata does not decode into the requested type.
    #[error("Cannot decode the CBOR metadata")]
    CborDecode(#[source] ciborium::de::Error<std::io::Error>),

    /// The metadata cannot be encoded as CBOR.
    #[error("Cannot encode the CBOR metadata")]
    CborEncode(#[source] ciborium::ser::Error<std::io::Error>),

    /// A protocol message (after the offer) does not decode, or has bytes after it.
    #[error("Cannot decode the message: {0}")]
    MsgDecode(String),

    /// A protocol message cannot be encoded.
    #[error("Cannot encode the message")]
    MsgEncode(#[source] postcard::Error),

    /// A UML's mconsole answered a request with its error flag set.
    #[error("UML's mconsole refused {command:?}: {reply}")]
    Mconsole { command: String, reply: String },

    /// Talking to a UML's mconsole socket failed (it is not running, or does not answer).
    #[error("Cannot {step} the UML mconsole at {socket}")]
    MconsoleIo {
        socket: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// A /proc file's text is malformed. `file` is the kind (`"smaps"`, `"status"`, ...), `line`
    /// the offending line (shortened to [`MAX_LINE_IN_ERROR`] bytes), `reason` what is wrong.
    #[error("Malformed /proc/PID/{file}: {reason} in line {line:?}")]
    Parse {
        file: &'static str,
        line: String,
        reason: String,
    },
}

/// At most this many bytes of an offending /proc line are kept in [`CommonError::Parse`].
pub const MAX_LINE_IN_ERROR: usize = 160;

impl CommonError {
    /// A [`CommonError::Parse`] holding at most [`MAX_LINE_IN_ERROR`] bytes of `line`.
    pub(crate) fn parse(file: &'static str, line: &str, reason: impl Into<String>) -> Self {
        let mut end = line.len().min(MAX_LINE_IN_ERROR);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        let mut kept = line[..end].to_owned();
        if end < line.len() {
            kept.push('…');
        }
        CommonError::Parse {
            file,
            line: kept,
            reason: reason.into(),
        }
    }

    /// A [`CommonError::Io`] for `step`, usable as `map_err(CommonError::io("reading x"))`.
    pub(crate) fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| CommonError::Io { step, source }
    }
}

/// `e` and its causes as one line, outermost first (`a: b: c`), for crates that report errors
/// as text without anyhow (logs, a refusal's reason).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
