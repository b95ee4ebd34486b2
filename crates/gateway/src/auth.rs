//! API keys: who is calling, with what default priority and limits.
//!
//! Keys are held only as SHA-256 digests. A presented key is hashed and looked up by digest, then the
//! digests are compared in constant time: lookup timing can reveal nothing about a key, and a log line
//! names a tenant and a short digest, never the key.

use crate::config::{ApiKeyConfig, AuthConfig};
use gateway_core::{ErrorKind, GatewayError, Priority};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// A caller identified by its API key.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    /// The tenant's name from config.
    pub name: Arc<str>,
    /// Default priority of its requests.
    pub priority: Priority,
    /// Requests per minute, overriding `rate_limit.per_user_rpm`.
    pub rpm: Option<u64>,
    /// Tokens per minute, overriding `rate_limit.per_user_tpm`.
    pub tpm: Option<u64>,
    /// Requests per day, overriding `rate_limit.per_user_rpd`.
    pub rpd: Option<u64>,
}

/// The key table in force. Comparable, so a reload whose config is unchanged still notices a changed
/// keys file.
#[derive(Debug, Default, PartialEq)]
pub struct Auth {
    enabled: bool,
    by_digest: HashMap<[u8; 32], Arc<Tenant>>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// First 8 hex digits of a key's SHA-256: enough to tell keys apart in logs, useless to an attacker.
pub fn short_hash(key: &str) -> String {
    digest(key)[..4].iter().map(|b| format!("{b:02x}")).collect()
}

impl Auth {
    /// The table for `cfg` (keys from config and `keys_file`, which is read here).
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, String> {
        Ok(Self::new(cfg.enabled, &cfg.all_keys()?))
    }

    /// The table of `keys`, already read and checked ([`crate::config::Config::validate_reading_keys`]).
    pub fn new(enabled: bool, keys: &[ApiKeyConfig]) -> Self {
        let by_digest = keys.iter().map(|k| (digest(&k.key), Arc::new(tenant(k)))).collect();
        Self { enabled, by_digest }
    }

    /// Whether keys are required.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The tenant named `name` in this table (the batch runner acts for a batch's tenant).
    pub fn tenant_named(&self, name: &str) -> Option<Arc<Tenant>> {
        self.by_digest.values().find(|t| &*t.name == name).cloned()
    }

    /// The tenant of a request's `Authorization: Bearer` key: `Ok(None)` when auth is off, 401
    /// `invalid_api_key` when the key is missing or unknown.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Option<Arc<Tenant>>, GatewayError> {
        if !self.enabled {
            return Ok(None);
        }
        let Some(key) = bearer_token(headers) else {
            return Err(GatewayError::new(
                ErrorKind::InvalidApiKey,
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            ));
        };
        let d = digest(key);
        match self.by_digest.get_key_value(&d) {
            Some((stored, tenant)) if bool::from(stored.ct_eq(&d)) => Ok(Some(Arc::clone(tenant))),
            _ => {
                tracing::info!(key_hash = %short_hash(key), "unknown API key");
                Err(GatewayError::new(ErrorKind::InvalidApiKey, "Incorrect API key provided."))
            }
        }
    }
}

/// The credential of `Authorization: Bearer <token>`, the one parser for API keys and the admin token:
/// the scheme in any case (RFC 9110 makes auth schemes case-insensitive: `bearer`, `BEARER`), the token
/// trimmed; `None` when the header is absent, not UTF-8, another scheme, or has no token.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?.trim_start();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn tenant(k: &ApiKeyConfig) -> Tenant {
    Tenant {
        name: Arc::from(k.name.as_str()),
        priority: k.priority,
        rpm: k.requests_per_minute,
        tpm: k.tokens_per_minute,
        rpd: k.requests_per_day,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Auth {
        let cfg = AuthConfig {
            enabled: true,
            keys: vec![ApiKeyConfig {
                key: "sk-gold".into(),
                name: "gold".into(),
                priority: Priority::High,
                requests_per_minute: Some(600),
                tokens_per_minute: None,
                requests_per_day: None,
            }],
            keys_file: None,
        };
        Auth::from_config(&cfg).expect("table builds")
    }

    fn headers(auth: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, auth.parse().expect("valid header"));
        h
    }

    #[test]
    fn known_key_finds_its_tenant_and_others_are_401() {
        let auth = table();
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let t = auth.authenticate(&headers(&format!("{scheme} sk-gold"))).expect("any case").expect("enabled");
            assert_eq!(&*t.name, "gold", "{scheme}");
        }
        let t = auth.authenticate(&headers("Bearer   sk-gold ")).expect("known").expect("enabled");
        assert_eq!(&*t.name, "gold");
        assert_eq!(t.priority, Priority::High);
        for bad in ["Bearer sk-golden", "Bearer ", "Basic sk-gold", "sk-gold", "Bearersk-gold", "Bear sk-gold"] {
            let err = auth.authenticate(&headers(bad)).unwrap_err();
            assert_eq!(err.status(), 401, "{bad}");
            assert_eq!(err.body()["error"]["code"], "invalid_api_key");
        }
        assert!(auth.authenticate(&http::HeaderMap::new()).is_err());
        assert_eq!(Auth::default().authenticate(&http::HeaderMap::new()), Ok(None), "auth off");
    }

    #[test]
    fn short_hash_does_not_contain_the_key() {
        let h = short_hash("sk-gold");
        assert!(!h.contains("gold"));
        assert_eq!(h, short_hash("sk-gold"));
        assert_ne!(h, short_hash("sk-silver"));
    }
}
