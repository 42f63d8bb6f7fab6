//! The `http` fuzz target: the input is an HTTP/1.1 request parsed by `httparse` (crates.io,
//! `default-features = false`, so no_std), then its headers are walked the way a server would
//! (`Host`, `Content-Length`, `Transfer-Encoding: chunked` with the first chunk size parsed by
//! `httparse::parse_chunk_size`, `Connection`, `Expect`) and the body checked against them.
//!
//! The planted bug: a request whose method starts with [`MAGIC`] (`PWN`, a valid token). The
//! method is compared one byte per branch, each matched byte with a side effect (an atomic
//! store), so every matched byte is a new edge for a coverage-guided fuzzer; the method is known
//! as soon as `httparse` has read it (`"PWN "` is enough, the rest may be partial).
//!
//! Shared by the guest example (`guest/sdk/examples/http.rs`, no_std) and the native fuzz
//! bench (std, included with `#[path]`): only `core`, `alloc` and `httparse` are used; the
//! including crate provides `extern crate alloc`. Invariant: `run` never panics on any input
//! (every slice index is checked); `Err` is only the planted bug.

use alloc::vec::Vec;

/// The method prefix behind which the planted bug sits.
pub const MAGIC: &[u8] = b"PWN";
/// Most headers a request may have (more: `httparse::Error::TooManyHeaders`).
pub const MAX_HEADERS: usize = 32;

/// What the target does with a header's value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    Expect,
}

/// The header names the target acts on (lower case; matched case-insensitively).
pub struct State {
    known: Vec<(&'static [u8], Kind)>,
}

/// How far the last input matched [`MAGIC`] (the per-byte side effect).
static DEPTH: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Builds the header table (before `snapshot_here` in the guest).
pub fn setup() -> State {
    State {
        known: alloc::vec![
            (&b"host"[..], Kind::Host),
            (b"content-length", Kind::ContentLength),
            (b"transfer-encoding", Kind::TransferEncoding),
            (b"connection", Kind::Connection),
            (b"expect", Kind::Expect),
        ],
    }
}

impl State {
    fn kind(&self, name: &str) -> Option<Kind> {
        self.known
            .iter()
            .find(|(k, _)| name.as_bytes().eq_ignore_ascii_case(k))
            .map(|&(_, kind)| kind)
    }
}

/// The planted bug: `Err` when `method` starts with [`MAGIC`], checked byte by byte.
fn check_method(method: &[u8]) -> Result<(), &'static str> {
    for (i, &want) in MAGIC.iter().enumerate() {
        if method.get(i) != Some(&want) {
            return Ok(());
        }
        DEPTH.store(i + 1, core::sync::atomic::Ordering::Relaxed);
        if i + 1 == MAGIC.len() {
            return Err("planted bug: http method PWN");
        }
    }
    Ok(())
}

/// Parses a decimal `Content-Length` (at most 12 digits, no sign or spaces inside).
fn content_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 12 {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Parses `input` as an HTTP/1.1 request and answers as a small server would; the value is a
/// status: 1 incomplete request, 10..=16 a parse error (`httparse::Error`), 20..=29 a
/// request refused after its headers (400-like), otherwise 100 + a digest of what was
/// understood (method, path, version, headers, body).
pub fn run(state: &State, input: &[u8]) -> Result<u64, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(input);
    if let Some(method) = req.method {
        check_method(method.as_bytes())?;
    }
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(1),
        Err(e) => {
            return Ok(10
                + match e {
                    httparse::Error::HeaderName => 0,
                    httparse::Error::HeaderValue => 1,
                    httparse::Error::NewLine => 2,
                    httparse::Error::Status => 3,
                    httparse::Error::Token => 4,
                    httparse::Error::TooManyHeaders => 5,
                    httparse::Error::Version => 6,
                })
        }
    };
    let body = input.get(head_len..).unwrap_or(&[]);
    let (mut host, mut length, mut chunked) = (false, None, false);
    let mut keep_alive = req.version == Some(1);
    let mut digest = 0u64;
    for h in req.headers.iter() {
        match state.kind(h.name) {
            Some(Kind::Host) => {
                if host || h.value.is_empty() {
                    return Ok(20); // a second or empty Host
                }
                host = true;
            }
            Some(Kind::ContentLength) => match (content_length(h.value), length) {
                (None, _) => return Ok(21),
                (Some(a), Some(b)) if a != b => return Ok(22), // conflicting lengths
                (Some(a), _) => length = Some(a),
            },
            Some(Kind::TransferEncoding) => {
                chunked = h.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
                if !chunked {
                    return Ok(23); // an encoding this server does not speak
                }
            }
            Some(Kind::Connection) => {
                let v = h.value.trim_ascii();
                if v.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if v.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
            Some(Kind::Expect) => {
                if !h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                    return Ok(24); // 417
                }
                digest += 3;
            }
            None => digest += 1,
        }
    }
    if req.version == Some(1) && !host {
        return Ok(25); // HTTP/1.1 requires Host
    }
    if chunked && length.is_some() {
        return Ok(26); // both framings: request smuggling, refused
    }
    if chunked {
        match httparse::parse_chunk_size(body) {
            Ok(httparse::Status::Complete((_, size))) => digest += size.min(1000),
            Ok(httparse::Status::Partial) => return Ok(27),
            Err(_) => return Ok(28),
        }
    } else if let Some(n) = length {
        if (body.len() as u64) < n {
            return Ok(29); // the body is shorter than announced
        }
        digest += n.min(1000);
    }
    let path = req.path.unwrap_or("");
    digest += path.split('/').filter(|s| !s.is_empty()).count() as u64 * 7;
    digest += req.method.map_or(0, |m| m.len() as u64);
    Ok(100 + (digest + u64::from(keep_alive)) % 100)
}
