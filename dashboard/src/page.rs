//! The dashboard page and its login, all embedded in the binary (`dashboard/assets/`, no build step).
//!
//! | route | what |
//! |---|---|
//! | `GET /` | with a valid token (cookie or bearer): the dashboard; without: the login form (200), with no cluster data |
//! | `POST /login` | form `token=...`: right → 303 to `/` setting `pomelo_admin` (HttpOnly, SameSite=Strict, Path=/); wrong → 401 and the form with an error |
//! | `POST /logout` | clears the cookie, 303 to `/` |
//! | `GET /assets/app.js`, `/assets/app.css` | the page's script and style (need the token: see [`assets`]) |
//!
//! `/login` and `/logout` refuse a cross-origin `Origin` (403). Bodies are capped at [`MAX_FORM`] bytes.
//! The login form has no script at all; every page response carries a strict Content-Security-Policy.

use std::collections::HashMap;
use std::sync::Arc;

use warp::http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::auth;

const INDEX: &str = include_str!("../assets/index.html");
const LOGIN: &str = include_str!("../assets/login.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

/// Largest login or logout body accepted.
pub const MAX_FORM: u64 = 4096;

const PAGE_CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                        connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
const LOGIN_CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// `/`, `/login`, `/logout`: reachable without the token (they show or set nothing else).
pub fn routes(keys: Arc<auth::Keys>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let k = keys.clone();
    let keys_for_logout = keys.clone();
    let index = warp::path::end().and(warp::get()).and(warp::header::headers_cloned()).map(move |h: HeaderMap| {
        if auth::authenticate(&k, &h).is_some() {
            html(INDEX.to_string(), StatusCode::OK, PAGE_CSP)
        } else if auth::cookies(&h, auth::COOKIE).next().is_some() {
            login_form(StatusCode::OK, "notice", "The admin token has changed or your session ended. Log in again.")
        } else {
            login_form(StatusCode::OK, "", "")
        }
    });
    let login = warp::path!("login")
        .and(warp::post())
        .and(warp::header::headers_cloned())
        .and(warp::body::content_length_limit(MAX_FORM))
        .and(warp::body::form::<HashMap<String, String>>())
        .then(move |h: HeaderMap, form: HashMap<String, String>| {
            let keys = keys.clone();
            async move {
                if !auth::same_origin(&h) {
                    return cross_origin();
                }
                let given = form.get("token").map(|t| t.trim()).unwrap_or("");
                if keys.is_token(given) {
                    match keys.open_session() {
                        Some(session) => redirect_home(auth::login_cookie(&session)),
                        None => crate::api::error(StatusCode::SERVICE_UNAVAILABLE, "no session", "no random source"),
                    }
                } else if keys.throttle().await {
                    login_form(StatusCode::UNAUTHORIZED, "error", "That is not the admin token.")
                } else {
                    login_form(StatusCode::TOO_MANY_REQUESTS, "error", "Too many wrong tokens; try again shortly.")
                }
            }
        });
    let k = keys_for_logout;
    let logout =
        warp::path!("logout").and(warp::post()).and(warp::header::headers_cloned()).map(move |h: HeaderMap| {
            if auth::same_origin(&h) {
                k.close_sessions(&h);
                redirect_home(auth::logout_cookie())
            } else {
                cross_origin()
            }
        });
    index.or(login).unify().or(logout).unify()
}

/// The page's script and style; mount behind [`auth::guard`].
pub fn assets() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("assets" / String).and(warp::get()).map(|name: String| {
        let (body, kind) = match name.as_str() {
            "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
            "app.css" => (APP_CSS, "text/css; charset=utf-8"),
            _ => return crate::api::error(StatusCode::NOT_FOUND, "not found", format!("no asset `{name}`")),
        };
        let mut r = Response::new(body.into());
        r.headers_mut().insert(CONTENT_TYPE, header(kind));
        r.headers_mut().insert(CACHE_CONTROL, header("no-cache"));
        r
    })
}

fn header(v: &'static str) -> warp::http::HeaderValue {
    warp::http::HeaderValue::from_static(v)
}

fn html(body: String, status: StatusCode, csp: &'static str) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, header("text/html; charset=utf-8"));
    h.insert(CACHE_CONTROL, header("no-store"));
    h.insert("content-security-policy", header(csp));
    h.insert("x-frame-options", header("DENY"));
    // Not `no-referrer`: with it Chromium sends `Origin: null` on the login form post.
    h.insert("referrer-policy", header("same-origin"));
    r
}

/// The login form, with an optional message (`class` is `error` or `notice`).
fn login_form(status: StatusCode, class: &str, message: &str) -> Response {
    let message = if message.is_empty() {
        String::new()
    } else {
        format!("<p class=\"msg {class}\" role=\"alert\">{}</p>", escape(message))
    };
    html(LOGIN.replace("{{message}}", &message), status, LOGIN_CSP)
}

fn redirect_home(cookie: String) -> Response {
    let mut r = Response::new("".into());
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut().insert(LOCATION, header("/"));
    r.headers_mut().insert(CACHE_CONTROL, header("no-store"));
    if let Ok(v) = warp::http::HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(SET_COOKIE, v);
    }
    r
}

fn cross_origin() -> Response {
    crate::api::error(StatusCode::FORBIDDEN, "cross-origin request", "this form only accepts posts from its own page")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "abcdef0123456789";

    fn filter() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
        routes(auth::Keys::new(Arc::from(T)))
    }

    #[tokio::test]
    async fn root_without_a_token_is_the_login_form_only() {
        let r = warp::test::request().path("/").reply(&filter()).await;
        assert_eq!(r.status(), 200);
        let body = String::from_utf8_lossy(r.body()).to_string();
        assert!(body.contains("name=\"token\"") && !body.contains("app.js"), "{body}");
        let stale =
            warp::test::request().path("/").header("cookie", "pomelo_admin=old-token-xxxxxxx").reply(&filter()).await;
        assert!(String::from_utf8_lossy(stale.body()).contains("Log in again"));
        let token_cookie =
            warp::test::request().path("/").header("cookie", "pomelo_admin=abcdef0123456789").reply(&filter()).await;
        assert!(!String::from_utf8_lossy(token_cookie.body()).contains("app.js"), "the token is not a session");
        let ok =
            warp::test::request().path("/").header("authorization", "Bearer abcdef0123456789").reply(&filter()).await;
        assert!(String::from_utf8_lossy(ok.body()).contains("/assets/app.js"));
        assert!(ok.headers().contains_key("content-security-policy"));
    }

    #[tokio::test]
    async fn login_sets_the_cookie_and_logout_clears_it() {
        let post = |body: &str| {
            warp::test::request()
                .method("POST")
                .path("/login")
                .header("content-type", "application/x-www-form-urlencoded")
                .header("host", "127.0.0.1:7001")
                .body(body)
        };
        let f = filter();
        let good = post("token=abcdef0123456789").reply(&f).await;
        assert_eq!(good.status(), 303);
        assert_eq!(good.headers()[LOCATION], "/");
        let set = good.headers()[SET_COOKIE].to_str().unwrap_or("").to_string();
        assert!(set.ends_with("; HttpOnly; SameSite=Strict; Path=/"), "{set}");
        let cookie = set.split(';').next().unwrap_or("").to_string();
        assert!(!cookie.contains(T), "the cookie is a session id, not the token: {cookie}");
        let home = warp::test::request().path("/").header("cookie", &cookie).reply(&f).await;
        assert!(String::from_utf8_lossy(home.body()).contains("/assets/app.js"), "the session opens the page");
        let out = warp::test::request().method("POST").path("/logout").header("cookie", &cookie).reply(&f).await;
        assert_eq!(out.status(), 303);
        let after = warp::test::request().path("/").header("cookie", &cookie).reply(&f).await;
        assert!(String::from_utf8_lossy(after.body()).contains("Log in again"), "logout ends the session");
        let bad = post("token=nope").reply(&filter()).await;
        assert_eq!(bad.status(), 401);
        assert!(!bad.headers().contains_key(SET_COOKIE));
        assert!(String::from_utf8_lossy(bad.body()).contains("not the admin token"));
        let evil = post("token=abcdef0123456789").header("origin", "http://evil.example").reply(&filter()).await;
        assert_eq!(evil.status(), 403);
        let big = post(&format!("token={}", "x".repeat(5000))).reply(&filter()).await;
        assert_eq!(big.status(), 413);
        let out = warp::test::request().method("POST").path("/logout").reply(&filter()).await;
        assert_eq!(out.status(), 303);
        assert!(out.headers()[SET_COOKIE].to_str().unwrap_or("").contains("Max-Age=0"));
    }
}
