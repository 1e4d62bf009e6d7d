//! HTTP basic authentication against the bcrypt hashes of the web config
//! file's `basic_auth_users`, as exporter-toolkit does it: bcrypt is slow
//! by design (tens of milliseconds a check), so a successful (user,
//! password) is remembered in a small cache, checks are serialised (a flood
//! of wrong passwords costs one core, not all), an unknown user costs a
//! bcrypt as a known one does (the time does not tell which users exist),
//! and cache entries are compared in constant time.
use std::{collections::BTreeMap, collections::VecDeque, sync::Mutex};

use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use std::sync::Arc;

/// Successful verifications remembered; the oldest is forgotten first.
const CACHE_ENTRIES: usize = 100;

type Digest = [u8; 32];

pub struct BasicAuth {
    /// User name to bcrypt hash.
    users: BTreeMap<String, String>,
    /// Digests of (user, hash, password) that bcrypt accepted. Digests,
    /// not passwords, so that the agent's memory holds no password.
    verified: Mutex<VecDeque<Digest>>,
    /// One bcrypt at a time.
    bcrypt: tokio::sync::Semaphore,
}

impl BasicAuth {
    /// None when no users are configured (no authentication).
    pub fn new(users: BTreeMap<String, String>) -> Option<Arc<Self>> {
        (!users.is_empty()).then(|| {
            Arc::new(Self {
                users,
                verified: Mutex::new(VecDeque::with_capacity(CACHE_ENTRIES)),
                bcrypt: tokio::sync::Semaphore::new(1),
            })
        })
    }

    fn digest(user: &str, hash: &str, password: &str) -> Digest {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [user, hash, password] {
            context.update(&(part.len() as u64).to_le_bytes());
            context.update(part.as_bytes());
        }
        let mut digest = [0; 32];
        digest.copy_from_slice(context.finish().as_ref());
        digest
    }

    /// Every entry is compared, each in constant time: neither the match's
    /// position nor its prefix shows in the time taken.
    fn cached(&self, digest: &Digest) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified.iter().fold(false, |found, entry| {
            let difference = entry
                .iter()
                .zip(digest)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found | (difference == 0)
        })
    }

    fn remember(&self, digest: Digest) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= CACHE_ENTRIES {
            verified.pop_front();
        }
        verified.push_back(digest);
    }

    /// Whether `user` with `password` may in.
    pub async fn verify(&self, user: &str, password: &str) -> bool {
        let known = self.users.get(user);
        // An unknown user is checked against some user's hash, and refused
        // whatever the outcome, so that it takes as long.
        let Some(hash) = known.or_else(|| self.users.values().next()) else {
            return false;
        };
        let digest = Self::digest(user, hash, password);
        if known.is_some() && self.cached(&digest) {
            return true;
        }
        let Ok(_turn) = self.bcrypt.acquire().await else {
            return false;
        };
        let (password_owned, hash_owned) = (password.to_string(), hash.clone());
        let accepted = tokio::task::spawn_blocking(move || {
            bcrypt::verify(password_owned, &hash_owned).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if accepted && known.is_some() {
            self.remember(digest);
            return true;
        }
        false
    }
}

/// `Authorization: Basic base64(user:password)` as (user, password).
fn credentials(request: &Request) -> Option<(String, String)> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

fn unauthorized() -> Response {
    let mut response = (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"pymem\""),
    );
    response
}

/// Middleware: the request goes on only with valid credentials.
pub(super) async fn require_auth(
    State(auth): State<Arc<BasicAuth>>,
    request: Request,
    next: Next,
) -> Response {
    match credentials(&request) {
        Some((user, password)) if auth.verify(&user, &password).await => next.run(request).await,
        Some((user, _)) => {
            log::debug!(
                "refused {user:?} on {}: wrong password or unknown user",
                request.uri()
            );
            unauthorized()
        }
        None => unauthorized(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_right_password_passes_a_wrong_one_or_an_unknown_user_does_not() {
        let users = BTreeMap::from([("alice".to_string(), bcrypt::hash("s3cret", 4).unwrap())]);
        let auth = BasicAuth::new(users).unwrap();
        assert!(auth.verify("alice", "s3cret").await);
        // Now from the cache, and still only that password.
        assert!(auth.verify("alice", "s3cret").await);
        assert!(!auth.verify("alice", "s3cret ").await);
        assert!(!auth.verify("bob", "s3cret").await);
        assert_eq!(auth.verified.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_cache_is_bounded() {
        let users = BTreeMap::from([("alice".to_string(), bcrypt::hash("x", 4).unwrap())]);
        let auth = BasicAuth::new(users).unwrap();
        for i in 0..CACHE_ENTRIES * 2 {
            auth.remember(BasicAuth::digest("alice", "h", &i.to_string()));
        }
        assert_eq!(auth.verified.lock().unwrap().len(), CACHE_ENTRIES);
        assert!(auth.cached(&BasicAuth::digest(
            "alice",
            "h",
            &(CACHE_ENTRIES * 2 - 1).to_string()
        )));
        assert!(!auth.cached(&BasicAuth::digest("alice", "h", "0")));
    }
}
