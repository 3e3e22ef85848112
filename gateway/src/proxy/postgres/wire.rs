//! Message framing for the PostgreSQL adapter.
//!
//! Upstream messages are parsed with `postgres-protocol` where the adapter
//! needs their content; frames the adapter only relays are cut by their
//! 5-byte header and forwarded untouched. The few backend messages tollgate
//! writes itself (authentication requests, errors) are built here, since
//! `postgres-protocol` only encodes the frontend side.

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol version 3.0 in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// PostgreSQL refuses startup packets larger than this; so do we.
const MAX_STARTUP_PACKET: usize = 10_000;
/// Upper bound for one message, as PostgreSQL's own limit for large
/// messages: a length field above it is a malformed stream, not a message.
pub const MAX_MESSAGE: usize = 1 << 30;
/// The password message carries a token: PostgreSQL itself caps
/// authentication messages far lower; this bounds what an unauthenticated
/// peer can make tollgate hold.
pub const MAX_PASSWORD_MESSAGE: usize = 64 * 1024;
/// Largest message accepted from an authenticated agent (a statement, a
/// COPY chunk); larger ones end the session as malformed.
pub const MAX_CLIENT_MESSAGE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// The first packet of a connection.
#[derive(Debug)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel {
        process_id: i32,
        secret_key: i32,
    },
    /// StartupMessage parameters in order (user, database, options, ...).
    Startup(Vec<(String, String)>),
}

pub async fn read_startup<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Startup, WireError> {
    // A connection closed before its first byte sent nothing to refuse (a
    // health check, a port probe); one closed part-way through its packet
    // is a malformed startup, and refused as one.
    let part_way = |err: WireError| match err {
        WireError::Closed => WireError::Malformed(
            "the client closed the connection in the middle of its startup packet".into(),
        ),
        WireError::Io(err) => WireError::Malformed(format!(
            "the connection failed in the middle of the startup packet: {err}"
        )),
        other => other,
    };
    let mut len_bytes = [0u8; 4];
    read_exact_or_closed(reader, &mut len_bytes[..1]).await?;
    read_exact_or_closed(reader, &mut len_bytes[1..])
        .await
        .map_err(part_way)?;
    let len = i32::from_be_bytes(len_bytes);
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(WireError::Malformed(format!("startup packet length {len}")));
    }
    let mut body = vec![0u8; len as usize - 4];
    read_exact_or_closed(reader, &mut body)
        .await
        .map_err(part_way)?;
    let mut buf = &body[..];
    let code = buf.get_i32();
    match code {
        SSL_REQUEST => Ok(Startup::Ssl),
        GSSENC_REQUEST => Ok(Startup::GssEnc),
        CANCEL_REQUEST if buf.len() == 8 => Ok(Startup::Cancel {
            process_id: buf.get_i32(),
            secret_key: buf.get_i32(),
        }),
        PROTOCOL_3_0 => {
            let mut params = Vec::new();
            loop {
                let key = take_cstr(&mut buf)?;
                if key.is_empty() {
                    break;
                }
                let value = take_cstr(&mut buf)?;
                // PostgreSQL takes the last of a repeated parameter; a
                // reader that took the first would audit another
                // database (or intent) than the session runs in.
                if params.iter().any(|(k, _)| *k == key) {
                    return Err(WireError::Malformed(format!(
                        "startup parameter {key:?} given twice"
                    )));
                }
                params.push((key, value));
            }
            Ok(Startup::Startup(params))
        }
        other => Err(WireError::Malformed(format!(
            "unsupported protocol version {}.{}",
            other >> 16,
            other & 0xffff
        ))),
    }
}

/// One tagged message, header included, as it travels on the wire.
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    pub bytes: BytesMut,
}

impl Frame {
    /// The message body, after tag and length.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }
}

/// Cuts the next complete frame off the front of `buf`, if there is one.
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    split_frame_limited(buf, MAX_MESSAGE)
}

/// [`split_frame`] refusing messages longer than `max` bytes. Nothing is
/// reserved ahead of the bytes actually received, so a length field alone
/// cannot make tollgate allocate.
pub fn split_frame_limited(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > max {
        return Err(WireError::Malformed(format!(
            "message {:?} with length {len} (at most {max} accepted)",
            tag as char
        )));
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(Frame {
        tag,
        bytes: buf.split_to(total),
    }))
}

/// Reads until one complete frame of at most `max` bytes is available.
pub async fn read_frame_limited<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Frame, WireError> {
    loop {
        if let Some(frame) = split_frame_limited(buf, max)? {
            return Ok(frame);
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
}

/// Reads until one complete frame is available.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Frame, WireError> {
    read_frame_limited(reader, buf, MAX_MESSAGE).await
}

/// A NUL-terminated string from the front of `buf`.
pub fn take_cstr(buf: &mut &[u8]) -> Result<String, WireError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| WireError::Malformed("string without terminator".into()))?;
    let text = std::str::from_utf8(&buf[..end])
        .map_err(|_| WireError::Malformed("string is not UTF-8".into()))?
        .to_owned();
    *buf = &buf[end + 1..];
    Ok(text)
}

/// The longest name PostgreSQL keeps of a prepared statement or portal
/// (NAMEDATALEN - 1): it compares names only that far.
pub const MAX_OBJECT_NAME: usize = 63;

/// A statement or portal name from the front of `buf`. A longer one than
/// the server keeps is refused: two names that differ past byte 63 are one
/// to the server and two to tollgate, which would then judge one
/// statement and let the server run another. So is one that is not
/// ASCII: the server converts a name to the database's encoding before
/// it cuts it at 63 bytes, where a character may take more bytes than in
/// UTF-8 (EUC_JP, EUC_TW) or two characters become one, so only ASCII,
/// the same bytes in every server encoding, is measured right here.
fn take_object_name(buf: &mut &[u8]) -> Result<String, WireError> {
    let name = take_cstr(buf)?;
    if name.len() > MAX_OBJECT_NAME {
        return Err(WireError::Malformed(format!(
            "a statement or portal name of {} bytes (the server keeps {MAX_OBJECT_NAME})",
            name.len()
        )));
    }
    if !name.is_ascii() {
        return Err(WireError::Malformed(
            "a statement or portal name that is not ASCII (the server's encoding may read it as another name)"
                .into(),
        ));
    }
    Ok(name)
}

/// Query ('Q'): the statement text.
pub fn query_text(frame: &Frame) -> Result<String, WireError> {
    take_cstr(&mut frame.body())
}

/// Parse ('P'): statement name, query text and the parameter type OIDs the
/// client declared (0 or missing: the server infers the type).
pub fn parse_message(frame: &Frame) -> Result<(String, String, Vec<u32>), WireError> {
    let mut body = frame.body();
    let name = take_object_name(&mut body)?;
    let query = take_cstr(&mut body)?;
    let mut types = Vec::new();
    if body.len() >= 2 {
        let count = body.get_i16().max(0) as usize;
        for _ in 0..count {
            if body.len() < 4 {
                return Err(WireError::Malformed(
                    "Parse message too short (parameter types)".into(),
                ));
            }
            types.push(body.get_u32());
        }
    }
    Ok((name, query, types))
}

/// Type OIDs whose binary form is their text.
const TEXT_OID: u32 = 25;
const VARCHAR_OID: u32 = 1043;

/// A binary parameter of a well-known fixed-size type, as PostgreSQL would
/// print it (text types are rendered as text-format values are).
fn render_binary(type_oid: u32, bytes: &[u8]) -> Option<String> {
    const BOOL: u32 = 16;
    const INT8: u32 = 20;
    const INT2: u32 = 21;
    const INT4: u32 = 23;
    const FLOAT4: u32 = 700;
    const FLOAT8: u32 = 701;
    const UUID: u32 = 2950;
    Some(match (type_oid, bytes.len()) {
        (BOOL, 1) => (bytes[0] != 0).to_string(),
        (INT2, 2) => i16::from_be_bytes([bytes[0], bytes[1]]).to_string(),
        (INT4, 4) => i32::from_be_bytes(bytes.try_into().ok()?).to_string(),
        (INT8, 8) => i64::from_be_bytes(bytes.try_into().ok()?).to_string(),
        (FLOAT4, 4) => f32::from_be_bytes(bytes.try_into().ok()?).to_string(),
        (FLOAT8, 8) => f64::from_be_bytes(bytes.try_into().ok()?).to_string(),
        (UUID, 16) => {
            let h = hex::encode(bytes);
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        }
        _ => return None,
    })
}

/// Bind ('B'): portal name and statement name.
pub fn bind_message(frame: &Frame) -> Result<(String, String), WireError> {
    let mut body = frame.body();
    let portal = take_object_name(&mut body)?;
    let statement = take_object_name(&mut body)?;
    Ok((portal, statement))
}

/// Bind ('B'): the parameter values, rendered for the audit: text-format
/// values as text, binary ones of well-known types (from the Parse's
/// `types`) as PostgreSQL prints them, other binary ones as `\\x` hex, NULL
/// as null; each value capped at `max_value` bytes and the whole list at
/// `max_total` (a JSON array).
pub fn bind_parameters_rendered(
    frame: &Frame,
    types: &[u32],
    max_value: usize,
    max_total: usize,
) -> Result<String, WireError> {
    let mut body = frame.body();
    take_cstr(&mut body)?; // portal
    take_cstr(&mut body)?; // statement
    let short = |what: &str| WireError::Malformed(format!("Bind message too short ({what})"));
    let take_i16 = |body: &mut &[u8], what: &str| -> Result<i16, WireError> {
        if body.len() < 2 {
            return Err(short(what));
        }
        Ok(body.get_i16())
    };
    let format_count = take_i16(&mut body, "format count")?.max(0) as usize;
    let mut formats = Vec::with_capacity(format_count);
    for _ in 0..format_count {
        formats.push(take_i16(&mut body, "format")?);
    }
    let value_count = take_i16(&mut body, "parameter count")?.max(0) as usize;
    let mut rendered = Vec::with_capacity(value_count);
    let mut total = 0usize;
    for i in 0..value_count {
        if body.len() < 4 {
            return Err(short("parameter length"));
        }
        let len = body.get_i32();
        let binary = match formats.len() {
            0 => false,
            1 => formats[0] == 1,
            _ => formats.get(i).copied() == Some(1),
        };
        let value = if len < 0 {
            serde_json::Value::Null
        } else {
            let len = len as usize;
            if body.len() < len {
                return Err(short("parameter value"));
            }
            let (bytes, rest) = body.split_at(len);
            body = rest;
            let type_oid = types.get(i).copied().unwrap_or(0);
            // Only what can be kept is converted: a value may be 64 MiB, and
            // invalid UTF-8 would triple as replacement characters. The
            // slack lets a character cut at the end be told from one whole.
            let kept = &bytes[..len.min(max_value.saturating_add(4))];
            let typed = if !binary || matches!(type_oid, TEXT_OID | VARCHAR_OID) {
                Some(String::from_utf8_lossy(kept).into_owned())
            } else {
                render_binary(type_oid, bytes)
            };
            let text = match typed {
                Some(text) if text.len() <= max_value && kept.len() == len => text,
                Some(text) => {
                    let mut cut = max_value.min(text.len());
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    format!("{}...({len} bytes)", &text[..cut])
                }
                None if len > max_value => {
                    format!("\\x{}...({len} bytes)", hex::encode(&bytes[..max_value]))
                }
                None => format!("\\x{}", hex::encode(bytes)),
            };
            serde_json::Value::String(text)
        };
        total += value.to_string().len();
        if total > max_total {
            rendered.push(serde_json::Value::String(format!(
                "...({} more parameters)",
                value_count - i
            )));
            break;
        }
        rendered.push(value);
    }
    Ok(serde_json::Value::Array(rendered).to_string())
}

/// Execute ('E'): portal name.
pub fn execute_portal(frame: &Frame) -> Result<String, WireError> {
    take_object_name(&mut frame.body())
}

/// Close ('C' from the client): kind ('S' statement, 'P' portal) and name.
pub fn close_message(frame: &Frame) -> Result<(u8, String), WireError> {
    let mut body = frame.body();
    if body.is_empty() {
        return Err(WireError::Malformed("empty Close".into()));
    }
    let kind = body[0];
    body = &body[1..];
    Ok((kind, take_object_name(&mut body)?))
}

/// ParameterStatus ('S' from the server): the value, if it reports `name`.
pub fn parameter_status(frame: &Frame, name: &str) -> Option<String> {
    let mut body = frame.body();
    let key = take_cstr(&mut body).ok()?;
    (key == name).then(|| take_cstr(&mut body).ok()).flatten()
}

/// PasswordMessage ('p'): the password, i.e. the agent's token.
pub fn password(frame: &Frame) -> Result<String, WireError> {
    if frame.tag != b'p' {
        return Err(WireError::Malformed(format!(
            "expected a password message, got {:?}",
            frame.tag as char
        )));
    }
    take_cstr(&mut frame.body())
}

/// CommandComplete ('C' from the server): the row count at the end of the
/// tag ("SELECT 3", "INSERT 0 5", "UPDATE 2"), when there is one.
pub fn command_complete_rows(frame: &Frame) -> Option<i64> {
    let tag = take_cstr(&mut frame.body()).ok()?;
    tag.rsplit(' ').next()?.parse().ok()
}

/// The fields of an ErrorResponse or NoticeResponse, as (code, value),
/// stopping at the terminator or at the first malformed field.
fn response_fields(frame: &Frame) -> Vec<(u8, String)> {
    let mut fields = Vec::new();
    let mut body = frame.body();
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            break;
        }
        body = rest;
        let Ok(value) = take_cstr(&mut body) else {
            break;
        };
        fields.push((field, value));
    }
    fields
}

/// Whether an ErrorResponse ends the session: severity FATAL or PANIC
/// (the non-localized `V` field, else `S`).
pub fn is_fatal(frame: &Frame) -> bool {
    let fields = response_fields(frame);
    let severity = fields
        .iter()
        .find(|(field, _)| *field == b'V')
        .or_else(|| fields.iter().find(|(field, _)| *field == b'S'));
    severity.is_some_and(|(_, s)| s == "FATAL" || s == "PANIC")
}

/// ErrorResponse ('E' from the server): SQLSTATE and message.
pub fn error_fields(frame: &Frame) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    for (field, value) in response_fields(frame) {
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    (code, message)
}

fn put_frame(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let len_at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - len_at) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, text: &str) {
    // A NUL inside would end the field early; PostgreSQL never sends one.
    out.put_slice(text.replace('\0', " ").as_bytes());
    out.put_u8(0);
}

/// AuthenticationCleartextPassword: the token travels as the password.
pub fn authentication_cleartext(out: &mut BytesMut) {
    put_frame(out, b'R', |b| b.put_i32(3));
}

pub fn authentication_ok(out: &mut BytesMut) {
    put_frame(out, b'R', |b| b.put_i32(0));
}

/// An ErrorResponse or NoticeResponse with only its severity and SQLSTATE
/// kept and `message` in place of the server's: messages, details and
/// context can quote the values a statement touched.
pub fn redacted(frame: &Frame, message: &str) -> BytesMut {
    let kept: Vec<(u8, String)> = response_fields(frame)
        .into_iter()
        .filter(|(field, _)| matches!(field, b'S' | b'V' | b'C'))
        .collect();
    let mut out = BytesMut::new();
    put_frame(&mut out, frame.tag, |b| {
        for (field, value) in &kept {
            b.put_u8(*field);
            put_cstr(b, value);
        }
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
    out
}

/// Fields of an ErrorResponse or NoticeResponse that quote the values of
/// rows: a constraint violation's DETAIL shows the failing row, CONTEXT
/// and the internal query may show a function's arguments or a trigger's
/// statement.
const VALUE_FIELDS: &[u8] = b"DWq";

/// The ErrorResponse or NoticeResponse without the fields that quote row
/// values ([`VALUE_FIELDS`]); `None` when it has none of them. For a
/// statement that names no masked column but may still touch masked rows
/// through what it sets off (a cascade, a trigger, a deferred constraint
/// checked at commit).
pub fn without_row_values(frame: &Frame) -> Option<BytesMut> {
    let fields = response_fields(frame);
    if !fields.iter().any(|(field, _)| VALUE_FIELDS.contains(field)) {
        return None;
    }
    let mut out = BytesMut::new();
    put_frame(&mut out, frame.tag, |b| {
        for (field, value) in fields.iter().filter(|(f, _)| !VALUE_FIELDS.contains(f)) {
            b.put_u8(*field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
    Some(out)
}

/// A NotificationResponse (`A`) with its payload withheld: the sending
/// process and the channel kept, the payload empty. `None` if the frame
/// is not a whole notification.
pub fn notification_without_payload(frame: &Frame) -> Option<BytesMut> {
    let body = frame.bytes.get(5..)?;
    let pid = body.get(..4)?;
    let channel_end = body.get(4..)?.iter().position(|&b| b == 0)?;
    let channel = body.get(4..4 + channel_end)?;
    let mut out = BytesMut::new();
    put_frame(&mut out, b'A', |b| {
        b.put_slice(pid);
        b.put_slice(channel);
        b.put_u8(0);
        b.put_u8(0);
    });
    Some(out)
}

/// ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(out: &mut BytesMut, severity: &str, code: &str, message: &str) {
    put_frame(out, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity);
        b.put_u8(b'V');
        put_cstr(b, severity);
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

/// A simple Query message (frontend).
pub fn query(out: &mut BytesMut, text: &str) {
    put_frame(out, b'Q', |b| put_cstr(b, text));
}

/// An Execute message (frontend) of `portal`, all rows.
pub fn execute(out: &mut BytesMut, portal: &str) {
    put_frame(out, b'E', |b| {
        put_cstr(b, portal);
        b.put_i32(0);
    });
}

/// ReadyForQuery with the transaction status byte ('I', 'T' or 'E').
pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    put_frame(out, b'Z', |b| b.put_u8(status));
}

async fn read_exact_or_closed<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<(), WireError> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Closed),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statement or portal name longer than the server keeps, or not
    /// ASCII, is refused in every message that names one; 63 bytes pass.
    #[test]
    fn object_names_longer_than_the_server_keeps_are_refused() {
        let message = |tag: u8, body: Vec<u8>| {
            let mut buf = BytesMut::new();
            buf.put_u8(tag);
            buf.put_i32(4 + body.len() as i32);
            buf.put_slice(&body);
            split_frame(&mut buf).unwrap().unwrap()
        };
        let cstr = |s: &str| [s.as_bytes(), b"\0"].concat();
        for (name, ok) in [
            ("n".repeat(63), true),
            ("n".repeat(64), false),
            // 43 bytes here, 64 in an EUC_JP database, where it is the
            // same name as any other with these first 63 bytes.
            (format!("{}1", "á".repeat(21)), false),
            ("stmtcache_0a1b".to_string(), true),
        ] {
            let len = name.len();
            let parse = message(b'P', [cstr(&name), cstr("SELECT 1"), vec![0, 0]].concat());
            assert_eq!(parse_message(&parse).is_ok(), ok, "Parse {len}");
            let bind = message(b'B', [cstr(""), cstr(&name), vec![0; 6]].concat());
            assert_eq!(bind_message(&bind).is_ok(), ok, "Bind statement {len}");
            let bind = message(b'B', [cstr(&name), cstr(""), vec![0; 6]].concat());
            assert_eq!(bind_message(&bind).is_ok(), ok, "Bind portal {len}");
            let execute = message(b'E', [cstr(&name), vec![0; 4]].concat());
            assert_eq!(execute_portal(&execute).is_ok(), ok, "Execute {len}");
            let close = message(b'C', [vec![b'S'], cstr(&name)].concat());
            assert_eq!(close_message(&close).is_ok(), ok, "Close {len}");
        }
    }

    #[test]
    fn frames_are_cut_only_when_complete() {
        let mut buf = BytesMut::from(&b"Q\x00\x00\x00\x0dSELECT 1\x00Q"[..]);
        let frame = split_frame(&mut buf).unwrap().unwrap();
        assert_eq!(frame.tag, b'Q');
        assert_eq!(query_text(&frame).unwrap(), "SELECT 1");
        assert!(split_frame(&mut buf).unwrap().is_none());
        assert_eq!(&buf[..], b"Q");
    }

    #[test]
    fn a_length_over_the_cap_is_refused_from_its_header_alone() {
        // A password message announcing 1 GiB: refused before any body
        // arrives, and nothing reserved for it.
        let mut buf = BytesMut::from(&b"p\x40\x00\x00\x00"[..]);
        assert!(matches!(
            split_frame_limited(&mut buf, MAX_PASSWORD_MESSAGE),
            Err(WireError::Malformed(_))
        ));
        let mut buf = BytesMut::from(&b"Q\x00\x01\x00\x00"[..]);
        assert!(split_frame_limited(&mut buf, MAX_CLIENT_MESSAGE)
            .unwrap()
            .is_none());
        assert!(
            buf.capacity() < 1024,
            "reserved {} bytes for an announced message",
            buf.capacity()
        );
    }

    #[test]
    fn a_negative_length_is_malformed() {
        let mut buf = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert!(matches!(
            split_frame(&mut buf),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn error_response_round_trips() {
        let mut out = BytesMut::new();
        error_response(&mut out, "FATAL", "28000", "token refused: expired");
        let frame = split_frame(&mut out).unwrap().unwrap();
        assert_eq!(frame.tag, b'E');
        assert_eq!(
            error_fields(&frame),
            ("28000".into(), "token refused: expired".into())
        );
    }

    #[test]
    fn redaction_keeps_severity_and_code_only() {
        let mut out = BytesMut::new();
        put_frame(&mut out, b'E', |b| {
            for (f, v) in [
                (b'S', "ERROR"),
                (b'C', "22P02"),
                (b'M', "invalid input: \"ada@example.com\""),
                (b'D', "ada"),
            ] {
                b.put_u8(f);
                put_cstr(b, v);
            }
            b.put_u8(0);
        });
        let frame = split_frame(&mut out).unwrap().unwrap();
        let mut redacted = redacted(&frame, "withheld");
        let again = split_frame(&mut redacted).unwrap().unwrap();
        assert_eq!(error_fields(&again), ("22P02".into(), "withheld".into()));
        assert!(!again.bytes.windows(3).any(|w| w == b"ada"));
    }

    #[test]
    fn command_complete_row_counts() {
        for (tag, rows) in [
            ("SELECT 3", Some(3)),
            ("INSERT 0 5", Some(5)),
            ("BEGIN", None),
        ] {
            let mut out = BytesMut::new();
            put_frame(&mut out, b'C', |b| put_cstr(b, tag));
            let frame = split_frame(&mut out).unwrap().unwrap();
            assert_eq!(command_complete_rows(&frame), rows, "{tag}");
        }
    }

    #[test]
    fn bind_parameters_are_rendered_and_capped() {
        let mut out = BytesMut::new();
        put_frame(&mut out, b'B', |b| {
            put_cstr(b, "");
            put_cstr(b, "s1");
            b.put_i16(2);
            b.put_i16(0);
            b.put_i16(1);
            b.put_i16(3);
            b.put_i32(3);
            b.put_slice(b"Ada");
            b.put_i32(2);
            b.put_slice(&[0xde, 0xad]);
            b.put_i32(-1);
            b.put_i16(0);
        });
        let frame = split_frame(&mut out).unwrap().unwrap();
        assert_eq!(
            bind_parameters_rendered(&frame, &[], 64, 4096).unwrap(),
            r#"["Ada","\\xdead",null]"#
        );
        assert_eq!(
            bind_parameters_rendered(&frame, &[], 1, 4096).unwrap(),
            r#"["A...(3 bytes)","\\xde...(2 bytes)",null]"#
        );
        // With the types declared at Parse, binary integers read as numbers.
        assert_eq!(
            bind_parameters_rendered(&frame, &[25, 21], 64, 4096).unwrap(),
            r#"["Ada","-8531",null]"#
        );
    }

    /// A large value is cut before it is converted: a megabyte of
    /// invalid UTF-8 renders to its cap, not to three megabytes of
    /// replacement characters; a character cut at the cap is dropped
    /// whole.
    #[test]
    fn large_parameters_are_cut_before_they_are_converted() {
        let mut out = BytesMut::new();
        put_frame(&mut out, b'B', |b| {
            put_cstr(b, "");
            put_cstr(b, "");
            b.put_i16(0);
            b.put_i16(2);
            b.put_i32(1 << 20);
            b.put_slice(&vec![0xff; 1 << 20]);
            b.put_i32(6);
            b.put_slice("aé€".as_bytes());
        });
        let frame = split_frame(&mut out).unwrap().unwrap();
        let rendered = bind_parameters_rendered(&frame, &[], 256, 4096).unwrap();
        let values: Vec<String> = serde_json::from_str(&rendered).unwrap();
        assert!(values[0].ends_with("...(1048576 bytes)"), "{rendered}");
        assert!(
            values[0].len() <= 256 + "...(1048576 bytes)".len(),
            "{rendered}"
        );
        assert_eq!(
            bind_parameters_rendered(&frame, &[], 3, 4096).unwrap(),
            "[\"\u{fffd}...(1048576 bytes)\",\"a\u{e9}...(6 bytes)\"]"
        );
    }

    #[test]
    fn a_truncated_bind_is_malformed_not_a_panic() {
        let mut out = BytesMut::new();
        put_frame(&mut out, b'B', |b| {
            put_cstr(b, "");
            put_cstr(b, "");
            b.put_i16(0);
            b.put_i16(1);
            b.put_i32(100);
        });
        let frame = split_frame(&mut out).unwrap().unwrap();
        assert!(matches!(
            bind_parameters_rendered(&frame, &[], 64, 4096),
            Err(WireError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn startup_parameters_are_read_in_order() {
        let mut packet = BytesMut::new();
        packet.put_i32(0);
        packet.put_i32(PROTOCOL_3_0);
        for s in ["user", "agent", "database", "orders", ""] {
            put_cstr(&mut packet, s);
        }
        let len = packet.len() as i32;
        packet[..4].copy_from_slice(&len.to_be_bytes());
        let Startup::Startup(params) = read_startup(&mut &packet[..]).await.unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!(
            params,
            vec![
                ("user".into(), "agent".into()),
                ("database".into(), "orders".into())
            ]
        );
    }

    #[test]
    fn a_notification_keeps_its_channel_and_loses_its_payload() {
        let mut raw = BytesMut::new();
        put_frame(&mut raw, b'A', |b| {
            b.put_i32(4242);
            put_cstr(b, "orders");
            put_cstr(b, "ada@example.com");
        });
        let frame = split_frame(&mut raw).unwrap().unwrap();
        let out = notification_without_payload(&frame).unwrap();
        let mut expected = BytesMut::new();
        put_frame(&mut expected, b'A', |b| {
            b.put_i32(4242);
            put_cstr(b, "orders");
            put_cstr(b, "");
        });
        assert_eq!(out, expected);
        let mut cut = BytesMut::from(&[b'A', 0, 0, 0, 6, 1, 2][..]);
        let frame = split_frame(&mut cut).unwrap().unwrap();
        assert!(notification_without_payload(&frame).is_none());
    }
}
