//! A TCP relay that does nothing but copy bytes: no protocol parsing, no
//! identity, no policy, no audit. `cargo xtask bench` runs pgbench through
//! it beside PgBouncer and tollgate, on tokio's multi-thread runtime and
//! jemalloc as tollgate, so the table shows what any proxy costs on the
//! host before it does any work of its own.
//!
//! `bare_relay LISTEN_PORT UPSTREAM_ADDR` (listens on 127.0.0.1).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
// Linked for its global allocator (jemalloc), so that the relay allocates
// as tollgate does: an unreferenced crate is not linked at all.
use tollgate as _;

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .context("usage: bare_relay LISTEN_PORT UPSTREAM_ADDR")?
        .parse()
        .context("LISTEN_PORT")?;
    let upstream: SocketAddr = args
        .next()
        .context("usage: bare_relay LISTEN_PORT UPSTREAM_ADDR")?
        .parse()
        .context("UPSTREAM_ADDR")?;
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("listen on 127.0.0.1:{port}"))?;
    loop {
        let (client, _) = listener.accept().await.context("accept")?;
        tokio::spawn(async move {
            if let Err(e) = relay(client, upstream).await {
                eprintln!("bare_relay: {e:#}");
            }
        });
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) -> Result<()> {
    let mut server = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connect to {upstream}"))?;
    // As tollgate does on both sides: small messages go out at once.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}
