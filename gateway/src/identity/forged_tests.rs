//! Forged and malformed tokens, built byte by byte: each differs from an
//! accepted baseline in one way and must be refused with one specific code.

use std::collections::HashMap;

use aws_lc_rs::{
    hmac,
    rand::SystemRandom,
    signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine,
};
use serde_json::{json, Map, Value};

use super::tests::{file_config, spec, AUD, OID, OTHER_TID, TID};
use super::*;
use crate::dev::{DevKey, Keyring, TokenKind, TokenSpec};

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Claims of the baseline token, as a JSON object to modify.
fn claims() -> Map<String, Value> {
    match spec().claims_at(now()) {
        Value::Object(m) => m,
        _ => unreachable!("claims_at returns an object"),
    }
}

fn claims_with(f: impl FnOnce(&mut Map<String, Value>)) -> String {
    let mut c = claims();
    f(&mut c);
    Value::Object(c).to_string()
}

fn header(kid: &str) -> String {
    json!({ "typ": "JWT", "alg": "RS256", "kid": kid }).to_string()
}

/// `b64(header).b64(payload)` signed RS256 by `key`.
fn rs256(key: &DevKey, header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = key.sign(input.as_bytes(), false).expect("sign");
    format!("{input}.{}", b64(&sig))
}

fn ps256(key: &DevKey, header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = key.sign(input.as_bytes(), true).expect("sign");
    format!("{input}.{}", b64(&sig))
}

fn es256(key: &EcdsaKeyPair, header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = key
        .sign(&SystemRandom::new(), input.as_bytes())
        .expect("sign");
    format!("{input}.{}", b64(sig.as_ref()))
}

fn hs256(secret: &[u8], header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

fn pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ascii"))
        .collect();
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        lines.join("\n")
    )
}

/// The EC key as a JWK, for configs that allow ES256.
fn ec_jwk(key: &EcdsaKeyPair, kid: &str) -> Value {
    // Uncompressed point: 0x04 || x || y.
    let point = key.public_key().as_ref();
    json!({ "kty": "EC", "use": "sig", "crv": "P-256", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]) })
}

pub(crate) struct Case {
    pub(crate) name: &'static str,
    /// Extra `[identity]` lines for this case.
    pub(crate) config: &'static str,
    pub(crate) token: String,
    pub(crate) code: &'static str,
}

/// Positive controls (name, extra config, token) and the forged cases,
/// with their keys kept in `dir` (whose jwks.json the configs name). Shared
/// with the PostgreSQL adapter's tests, which replay every case over the wire.
pub(crate) type Control = (&'static str, &'static str, String);

/// Identity settings with Graph (client id `tollgate`, its secret in
/// `dir`) on a loopback port nothing listens on.
fn graph_unreachable(dir: &std::path::Path) -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let secret = crate::dev::directory::graph_secret_file(dir).expect("secret");
    format!(
        "development_idp = true\n[graph]\nendpoint = \"http://{closed}\"\n\
         authority = \"http://{closed}\"\nclient_id = \"tollgate\"\nclient_secret_file = {secret:?}\n"
    )
}

pub(crate) fn forged_cases(dir: &std::path::Path) -> (Vec<Control>, Vec<Case>) {
    let ring = Keyring::open_or_create(dir).expect("keyring");
    let key = ring.signing_key();
    let kid = key.kid.as_str();
    let ec = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("ec key");
    // Publish the EC key too, so ES256 is refused for the alg, not the kid.
    // Keys published for one issuer, as Entra's multi-tenant key sets name
    // them: one for every tenant (the placeholder), one for another tenant
    // only.
    let for_every_tenant = DevKey::generate().expect("key");
    let for_other_tenant = DevKey::generate().expect("key");
    let blank_issuer = DevKey::generate().expect("key");
    let numbered_issuer = DevKey::generate().expect("key");
    let with_issuer = |key: &DevKey, issuer: Value| {
        let mut jwk = key.jwk();
        jwk["issuer"] = issuer;
        jwk
    };
    let mut jwks = ring.jwks();
    if let Some(keys) = jwks.get_mut("keys").and_then(Value::as_array_mut) {
        keys.push(ec_jwk(&ec, "ec-1"));
        keys.push(with_issuer(
            &for_every_tenant,
            json!("https://login.microsoftonline.com/{tenantid}/v2.0"),
        ));
        keys.push(with_issuer(
            &for_other_tenant,
            json!(format!(
                "https://login.microsoftonline.com/{OTHER_TID}/v2.0"
            )),
        ));
        keys.push(with_issuer(&blank_issuer, json!(" ")));
        // An issuer that is not a string: the key is not used at all.
        keys.push(with_issuer(&numbered_issuer, json!(5)));
    }
    std::fs::write(dir.join("jwks.json"), jwks.to_string()).expect("write jwks");

    let h = header(kid);
    let good = Value::Object(claims()).to_string();
    // The baseline's claims as a v1 token has them.
    let good_v1 = TokenSpec {
        version: 1,
        ..spec()
    }
    .claims_at(now())
    .to_string();
    let stranger = DevKey::generate().expect("key");
    let public_der = key.public_key_der().expect("der");
    let t = now();

    // The baseline and the positive controls must pass, or the refusals
    // below would prove nothing.
    let controls = [
        ("baseline", "", rs256(key, &h, &good)),
        (
            "a key whose issuer names every tenant",
            "",
            rs256(&for_every_tenant, &header(&for_every_tenant.kid), &good),
        ),
        (
            // Entra signs both versions with the keys its v2 key sets
            // name the v2 issuer for.
            "a v1 token on a key of the v2 issuer",
            "token_versions = [1, 2]",
            rs256(&for_every_tenant, &header(&for_every_tenant.kid), &good_v1),
        ),
        (
            "a key whose issuer is blank",
            "",
            rs256(&blank_issuer, &header(&blank_issuer.kid), &good),
        ),
        (
            "ps256 when allowed",
            "allowed_algorithms = [\"RS256\", \"PS256\"]",
            ps256(key, &json!({"alg": "PS256", "kid": kid}).to_string(), &good),
        ),
        (
            "es256 when allowed",
            "allowed_algorithms = [\"RS256\", \"ES256\"]",
            es256(
                &ec,
                &json!({"alg": "ES256", "kid": "ec-1"}).to_string(),
                &good,
            ),
        ),
        (
            // Past the maximum age by less than the clock skew allows.
            "older than max age within the skew",
            "max_token_age_secs = 3600",
            rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("iat".into(), json!(t - 3600 - 150));
                    c.insert("nbf".into(), json!(t - 3600 - 150));
                }),
            ),
        ),
    ];

    let altered_payload = {
        let signed = rs256(key, &h, &good);
        let forged = b64(claims_with(|c| {
            c.insert("oid".into(), json!("99999999-9999-4999-8999-999999999999"));
        })
        .as_bytes());
        let parts: Vec<&str> = signed.split('.').collect();
        format!("{}.{forged}.{}", parts[0], parts[2])
    };
    let altered_signature = {
        let signed = rs256(key, &h, &good);
        let (input, sig) = signed.rsplit_once('.').expect("three parts");
        let mut bytes = URL_SAFE_NO_PAD.decode(sig).expect("b64");
        bytes[10] ^= 0x01;
        format!("{input}.{}", b64(&bytes))
    };
    let truncated_signature = {
        let signed = rs256(key, &h, &good);
        let (input, sig) = signed.rsplit_once('.').expect("three parts");
        let bytes = URL_SAFE_NO_PAD.decode(sig).expect("b64");
        format!("{input}.{}", b64(&bytes[..bytes.len() / 2]))
    };
    let v2_issuer = |tid: &str| format!("https://login.microsoftonline.com/{tid}/v2.0");
    // serde_json keeps the last of duplicate members: put the bad value
    // first and the good one last, so only explicit detection refuses it.
    let dup_aud = format!("{{\"aud\":\"api://evil\",{}", &good[1..]);
    let dup_alg = format!("{{\"alg\":\"HS256\",{}", &header(kid)[1..]);

    // Leaked: the table holds &'static config snippets and this one names
    // a temp path.
    let graph_unreachable: &'static str = Box::leak(graph_unreachable(dir).into_boxed_str());

    let cases = vec![
        Case {
            // Storm-0558's shape: a key meant for another issuer signing
            // for this tenant.
            name: "a key published for another tenant's issuer",
            config: "",
            token: rs256(&for_other_tenant, &header(&for_other_tenant.kid), &good),
            code: "key_issuer_mismatch",
        },
        Case {
            name: "a v1 token on a key of another tenant's v2 issuer",
            config: "token_versions = [1, 2]",
            token: rs256(&for_other_tenant, &header(&for_other_tenant.kid), &good_v1),
            code: "key_issuer_mismatch",
        },
        Case {
            name: "alg none, no signature",
            config: "",
            token: format!(
                "{}.{}.",
                b64(json!({"alg": "none", "kid": kid}).to_string().as_bytes()),
                b64(good.as_bytes())
            ),
            code: "alg_not_allowed",
        },
        Case {
            name: "alg None (case variant)",
            config: "",
            token: format!(
                "{}.{}.",
                b64(json!({"alg": "None", "kid": kid}).to_string().as_bytes()),
                b64(good.as_bytes())
            ),
            code: "alg_not_allowed",
        },
        Case {
            name: "HS256 keyed with the RSA public key PEM",
            config: "",
            token: hs256(
                pem(&public_der).as_bytes(),
                &json!({"alg": "HS256", "kid": kid}).to_string(),
                &good,
            ),
            code: "alg_not_allowed",
        },
        Case {
            name: "HS256 keyed with the RSA public key DER",
            config: "",
            token: hs256(
                &public_der,
                &json!({"alg": "HS256", "kid": kid}).to_string(),
                &good,
            ),
            code: "alg_not_allowed",
        },
        Case {
            name: "RS256 signed by an unknown key",
            config: "",
            token: rs256(&stranger, &header(&stranger.kid), &good),
            code: "unknown_kid",
        },
        Case {
            name: "a key whose issuer is not a string",
            config: "",
            token: rs256(&numbered_issuer, &header(&numbered_issuer.kid), &good),
            code: "unknown_kid",
        },
        Case {
            name: "unknown key claiming the known kid",
            config: "",
            token: rs256(&stranger, &h, &good),
            code: "bad_signature",
        },
        Case {
            name: "no kid",
            config: "",
            token: rs256(
                key,
                &json!({"alg": "RS256", "typ": "JWT"}).to_string(),
                &good,
            ),
            code: "missing_kid",
        },
        Case {
            name: "kid not a string",
            config: "",
            token: rs256(key, &json!({"alg": "RS256", "kid": 7}).to_string(), &good),
            code: "missing_kid",
        },
        Case {
            name: "crit header",
            config: "",
            token: rs256(
                key,
                &json!({"alg": "RS256", "kid": kid, "crit": ["exp"]}).to_string(),
                &good,
            ),
            code: "unsupported_crit",
        },
        Case {
            name: "expired beyond skew",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("exp".into(), json!(t - 301));
                }),
            ),
            code: "expired",
        },
        Case {
            name: "nbf in the future",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("nbf".into(), json!(t + 900));
                    c.insert("exp".into(), json!(t + 4000));
                }),
            ),
            code: "not_yet_valid",
        },
        Case {
            name: "iat far in the future",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("iat".into(), json!(t + 86_400));
                    c.insert("exp".into(), json!(t + 90_000));
                }),
            ),
            code: "issued_in_future",
        },
        Case {
            name: "older than max age",
            config: "max_token_age_secs = 3600",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("iat".into(), json!(t - 7200));
                    c.insert("nbf".into(), json!(t - 7200));
                }),
            ),
            code: "too_old",
        },
        Case {
            name: "no iat while a max age is set",
            config: "max_token_age_secs = 3600",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.remove("iat");
                }),
            ),
            code: "missing_claim",
        },
        Case {
            name: "wrong issuer host",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert(
                        "iss".into(),
                        json!(format!("https://login.evil.example/{TID}/v2.0")),
                    );
                }),
            ),
            code: "bad_issuer",
        },
        Case {
            name: "tenant not allowed (iss and tid agree)",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("tid".into(), json!(OTHER_TID));
                    c.insert("iss".into(), json!(v2_issuer(OTHER_TID)));
                }),
            ),
            code: "tenant_not_allowed",
        },
        Case {
            name: "iss names another tenant than tid",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("iss".into(), json!(v2_issuer(OTHER_TID)));
                }),
            ),
            code: "issuer_tenant_mismatch",
        },
        Case {
            name: "wrong audience",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("aud".into(), json!("api://another-resource"));
                }),
            ),
            code: "bad_audience",
        },
        Case {
            name: "Microsoft Graph audience (GUID)",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("aud".into(), json!("00000003-0000-0000-c000-000000000000"));
                }),
            ),
            code: "graph_audience",
        },
        Case {
            name: "Microsoft Graph audience (URL)",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("aud".into(), json!("https://graph.microsoft.com"));
                }),
            ),
            code: "graph_audience",
        },
        Case {
            name: "audience as an array",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("aud".into(), json!([AUD]));
                }),
            ),
            code: "bad_claim_type",
        },
        Case {
            name: "v1 token where only v2 is accepted",
            config: "",
            token: rs256(key, &h, &good_v1),
            code: "version_not_accepted",
        },
        Case {
            name: "payload altered after signing",
            config: "",
            token: altered_payload,
            code: "bad_signature",
        },
        Case {
            name: "signature altered",
            config: "",
            token: altered_signature,
            code: "bad_signature",
        },
        Case {
            name: "signature truncated",
            config: "",
            token: truncated_signature,
            code: "bad_signature",
        },
        Case {
            name: "RS256 with an empty signature",
            config: "",
            token: format!("{}.{}.", b64(h.as_bytes()), b64(good.as_bytes())),
            code: "bad_signature",
        },
        Case {
            name: "truncated to two segments",
            config: "",
            token: {
                let s = rs256(key, &h, &good);
                s[..s.rfind('.').expect("dot")].to_string()
            },
            code: "malformed",
        },
        Case {
            name: "five segments (JWE shape)",
            config: "",
            token: format!("{}.a.b", rs256(key, &h, &good)),
            code: "malformed",
        },
        Case {
            name: "payload not base64url",
            config: "",
            token: format!("{}.*not*base64*.{}", b64(h.as_bytes()), b64(b"sig")),
            code: "bad_encoding",
        },
        Case {
            name: "padded base64",
            config: "",
            token: {
                let s = rs256(key, &h, &good);
                let (a, rest) = s.split_once('.').expect("dot");
                format!("{a}==.{rest}")
            },
            code: "bad_encoding",
        },
        Case {
            name: "header not JSON",
            config: "",
            token: format!(
                "{}.{}.{}",
                b64(b"alg=RS256"),
                b64(good.as_bytes()),
                b64(b"sig")
            ),
            code: "bad_json",
        },
        Case {
            name: "payload a JSON array",
            config: "",
            token: rs256(key, &h, "[1,2,3]"),
            code: "bad_json",
        },
        Case {
            name: "oversized (> 16 KiB), refused before parsing",
            config: "",
            // Not even valid base64: size must be checked first.
            token: "x".repeat(MAX_TOKEN_BYTES + 1),
            code: "oversized",
        },
        Case {
            name: "duplicate aud claim",
            config: "",
            token: rs256(key, &h, &dup_aud),
            code: "duplicate_member",
        },
        Case {
            name: "duplicate alg in header",
            config: "",
            token: rs256(key, &dup_alg, &good),
            code: "duplicate_member",
        },
        Case {
            name: "duplicate member nested in a claim",
            config: "",
            token: rs256(
                key,
                &h,
                &format!("{{\"x\":{{\"a\":1,\"a\":2}},{}", &good[1..]),
            ),
            code: "duplicate_member",
        },
        Case {
            name: "groups claim is a string",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("groups".into(), json!("admins"));
                }),
            ),
            code: "bad_claim_type",
        },
        Case {
            name: "groups claim holds numbers",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("groups".into(), json!([1, 2]));
                }),
            ),
            code: "bad_claim_type",
        },
        Case {
            name: "exp is a string",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("exp".into(), json!((t + 3600).to_string()));
                }),
            ),
            code: "bad_claim_type",
        },
        Case {
            name: "no exp",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.remove("exp");
                }),
            ),
            code: "missing_claim",
        },
        Case {
            name: "no tid",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.remove("tid");
                }),
            ),
            code: "missing_claim",
        },
        Case {
            name: "no oid",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.remove("oid");
                }),
            ),
            code: "missing_claim",
        },
        Case {
            name: "app-only token carrying scp",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("idtyp".into(), json!("app"));
                }),
            ),
            code: "inconsistent_kind",
        },
        Case {
            name: "implicit-flow group overage (hasgroups) and no Graph configured",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.remove("groups");
                    c.insert("hasgroups".into(), json!(true));
                }),
            ),
            code: "groups_overage",
        },
        Case {
            name: "hasgroups that is not a boolean",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("hasgroups".into(), json!("true"));
                }),
            ),
            code: "bad_claim_type",
        },
        Case {
            name: "group overage and no Graph configured",
            config: "",
            token: rs256(
                key,
                &h,
                &Value::Object(
                    match (TokenSpec {
                        overage: true,
                        ..spec()
                    })
                    .claims_at(t)
                    {
                        Value::Object(m) => m,
                        _ => unreachable!(),
                    },
                )
                .to_string(),
            ),
            code: "groups_overage",
        },
        Case {
            // Whoever holds the Graph lookup's secret can get a token for
            // tollgate as tollgate itself (client credentials).
            name: "an app token of tollgate's own application",
            config: graph_unreachable,
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("azp".into(), json!("tollgate"));
                    c.insert("idtyp".into(), json!("app"));
                    c.remove("scp");
                }),
            ),
            code: "own_application",
        },
        Case {
            // The audience's own client id as the client of an app-only
            // token: tollgate's registration asking for a token for
            // itself, Graph or not.
            name: "an app token whose client is the audience's application",
            config: "",
            token: rs256(
                key,
                &h,
                &claims_with(|c| {
                    c.insert("azp".into(), json!(super::tests::AUD_GUID.to_uppercase()));
                    c.insert("idtyp".into(), json!("app"));
                    c.remove("scp");
                }),
            ),
            code: "own_application",
        },
        Case {
            name: "group overage and Graph unreachable",
            config: graph_unreachable,
            token: rs256(
                key,
                &h,
                &Value::Object(
                    match (TokenSpec {
                        overage: true,
                        ..spec()
                    })
                    .claims_at(t)
                    {
                        Value::Object(m) => m,
                        _ => unreachable!(),
                    },
                )
                .to_string(),
            ),
            code: "groups_lookup_failed",
        },
        Case {
            name: "PS256 when only RS256 is allowed",
            config: "",
            token: ps256(key, &json!({"alg": "PS256", "kid": kid}).to_string(), &good),
            code: "alg_not_allowed",
        },
        Case {
            name: "ES256 when only RS256 is allowed",
            config: "",
            token: es256(
                &ec,
                &json!({"alg": "ES256", "kid": "ec-1"}).to_string(),
                &good,
            ),
            code: "alg_not_allowed",
        },
        Case {
            name: "ES256 header naming the RSA key",
            config: "allowed_algorithms = [\"RS256\", \"ES256\"]",
            token: es256(&ec, &json!({"alg": "ES256", "kid": kid}).to_string(), &good),
            code: "key_alg_mismatch",
        },
        Case {
            name: "empty string",
            config: "",
            token: String::new(),
            code: "missing_token",
        },
        Case {
            name: "whitespace only",
            config: "",
            token: " \r\n".into(),
            code: "missing_token",
        },
    ];
    assert!(cases.len() >= 25, "the suite must keep at least 25 cases");

    (controls.to_vec(), cases)
}

#[tokio::test]
async fn forged_and_malformed_tokens_are_refused_with_specific_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (controls, cases) = forged_cases(dir.path());
    let mut verifiers: HashMap<&str, Verifier> = HashMap::new();
    for extra in controls
        .iter()
        .map(|c| c.1)
        .chain(cases.iter().map(|c| c.config))
    {
        if !verifiers.contains_key(extra) {
            let v = Verifier::from_config(&file_config(dir.path(), extra))
                .await
                .expect("verifier");
            verifiers.insert(extra, v);
        }
    }
    for (name, extra, token) in &controls {
        let p = verifiers[extra].verify(token).await;
        assert!(p.is_ok(), "control {name:?} refused: {p:?}");
        assert_eq!(p.map(|p| p.object_id).unwrap_or_default(), OID);
    }
    let mut wrong = Vec::new();
    for c in &cases {
        match verifiers[c.config].verify(&c.token).await {
            Ok(_) => wrong.push(format!("{}: accepted, expected {}", c.name, c.code)),
            Err(e) if e.code() != c.code => wrong.push(format!(
                "{}: refused with {} ({e}), expected {}",
                c.name,
                e.code(),
                c.code
            )),
            Err(_) => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

/// A user signing in through tollgate's own registration (the Graph
/// lookup's client) is someone: only an app-only token of it is refused.
#[tokio::test]
async fn a_users_token_through_the_graph_lookups_own_client_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = Keyring::open_or_create(dir.path()).expect("keyring");
    let key = ring.signing_key();
    let v = Verifier::from_config(&file_config(dir.path(), &graph_unreachable(dir.path())))
        .await
        .expect("verifier");
    let t = rs256(
        key,
        &header(key.kid.as_str()),
        &claims_with(|c| {
            c.insert("azp".into(), json!("tollgate"));
        }),
    );
    let p = v
        .verify(&t)
        .await
        .expect("a user's token through tollgate's own registration");
    assert_eq!(p.kind, PrincipalKind::User);
}

/// Without idtyp and scp, a token is app-only only when its subject is
/// the application itself (sub equals oid): a user's token without scp
/// (its sub pairwise) stays the user's, and does not take the roles of the
/// client it came through.
#[tokio::test]
async fn without_idtyp_only_a_token_whose_subject_is_its_oid_is_app_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = Keyring::open_or_create(dir.path()).expect("keyring");
    let key = ring.signing_key();
    let h = header(key.kid.as_str());
    let v = Verifier::from_config(&file_config(dir.path(), ""))
        .await
        .expect("verifier");
    let user_without_scp = rs256(
        key,
        &h,
        &claims_with(|c| {
            c.remove("idtyp");
            c.remove("scp");
        }),
    );
    assert_eq!(
        v.verify(&user_without_scp).await.expect("accepted").kind,
        PrincipalKind::User
    );
    let application = rs256(
        key,
        &h,
        &claims_with(|c| {
            c.remove("idtyp");
            c.remove("scp");
            c.insert("sub".into(), json!(OID));
        }),
    );
    assert_eq!(
        v.verify(&application).await.expect("accepted").kind,
        PrincipalKind::App
    );
}

#[tokio::test]
async fn app_token_minted_by_dev_idp_has_no_scp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = Keyring::open_or_create(dir.path()).expect("keyring");
    let c = TokenSpec {
        kind: TokenKind::App,
        ..spec()
    }
    .claims_at(now());
    assert_eq!(c.get("idtyp"), Some(&json!("app")));
    assert!(c.get("scp").is_none());
    let v = Verifier::from_config(&file_config(dir.path(), ""))
        .await
        .expect("verifier");
    let t = TokenSpec {
        kind: TokenKind::App,
        ..spec()
    }
    .mint(ring.signing_key())
    .expect("mint");
    assert_eq!(
        v.verify(&t).await.expect("accepted").kind,
        PrincipalKind::App
    );
}
