//! The server's listener: plain TCP, or TLS with each handshake in its own
//! task, so that a client that connects and says nothing holds up nobody.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{extract::connect_info::Connected, serve::IncomingStream};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{Semaphore, mpsc},
};
use tokio_rustls::TlsAcceptor;

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes under way at once; further connections wait to be
/// accepted.
const MAX_HANDSHAKES: usize = 64;

pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

pub struct AgentListener {
    local_addr: SocketAddr,
    kind: Kind,
}

enum Kind {
    Plain(TcpListener),
    /// Connections whose handshake completed.
    Tls(mpsc::Receiver<(Box<dyn Connection>, SocketAddr)>),
}

/// The client's address, for the rate limits.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, AgentListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, AgentListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl AgentListener {
    pub fn new(tcp: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> io::Result<Self> {
        let local_addr = tcp.local_addr()?;
        let kind = match tls {
            None => Kind::Plain(tcp),
            Some(config) => Kind::Tls(spawn_handshakes(tcp, TlsAcceptor::from(config))),
        };
        Ok(Self { local_addr, kind })
    }
}

fn spawn_handshakes(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
) -> mpsc::Receiver<(Box<dyn Connection>, SocketAddr)> {
    let (done, connections) = mpsc::channel(MAX_HANDSHAKES);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        while !done.is_closed() {
            let Ok(turn) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match tcp.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, mostly: wait rather than spin.
                    log::debug!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, done) = (acceptor.clone(), done.clone());
            tokio::spawn(async move {
                let _turn = turn;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = done
                            .send((Box::new(tls) as Box<dyn Connection>, peer))
                            .await;
                    }
                    Ok(Err(e)) => log::debug!("TLS handshake with {peer}: {e}"),
                    Err(_) => log::debug!("TLS handshake with {peer}: timed out"),
                }
            });
        }
    });
    connections
}

impl axum::serve::Listener for AgentListener {
    type Io = Box<dyn Connection>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match &mut self.kind {
            Kind::Plain(tcp) => loop {
                match TcpListener::accept(tcp).await {
                    Ok((stream, peer)) => return (Box::new(stream), peer),
                    Err(e) => {
                        log::debug!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            },
            Kind::Tls(connections) => match connections.recv().await {
                Some(connection) => connection,
                // The accepting task is gone: nothing will come.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}
