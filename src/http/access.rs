//! Who may use the dashboard: whoever shows the pod's token, on every page and action
//! (job data, errors and parked bodies are a producer's data). The token comes from
//! `TASKMILL_DASHBOARD_TOKEN`, which also allows the write actions; without it the pod
//! makes one at start and logs the dashboard's URL with it, as notebook servers do,
//! and the dashboard is read-only (a token read from a log should not cancel jobs).
//!
//! A request shows it as `?token=` (answered with a cookie and a redirect to the same
//! page without it, so links keep working and the token leaves the address bar), the
//! cookie, or `Authorization: Bearer` (for scripts). The cookie is `HttpOnly` and
//! `SameSite=Strict`: no script reads it, and no other site's form can post with it.
//! Every comparison is in constant time; no page ever shows the token.

use std::net::SocketAddr;

use axum::http::{header, HeaderMap, Uri};

use crate::config::Token;

const COOKIE: &str = "taskmill_token";

/// What becomes of a request to the dashboard.
pub(crate) enum Admission {
    /// It showed the token by cookie or header: on to the page.
    Through,
    /// It showed the token as `?token=`: to `location` (the same page without it),
    /// setting `cookie`.
    Redirect { location: String, cookie: String },
    /// Refused, and why.
    Refused(&'static str),
}

/// The dashboard's token, and whether it allows writing.
pub(crate) struct Access {
    token: Token,
    writable: bool,
}

impl Access {
    /// The configured token (writable), or a new one, logged with the URL of the
    /// dashboard served at `serving` (read-only).
    pub fn new(configured: Option<Token>, serving: SocketAddr) -> Self {
        if let Some(token) = configured {
            return Self {
                token,
                writable: true,
            };
        }
        let token = Token::generate();
        let host = if serving.ip().is_unspecified() {
            SocketAddr::new([127, 0, 0, 1].into(), serving.port())
        } else {
            serving
        };
        tracing::info!(
            url = %format!("http://{host}/?token={}", token.expose()),
            "dashboard (read-only: set TASKMILL_DASHBOARD_TOKEN for the write actions and a token that outlives the pod)"
        );
        Self {
            token,
            writable: false,
        }
    }

    /// Whether the write actions are allowed.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Whether a request for `uri` with `headers` may see the dashboard.
    pub fn admit(&self, uri: &Uri, headers: &HeaderMap) -> Admission {
        let query = uri.query().unwrap_or_default();
        let given = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="));
        if let Some(given) = given {
            if !self.token.matches_bytes(&percent_decoded(given)) {
                return Admission::Refused("wrong token");
            }
            let rest: Vec<&str> = query
                .split('&')
                .filter(|pair| !pair.starts_with("token="))
                .collect();
            let mut location = uri.path().to_owned();
            if !rest.is_empty() {
                location = format!("{location}?{}", rest.join("&"));
            }
            return Admission::Redirect {
                location,
                cookie: self.cookie(),
            };
        }
        if self.admits(headers) {
            Admission::Through
        } else {
            Admission::Refused("this dashboard needs the pod's token")
        }
    }

    /// Whether the request's cookie or bearer header carries the token.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if bearer.is_some_and(|given| self.token.matches(given)) {
            return true;
        }
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|cookies| cookies.split(';'))
            .filter_map(|cookie| cookie.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .filter_map(unhex)
            .any(|given| self.token.matches_bytes(&given))
    }

    /// The cookie that carries the token: hex, since a configured token may hold
    /// characters a cookie cannot.
    fn cookie(&self) -> String {
        let hex: String = self
            .token
            .expose()
            .bytes()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        format!("{COOKIE}={hex}; Path=/; HttpOnly; SameSite=Strict")
    }
}

/// A query value's bytes: `%XX` decoded and `+` a space, as forms encode them.
fn percent_decoded(value: &str) -> Vec<u8> {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match bytes.get(i + 1..i + 3).and_then(unhex_pair) {
                Some(byte) => {
                    decoded.push(byte);
                    i += 3;
                    continue;
                }
                None => decoded.push(b'%'),
            },
            b'+' => decoded.push(b' '),
            byte => decoded.push(byte),
        }
        i += 1;
    }
    decoded
}

fn unhex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.as_bytes().chunks(2).map(unhex_pair).collect()
}

fn unhex_pair(pair: &[u8]) -> Option<u8> {
    u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::{percent_decoded, unhex, Access};
    use crate::config::Token;
    use axum::http::{header, HeaderMap};

    fn access(secret: &str) -> Access {
        Access::new(Token::new(secret), "127.0.0.1:9464".parse().unwrap())
    }

    #[test]
    fn the_cookie_set_is_the_cookie_admitted() {
        let access = access("correct horse; battery=staple");
        let cookie = access.cookie();
        let value = cookie.split(';').next().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, format!("other=1; {value}").parse().unwrap());
        assert!(access.admits(&headers));
        assert!(!access.admits(&HeaderMap::new()));
        let mut wrong = HeaderMap::new();
        wrong.insert(header::COOKIE, "taskmill_token=00".parse().unwrap());
        assert!(!wrong.is_empty() && !access.admits(&wrong));
    }

    #[test]
    fn a_bearer_header_is_admitted() {
        let access = access("s3cret");
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(access.admits(&headers));
        headers.insert(header::AUTHORIZATION, "Bearer s3cre".parse().unwrap());
        assert!(!access.admits(&headers));
    }

    #[test]
    fn query_values_are_decoded_as_forms_encode_them() {
        assert_eq!(percent_decoded("a+b%20c%3B%zz"), b"a b c;%zz");
        assert_eq!(unhex("6869"), Some(b"hi".to_vec()));
        assert_eq!(unhex("686"), None);
    }
}
