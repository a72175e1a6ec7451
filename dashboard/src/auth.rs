//! The admin token: every route but `/healthz` (and the login form itself) needs it, as
//! `Authorization: Bearer <token>` or the `pomelo_admin` session cookie that `POST /login` sets (HttpOnly,
//! SameSite=Strict). The cookie is never the token: it is `id.expiry.tag`, a random id and its expiry
//! signed with the token (HMAC-SHA256), so it tells nothing about the token, ends after [`SESSION_TTL`] or
//! at logout, and a new master with the same token (one that adopted the cluster) still accepts it.
//! Tokens and tags are compared in constant time.
//!
//! Wrong credentials are throttled: each one is answered only after [`FAILURE_DELAY`], one at a time
//! across the whole server, so guessing runs at most ~10 tries a second however many sockets an attacker
//! opens; past [`MAX_WAITING`] queued failures the rest are answered 429 at once (bounded memory).
//!
//! Every request, even `/healthz`, must name this server in `Host` ([`HostAllow`]): an IP literal,
//! `localhost`, or a name listed in `master.adminHosts`, with the admin port. A page on another site that
//! rebinds its name to 127.0.0.1 (DNS rebinding) sends its own name and gets 421.
//!
//! CSRF: a state-changing request (anything but GET/HEAD/OPTIONS) that is authenticated only by the
//! cookie must also look same-origin: its `Origin` header, when present, names this server's `Host`, and
//! its `Sec-Fetch-Site`, when present, is `same-origin` or `none`. Bearer requests (the CLI, scripts) are
//! not cookie-driven, so they are not checked. The checks are pure functions ([`check`]) wrapped in one
//! warp filter ([`guard`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warp::http::header::{AUTHORIZATION, COOKIE as COOKIE_HEADER, HOST, ORIGIN};
use warp::http::{HeaderMap, Method};
use warp::{Filter, Rejection};

/// The cookie the login form sets.
pub const COOKIE: &str = "pomelo_admin";
/// How long a login session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Logged-out sessions remembered at once (until they would have expired); past it a logout only clears
/// the browser's cookie.
pub const MAX_LOGGED_OUT: usize = 1024;
/// How long each wrong credential waits for its answer (one at a time).
pub const FAILURE_DELAY: Duration = Duration::from_millis(100);
/// Wrong credentials waiting for their answer at once; more are refused with 429 straight away.
pub const MAX_WAITING: usize = 64;

/// No valid token.
#[derive(Debug)]
pub struct Unauthorized;
impl warp::reject::Reject for Unauthorized {}

/// Too many wrong credentials are waiting already.
#[derive(Debug)]
pub struct Throttled;
impl warp::reject::Reject for Throttled {}

/// A cookie-authenticated mutation from another origin.
#[derive(Debug)]
pub struct CrossOrigin;
impl warp::reject::Reject for CrossOrigin {}

/// A `Host` that is not this server.
#[derive(Debug)]
pub struct WrongHost;
impl warp::reject::Reject for WrongHost {}

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

/// The token, the logged-out sessions and the failure throttle: one per admin server.
pub struct Keys {
    token: Arc<str>,
    /// Session id → when it was logged out.
    logged_out: Mutex<HashMap<String, Instant>>,
    failing: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
}

impl Keys {
    pub fn new(token: Arc<str>) -> Arc<Keys> {
        Arc::new(Keys {
            token,
            logged_out: Mutex::new(HashMap::new()),
            failing: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
        })
    }

    /// Whether `given` is the admin token.
    pub fn is_token(&self, given: &str) -> bool {
        same(given, &self.token)
    }

    /// A new session after a good login: `id.expiry.mac`, signed with the token (HMAC-SHA256), so it is not
    /// the token, tells nothing about it, ends after [`SESSION_TTL`], and a new master with the same token
    /// (one that adopted the cluster) still accepts it: the page reconnects without a new login.
    pub fn open_session(&self) -> Option<String> {
        let id = pomelo_proto::auth::nonce().ok()?;
        let expiry = unix_now() + SESSION_TTL.as_secs();
        Some(format!("{id}.{expiry}.{}", self.mac(&id, expiry)))
    }

    fn mac(&self, id: &str, expiry: u64) -> String {
        let expiry = expiry.to_string();
        let parts: [&[u8]; 4] = [b"pomelo-rs admin session v1\0", id.as_bytes(), b"\0", expiry.as_bytes()];
        pomelo_proto::auth::tag_hex(self.token.as_bytes(), &parts)
    }

    /// Whether `cookie` is a session this token signed, not expired and not logged out.
    pub fn is_session(&self, cookie: &str) -> bool {
        let mut parts = cookie.splitn(3, '.');
        let (Some(id), Some(expiry), Some(mac)) = (parts.next(), parts.next(), parts.next()) else { return false };
        let Ok(expiry) = expiry.parse::<u64>() else { return false };
        if expiry <= unix_now() || !pomelo_proto::auth::valid_nonce(id) || !same(mac, &self.mac(id, expiry)) {
            return false;
        }
        !self.logged_out.lock().unwrap_or_else(|e| e.into_inner()).contains_key(id)
    }

    /// Ends the sessions named by the request's cookies (remembered until they would have expired, at most
    /// [`MAX_LOGGED_OUT`] of them; a master restart forgets them, the expiry still holds).
    pub fn close_sessions(&self, headers: &HeaderMap) {
        let ids: Vec<String> = cookies(headers, COOKIE).filter_map(|c| c.split('.').next().map(String::from)).collect();
        let mut ended = self.logged_out.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        ended.retain(|_, at| now.duration_since(*at) < SESSION_TTL);
        for id in ids {
            if ended.len() < MAX_LOGGED_OUT {
                ended.insert(id, now);
            }
        }
    }

    /// Waits out one wrong credential: [`FAILURE_DELAY`], one at a time. `false` when too many wait already.
    pub async fn throttle(&self) -> bool {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        {
            let _turn = self.failing.lock().await;
            tokio::time::sleep(FAILURE_DELAY).await;
        }
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        true
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The `Host` values this server answers to.
#[derive(Debug, Clone)]
pub struct HostAllow {
    port: u16,
    names: Vec<String>,
}

impl HostAllow {
    /// `port`: the admin port; `names`: the extra host names (`master.adminHosts`).
    pub fn new(port: u16, names: &[String]) -> HostAllow {
        HostAllow { port, names: names.iter().map(|n| n.to_ascii_lowercase()).collect() }
    }

    /// Whether a request's `Host` names this server: an IP literal, `localhost` or an allowed name, with the
    /// admin port (or no port when the admin port is 80).
    pub fn allows(&self, host: Option<&str>) -> bool {
        let Some(host) = host.map(str::trim) else { return false };
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p)) if !n.is_empty() && (n.ends_with(']') || !n.contains(':')) => (n, p.parse::<u16>().ok()),
            _ => (host, Some(80)),
        };
        if port != Some(self.port) {
            return false;
        }
        let name = name.to_ascii_lowercase();
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || self.names.contains(&name)
    }
}

/// Passes only requests whose `Host` names this server.
pub fn host(allow: HostAllow) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>(HOST.as_str())
        .and_then(move |h: Option<String>| {
            let ok = allow.allows(h.as_deref());
            async move {
                if ok {
                    Ok(())
                } else {
                    Err(warp::reject::custom(WrongHost))
                }
            }
        })
        .untuple_one()
}

/// Passes only requests that carry the token (and, for cookie-authenticated mutations, come from this origin).
pub fn guard(keys: Arc<Keys>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::method()
        .and(warp::header::headers_cloned())
        .and_then(move |method: Method, headers: HeaderMap| {
            let keys = keys.clone();
            async move {
                match check(&keys, &method, &headers) {
                    Ok(_) => Ok(()),
                    Err(Denied::Unauthorized) => {
                        let tried = headers.contains_key(AUTHORIZATION) || cookies(&headers, COOKIE).next().is_some();
                        if tried && !keys.throttle().await {
                            return Err(warp::reject::custom(Throttled));
                        }
                        Err(warp::reject::custom(Unauthorized))
                    }
                    Err(Denied::CrossOrigin) => Err(warp::reject::custom(CrossOrigin)),
                }
            }
        })
        .untuple_one()
}

/// The whole decision for one request.
pub fn check(keys: &Keys, method: &Method, headers: &HeaderMap) -> Result<Via, Denied> {
    let via = authenticate(keys, headers).ok_or(Denied::Unauthorized)?;
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if via == Via::Cookie && !safe && !same_origin(headers) {
        return Err(Denied::CrossOrigin);
    }
    Ok(via)
}

/// Which credential, if any, is good: the token as a bearer, or a live session's cookie. A bearer wins.
pub fn authenticate(keys: &Keys, headers: &HeaderMap) -> Option<Via> {
    let bearer = headers.get_all(AUTHORIZATION).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        let (scheme, given) = v.trim().split_once(' ').unwrap_or(("", ""));
        scheme.eq_ignore_ascii_case("bearer") && keys.is_token(given.trim())
    });
    if bearer {
        return Some(Via::Bearer);
    }
    cookies(headers, COOKIE).any(|given| keys.is_session(&given)).then_some(Via::Cookie)
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

/// `Set-Cookie` value after a good login: the session id, never the token. It ends with the browser.
pub fn login_cookie(session: &str) -> String {
    format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", encode(session))
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

    fn keys() -> Arc<Keys> {
        Keys::new(Arc::from(T))
    }

    #[test]
    fn compares_whole_strings() {
        assert!(same(T, "abcdef0123456789"));
        assert!(!same(T, "abcdef012345678"));
        assert!(!same(T, "abcdef0123456780"));
        assert!(!same("", "x"));
    }

    #[test]
    fn bearer_or_session_cookie_never_the_token_as_cookie() {
        let k = keys();
        let bearer = headers(&[("authorization", "Bearer abcdef0123456789")]);
        assert_eq!(check(&k, &Method::POST, &bearer), Ok(Via::Bearer));
        let lower = headers(&[("authorization", "bearer abcdef0123456789")]);
        assert_eq!(authenticate(&k, &lower), Some(Via::Bearer));
        let wrong = headers(&[("authorization", "Bearer nope"), ("cookie", "pomelo_admin=nope")]);
        assert_eq!(check(&k, &Method::GET, &wrong), Err(Denied::Unauthorized));
        let token_as_cookie = headers(&[("cookie", "pomelo_admin=abcdef0123456789")]);
        assert_eq!(check(&k, &Method::GET, &token_as_cookie), Err(Denied::Unauthorized), "the token is no cookie");
        let id = k.open_session().expect("session");
        assert!(!id.contains(T));
        let cookie = headers(&[("cookie", &format!("theme=dark; pomelo_admin={id}; x=y"))]);
        assert_eq!(check(&k, &Method::GET, &cookie), Ok(Via::Cookie));
        k.close_sessions(&cookie);
        assert_eq!(check(&k, &Method::GET, &cookie), Err(Denied::Unauthorized), "logged out");
        assert_eq!(check(&k, &Method::GET, &HeaderMap::new()), Err(Denied::Unauthorized));
    }

    #[test]
    fn sessions_are_signed_by_the_token_and_expire() {
        let k = keys();
        let s = k.open_session().expect("session");
        assert!(Keys::new(Arc::from(T)).is_session(&s), "a new master with the same token accepts it");
        assert!(!Keys::new(Arc::from("another-token-0123456789")).is_session(&s), "another token does not");
        let (id, _) = s.split_once('.').expect("id");
        let forged = format!("{id}.{}.{}", unix_now() + 10_000_000, "00".repeat(32));
        assert!(!k.is_session(&forged), "a longer expiry needs a new signature");
        let past = format!("{id}.1.{}", k.mac(id, 1));
        assert!(!k.is_session(&past), "expired");
    }

    #[test]
    fn cookie_mutations_must_be_same_origin() {
        let k = keys();
        let id = k.open_session().expect("session");
        let cookie = format!("pomelo_admin={id}");
        let base = [("cookie", cookie.as_str()), ("host", "127.0.0.1:7001")];
        let with = |extra: &[(&'static str, &str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            check(&k, &Method::POST, &headers(&all))
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
        assert_eq!(check(&k, &Method::GET, &headers(&get)), Ok(Via::Cookie));
        let bearer = headers(&[("authorization", "Bearer abcdef0123456789"), ("origin", "http://evil.example")]);
        assert_eq!(check(&k, &Method::POST, &bearer), Ok(Via::Bearer));
    }

    #[test]
    fn cookie_values_round_trip() {
        assert_eq!(login_cookie("0123abcd"), "pomelo_admin=0123abcd; HttpOnly; SameSite=Strict; Path=/");
        let odd = "a b;c,d\"e\\f%41é";
        let set = login_cookie(odd);
        let value = set.trim_start_matches("pomelo_admin=").split(';').next().unwrap_or("");
        assert!(!value.contains([' ', ';', ',', '"', '\\']), "{value}");
        let h = headers(&[("cookie", &format!("pomelo_admin={value}"))]);
        assert_eq!(cookies(&h, COOKIE).next().as_deref(), Some(odd));
    }

    #[test]
    fn only_this_servers_names_pass_the_host_check() {
        let allow = HostAllow::new(7001, &["chat-admin.example.com".to_string()]);
        for ok in ["127.0.0.1:7001", "localhost:7001", "[::1]:7001", "10.0.0.5:7001", "Chat-Admin.example.com:7001"] {
            assert!(allow.allows(Some(ok)), "{ok}");
        }
        for bad in ["evil.example:7001", "127.0.0.1:7002", "127.0.0.1", "", "localhost.evil.example:7001", "[::1]"] {
            assert!(!allow.allows(Some(bad)), "{bad}");
        }
        assert!(!allow.allows(None), "no Host at all");
        assert!(HostAllow::new(80, &[]).allows(Some("127.0.0.1")), "port 80 may be left out");
    }

    #[tokio::test]
    async fn wrong_credentials_wait_their_turn_and_the_queue_is_bounded() {
        let k = keys();
        let started = tokio::time::Instant::now();
        let tries: Vec<_> = (0..5)
            .map(|_| {
                tokio::spawn({
                    let k = k.clone();
                    async move { k.throttle().await }
                })
            })
            .collect();
        for t in tries {
            assert!(t.await.expect("join"));
        }
        assert!(started.elapsed() >= FAILURE_DELAY * 5, "one at a time: {:?}", started.elapsed());
        k.waiting.store(MAX_WAITING, Ordering::Release);
        assert!(!k.throttle().await, "a full queue answers at once");
    }
}
