//! One HTTP/1.1 keep-alive connection per worker (hyper's connection-level client: no
//! pool, no TLS). A broken connection is dropped and the next request opens a new one.

use std::{net::SocketAddr, time::Duration};

use http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A request that got no HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TransportError {
    /// The TCP connection or the HTTP handshake failed.
    Connect,
    /// No complete answer within the request timeout.
    Timeout,
    /// The connection broke before the answer was complete.
    Closed,
    /// The request could not be built (e.g. a header value the server sent us is not valid
    /// in a header).
    Request,
}

impl TransportError {
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::Request => "request",
        }
    }
}

/// A complete answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// One keep-alive connection to the target.
#[derive(Debug)]
pub struct Connection {
    addr: SocketAddr,
    authority: HeaderValue,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Connection {
    /// Nothing is opened until the first request (or [`Connection::connect`]).
    pub fn new(addr: SocketAddr, authority: &str, timeout: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            addr,
            authority: HeaderValue::from_str(authority)?,
            timeout,
            sender: None,
        })
    }

    /// Opens the connection now (set-up does this so the first measured request does not
    /// pay for the TCP handshake).
    pub async fn connect(&mut self) -> Result<(), TransportError> {
        match tokio::time::timeout(self.timeout, self.ready()).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(TransportError::Timeout),
        }
    }

    /// Sends one request and reads the whole answer, within the timeout.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        json: Option<Bytes>,
    ) -> Result<Answer, TransportError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.authority.clone());
        if let Some(token) = bearer {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match json {
            Some(body) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                body
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(body))
            .map_err(|_| TransportError::Request)?;
        match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => {
                self.sender = None;
                Err(error)
            }
            Err(_) => {
                // The answer may still arrive on this connection: never reuse it.
                self.sender = None;
                Err(TransportError::Timeout)
            }
        }
    }

    async fn exchange(&mut self, request: Request<Full<Bytes>>) -> Result<Answer, TransportError> {
        let sender = self.ready().await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|_| TransportError::Closed)?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|_| TransportError::Closed)?
            .to_bytes();
        Ok(Answer { status, body })
    }

    /// The open connection, ready for a request; opens one if there is none or the server
    /// closed the last one.
    async fn ready(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, TransportError> {
        if self.sender.as_ref().is_some_and(SendRequest::is_closed) {
            self.sender = None;
        }
        let sender = match self.sender.take() {
            Some(sender) => sender,
            None => self.open().await?,
        };
        let sender = self.sender.insert(sender);
        if sender.ready().await.is_err() {
            self.sender = None;
            return Err(TransportError::Closed);
        }
        self.sender.as_mut().ok_or(TransportError::Closed)
    }

    async fn open(&self) -> Result<SendRequest<Full<Bytes>>, TransportError> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|_| TransportError::Connect)?;
        // Small requests and answers: waiting to coalesce them only adds latency.
        stream
            .set_nodelay(true)
            .map_err(|_| TransportError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| TransportError::Connect)?;
        // The connection task ends when the sender is dropped or the server closes.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}
