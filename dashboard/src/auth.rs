//! The admin token: every route but `/healthz` needs it, as `Authorization: Bearer <token>` or the
//! `pomelo_admin` cookie that the login form sets (SameSite=Strict, HttpOnly). Compared in constant time.

use std::sync::Arc;

use warp::{Filter, Rejection};

/// The cookie the login form sets.
pub const COOKIE: &str = "pomelo_admin";

#[derive(Debug)]
pub struct Unauthorized;
impl warp::reject::Reject for Unauthorized {}

/// Passes only requests that carry the token.
pub fn require(token: Arc<str>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(warp::cookie::optional::<String>(COOKIE))
        .and_then(move |header: Option<String>, cookie: Option<String>| {
            let token = token.clone();
            async move {
                let bearer = header.as_deref().and_then(|h| h.strip_prefix("Bearer ")).map(str::trim);
                let ok = [bearer, cookie.as_deref()].into_iter().flatten().any(|given| same(given, &token));
                if ok {
                    Ok(())
                } else {
                    Err(warp::reject::custom(Unauthorized))
                }
            }
        })
        .untuple_one()
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
    use super::same;

    #[test]
    fn compares_whole_strings() {
        assert!(same("abcdef0123456789", "abcdef0123456789"));
        assert!(!same("abcdef0123456789", "abcdef012345678"));
        assert!(!same("abcdef0123456789", "abcdef0123456780"));
        assert!(!same("", "x"));
    }
}
