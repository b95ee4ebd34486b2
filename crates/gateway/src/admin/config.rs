//! The running config through the admin API: `GET /api/config` (secrets redacted, [`redact`]) and
//! `PATCH /api/config` (an RFC 7386 merge patch, [`merge_patch`], validated and applied by
//! [`crate::reload::update`]).

use super::{bad_request, parse_json, AdminAuth};
use crate::config::Config;
use crate::error::ApiError;
use crate::reload;
use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use bytes::Bytes;
use serde_json::{Map, Value};
use std::sync::Arc;

/// Keys whose string values are secrets, wherever they appear in the config tree.
const SECRET_KEYS: &[&str] = &["api_key", "token", "key", "password", "secret"];

pub use crate::config::REDACTED;

/// Replaces secrets in a config tree, by key name so sections added later are covered: string values of
/// keys named `api_key`, `token`, `key`, `password`, `secret` (or ending in `_key`, `_token`,
/// `_password`, `_secret`) become `"***"`, and so do the credentials of any URL (`redis://u:pw@h`,
/// [`crate::config::redact_url`]).
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                let k = k.strip_suffix('s').unwrap_or(&k);
                let secret = SECRET_KEYS.iter().any(|s| k == *s || k.ends_with(&format!("_{s}")));
                match v {
                    Value::String(s) if secret => *s = REDACTED.into(),
                    Value::Array(items) if secret => {
                        for item in items.iter_mut() {
                            if item.is_string() {
                                *item = Value::String(REDACTED.into());
                            } else {
                                redact(item);
                            }
                        }
                    }
                    _ => redact(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::String(s) => {
            if let std::borrow::Cow::Owned(clean) = crate::config::redact_url(s) {
                *s = clean;
            }
        }
        _ => {}
    }
}

/// The running config as JSON, secrets redacted.
pub fn redacted_config(config: &Config) -> Value {
    let mut v = serde_json::to_value(config).unwrap_or(Value::Null);
    redact(&mut v);
    v
}

pub(super) async fn get(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(redacted_config(&app.snapshot.load().config))
}

/// Applies an RFC 7386 JSON merge patch to `target`: objects merge key by key, `null` deletes, anything
/// else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(map) = target {
        for (k, v) in patch {
            if v.is_null() {
                map.remove(k);
            } else {
                merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// `current` with `patch` merged in, read back as a [`Config`] and validated. The error names the key.
pub fn patched_config(current: &Config, patch: &Value) -> Result<Config, String> {
    if !patch.is_object() {
        return Err("the body must be a JSON object (a merge patch of the config)".into());
    }
    let mut doc = serde_json::to_value(current).map_err(|e| format!("cannot serialise the config: {e}"))?;
    merge_patch(&mut doc, patch);
    let config: Config = figment::Figment::from(figment::providers::Serialized::defaults(doc))
        .extract()
        .map_err(|e| crate::config::one_line_error(&e))?;
    config.validate()?;
    Ok(config)
}

pub(super) async fn patch(
    _: AdminAuth,
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let patch = parse_json(&body)?;
    let config = reload::update(&app, |cur| patched_config(cur, &patch)).await.map_err(bad_request)?;
    tracing::info!("config patched through the admin API");
    Ok(Json(redacted_config(&config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn redaction_is_by_key_name_and_url_password() {
        let mut v = json!({
            "workers": [{"url": "http://a:1", "api_key": "sk-1"}, {"url": "http://b:1", "api_key": null}],
            "admin": {"token": "t0p"},
            "cache": {"redis_url": "redis://user:pw@host:6379/0", "signing_key": "k", "keys": ["x"]},
            "auth": {"keys": [{"key": "sk-2", "tenant": "a"}]},
        });
        redact(&mut v);
        assert_eq!(v["workers"][0]["api_key"], REDACTED);
        assert_eq!(v["workers"][0]["url"], "http://a:1");
        assert_eq!(v["workers"][1]["api_key"], Value::Null);
        assert_eq!(v["admin"]["token"], REDACTED);
        assert_eq!(v["cache"]["redis_url"], "redis://user:***@host:6379/0");
        assert_eq!(v["cache"]["signing_key"], REDACTED);
        assert_eq!(v["auth"]["keys"][0]["key"], REDACTED);
        assert_eq!(v["auth"]["keys"][0]["tenant"], "a");
        assert_eq!(v["cache"]["keys"][0], REDACTED);
        assert!(!v.to_string().contains("sk-") && !v.to_string().contains("t0p") && !v.to_string().contains(":pw@"));
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "n": [1]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "n": [1]}));
    }

    #[test]
    fn patch_errors_name_the_key() {
        let cur = Config::default();
        let e = patched_config(&cur, &json!({"routing": {"strategy": "nope"}})).unwrap_err();
        assert!(e.starts_with("routing.strategy") && e.contains("nope"), "{e}");
        let e = patched_config(&cur, &json!({"routing": {"bogus": 1}})).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = patched_config(&cur, &json!({"health": {"interval_ms": 0}})).unwrap_err();
        assert!(e.contains("health.interval_ms"), "{e}");
        let ok = patched_config(&cur, &json!({"routing": {"strategy": "least_queue"}})).unwrap();
        assert_eq!(ok.routing.strategy, routing::Strategy::LeastQueue);
        assert_eq!(ok.server, cur.server);
    }

    #[test]
    fn redaction_covers_user_only_urls() {
        let mut v = json!({"workers": [{"url": "http://tok3n@h:1/"}], "list": ["http://u:pw@h"]});
        redact(&mut v);
        assert_eq!(v["workers"][0]["url"], "http://***@h:1/");
        assert_eq!(v["list"][0], "http://u:***@h");
    }
}
