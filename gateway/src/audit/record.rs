//! One audited request: a flat record whose fields are named after OCSF
//! attribute paths, so each becomes a typed top-level Parquet column.
//! docs/audit-schema.md documents every field.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Text every record of a session repeats (who, from where, to what):
/// shared by them rather than copied into each. A busy session's records
/// wait in memory until their segment is written, and these fields were
/// about a third of a record's memory and most of its allocations.
pub type SharedText = std::sync::Arc<str>;

/// A list every record of a session repeats (groups, roles), shared as
/// [`SharedText`] is.
pub type SharedList = std::sync::Arc<[String]>;

/// `prev_record_hash` of the first record of a chain: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// OCSF class: Datastore Activity.
pub const CLASS_DATASTORE_ACTIVITY: i32 = 6005;
/// OCSF class: API Activity (Kubernetes requests).
pub const CLASS_API_ACTIVITY: i32 = 6003;
/// OCSF class: SSH Activity.
pub const CLASS_SSH_ACTIVITY: i32 = 4007;
/// OCSF class: Authentication.
pub const CLASS_AUTHENTICATION: i32 = 3002;

/// Datastore activity ids (OCSF 6005).
pub mod datastore_activity {
    pub const READ: i32 = 1;
    pub const UPDATE: i32 = 2;
    pub const CONNECT: i32 = 3;
    pub const QUERY: i32 = 4;
    pub const WRITE: i32 = 5;
    pub const CREATE: i32 = 6;
    pub const DELETE: i32 = 7;
}

/// Authentication activity ids (OCSF 3002).
pub mod authentication_activity {
    pub const LOGON: i32 = 1;
}

/// OCSF `status_id`.
pub mod status {
    /// The outcome is not known (a request the session ended on before
    /// the server answered).
    pub const UNKNOWN: i32 = 0;
    pub const SUCCESS: i32 = 1;
    pub const FAILURE: i32 = 2;
}

/// OCSF `action_id`.
pub mod action {
    pub const ALLOWED: i32 = 1;
    pub const DENIED: i32 = 2;
    pub const MODIFIED: i32 = 4;
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
// A WAL written before a field existed still decodes (the field is empty).
#[serde(default)]
pub struct AuditRecord {
    // --- filled by the audit store ---
    /// Position in this host's chain, from 1, without gaps.
    pub sequence: u64,
    /// SHA-256 of the previous record's canonical encoding (hex).
    pub prev_record_hash: String,
    /// SHA-256 of this record's canonical encoding (hex).
    pub record_hash: String,

    // --- what and when ---
    /// Which event of a request this is: "request" (written durably before
    /// the request is forwarded), "outcome" (after the response),
    /// "refusal" (the request was refused; nothing was forwarded), or
    /// "session" (a connection was authenticated or ended).
    pub phase: String,
    /// Shared by the request and outcome records of one request.
    pub request_uid: String,
    /// Event time, milliseconds since the Unix epoch (OCSF `time`).
    pub time: i64,
    pub class_uid: i32,
    pub activity_id: i32,
    /// class_uid * 100 + activity_id.
    pub type_uid: i64,
    /// OCSF `status_id`: 1 success, 2 failure.
    pub status_id: i32,
    /// Why it failed or was refused, in words.
    pub status_detail: String,
    /// OCSF `action_id`: 1 allowed, 2 denied, 4 modified.
    pub action_id: i32,
    /// The policy rule that decided (empty when none matched).
    pub policy_uid: String,
    /// Id of the approval that let a NeedsApproval request run (empty when
    /// no approval was involved).
    pub approval_uid: String,
    /// Entra object id of the person who approved (empty when none).
    pub approver_user_uid: String,
    /// Display name of the approver: for reading, never for decisions.
    pub approver_user_name: String,

    // --- who (from the validated token) ---
    /// Entra object id (`oid`).
    pub actor_user_uid: SharedText,
    /// Display name (upn / preferred_username): never used for decisions.
    pub actor_user_name: SharedText,
    /// Entra tenant id (`tid`).
    pub actor_user_org_uid: SharedText,
    /// Client application id (`azp` / `appid`).
    pub actor_app_uid: SharedText,
    pub actor_user_groups: SharedList,
    pub actor_user_roles: SharedList,
    /// Token id (`uti`); the token itself is never stored.
    pub actor_session_credential_uid: SharedText,
    /// SHA-256 of the token (hex).
    pub actor_session_credential_fingerprint: SharedText,

    // --- the agent process (from the kernel redirect) ---
    pub actor_process_pid: Option<i32>,
    pub actor_process_name: SharedText,
    pub actor_process_cgroup_id: Option<i64>,

    // --- where ---
    pub src_endpoint_ip: SharedText,
    pub src_endpoint_port: Option<i32>,
    /// The address the agent asked for (before the redirect).
    pub dst_endpoint_ip: SharedText,
    pub dst_endpoint_port: Option<i32>,
    /// Configured target name, e.g. "orders-db".
    pub dst_endpoint_name: SharedText,
    /// "postgres", "ssh", "kubernetes".
    pub connection_info_protocol_name: SharedText,
    /// One id per client connection, shared by all its records.
    pub session_uid: SharedText,
    /// SO_COOKIE of the gateway's upstream socket, for bypass reconciliation.
    pub upstream_socket_cookie: Option<i64>,

    // --- the request ---
    /// Database user and database name the agent asked for.
    pub database_user: SharedText,
    pub database_name: SharedText,
    /// The exact statement text.
    pub query_info_query_string: String,

    // --- the outcome ---
    pub response_rows: Option<i64>,
    pub response_bytes: Option<i64>,
    /// Server-side error code (SQLSTATE, HTTP status, exit status).
    pub response_error_code: String,
    pub duration_us: Option<i64>,

    /// Statement kind the policy saw: read, write, ddl, dcl, admin,
    /// transaction, utility (the strongest of a multi-statement request);
    /// "unparsed" when the SQL parser did not understand it.
    pub query_info_kind: String,
    /// Tables read and written, `schema.table`.
    pub query_info_tables_read: Vec<String>,
    pub query_info_tables_written: Vec<String>,
    /// Bound parameter values, rendered readably and size-capped (JSON array).
    pub query_info_parameters: String,
    /// Why the agent says it acts (application_name or `/* intent: ... */`).
    pub intent: String,
    /// tollgate roles of the caller, which policy decided on.
    pub actor_tollgate_roles: SharedList,
    /// Result columns whose values were masked.
    pub masked_columns: Vec<String>,
    /// The rows returned, after masking, when the grant records full
    /// results: a JSON array of rows (each an array of values, NULL as
    /// null); past the size cap, a last element `{"truncated_rows": N}`
    /// counts the rows not kept. Empty otherwise.
    pub response_data: String,

    /// Everything else, as a JSON object.
    pub unmapped: String,
}

impl AuditRecord {
    /// The canonical encoding that `record_hash` is computed over: a JSON
    /// object of the record's fields with keys in byte order, no
    /// whitespace, leaving out `record_hash` and every field that is empty:
    /// an empty string, an empty list, or an absent (`None`) value. Numbers
    /// are always kept, so `Some(0)` and `None` hash differently.
    ///
    /// Hashing the logical record rather than Parquet bytes keeps the hash
    /// independent of how a file happens to be encoded. Leaving defaults out
    /// means a field added later (absent, so empty, in older records and
    /// files) does not change the hash of any record written before it, as
    /// long as it is a string, a list or an `Option`; fields are only ever
    /// added, never renamed or removed.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        super::segment::canonical_bytes(self)
    }

    /// SHA-256 over [`Self::canonical_bytes`], lower-case hex.
    pub fn compute_hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, written the obvious way: serde_json tree, drop
    /// `record_hash` and empty values, sort keys.
    fn reference(r: &AuditRecord) -> Vec<u8> {
        let serde_json::Value::Object(fields) = serde_json::to_value(r).unwrap() else {
            unreachable!()
        };
        let kept: std::collections::BTreeMap<String, serde_json::Value> = fields
            .into_iter()
            .filter(|(k, v)| k != "record_hash" && !is_empty(v))
            .collect();
        serde_json::to_vec(&kept).unwrap()
    }

    fn is_empty(v: &serde_json::Value) -> bool {
        use serde_json::Value;
        match v {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            _ => false,
        }
    }

    #[test]
    fn canonical_encoding_matches_the_reference_definition() {
        let awkward = [
            "",
            "plain",
            "quote \" and backslash \\",
            "control \u{1} \n \t",
            "ünïcødé ✓ 𝄞",
            "</script>",
        ];
        for i in 0..200usize {
            let s = |k: usize| awkward[(i + k) % awkward.len()].to_string();
            let r = AuditRecord {
                sequence: i as u64 * 7919,
                prev_record_hash: s(0),
                record_hash: s(1),
                phase: s(2),
                time: -(i as i64) * 1_000_003,
                class_uid: i as i32 - 100,
                type_uid: i64::MAX - i as i64,
                actor_user_groups: (0..i % 3).map(s).collect(),
                actor_process_pid: (i % 3 == 0).then_some(i as i32 - 1),
                actor_process_cgroup_id: (i % 4 == 1).then_some(i64::MIN + i as i64),
                query_info_query_string: s(3),
                masked_columns: (0..i % 2).map(s).collect(),
                unmapped: s(4),
                ..Default::default()
            };
            assert_eq!(
                String::from_utf8(r.canonical_bytes()).unwrap(),
                String::from_utf8(reference(&r)).unwrap(),
                "record {i}"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_config(1024))]

        /// Random text (escapes, control characters, any character) in
        /// strings and lists, random numbers and absent values, across the
        /// members on either side of the chain members and at both ends.
        #[test]
        fn canonical_encoding_of_random_records_matches_the_reference(
            text in proptest::collection::vec("(\\PC|[\"\\\\\u{0}-\u{1f}]){0,40}", 8),
            list in proptest::collection::vec("(\\PC|[\"\\\\\u{0}-\u{1f}]){0,12}", 0..4),
            n in proptest::prelude::any::<(u64, i64, i32, Option<i64>, Option<i32>)>(),
        ) {
            let r = AuditRecord {
                sequence: n.0,
                prev_record_hash: text[0].clone(),
                record_hash: text[1].clone(),
                action_id: n.2,
                time: n.1,
                policy_uid: text[2].clone(),
                phase: text[3].clone(),
                query_info_query_string: text[4].clone(),
                session_uid: text[5].as_str().into(),
                unmapped: text[6].clone(),
                actor_user_groups: list.as_slice().into(),
                masked_columns: list.iter().rev().cloned().collect(),
                response_rows: n.3,
                actor_process_pid: n.4,
                response_data: text[7].clone(),
                ..Default::default()
            };
            proptest::prop_assert_eq!(
                String::from_utf8(r.canonical_bytes()).unwrap(),
                String::from_utf8(reference(&r)).unwrap()
            );
        }
    }

    #[test]
    fn canonical_encoding_is_sorted_and_leaves_out_empty_fields_and_own_hash() {
        let r = AuditRecord {
            sequence: 7,
            prev_record_hash: "ab".into(),
            record_hash: "ignored".into(),
            phase: "request".into(),
            actor_user_groups: ["g".to_string()].into(),
            actor_process_pid: Some(0),
            response_rows: None,
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(r.canonical_bytes()).unwrap(),
            concat!(
                r#"{"action_id":0,"activity_id":0,"actor_process_pid":0,"actor_user_groups":["g"],"#,
                r#""class_uid":0,"phase":"request","prev_record_hash":"ab","sequence":7,"#,
                r#""status_id":0,"time":0,"type_uid":0}"#
            )
        );
        // Some(0) is a value, None is not: they must not hash alike.
        let mut none = r.clone();
        none.actor_process_pid = None;
        assert_ne!(none.compute_hash(), r.compute_hash());
        let mut other = r.clone();
        other.record_hash = "different".into();
        assert_eq!(other.compute_hash(), r.compute_hash());
    }

    #[test]
    fn json_from_before_a_field_existed_decodes_with_it_empty() {
        let r: AuditRecord = serde_json::from_str(r#"{"sequence":3,"phase":"request"}"#).unwrap();
        assert_eq!(r.sequence, 3);
        assert!(r.masked_columns.is_empty());
        assert_eq!(r.response_rows, None);
    }
}
