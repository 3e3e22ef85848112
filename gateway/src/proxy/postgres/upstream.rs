//! The gateway's own connection to the real server, authenticated with the
//! credential from the config (never the agent's).

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::{
    authentication::{md5_hash, sasl},
    message::{backend, frontend},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::wire::{self, Frame, WireError};
use crate::proxy::{tls::BoxedIo, Target};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach {address}: {source}")]
    Connect {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the target did not complete the login within {} s", LOGIN_TIMEOUT.as_secs())]
    TimedOut,
    #[error("target refused the gateway's credential: {code} {message}")]
    Refused { code: String, message: String },
    #[error("target asked for an authentication method tollgate does not speak ({0})")]
    UnsupportedAuth(String),
    #[error("TLS to the target: {0}")]
    Tls(String),
    #[error("gateway credential: {0}")]
    Credential(String),
    #[error(
        "the target reports {name} {value}; tollgate reads statements with {name} {expected} only"
    )]
    ReadsTextOtherwise {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Startup parameters passed from the agent to the target. Drivers need
/// these; none changes how a statement's text is parsed. `client_encoding`
/// is always UTF8: tollgate reads statements as UTF-8, and client-only
/// encodings (SJIS, BIG5, GBK) can hide a quote inside a multi-byte
/// character.
pub const PASSED_STARTUP_PARAMETERS: &[&str] = &[
    "database",
    "application_name",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "extra_float_digits",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
];

/// An authenticated upstream connection and what the server said after
/// AuthenticationOk (ParameterStatus, BackendKeyData, ReadyForQuery), which
/// the client must see as if it came from the server.
pub struct Upstream {
    pub stream: BoxedIo,
    pub buffered: BytesMut,
    pub greeting: BytesMut,
    pub socket_cookie: Option<u64>,
}

/// How long the connection and the login upstream may take: a server that
/// accepts the connection and never answers must not hold the agent's
/// session (and its audit record of the connection) forever.
pub const LOGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Connects and authenticates as `target.credential`, asking for the
/// database and options the agent asked for. The socket's cookie is
/// taken before the connection is tried, so a failed attempt (which the
/// kernel's evidence sees too) is on record with it.
pub async fn connect(
    target: &Target,
    client_params: &[(String, String)],
) -> Result<Upstream, UpstreamFailure> {
    let connect_error = |source| UpstreamError::Connect {
        address: target.address,
        source,
    };
    let (socket, socket_cookie) =
        super::super::upstream_socket(target.address).map_err(|source| UpstreamFailure {
            error: connect_error(source),
            socket_cookie: None,
        })?;
    let login = async {
        let stream = socket
            .connect(target.address)
            .await
            .map_err(connect_error)?;
        let _ = stream.set_nodelay(true);
        establish(target, stream, socket_cookie, client_params).await
    };
    match tokio::time::timeout(LOGIN_TIMEOUT, login).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::TimedOut),
    }
    .map_err(|error| UpstreamFailure {
        error,
        socket_cookie,
    })
}

/// A failed upstream connection, with the cookie of the socket tollgate
/// opened (when it got that far): the kernel saw that connection, so the
/// audit must account for it too.
#[derive(Debug)]
pub struct UpstreamFailure {
    pub error: UpstreamError,
    pub socket_cookie: Option<u64>,
}

impl std::fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl UpstreamFailure {
    /// The message of the client's ErrorResponse. What is wrong with
    /// tollgate's own credential (a password file's path, why it cannot be
    /// read) is the operator's business, kept in the log and the audit; the
    /// agent learns only that tollgate could not log in.
    pub fn client_message(&self) -> String {
        match self.error {
            UpstreamError::Credential(_) => {
                "tollgate: tollgate could not log in to the target".to_owned()
            }
            _ => format!("tollgate: {self}"),
        }
    }
}

async fn establish(
    target: &Target,
    stream: TcpStream,
    socket_cookie: Option<u64>,
    client_params: &[(String, String)],
) -> Result<Upstream, UpstreamError> {
    let mut stream = negotiate_tls(target, stream).await?;
    let user = target.credential.user.as_str();
    let password = target
        .credential
        .password()
        .map_err(|err| UpstreamError::Credential(err.to_string()))?;

    // The session parameters drivers depend on pass through; the ones that
    // change how the server reads SQL text (standard_conforming_strings,
    // search_path, an `options` string setting anything) do not, or the
    // server could run a different statement than the one policy decided.
    // standard_conforming_strings is set here, above any role or database
    // default: with it off, a backslash in a plain string hides a quote,
    // and the server would split statements where tollgate does not.
    // The settings asked for are the ones the greeting is checked against.
    // Unqualified names are classified as `public.x`: the server must
    // resolve them there too (search_path, one of the settings), not in a
    // schema named after the gateway's user or one a role default put
    // first.
    let mut params: Vec<(&str, &str)> = vec![("user", user)];
    params.extend(
        TEXT_READING_SETTINGS
            .iter()
            .map(|setting| (setting.name, setting.value)),
    );
    for (key, value) in client_params {
        if PASSED_STARTUP_PARAMETERS.contains(&key.as_str()) {
            params.push((key, value));
        } else if !params.iter().any(|(set, _)| set == key) {
            tracing::info!(parameter = %key, "startup parameter not passed to the target");
        }
    }
    let mut out = BytesMut::new();
    frontend::startup_message(params.iter().copied(), &mut out).map_err(WireError::Io)?;
    super::send_all(&mut stream, &out)
        .await
        .map_err(WireError::Io)?;

    let mut buf = BytesMut::new();
    let mut scram: Option<sasl::ScramSha256> = None;
    let mut scram_proven = false;
    loop {
        let frame = wire::read_frame(&mut stream, &mut buf).await?;
        match frame.tag {
            b'R' => {
                let message = parse_backend(&frame)?;
                out.clear();
                match message {
                    // After a SCRAM start, only a server that sent its
                    // proof (SASLFinal, checked below) may say the login
                    // succeeded: a rogue server skipping it would have
                    // logged tollgate in without knowing the password.
                    backend::Message::AuthenticationOk if scram.is_some() && !scram_proven => {
                        return Err(WireError::Malformed(
                            "the server ended SCRAM authentication without proving it knows the password".into(),
                        )
                        .into());
                    }
                    backend::Message::AuthenticationOk => break,
                    // Nor may it, once SCRAM has started, fall back to a
                    // method that hands it the password or its hash.
                    backend::Message::AuthenticationCleartextPassword
                    | backend::Message::AuthenticationMd5Password(_)
                        if scram.is_some() =>
                    {
                        return Err(WireError::Malformed(
                            "the server asked for the password itself in the middle of SCRAM authentication".into(),
                        )
                        .into());
                    }
                    backend::Message::AuthenticationCleartextPassword
                    | backend::Message::AuthenticationMd5Password(_)
                        if !password_may_cross(target) =>
                    {
                        return Err(UpstreamError::UnsupportedAuth(format!(
                            "the server at {} asked for the password (or its MD5 hash) over a \
                             connection without verified TLS; configure upstream_tls, or SCRAM \
                             on the server",
                            target.config.address
                        )));
                    }
                    backend::Message::AuthenticationCleartextPassword => {
                        let password = need(&password)?;
                        frontend::password_message(password.as_bytes(), &mut out)
                            .map_err(WireError::Io)?;
                    }
                    backend::Message::AuthenticationMd5Password(body) => {
                        let password = need(&password)?;
                        let hash = md5_hash(user.as_bytes(), password.as_bytes(), body.salt());
                        frontend::password_message(hash.as_bytes(), &mut out)
                            .map_err(WireError::Io)?;
                    }
                    backend::Message::AuthenticationSasl(body) => {
                        let password = need(&password)?;
                        let mechanisms: Vec<String> = body
                            .mechanisms()
                            .map(|m| Ok(m.to_owned()))
                            .collect()
                            .map_err(WireError::Io)?;
                        if !mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256) {
                            return Err(UpstreamError::UnsupportedAuth(mechanisms.join(", ")));
                        }
                        let state = sasl::ScramSha256::new(
                            password.as_bytes(),
                            sasl::ChannelBinding::unsupported(),
                        );
                        frontend::sasl_initial_response(
                            sasl::SCRAM_SHA_256,
                            state.message(),
                            &mut out,
                        )
                        .map_err(WireError::Io)?;
                        scram = Some(state);
                    }
                    backend::Message::AuthenticationSaslContinue(body) => {
                        let state = scram.as_mut().ok_or_else(|| {
                            WireError::Malformed("SASL continue before SASL start".into())
                        })?;
                        state.update(body.data()).map_err(WireError::Io)?;
                        frontend::sasl_response(state.message(), &mut out)
                            .map_err(WireError::Io)?;
                    }
                    backend::Message::AuthenticationSaslFinal(body) => {
                        let state = scram.as_mut().ok_or_else(|| {
                            WireError::Malformed("SASL final before SASL start".into())
                        })?;
                        // Proves the server knew the password: a rogue
                        // upstream cannot fake a successful SCRAM exchange.
                        state.finish(body.data()).map_err(WireError::Io)?;
                        scram_proven = true;
                    }
                    _ => {
                        return Err(UpstreamError::UnsupportedAuth(
                            "unknown authentication request".into(),
                        ))
                    }
                }
                if !out.is_empty() {
                    super::send_all(&mut stream, &out)
                        .await
                        .map_err(WireError::Io)?;
                }
            }
            b'E' => {
                let (code, message) = wire::error_fields(&frame);
                return Err(UpstreamError::Refused { code, message });
            }
            b'N' => {} // NoticeResponse during startup: nothing to do.
            other => {
                return Err(WireError::Malformed(format!(
                    "unexpected {:?} during authentication",
                    other as char
                ))
                .into())
            }
        }
    }

    // After AuthenticationOk: ParameterStatus*, BackendKeyData, ReadyForQuery.
    let mut greeting = BytesMut::new();
    loop {
        let frame = wire::read_frame(&mut stream, &mut buf).await?;
        let tag = frame.tag;
        if tag == b'E' {
            let (code, message) = wire::error_fields(&frame);
            return Err(UpstreamError::Refused { code, message });
        }
        // The login asked for these; a server (or a pooler in between)
        // that reports others would read statements otherwise.
        if let Some((setting, value)) = text_reading_changed(&frame) {
            return Err(UpstreamError::ReadsTextOtherwise {
                name: setting.name,
                value,
                expected: setting.value,
            });
        }
        // Identifiers (table names, statement names) are cut at 63 bytes
        // of the database's encoding: in another than UTF-8 (or SQL_ASCII,
        // which keeps the bytes it is given) a name tollgate decided on
        // could be another one to the server.
        if let Some(value) = (tag == b'S')
            .then(|| wire::parameter_status(&frame, "server_encoding"))
            .flatten()
            .filter(|v| !v.eq_ignore_ascii_case("UTF8") && !v.eq_ignore_ascii_case("SQL_ASCII"))
        {
            return Err(UpstreamError::ReadsTextOtherwise {
                name: "server_encoding",
                value,
                expected: "UTF8",
            });
        }
        greeting.extend_from_slice(&frame.bytes);
        if tag == b'Z' {
            break;
        }
    }
    Ok(Upstream {
        stream,
        buffered: buf,
        greeting,
        socket_cookie,
    })
}

/// A setting under which the server reads SQL text as tollgate does: its
/// name, the value tollgate asks for at login, and the family of the rule
/// that names a change of it.
pub(super) struct ReadingSetting {
    pub name: &'static str,
    pub value: &'static str,
    pub family: &'static str,
}

/// The settings under which the server reads SQL text as tollgate does:
/// another client encoding can hide a quote inside a multi-byte
/// character, and with standard_conforming_strings off a backslash in a
/// plain string hides one; with another search_path an unqualified name
/// is another table than the `public.x` tollgate decided on (PostgreSQL
/// reports its changes from version 18; before, they are refused by
/// policy, see policy.md). tollgate asks for all three at login.
const TEXT_READING_SETTINGS: [ReadingSetting; 3] = [
    ReadingSetting {
        name: "client_encoding",
        value: "UTF8",
        family: "encoding",
    },
    ReadingSetting {
        name: "standard_conforming_strings",
        value: "on",
        family: "encoding",
    },
    ReadingSetting {
        name: "search_path",
        value: "public",
        family: "names",
    },
];

/// If `frame` is a ParameterStatus giving one of
/// [`TEXT_READING_SETTINGS`] another value: that setting, and the value.
pub(super) fn text_reading_changed(frame: &Frame) -> Option<(&'static ReadingSetting, String)> {
    if frame.tag != b'S' {
        return None;
    }
    TEXT_READING_SETTINGS.iter().find_map(|setting| {
        let value = wire::parameter_status(frame, setting.name)?;
        (!value.eq_ignore_ascii_case(setting.value)).then_some((setting, value))
    })
}

/// Whether tollgate may answer a request for its password in the clear,
/// or for its MD5 hash (which an eavesdropper can replay, or crack
/// offline): over verified TLS, or to a server at a loopback address.
/// Anywhere else
/// whoever answers in the server's place on the network would be handed
/// the target's privileged login. SCRAM proves the password without
/// sending it, and stays allowed.
fn password_may_cross(target: &Target) -> bool {
    target.config.path_is_protected()
}

/// With `upstream_tls` configured, asks the server for TLS and verifies
/// its certificate; a server that declines is refused, never used in the
/// clear. Sessions and cancel requests alike.
pub(super) async fn negotiate_tls(
    target: &Target,
    mut stream: TcpStream,
) -> Result<BoxedIo, UpstreamError> {
    let Some(tls) = &target.upstream_tls else {
        return Ok(Box::new(stream));
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await.map_err(WireError::Io)?;
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(WireError::Io)?;
    if answer[0] != b'S' {
        return Err(UpstreamError::Tls("the server does not offer TLS".into()));
    }
    let tls_stream = tls
        .connector
        .connect(tls.server_name.clone(), stream)
        .await
        .map_err(|err| UpstreamError::Tls(err.to_string()))?;
    Ok(Box::new(tls_stream))
}

fn need(password: &Option<String>) -> Result<&str, UpstreamError> {
    password.as_deref().ok_or_else(|| {
        UpstreamError::Credential("the target asks for a password and none is configured".into())
    })
}

fn parse_backend(frame: &Frame) -> Result<backend::Message, WireError> {
    let mut bytes = frame.bytes.clone();
    backend::Message::parse(&mut bytes)?
        .ok_or_else(|| WireError::Malformed("incomplete message".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The test target, its server at `address` (a rogue or silent one).
    fn target_at(address: std::net::SocketAddr, password: Option<&str>) -> Target {
        let mut config = crate::proxy::postgres::refusal_tests::target_config(
            "127.0.0.1:0".parse().expect("addr"),
        );
        config.address = address;
        if let Some(password) = password {
            config.credential.password = Some(password.into());
        }
        Target::new(config).expect("target")
    }

    /// The next connection to `server`, its startup message read: what a
    /// test's rogue server answers next is tollgate's login.
    async fn accept_login(server: &tokio::net::TcpListener) -> tokio::net::TcpStream {
        let (mut conn, _) = server.accept().await.expect("accept");
        let mut startup = [0u8; 1024];
        let _ = conn.read(&mut startup).await.expect("startup message");
        conn
    }

    /// A rogue server that asks for SCRAM-SHA-256 and, after tollgate's
    /// first SCRAM message, sends `then` (and ReadyForQuery, a session were
    /// tollgate to accept it). Returns why tollgate refused it.
    async fn refused_by_tollgate_after_scram_start(then: &'static [u8]) -> String {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = server.local_addr().expect("addr");
        let rogue = tokio::spawn(async move {
            let mut conn = accept_login(&server).await;
            // AuthenticationSASL: SCRAM-SHA-256.
            let mechanism = b"SCRAM-SHA-256\0\0";
            let mut sasl = vec![b'R'];
            sasl.extend_from_slice(&(4 + 4 + mechanism.len() as i32).to_be_bytes());
            sasl.extend_from_slice(&10i32.to_be_bytes());
            sasl.extend_from_slice(mechanism);
            conn.write_all(&sasl).await.expect("ask for SASL");
            let mut initial = [0u8; 1024];
            let _ = conn.read(&mut initial).await.expect("initial response");
            conn.write_all(then).await.expect("the rogue's answer");
            conn.write_all(&[b'Z', 0, 0, 0, 5, b'I'])
                .await
                .expect("ready");
            let mut rest = Vec::new();
            let _ = conn.read_to_end(&mut rest).await;
        });
        let target = target_at(address, Some("secret"));
        let connected = tokio::time::timeout(Duration::from_secs(10), connect(&target, &[]))
            .await
            .expect("connect ends");
        rogue.abort();
        match connected {
            Ok(_) => panic!("went on with a server that never proved it knew the password"),
            Err(failure) => failure.to_string(),
        }
    }

    /// A server asking for the password in the clear, or its MD5 hash,
    /// gets it only over verified TLS or at a loopback address: elsewhere whoever
    /// answers in the server's place would be handed tollgate's login.
    #[tokio::test]
    async fn the_password_does_not_cross_the_network_in_the_clear() {
        for local in ["127.0.0.1:5432", "[::1]:5432", "[::ffff:127.0.0.1]:5432"] {
            assert!(
                password_may_cross(&target_at(local.parse().expect("addr"), None)),
                "{local}"
            );
        }
        assert!(!password_may_cross(&target_at(
            "10.0.0.5:5432".parse().expect("addr"),
            None
        )));
        // A rogue server on this host's own non-loopback address, reached
        // as a remote target would be.
        let probe = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
        probe.connect("192.0.2.1:9").expect("a route out");
        let ip = probe.local_addr().expect("local address").ip();
        assert!(!ip.is_loopback() && !ip.is_unspecified(), "{ip}");
        let server = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
        let address = server.local_addr().expect("addr");
        for ask in [
            &[b'R', 0, 0, 0, 8, 0, 0, 0, 3][..],
            &[b'R', 0, 0, 0, 12, 0, 0, 0, 5, 1, 2, 3, 4],
        ] {
            let target = target_at(address, Some("secret"));
            let login =
                tokio::spawn(
                    async move { connect(&target, &[]).await.err().map(|f| f.to_string()) },
                );
            let mut conn = accept_login(&server).await;
            conn.write_all(ask).await.expect("ask for the password");
            let mut answer = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await;
            assert!(
                !answer.windows(6).any(|w| w == b"secret"),
                "the password crossed in the clear"
            );
            assert!(
                !answer.starts_with(b"p"),
                "a password message was sent: {answer:?}"
            );
            let refused = login.await.expect("login task").expect("refused");
            assert!(refused.contains("without verified TLS"), "{refused}");
        }
    }

    /// A server that accepts the connection and never answers the login
    /// does not hold the session: the login ends at LOGIN_TIMEOUT, and the
    /// failure keeps the socket's cookie for the audit (the kernel saw the
    /// connection).
    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_answers_the_login_is_given_up_on() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = server.local_addr().expect("addr");
        let silent = tokio::spawn(async move {
            let (conn, _) = server.accept().await.expect("accept");
            // Holds the connection open and says nothing.
            std::future::pending::<()>().await;
            drop(conn);
        });
        let target = target_at(address, None);
        let started = tokio::time::Instant::now();
        let failure = match connect(&target, &[]).await {
            Ok(_) => panic!("logged in to a server that said nothing"),
            Err(failure) => failure,
        };
        silent.abort();
        assert!(
            matches!(failure.error, UpstreamError::TimedOut),
            "{failure}"
        );
        assert!(started.elapsed() >= LOGIN_TIMEOUT);
        assert!(failure.socket_cookie.is_some());
    }

    /// Once SCRAM has started, only the server's proof lets the login
    /// succeed: AuthenticationOk without it (a server that never knew the
    /// password) is refused, and so is a request for the password itself
    /// (cleartext or MD5), which would hand it to such a server.
    #[tokio::test]
    async fn a_server_that_skips_the_scram_proof_is_refused() {
        let ok: &[u8] = &[b'R', 0, 0, 0, 8, 0, 0, 0, 0];
        let cleartext: &[u8] = &[b'R', 0, 0, 0, 8, 0, 0, 0, 3];
        let md5: &[u8] = &[b'R', 0, 0, 0, 12, 0, 0, 0, 5, 1, 2, 3, 4];
        for (then, why) in [
            (
                ok,
                "ended SCRAM authentication without proving it knows the password",
            ),
            (
                cleartext,
                "asked for the password itself in the middle of SCRAM",
            ),
            (md5, "asked for the password itself in the middle of SCRAM"),
        ] {
            let refused = refused_by_tollgate_after_scram_start(then).await;
            assert!(refused.contains(why), "{refused}");
        }
    }

    /// A server, or a pooler in between, whose greeting reports a setting
    /// under which it would read statements otherwise than tollgate (it
    /// ignored what the login asked for) is refused before any session.
    #[tokio::test]
    async fn a_server_that_reads_text_otherwise_is_refused_at_login() {
        for (name, value) in [
            ("standard_conforming_strings", "off"),
            ("client_encoding", "SJIS"),
            ("search_path", "hr, public"),
            ("server_encoding", "EUC_JP"),
            ("server_encoding", "LATIN1"),
        ] {
            let server = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let address = server.local_addr().expect("addr");
            let lax = tokio::spawn(async move {
                let mut conn = accept_login(&server).await;
                // AuthenticationOk (trust), the setting, ReadyForQuery.
                let mut greeting = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
                let body = format!("{name}\0{value}\0");
                greeting.push(b'S');
                greeting.extend_from_slice(&(4 + body.len() as i32).to_be_bytes());
                greeting.extend_from_slice(body.as_bytes());
                greeting.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
                conn.write_all(&greeting).await.expect("greeting");
                let mut rest = Vec::new();
                let _ = conn.read_to_end(&mut rest).await;
            });
            let target = target_at(address, None);
            let connected = tokio::time::timeout(Duration::from_secs(10), connect(&target, &[]))
                .await
                .expect("connect ends");
            lax.abort();
            match connected {
                Ok(_) => panic!("went on with a server whose {name} is {value}"),
                Err(failure) => assert!(
                    matches!(&failure.error, UpstreamError::ReadsTextOtherwise { name: n, .. } if *n == name),
                    "{failure}"
                ),
            }
        }
    }
}
