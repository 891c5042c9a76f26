//! MQTT over WebSocket: the upgrade (path, the `mqtt` subprotocol) and a
//! byte stream over binary frames, so that the connection code reads and
//! writes it like a socket. MQTT packets may be split across frames or
//! packed several to a frame (MQTT 5 section 6): frames are only a carrier.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Subprotocols accepted: `mqtt` (3.1.1 and 5), `mqttv3.1` (3.1).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Upgrade `stream` to WebSocket on `path`. A request for another path
/// gets 404; one offering subprotocols without `mqtt` gets 400.
pub(crate) async fn accept<S>(
    stream: S,
    path: &str,
    max_message: usize,
) -> Result<WsStream<S>, tokio_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The callback's signature is tungstenite's (its error is a whole response).
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() != path {
            return Err(refusal(StatusCode::NOT_FOUND, "no MQTT endpoint here"));
        }
        let offered = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        if !offered.is_empty() {
            let Some(chosen) = offered
                .iter()
                .find(|p| SUBPROTOCOLS.iter().any(|s| s.eq_ignore_ascii_case(p)))
            else {
                return Err(refusal(
                    StatusCode::BAD_REQUEST,
                    "the WebSocket subprotocol must be mqtt",
                ));
            };
            if let Ok(v) = HeaderValue::from_str(chosen) {
                response.headers_mut().insert("sec-websocket-protocol", v);
            }
        }
        Ok(response)
    };
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(max_message);
    config.max_frame_size = Some(max_message);
    let inner =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await?;
    Ok(WsStream {
        inner,
        pending: Bytes::new(),
        sending: None,
    })
}

/// The client's side, for bridges and load tools: upgrade `stream` (a TCP
/// or TLS connection to a broker) to a WebSocket at `url` (`ws://HOST/PATH`
/// or `wss://...`), offering the `mqtt` subprotocol. The result reads and
/// writes MQTT bytes as the broker's side of a WebSocket listener does.
pub async fn connect<S>(stream: S, url: &str) -> io::Result<WsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url
        .into_client_request()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
    let (inner, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(to_io)?;
    Ok(WsStream {
        inner,
        pending: Bytes::new(),
        sending: None,
    })
}

#[allow(clippy::result_large_err)]
fn refusal(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(why.to_string()));
    *r.status_mut() = status;
    r
}

/// A WebSocket carrying MQTT as a byte stream: reads concatenate binary
/// frames; each write is sent as one binary frame and is complete only
/// once flushed to the socket (the connection code does not flush after
/// every write, as a socket does not need it), so a write that must wait
/// is reported, on the caller's retry with the same bytes, as done.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// What is left of the last frame read.
    pending: Bytes,
    /// Bytes of a write handed to the WebSocket and not yet flushed out.
    sending: Option<usize>,
}

fn to_io(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Io(e) => e,
        E::ConnectionClosed | E::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                // Pings are answered by the WebSocket layer itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text WebSocket frame: MQTT travels in binary frames",
                    )))
                }
                // End of stream, as a socket's read of 0 bytes.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.sending.is_none() {
            ready!(Pin::new(&mut self.inner).poll_ready(cx)).map_err(to_io)?;
            Pin::new(&mut self.inner)
                .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
                .map_err(to_io)?;
            self.sending = Some(buf.len());
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx)).map_err(to_io)?;
        Poll::Ready(Ok(self.sending.take().unwrap_or(0)))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.inner).poll_close(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}
