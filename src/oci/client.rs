//! One signed conversation with an OCI API endpoint: Object Storage
//! (`store/oci.rs`) and Compute's image import (`import`) both speak through
//! a [`Client`], so there is one place where requests are signed, sent and
//! their error answers read.
//!
//! Promises: every request carries the signature of the profile's API key
//! over exactly the path, query and headers sent; a client talks only to the
//! endpoint it was made for (no proxy from the environment, no redirect);
//! an error answer becomes an [`OciAnswer`] with OCI's code, message and
//! `opc-request-id`, and a refused signature (401) says which profile and key
//! signed and whether this host's clock is the cause. No key material is
//! ever in an error.
//!
//! Design choice: HTTP/1.1 only. The signed `host` header must go out as
//! signed (HTTP/2 would send `:authority` in its place), and Oracle's SDKs
//! speak HTTP/1.1.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use reqwest::{Method, Response, StatusCode};

use super::profile::{self, Profile};
use super::sign::{self, Signer};

/// The most an error answer's body is read for its code and message.
const ERROR_BODY_MAX: usize = 64 << 10;

/// Beyond this, a 401's words name the clock as the cause (OCI refuses
/// signatures more than 300 s off; a Date header has 1 s resolution).
const SKEW_SAID_SECS: i64 = 240;

/// An OCI CLI profile with its API key loaded, ready to sign.
#[derive(Debug, Clone)]
pub struct Account {
    pub profile: Profile,
    pub signer: Arc<Signer>,
    /// "profile [NAME] of FILE, key KEY_ID", for the words of errors.
    pub who: String,
    /// What to log once: a key file others can read.
    pub warnings: Vec<String>,
}

impl Account {
    /// The profile `profile` of `config_file`, each falling back as the OCI
    /// CLI does: to `OCI_CLI_PROFILE` and `OCI_CLI_CONFIG_FILE`, then to
    /// `DEFAULT` and `~/.oci/config`.
    pub fn load(config_file: Option<&Path>, profile: Option<&str>) -> Result<Account, String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = PathBuf::from(env("HOME").unwrap_or_else(|| "/".into()));
        let file = profile::config_path(
            config_file.and_then(|p| p.to_str()),
            env("OCI_CLI_CONFIG_FILE").as_deref(),
            &home,
        );
        let pname = profile::profile_name(profile, env("OCI_CLI_PROFILE").as_deref());
        let prof = Profile::load(&file, &pname, &home).map_err(|e| e.to_string())?;
        let (signer, warnings) = prof.signer().map_err(|e| e.to_string())?;
        Ok(Account {
            who: format!(
                "profile [{pname}] of {}, key {}",
                file.display(),
                signer.key_id()
            ),
            profile: prof,
            signer: Arc::new(signer),
            warnings,
        })
    }
}

/// A request body.
pub enum Payload {
    None,
    /// An object's bytes (PutObject, UploadPart): not hashed for the signature.
    Object(Bytes),
    Json(Vec<u8>),
}

/// Why a request got no success answer.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The path cannot be made into a URL (an object name no URL can carry).
    #[error("no URL can carry it ({0})")]
    Url(String),
    /// No answer: the connection, TLS, a timeout.
    #[error(transparent)]
    Http(reqwest::Error),
    /// An error answer.
    #[error("{0}")]
    Answer(Box<OciAnswer>),
}

/// An error answer of OCI's API: its status, OCI's code and message, what an
/// operator can do about it, and the `opc-request-id` Oracle support asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciAnswer {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub advice: Option<String>,
    pub request_id: Option<String>,
}

impl std::fmt::Display for OciAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OCI answered {} {}", self.status, self.code)?;
        if !self.message.is_empty() {
            write!(f, " ({})", self.message)?;
        }
        if let Some(a) = &self.advice {
            write!(f, ": {a}")?;
        }
        match &self.request_id {
            Some(id) => write!(f, " [opc-request-id {id}]"),
            None => Ok(()),
        }
    }
}

impl OciAnswer {
    /// The service found the bytes not as their checksum says ("Unmatched
    /// Content CRC32C", "Unmatched Content MD5").
    pub fn checksum(&self) -> bool {
        self.status == 400 && self.message.contains("Unmatched Content")
    }

    /// Worth another try after a pause: throttling, a timeout, a conflict
    /// with a request still running, a server error (as Oracle's SDKs retry).
    pub fn passing(&self) -> bool {
        self.status >= 500 || matches!(self.status, 408 | 409 | 429)
    }
}

/// How a [`Client`] connects.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The whole of one request, answer included.
    pub request: Duration,
    pub connect: Duration,
}

/// Signs and sends requests to one endpoint.
pub struct Client {
    http: reqwest::Client,
    signer: Arc<Signer>,
    /// `https://HOST[:PORT]`, as configured.
    endpoint: String,
    /// The Host header, as signed.
    host: String,
    who: String,
}

impl Client {
    /// A client of `endpoint` (a scheme and host only) for `account`. Plain
    /// http is refused unless `allow_http`: the signatures would travel
    /// unencrypted. `example` is the endpoint to show in the refusal of a
    /// malformed one.
    pub fn new(
        account: &Account,
        endpoint: &str,
        example: &str,
        allow_http: bool,
        limits: Limits,
    ) -> Result<Client, String> {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let url = reqwest::Url::parse(&endpoint)
            .map_err(|e| format!("endpoint {endpoint:?} is not a URL: {e}"))?;
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => return Err(format!("endpoint {endpoint:?} has no host")),
        };
        if url.path() != "/" || url.query().is_some() {
            return Err(format!(
                "endpoint {endpoint:?} must be a scheme and host only, such as {example}"
            ));
        }
        match url.scheme() {
            "https" => {}
            "http" if allow_http => {}
            "http" => {
                return Err(format!(
                    "endpoint {endpoint} is plain http: the API key's signatures would \
                     travel unencrypted; use https, or allow_http = true on a trusted network"
                ));
            }
            other => return Err(format!("endpoint scheme {other:?}: use https")),
        }
        let http = reqwest::Client::builder()
            .timeout(limits.request)
            .connect_timeout(limits.connect)
            .pool_idle_timeout(Duration::from_secs(30))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .http1_only()
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Client {
            http,
            signer: account.signer.clone(),
            endpoint,
            host,
            who: account.who.clone(),
        })
    }

    /// `https://HOST[:PORT]`, without a trailing '/'.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Which profile and key sign, for the words of errors.
    pub fn who(&self) -> &str {
        &self.who
    }

    /// Signs and sends one request (`path_and_query` already encoded); an
    /// error answer becomes [`Failure::Answer`], a refused signature with
    /// the advice that says why.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        payload: Payload,
        extra: &[(&'static str, String)],
    ) -> Result<Response, Failure> {
        let url = reqwest::Url::parse(&format!("{}{path_and_query}", self.endpoint))
            .map_err(|e| Failure::Url(e.to_string()))?;
        // Signed exactly as sent: the path and query as the URL holds them.
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let date = httpdate::fmt_http_date(SystemTime::now());
        let body = match &payload {
            Payload::None => sign::Body::None,
            Payload::Object(_) => sign::Body::Object,
            Payload::Json(b) => sign::Body::Signed {
                content_type: "application/json",
                bytes: b,
            },
        };
        let signed = self.signer.sign(&sign::Request {
            method: method.as_str(),
            path_and_query: &target,
            host: &self.host,
            date: &date,
            body,
        });
        let mut req = self
            .http
            .request(method, url)
            .header("date", &date)
            .header("host", &self.host)
            .header("authorization", signed.authorization);
        for (k, v) in signed.headers.iter().chain(extra) {
            req = req.header(*k, v);
        }
        req = match payload {
            Payload::None => req,
            Payload::Object(b) => req.body(b),
            Payload::Json(b) => req.body(b),
        };
        let resp = req.send().await.map_err(Failure::Http)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(Failure::Answer(Box::new(self.answer(resp).await)))
    }

    /// An error answer in words: OCI's code and message; for a refused
    /// signature, what to check.
    async fn answer(&self, resp: Response) -> OciAnswer {
        let status = resp.status();
        let request_id = header(&resp, "opc-request-id");
        // How far this host's clock is from the service's, by its Date.
        let skew = header(&resp, "date")
            .and_then(|d| httpdate::parse_http_date(&d).ok())
            .map(|theirs| clock_skew(SystemTime::now(), theirs));
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(Ok(chunk)) = stream.next().await {
            body.extend_from_slice(&chunk);
            if body.len() >= ERROR_BODY_MAX {
                break;
            }
        }
        #[derive(serde::Deserialize, Default)]
        struct Doc {
            #[serde(default)]
            code: String,
            #[serde(default)]
            message: String,
        }
        let doc: Doc = serde_json::from_slice(&body).unwrap_or_default();
        let code = if doc.code.is_empty() {
            status.canonical_reason().unwrap_or("").replace(' ', "")
        } else {
            doc.code
        };
        let advice = (status == StatusCode::UNAUTHORIZED).then(|| match skew {
            Some(secs) if secs.abs() > SKEW_SAID_SECS => format!(
                "OCI did not accept the signature of {}: this host's clock is {} s {} \
                 OCI's (by the answer's Date), and OCI refuses a signature more than 5 \
                 minutes off: set the clock (timedatectl set-ntp true, or chrony), \
                 compare `date -u` with a time server",
                self.who,
                secs.abs(),
                if secs > 0 { "behind" } else { "ahead of" }
            ),
            _ => format!(
                "OCI did not accept the signature of {}: the fingerprint may not be the \
                 key's (`openssl rsa -pubout -outform DER -in KEY_FILE | openssl md5 -c`), \
                 the public key may not be uploaded to the user (Identity, Users, API \
                 Keys), or the clock may be more than 5 minutes off (`date -u`{})",
                self.who,
                skew.map(|s| format!("; it agrees with OCI's within {} s", s.abs().max(1)))
                    .unwrap_or_default()
            ),
        });
        OciAnswer {
            status: status.as_u16(),
            code,
            message: doc.message.chars().take(500).collect(),
            advice,
            request_id,
        }
    }
}

/// Seconds `theirs` is ahead of `ours` (negative: behind).
fn clock_skew(ours: SystemTime, theirs: SystemTime) -> i64 {
    match theirs.duration_since(ours) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// A success answer's JSON read whole as `T`; `Err` says what came instead
/// (`what` says what it should have been).
pub async fn json<T: serde::de::DeserializeOwned>(
    resp: Response,
    what: &str,
) -> Result<T, JsonFailure> {
    let text = resp.text().await.map_err(JsonFailure::Http)?;
    serde_json::from_str(&text)
        .map_err(|e| JsonFailure::Shape(format!("the answer is not {what} ({e}): {text:.200}")))
}

/// Why a success answer's JSON could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JsonFailure {
    /// The body did not arrive whole.
    #[error(transparent)]
    Http(reqwest::Error),
    /// It arrived, and is not what the API promises.
    #[error("{0}")]
    Shape(String),
}

/// An answer's header, if it is text.
pub fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// What stays as it is in one segment of an OCI API path: RFC 3986's
/// unreserved characters; '/' in an object name is encoded, as Oracle's Go
/// SDK does (`url.PathEscape`).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `s` as one segment of an API path.
pub fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// An OCI region id: lowercase words and a number, dash-separated, such as
/// `us-ashburn-1`, `eu-frankfurt-1`, `uk-gov-london-1`. AWS's names such as
/// `us-east-1` have the same shape; what this refuses is a name OCI never
/// uses (empty, upper case, no trailing number, `auto`).
pub fn is_region_id(region: &str) -> bool {
    let words: Vec<&str> = region.split('-').collect();
    words.len() >= 3
        && words
            .last()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        && words[..words.len() - 1]
            .iter()
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_ids() {
        for ok in [
            "us-ashburn-1",
            "eu-frankfurt-1",
            "uk-gov-london-1",
            "us-langley-1",
        ] {
            assert!(is_region_id(ok), "{ok}");
        }
        for bad in [
            "",
            "auto",
            "us-ashburn",
            "US-ASHBURN-1",
            "us--1",
            "iad",
            "us-ashburn-1a",
        ] {
            assert!(!is_region_id(bad), "{bad}");
        }
    }

    #[test]
    fn clock_skew_is_signed_seconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(clock_skew(t, t + Duration::from_secs(600)), 600);
        assert_eq!(clock_skew(t, t - Duration::from_secs(601)), -601);
        assert_eq!(clock_skew(t, t), 0);
    }

    #[test]
    fn object_names_are_one_path_segment() {
        assert_eq!(segment("ex/100% a#b.qcow2"), "ex%2F100%25%20a%23b.qcow2");
    }
}
