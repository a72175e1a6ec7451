//! The admin token: every route but `/healthz` (and the login form itself) needs it, as
//! `Authorization: Bearer <token>` or the `pomelo_admin` cookie that `POST /login` sets (HttpOnly,
//! SameSite=Strict). Tokens are compared in constant time.
//!
//! CSRF: a state-changing request (anything but GET/HEAD/OPTIONS) that is authenticated only by the
//! cookie must also look same-origin: its `Origin` header, when present, names this server's `Host`, and
//! its `Sec-Fetch-Site`, when present, is `same-origin` or `none`. Bearer requests (the CLI, scripts) are
//! not cookie-driven, so they are not checked. The checks are pure functions ([`check`]) wrapped in one
//! warp filter ([`guard`]).

use std::sync::Arc;

use warp::http::header::{AUTHORIZATION, COOKIE as COOKIE_HEADER, HOST, ORIGIN};
use warp::http::{HeaderMap, Method};
use warp::{Filter, Rejection};

/// The cookie the login form sets.
pub const COOKIE: &str = "pomelo_admin";

/// No valid token.
#[derive(Debug)]
pub struct Unauthorized;
impl warp::reject::Reject for Unauthorized {}

/// A cookie-authenticated mutation from another origin.
#[derive(Debug)]
pub struct CrossOrigin;
impl warp::reject::Reject for CrossOrigin {}

/// How a request proved it knows the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Bearer,
    Cookie,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Unauthorized,
    CrossOrigin,
}

/// Passes only requests that carry the token (and, for cookie-authenticated mutations, come from this origin).
pub fn guard(token: Arc<str>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::method()
        .and(warp::header::headers_cloned())
        .and_then(move |method: Method, headers: HeaderMap| {
            let verdict = check(&token, &method, &headers);
            async move {
                match verdict {
                    Ok(_) => Ok(()),
                    Err(Denied::Unauthorized) => Err(warp::reject::custom(Unauthorized)),
                    Err(Denied::CrossOrigin) => Err(warp::reject::custom(CrossOrigin)),
                }
            }
        })
        .untuple_one()
}

/// The whole decision for one request.
pub fn check(token: &str, method: &Method, headers: &HeaderMap) -> Result<Via, Denied> {
    let via = authenticate(token, headers).ok_or(Denied::Unauthorized)?;
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if via == Via::Cookie && !safe && !same_origin(headers) {
        return Err(Denied::CrossOrigin);
    }
    Ok(via)
}

/// Which credential, if any, carries the right token. A valid bearer wins over the cookie.
pub fn authenticate(token: &str, headers: &HeaderMap) -> Option<Via> {
    let bearer = headers.get_all(AUTHORIZATION).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        let (scheme, given) = v.trim().split_once(' ').unwrap_or(("", ""));
        scheme.eq_ignore_ascii_case("bearer") && same(given.trim(), token)
    });
    if bearer {
        return Some(Via::Bearer);
    }
    cookies(headers, COOKIE).any(|given| same(&given, token)).then_some(Via::Cookie)
}

/// Every value of the cookie `name` in the request (percent-decoded, as [`login_cookie`] encodes it).
pub fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = String> + 'a {
    headers.get_all(COOKIE_HEADER).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).filter_map(
        move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k.trim() == name).then(|| decode(v.trim().trim_matches('"')))
        },
    )
}

/// Whether a request looks as if this server's own page sent it.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if !matches!(site, "same-origin" | "none") {
            return false;
        }
    }
    let Some(origin) = text(ORIGIN.as_str()) else { return true };
    let Some(host) = text(HOST.as_str()) else { return false };
    let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    authority.is_some_and(|a| a.trim_end_matches('/').eq_ignore_ascii_case(host.trim()))
}

/// `Set-Cookie` value after a good login. Session cookie: it ends with the browser.
pub fn login_cookie(token: &str) -> String {
    format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", encode(token))
}

/// `Set-Cookie` value that removes the cookie.
pub fn logout_cookie() -> String {
    format!("{COOKIE}=; Max-Age=0; HttpOnly; SameSite=Strict; Path=/")
}

/// Cookie values may only hold RFC 6265 cookie-octets; anything else (and `%`) is percent-encoded.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        let octet = matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e) && b != b'%';
        if octet {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Constant-time equality: the time taken does not depend on where the strings differ.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "abcdef0123456789";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn compares_whole_strings() {
        assert!(same(T, "abcdef0123456789"));
        assert!(!same(T, "abcdef012345678"));
        assert!(!same(T, "abcdef0123456780"));
        assert!(!same("", "x"));
    }

    #[test]
    fn bearer_or_cookie() {
        let bearer = headers(&[("authorization", "Bearer abcdef0123456789")]);
        assert_eq!(check(T, &Method::POST, &bearer), Ok(Via::Bearer));
        let lower = headers(&[("authorization", "bearer abcdef0123456789")]);
        assert_eq!(authenticate(T, &lower), Some(Via::Bearer));
        let wrong = headers(&[("authorization", "Bearer nope"), ("cookie", "pomelo_admin=nope")]);
        assert_eq!(check(T, &Method::GET, &wrong), Err(Denied::Unauthorized));
        let cookie = headers(&[("cookie", "theme=dark; pomelo_admin=abcdef0123456789; x=y")]);
        assert_eq!(check(T, &Method::GET, &cookie), Ok(Via::Cookie));
        assert_eq!(check(T, &Method::GET, &HeaderMap::new()), Err(Denied::Unauthorized));
    }

    #[test]
    fn cookie_mutations_must_be_same_origin() {
        let base = [("cookie", "pomelo_admin=abcdef0123456789"), ("host", "127.0.0.1:7001")];
        let with = |extra: &[(&'static str, &str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            check(T, &Method::POST, &headers(&all))
        };
        assert_eq!(with(&[]), Ok(Via::Cookie), "no Origin: older clients, SameSite covers them");
        assert_eq!(with(&[("origin", "http://127.0.0.1:7001")]), Ok(Via::Cookie));
        assert_eq!(with(&[("origin", "http://evil.example")]), Err(Denied::CrossOrigin));
        assert_eq!(with(&[("origin", "null")]), Err(Denied::CrossOrigin));
        assert_eq!(with(&[("origin", "http://127.0.0.1:7002")]), Err(Denied::CrossOrigin));
        assert_eq!(with(&[("sec-fetch-site", "cross-site")]), Err(Denied::CrossOrigin));
        assert_eq!(with(&[("sec-fetch-site", "same-origin"), ("origin", "http://127.0.0.1:7001")]), Ok(Via::Cookie));
        // Reads are not checked; bearer requests are not cookie-driven.
        let mut get = base.to_vec();
        get.push(("origin", "http://evil.example"));
        assert_eq!(check(T, &Method::GET, &headers(&get)), Ok(Via::Cookie));
        let bearer = headers(&[("authorization", "Bearer abcdef0123456789"), ("origin", "http://evil.example")]);
        assert_eq!(check(T, &Method::POST, &bearer), Ok(Via::Bearer));
    }

    #[test]
    fn cookie_values_round_trip() {
        assert_eq!(login_cookie(T), "pomelo_admin=abcdef0123456789; HttpOnly; SameSite=Strict; Path=/");
        let odd = "a b;c,d\"e\\f%41é";
        let set = login_cookie(odd);
        let value = set.trim_start_matches("pomelo_admin=").split(';').next().unwrap_or("");
        assert!(!value.contains([' ', ';', ',', '"', '\\']), "{value}");
        let h = headers(&[("cookie", &format!("pomelo_admin={value}"))]);
        assert_eq!(authenticate(odd, &h), Some(Via::Cookie));
    }
}
