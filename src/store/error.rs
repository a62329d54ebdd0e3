//! What went wrong talking to a destination, in one error type for every
//! backend, and whether another try can cure it.

use crate::error::Class;

/// An S3 error message as a person reads it, on one line: object_store appends
/// the server's XML error document; only its Code and Message are kept.
pub fn readable(message: &str) -> String {
    let Some(at) = message.find("<?xml") else {
        return message.to_string();
    };
    let xml = &message[at..];
    let head = message[..at].trim_end();
    match (xml_field(xml, "Code"), xml_field(xml, "Message")) {
        (Some(code), Some(text)) if !text.is_empty() => format!("{head} {code} ({text})"),
        (Some(code), _) => format!("{head} {code}"),
        _ => head.to_string(),
    }
}

/// A request that never reached a server, by why: the kind an operator acts
/// on differently (a typo in the endpoint, a server down, a certificate, a
/// firewall). Read from the error's source chain: reqwest and hyper keep their
/// error types private, but their messages and the `io::Error` at the bottom
/// of the chain say which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unreachable {
    NoSuchHost,
    Refused,
    Tls,
    Timeout,
}

impl Unreachable {
    fn of(e: &(dyn std::error::Error + 'static)) -> Option<Unreachable> {
        let mut cur = Some(e);
        // Bounded: error chains are a handful of links deep.
        for _ in 0..16 {
            let Some(err) = cur else { break };
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => return Some(Unreachable::Refused),
                    std::io::ErrorKind::TimedOut => return Some(Unreachable::Timeout),
                    _ => {}
                }
            }
            let text = err.to_string();
            if text.starts_with("dns error") || text.contains("failed to lookup address") {
                return Some(Unreachable::NoSuchHost);
            }
            if text.contains("certificate") || text.contains("tls handshake") {
                return Some(Unreachable::Tls);
            }
            cur = err.source();
        }
        None
    }

    fn words(self) -> &'static str {
        match self {
            Unreachable::NoSuchHost => "no such host: the endpoint's name does not resolve",
            Unreachable::Refused => "connection refused: nothing listens at the endpoint",
            Unreachable::Tls => {
                "TLS failed: the endpoint's certificate or protocol was not accepted (a certificate signed by a private CA needs that CA in the table's ca_file)"
            }
            Unreachable::Timeout => "no answer: the connection timed out",
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Unreachable::NoSuchHost => "dns",
            Unreachable::Refused => "connection_refused",
            Unreachable::Tls => "tls",
            Unreachable::Timeout => "timeout",
        }
    }
}

/// A client error as a person reads it: a request that never reached the
/// server says why in plain words, with the system's own message; an answer
/// from the server keeps its S3 code and message on one line.
pub(super) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let Some(u) = Unreachable::of(e) else {
        let mut text = e.to_string();
        // reqwest says only "error sending request for url (...)": its source says why.
        if let Some(cause) = e.source().filter(|_| e.is::<reqwest::Error>()) {
            text = format!("{text}: {cause}");
        }
        return readable(&text);
    };
    // The innermost message is the system's (os error, resolver).
    let mut deepest = e.to_string();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    for _ in 0..16 {
        let Some(err) = cur else { break };
        deepest = err.to_string();
        cur = err.source();
    }
    let url = e
        .to_string()
        .split_whitespace()
        .find(|w| w.starts_with("http://") || w.starts_with("https://"))
        .map(|u| format!(" ({u})"))
        .unwrap_or_default();
    format!("{}{url}: {deepest}", u.words())
}

/// What went wrong talking to a destination.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {key}: {source}")]
    Io {
        op: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {key}: {}", describe(source))]
    Remote {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    /// A request to OCI's API that got no answer.
    #[error("{op} {key}: {}", describe(source))]
    Http {
        op: &'static str,
        key: String,
        #[source]
        source: reqwest::Error,
    },
    /// An error answer of OCI's API.
    #[error("{op} {key}: {answer}")]
    Oci {
        op: &'static str,
        key: String,
        answer: Box<OciAnswer>,
    },
    #[error("{op} {key}: {message}")]
    Check {
        op: &'static str,
        key: String,
        message: String,
    },
    /// An answer that makes no sense (no upload id, no ETag, a malformed
    /// checksum): another try would get the same.
    #[error("{op} {key}: the store's answer makes no sense: {message}")]
    Answer {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("cannot set up destination: {0}")]
    Setup(String),
    /// A source object that is not there.
    #[error("{key}: no such object ({what}); check the URL")]
    Missing { key: String, what: String },
    #[error("{key:?} cannot be an object key: {message}; rename the file")]
    Key { key: String, message: String },
}

pub use crate::oci::client::OciAnswer;

impl StoreError {
    /// A failed request to an OCI API, as a `StoreError` of `op` on `key`.
    pub fn from_oci(op: &'static str, key: &str, f: crate::oci::client::Failure) -> StoreError {
        use crate::oci::client::Failure;
        match f {
            Failure::Url(message) => StoreError::Key {
                key: key.to_string(),
                message: format!("no URL can carry it ({message})"),
            },
            Failure::Http(source) => StoreError::Http {
                op,
                key: key.to_string(),
                source,
            },
            Failure::Answer(answer) => StoreError::Oci {
                op,
                key: key.to_string(),
                answer,
            },
        }
    }

    /// A success answer whose JSON could not be read.
    pub fn from_json(
        op: &'static str,
        key: &str,
        f: crate::oci::client::JsonFailure,
    ) -> StoreError {
        use crate::oci::client::JsonFailure;
        match f {
            JsonFailure::Http(source) => StoreError::Http {
                op,
                key: key.to_string(),
                source,
            },
            JsonFailure::Shape(message) => StoreError::Answer {
                op,
                key: key.to_string(),
                message,
            },
        }
    }
}

/// S3 error codes that say the bytes did not arrive as sent.
const CHECKSUM_CODES: &[&str] = &[
    "BadDigest",
    "InvalidDigest",
    "XAmzContentChecksumMismatch",
    "XAmzContentSHA256Mismatch",
];

/// S3 error codes that ask the client to slow down.
const SLOW_DOWN_CODES: &[&str] = &["SlowDown", "Throttling", "ThrottlingException"];

/// Further codes of a 4xx answer that another try may cure (besides the two
/// lists above): the body was cut short, or the server was busy.
const OTHER_RETRYABLE_CODES: &[&str] = &[
    "IncompleteBody",
    "RequestTimeout",
    "TooManyRequests",
    "InternalError",
];

/// What is known of a failed S3 request. object_store keeps its request error
/// type private, so the HTTP status is read from that error's own message
/// ("Server returned non-2xx status code: 400 Bad Request: <body>"), never
/// from the whole text, whose URL holds upload ids that may contain any digits.
#[derive(Debug, Default, PartialEq)]
struct RemoteFailure {
    status: Option<u16>,
    code: Option<String>,
    http: Option<object_store::client::HttpErrorKind>,
}

impl RemoteFailure {
    fn of(e: &object_store::Error) -> RemoteFailure {
        let mut f = RemoteFailure::default();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        // Bounded: error chains are a handful of links deep.
        for _ in 0..16 {
            let Some(err) = cur else { break };
            if let Some(h) = err.downcast_ref::<object_store::client::HttpError>() {
                f.http = Some(h.kind());
            }
            f.read(&err.to_string());
            cur = err.source();
        }
        f
    }

    fn read(&mut self, text: &str) {
        if let Some(rest) = text.strip_prefix("Server returned non-2xx status code: ") {
            self.status = rest.get(..3).and_then(|s| s.parse().ok());
            self.code = xml_field(rest, "Code");
        } else if let Some(rest) = text.strip_prefix("Server returned error response: ") {
            self.code = xml_field(rest, "Code");
        }
    }

    fn code_in(&self, list: &[&str]) -> bool {
        self.code.as_deref().is_some_and(|c| list.contains(&c))
    }
}

/// The text of the first `<tag>` element in an XML document, if any.
fn xml_field(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..start + len].trim().to_string())
}

impl StoreError {
    /// [`Class::Retry`] for what another try after a pause may cure (see
    /// [`StoreError::retryable`]); [`Class::Refuse`] for a file name that
    /// cannot be a key; [`Class::Fatal`] for the rest: refused credentials,
    /// a missing bucket or upload, a request the server will never accept.
    /// The object asked for is not there.
    pub fn is_missing(&self) -> bool {
        match self {
            StoreError::Missing { .. } => true,
            StoreError::Remote { source, .. } => {
                matches!(source, object_store::Error::NotFound { .. })
            }
            StoreError::Oci { answer, .. } => answer.status == 404,
            StoreError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }

    pub fn class(&self) -> Class {
        match self {
            StoreError::Key { .. } | StoreError::Missing { .. } => Class::Refuse,
            _ if self.retryable() => Class::Retry,
            _ => Class::Fatal,
        }
    }

    /// Worth another try after a pause: network trouble, timeouts, 5xx,
    /// throttling, a body damaged on its way. Not: refused credentials, a
    /// missing bucket or upload, a request the server will never accept.
    pub fn retryable(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::ResourceBusy
            ),
            StoreError::Remote { source, .. } => match source {
                object_store::Error::Generic { .. } => {
                    let f = RemoteFailure::of(source);
                    match f.status {
                        Some(s) if s >= 500 || s == 408 || s == 429 => true,
                        Some(_) => {
                            f.code_in(CHECKSUM_CODES)
                                || f.code_in(SLOW_DOWN_CODES)
                                || f.code_in(OTHER_RETRYABLE_CODES)
                        }
                        // No answer at all: the connection failed.
                        None => true,
                    }
                }
                object_store::Error::JoinError { .. } => true,
                _ => false,
            },
            StoreError::Check { .. } => true,
            // No answer: the connection failed, timed out or was cut; not a
            // request that could not be built or a redirect ferry does not follow.
            StoreError::Http { source, .. } => !(source.is_builder() || source.is_redirect()),
            // 409: a commit still running when its retry arrives, or another
            // writer of the object (Oracle's SDKs retry it too).
            StoreError::Oci { answer: a, .. } => a.passing() || a.checksum(),
            StoreError::Setup(_)
            | StoreError::Key { .. }
            | StoreError::Missing { .. }
            | StoreError::Answer { .. } => false,
        }
    }

    /// A low-cardinality reason for logs and metrics: checksum, slow_down,
    /// timeout, reset, server_error or other.
    pub fn reason(&self) -> &'static str {
        use object_store::client::HttpErrorKind as K;
        match self {
            StoreError::Check { .. } => "checksum",
            StoreError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::TimedOut => "timeout",
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe => "reset",
                _ => "other",
            },
            StoreError::Remote { source, .. } => {
                let f = RemoteFailure::of(source);
                if f.code_in(CHECKSUM_CODES) {
                    "checksum"
                } else if f.status == Some(503)
                    || f.status == Some(429)
                    || f.code_in(SLOW_DOWN_CODES)
                {
                    "slow_down"
                } else if f.status == Some(408)
                    || f.code_in(&["RequestTimeout"])
                    || f.http == Some(K::Timeout)
                {
                    "timeout"
                } else if f.status.is_some_and(|s| s >= 500) {
                    "server_error"
                } else if let Some(u) = f
                    .status
                    .is_none()
                    .then(|| Unreachable::of(source))
                    .flatten()
                {
                    u.reason()
                } else if f.status.is_none()
                    && matches!(f.http, Some(K::Connect | K::Request | K::Interrupted))
                {
                    "reset"
                } else {
                    "other"
                }
            }
            StoreError::Http { source, .. } => match Unreachable::of(source) {
                Some(u) => u.reason(),
                None if source.is_timeout() => "timeout",
                None => "reset",
            },
            StoreError::Oci { answer: a, .. } => match a.status {
                _ if a.checksum() => "checksum",
                429 | 503 => "slow_down",
                408 => "timeout",
                s if s >= 500 => "server_error",
                _ => "other",
            },
            StoreError::Setup(_)
            | StoreError::Key { .. }
            | StoreError::Missing { .. }
            | StoreError::Answer { .. } => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn s3_error_documents_become_one_readable_line() {
        let m = "Error performing PUT http://h/b/k?partNumber=2 in 236ms - Server returned non-2xx status code: 400 Bad Request: <?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>BadDigest</Code><Message>The Content-Md5 you specified did not match what we received.</Message><Resource>/b/k</Resource></Error>";
        assert_eq!(
            super::readable(m),
            "Error performing PUT http://h/b/k?partNumber=2 in 236ms - Server returned non-2xx status code: 400 Bad Request: BadDigest (The Content-Md5 you specified did not match what we received.)"
        );
        assert_eq!(
            super::readable("503 Slow Down: <?xml?><Error><Code>SlowDown</Code></Error>"),
            "503 Slow Down: SlowDown"
        );
        assert_eq!(super::readable("400: <?xml broken"), "400:");
        assert_eq!(super::readable("connection reset"), "connection reset");
    }

    #[test]
    fn the_status_comes_from_the_answer_not_from_the_url() {
        let mut f = super::RemoteFailure::default();
        f.read("Error performing PUT http://h/b/k?partNumber=1&uploadId=d3e4403f503 in 220.403ms - Server returned non-2xx status code: 400 Bad Request: <Error><Code>BadDigest</Code></Error>");
        assert_eq!(f.status, None, "only the request error's own text counts");
        f.read("Server returned non-2xx status code: 400 Bad Request: <?xml?><Error><Code>BadDigest</Code></Error>");
        assert_eq!(f.status, Some(400));
        assert!(f.code_in(super::CHECKSUM_CODES));
        let mut g = super::RemoteFailure::default();
        g.read("Server returned non-2xx status code: 400 Bad Request: <Error><Code>EntityTooSmall</Code></Error>");
        assert_eq!(g.code.as_deref(), Some("EntityTooSmall"));
        assert!(!g.code_in(super::CHECKSUM_CODES) && !g.code_in(super::SLOW_DOWN_CODES));
        assert!(!g.code_in(super::OTHER_RETRYABLE_CODES));
        let mut h = super::RemoteFailure::default();
        h.read("Server returned non-2xx status code: 503 Service Unavailable: ");
        assert_eq!((h.status, h.code), (Some(503), None));
    }
}
