//! Splitting and decoding a compact JWS before anything trusts it.
//!
//! jsonwebtoken would decode header and payload itself, but it parses JSON
//! with serde_json, which silently keeps the last of two equal keys. Two
//! `aud` or `tid` members could then mean one thing to us and another to a
//! different parser, so both JSON objects are parsed here with a visitor that
//! refuses duplicates, and only the signature check is left to jsonwebtoken.

use std::fmt;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::IdentityError;

/// Largest token accepted. Entra access tokens are a few KiB; anything far
/// bigger is refused before it is decoded or parsed.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A token split into its three segments, header and payload decoded.
pub struct RawToken<'a> {
    /// `base64(header) "." base64(payload)`: what the signature covers.
    pub signing_input: &'a str,
    /// The signature segment, still base64url.
    pub signature: &'a str,
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
}

impl<'a> RawToken<'a> {
    pub fn parse(token: &'a str) -> Result<Self, IdentityError> {
        if token.is_empty() {
            return Err(IdentityError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(IdentityError::Oversized(token.len()));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentityError::Malformed("not three dot-separated segments"));
        };
        // An empty signature is left to the alg and signature checks, so
        // `alg: none` is refused as such.
        if h.is_empty() || p.is_empty() {
            return Err(IdentityError::Malformed("empty segment"));
        }
        let header_bytes = URL_SAFE_NO_PAD
            .decode(h)
            .map_err(|_| IdentityError::BadEncoding("header"))?;
        let payload_bytes = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| IdentityError::BadEncoding("payload"))?;
        URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| IdentityError::BadEncoding("signature"))?;
        let header = strict_object(&header_bytes, "header")?;
        let claims = strict_object(&payload_bytes, "payload")?;
        let signing_input = &token[..h.len() + 1 + p.len()];
        Ok(Self {
            signing_input,
            signature: s,
            header,
            claims,
        })
    }
}

/// Parses a JSON object, refusing duplicate member names at any depth.
fn strict_object(bytes: &[u8], part: &'static str) -> Result<Map<String, Value>, IdentityError> {
    match serde_json::from_slice::<StrictValue>(bytes) {
        Ok(StrictValue(Value::Object(map))) => Ok(map),
        Ok(_) => Err(IdentityError::BadJson(part)),
        // Our visitor's only custom error is the duplicate; serde_json files
        // custom errors under "data", syntax errors elsewhere.
        Err(e) if e.is_data() => Err(IdentityError::DuplicateMember(part)),
        Err(_) => Err(IdentityError::BadJson(part)),
    }
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate member {key:?}")));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Typed access to claims, naming the claim in every refusal.
pub struct Claims<'a>(pub &'a Map<String, Value>);

impl Claims<'_> {
    pub fn opt_str(&self, name: &'static str) -> Result<Option<&str>, IdentityError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(IdentityError::BadClaimType(name)),
        }
    }
    pub fn str(&self, name: &'static str) -> Result<&str, IdentityError> {
        self.opt_str(name)?.ok_or(IdentityError::MissingClaim(name))
    }
    pub fn opt_int(&self, name: &'static str) -> Result<Option<i64>, IdentityError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or(IdentityError::BadClaimType(name)),
            Some(_) => Err(IdentityError::BadClaimType(name)),
        }
    }
    pub fn int(&self, name: &'static str) -> Result<i64, IdentityError> {
        self.opt_int(name)?.ok_or(IdentityError::MissingClaim(name))
    }
    pub fn str_list(&self, name: &'static str) -> Result<Option<Vec<String>>, IdentityError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or(IdentityError::BadClaimType(name))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(IdentityError::BadClaimType(name)),
        }
    }
}
