//! CancelRequest: the agent gets a backend key made by tollgate, never the
//! server's. A cancel arrives on a new connection carrying that key;
//! tollgate finds the session it belongs to and sends the server's own key
//! to the server, so an agent can only cancel its own statements and never
//! learns anything that would let it talk to the server directly.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::{BufMut, BytesMut};
use rand::Rng;
use tokio::{io::AsyncWriteExt, net::TcpSocket};

use super::{
    upstream::{negotiate_tls, UpstreamError},
    wire::{self, WireError, CANCEL_REQUEST},
};
use crate::proxy::Target;

/// The server's side of one session's key, and the session it belongs to.
#[derive(Debug, Clone)]
pub struct ServerKey {
    pub address: SocketAddr,
    /// The target the session is of: a key is honoured only by that
    /// target's listener, so a cancel's record names the target it
    /// reached.
    pub target: Arc<str>,
    /// The session whose statement the cancel would stop, for the audit.
    pub session_uid: Arc<str>,
    /// The server's own backend process id, for the audit.
    pub process_id: i32,
    secret_key: i32,
}

impl ServerKey {
    /// Sends the cancel for this server session on `socket` (see
    /// [`crate::proxy::upstream_socket`]), over verified TLS when the
    /// target has `upstream_tls`, as its sessions are: the server's key
    /// crossing in the clear would let anyone on the path cancel that
    /// session's statements without tollgate.
    pub async fn send_cancel(
        &self,
        socket: TcpSocket,
        target: &Target,
    ) -> Result<(), UpstreamError> {
        let stream =
            socket
                .connect(self.address)
                .await
                .map_err(|source| UpstreamError::Connect {
                    address: self.address,
                    source,
                })?;
        let mut stream = negotiate_tls(target, stream).await?;
        let mut packet = BytesMut::with_capacity(16);
        packet.put_i32(16);
        packet.put_i32(CANCEL_REQUEST);
        packet.put_i32(self.process_id);
        packet.put_i32(self.secret_key);
        stream.write_all(&packet).await.map_err(WireError::Io)?;
        let _ = stream.shutdown().await;
        Ok(())
    }
}

/// Keys handed to agents, shared by all sessions of all targets.
#[derive(Debug, Default)]
pub struct CancelKeys {
    keys: Mutex<HashMap<(i32, i32), ServerKey>>,
}

/// Removes a session's key when the session ends.
pub struct Registration {
    keys: Arc<CancelKeys>,
    key: (i32, i32),
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.keys.lock().remove(&self.key);
    }
}

impl CancelKeys {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, i32), ServerKey>> {
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces the server's BackendKeyData in `greeting` with a fresh key
    /// of tollgate's and remembers which server key (of which session of
    /// which target) it stands for.
    pub fn substitute(
        self: &Arc<Self>,
        greeting: &mut BytesMut,
        address: SocketAddr,
        target: &str,
        session_uid: &str,
    ) -> Option<Registration> {
        let mut rest = std::mem::take(greeting);
        let mut rebuilt = BytesMut::with_capacity(rest.len());
        let mut registration = None;
        while let Ok(Some(frame)) = wire::split_frame(&mut rest) {
            if frame.tag == b'K' && frame.body().len() == 8 {
                let body = frame.body();
                let server = ServerKey {
                    address,
                    target: target.into(),
                    session_uid: session_uid.into(),
                    process_id: i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                    secret_key: i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                };
                let key = self.fresh_key(server);
                rebuilt.put_u8(b'K');
                rebuilt.put_i32(12);
                rebuilt.put_i32(key.0);
                rebuilt.put_i32(key.1);
                registration = Some(Registration {
                    keys: self.clone(),
                    key,
                });
            } else {
                rebuilt.unsplit(frame.bytes);
            }
        }
        rebuilt.unsplit(rest);
        *greeting = rebuilt;
        registration
    }

    fn fresh_key(&self, server: ServerKey) -> (i32, i32) {
        let mut rng = rand::rng();
        let mut keys = self.lock();
        loop {
            let key = (rng.random_range(1..i32::MAX), rng.random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(slot) = keys.entry(key) {
                slot.insert(server);
                return key;
            }
        }
    }

    /// The server session that the key tollgate handed out stands for, if
    /// it is a session of `target`: a key presented to another target's
    /// listener is unknown there, as it would be to another server.
    pub fn server_of(&self, target: &str, process_id: i32, secret_key: i32) -> Option<ServerKey> {
        self.lock()
            .get(&(process_id, secret_key))
            .filter(|server| &*server.target == target)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `upstream_tls`, the cancel goes inside verified TLS, as the
    /// target's sessions do; a server that declines TLS is not sent the
    /// key in the clear.
    #[tokio::test]
    async fn a_cancel_to_a_tls_target_goes_inside_verified_tls() {
        use tokio::io::AsyncReadExt;
        let pki = tempfile::tempdir().expect("tempdir");
        let tls = crate::proxy::tls::self_signed_cert(pki.path());
        let acceptor = crate::proxy::tls::acceptor(&tls).expect("acceptor");
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = server.local_addr().expect("addr");
        let mut config = crate::proxy::postgres::refusal_tests::target_config(
            "127.0.0.1:0".parse().expect("addr"),
        );
        config.address = address;
        config.upstream_tls = Some(crate::proxy::tls::UpstreamTlsConfig {
            ca_file: tls.cert.clone(),
            server_name: None,
        });
        let target = Target::new(config).expect("target");
        let key = ServerKey {
            address,
            target: "orders-db".into(),
            session_uid: "session-1".into(),
            process_id: 4242,
            secret_key: 777,
        };
        let mut want = BytesMut::new();
        want.put_i32(16);
        want.put_i32(CANCEL_REQUEST);
        want.put_i32(4242);
        want.put_i32(777);

        // A server that reads the SSLRequest, then declines it and reads
        // what comes in the clear, or takes it and reads inside TLS.
        let serve = |decline: bool| {
            let (server, acceptor) = (&server, acceptor.clone());
            async move {
                let (mut conn, _) = server.accept().await.expect("accept");
                let mut request = [0u8; 8];
                conn.read_exact(&mut request).await.expect("SSLRequest");
                assert_eq!(
                    i32::from_be_bytes([request[4], request[5], request[6], request[7]]),
                    wire::SSL_REQUEST
                );
                if decline {
                    conn.write_all(b"N").await.expect("N");
                    let mut rest = Vec::new();
                    let _ = conn.read_to_end(&mut rest).await;
                    return rest;
                }
                conn.write_all(b"S").await.expect("S");
                let mut tls = acceptor.accept(conn).await.expect("handshake");
                let mut cancel = [0u8; 16];
                tls.read_exact(&mut cancel)
                    .await
                    .expect("the cancel, inside TLS");
                cancel.to_vec()
            }
        };
        let socket = TcpSocket::new_v4().expect("socket");
        let (sent, got) = tokio::join!(key.send_cancel(socket, &target), serve(false));
        sent.expect("sent");
        assert_eq!(got, want.to_vec());

        let socket = TcpSocket::new_v4().expect("socket");
        let (sent, got) = tokio::join!(key.send_cancel(socket, &target), serve(true));
        let err = sent.expect_err("a server without TLS gets no cancel");
        assert!(err.to_string().contains("does not offer TLS"), "{err}");
        assert_eq!(got, Vec::<u8>::new(), "the key went out in the clear");
    }

    #[test]
    fn the_agent_sees_tollgate_s_key_and_it_maps_to_the_server_s() {
        let keys = Arc::new(CancelKeys::default());
        let mut greeting = BytesMut::new();
        greeting.put_u8(b'S');
        greeting.put_i32(4 + 13);
        greeting.put_slice(b"TimeZone\0UTC\0");
        greeting.put_u8(b'K');
        greeting.put_i32(12);
        greeting.put_i32(4242);
        greeting.put_i32(777);
        greeting.put_slice(b"Z\0\0\0\x05I");
        let address: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let registration = keys
            .substitute(&mut greeting, address, "orders-db", "session-1")
            .expect("key found");

        let mut frames = greeting.clone();
        let tags: Vec<u8> =
            std::iter::from_fn(|| wire::split_frame(&mut frames).ok().flatten().map(|f| f.tag))
                .collect();
        assert_eq!(tags, b"SKZ");
        let agent_key = registration.key;
        assert_ne!(agent_key, (4242, 777));
        let server = keys
            .server_of("orders-db", agent_key.0, agent_key.1)
            .expect("registered");
        assert_eq!((server.process_id, server.secret_key), (4242, 777));
        assert_eq!(&*server.session_uid, "session-1");
        assert!(
            keys.server_of("billing-db", agent_key.0, agent_key.1)
                .is_none(),
            "another target's listener does not honour the key"
        );
        drop(registration);
        assert!(keys.lock().is_empty(), "the key goes with the session");
    }
}
