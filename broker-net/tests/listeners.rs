//! Real TLS handshakes and WebSocket upgrades against a running broker:
//! certificates made by the test (rcgen), raw MQTT 3.1.1 over each transport.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use broker_core::hooks::{Authenticate, ConnectInfo, HookError, Login};
use broker_core::storage::Storage;
use broker_core::Broker;
use broker_net::{ListenerConfig, Protocol};
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const WITHIN: Duration = Duration::from_secs(5);

/// CONNECT, MQTT 3.1.1, clean session, client id "t", keep alive 60.
const CONNECT: [u8; 15] = [
    0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b't',
];
const PINGREQ: [u8; 2] = [0xC0, 0];

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    Ca {
        cert: p.self_signed(&key).expect("CA"),
        key,
    }
}

/// A certificate signed by `ca`: a server one for 127.0.0.1, or a client one named `cn`.
fn leaf(ca: &Ca, cn: &str, client: bool) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    if client {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    } else {
        p.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().expect("ip"))];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    }
    let cert = p.signed_by(&key, &ca.cert, &ca.key).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write PEM");
    path
}

/// A username, and whether it came from a certificate.
type SeenLogin = (Option<String>, bool);

/// Records what the authentication hook saw.
#[derive(Default, Clone)]
struct Seen(Arc<Mutex<Vec<SeenLogin>>>);

#[async_trait::async_trait]
impl Authenticate for Seen {
    async fn authenticate(&self, c: &ConnectInfo) -> Result<Login, HookError> {
        self.0
            .lock()
            .push((c.username.clone(), c.username_from_certificate));
        Ok(Login::allow())
    }
}

async fn broker(seen: Seen) -> Broker {
    let storage = Storage::from_backend(Arc::new(storage_memory::MemoryStore::new()));
    Broker::builder()
        .storage(storage)
        .authenticate(seen)
        .start()
        .await
        .expect("broker starts")
}

async fn listen(broker: &Broker, config: ListenerConfig) -> (SocketAddr, broker_net::Listener) {
    let listener = broker_net::bind(broker, &config).await.expect("bind");
    (listener.local_addr(), listener)
}

fn client_config(trust: &Ca, identity: Option<(String, String)>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(trust.cert.der().to_vec()))
        .expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = rustls_pemfile::certs(&mut cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("cert");
            let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key.as_bytes())
                .expect("key")
                .expect("a key");
            builder
                .with_client_auth_cert(certs, key)
                .expect("client auth")
        }
    };
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().expect("ip").into());
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// CONNECT and expect a CONNACK with return code 0.
async fn mqtt_hello<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> std::io::Result<[u8; 4]> {
    s.write_all(&CONNECT).await?;
    s.flush().await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(WITHIN, s.read_exact(&mut ack))
        .await
        .map_err(|_| std::io::Error::other("no CONNACK"))??;
    Ok(ack)
}

#[tokio::test]
async fn mqtts_handshake_and_a_wrong_ca_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca("test CA");
    let (cert, key) = leaf(&ca, "server", false);
    let mut config = ListenerConfig::new("127.0.0.1:0", Protocol::Mqtts);
    config.cert = Some(write(dir.path(), "cert.pem", &cert));
    config.key = Some(write(dir.path(), "key.pem", &key));
    let broker = broker(Seen::default()).await;
    let (addr, listener) = listen(&broker, config).await;
    tokio::spawn(listener.run());

    let mut s = tls_connect(addr, client_config(&ca, None))
        .await
        .expect("TLS");
    assert_eq!(mqtt_hello(&mut s).await.expect("CONNACK"), [0x20, 2, 0, 0]);

    let other = self::ca("another CA");
    let err = tls_connect(addr, client_config(&other, None))
        .await
        .expect_err("a server certificate from an unknown CA is refused");
    assert!(err.to_string().contains("certificate"), "{err}");
    broker.shutdown().await;
}

#[tokio::test]
async fn required_client_certificate_and_its_name_as_username() {
    let dir = tempfile::tempdir().expect("dir");
    let server_ca = ca("server CA");
    let client_ca = ca("client CA");
    let (cert, key) = leaf(&server_ca, "server", false);
    let mut config = ListenerConfig::new("127.0.0.1:0", Protocol::Mqtts);
    config.cert = Some(write(dir.path(), "cert.pem", &cert));
    config.key = Some(write(dir.path(), "key.pem", &key));
    config.client_ca = Some(write(dir.path(), "ca.pem", &client_ca.cert.pem()));
    config.require_certificate = true;
    config.use_identity_as_username = true;
    let seen = Seen::default();
    let broker = broker(seen.clone()).await;
    let (addr, listener) = listen(&broker, config).await;
    tokio::spawn(listener.run());

    // Without a certificate: the handshake (TLS 1.2) or the first read (1.3) fails.
    let refused = match tls_connect(addr, client_config(&server_ca, None)).await {
        Err(_) => true,
        Ok(mut s) => mqtt_hello(&mut s).await.is_err(),
    };
    assert!(refused, "a client without a certificate is refused");
    // With one from another CA: refused too.
    let rogue = ca("rogue CA");
    let refused = match tls_connect(
        addr,
        client_config(&server_ca, Some(leaf(&rogue, "evil", true))),
    )
    .await
    {
        Err(_) => true,
        Ok(mut s) => mqtt_hello(&mut s).await.is_err(),
    };
    assert!(refused, "a certificate from another CA is refused");
    assert!(seen.0.lock().is_empty(), "refused before MQTT");

    let identity = leaf(&client_ca, "device-42", true);
    let mut s = tls_connect(addr, client_config(&server_ca, Some(identity)))
        .await
        .expect("TLS with a client certificate");
    assert_eq!(mqtt_hello(&mut s).await.expect("CONNACK"), [0x20, 2, 0, 0]);
    assert_eq!(
        seen.0.lock().as_slice(),
        &[(Some("device-42".to_string()), true)],
        "the certificate's CN is the username"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn certificates_reload_without_dropping_connections() {
    let dir = tempfile::tempdir().expect("dir");
    let old_ca = ca("old CA");
    let (cert, key) = leaf(&old_ca, "server", false);
    let mut config = ListenerConfig::new("127.0.0.1:0", Protocol::Mqtts);
    config.cert = Some(write(dir.path(), "cert.pem", &cert));
    config.key = Some(write(dir.path(), "key.pem", &key));
    let broker = broker(Seen::default()).await;
    let (addr, listener) = listen(&broker, config).await;
    let reload = listener.tls_reload().expect("TLS listener");
    tokio::spawn(listener.run());
    let mut open = tls_connect(addr, client_config(&old_ca, None))
        .await
        .expect("TLS");
    mqtt_hello(&mut open).await.expect("CONNACK");

    // A broken file is refused and the old certificate stays.
    write(dir.path(), "key.pem", "not a key");
    reload.reload().expect_err("a bad key is refused");
    tls_connect(addr, client_config(&old_ca, None))
        .await
        .expect("old certificate kept");

    let new_ca = ca("new CA");
    let (cert, key) = leaf(&new_ca, "server", false);
    write(dir.path(), "cert.pem", &cert);
    write(dir.path(), "key.pem", &key);
    reload.reload().expect("reload");
    tls_connect(addr, client_config(&new_ca, None))
        .await
        .expect("new certificate served");
    tls_connect(addr, client_config(&old_ca, None))
        .await
        .expect_err("old certificate no longer served");

    // The connection opened before the reload still works.
    open.write_all(&PINGREQ).await.expect("ping");
    let mut pong = [0u8; 2];
    tokio::time::timeout(WITHIN, open.read_exact(&mut pong))
        .await
        .expect("in time")
        .expect("PINGRESP");
    assert_eq!(pong, [0xD0, 0]);
    broker.shutdown().await;
}

#[tokio::test]
async fn websocket_frames_carry_mqtt_split_or_packed() {
    let broker = broker(Seen::default()).await;
    let (addr, listener) = listen(&broker, ListenerConfig::new("127.0.0.1:0", Protocol::Ws)).await;
    tokio::spawn(listener.run());

    let mut request = format!("ws://{addr}/mqtt")
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().expect("header"));
    let (mut ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgrade");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"mqtt"[..])
    );
    // CONNECT split across two frames.
    ws.send(Message::binary(CONNECT[..5].to_vec()))
        .await
        .expect("send");
    ws.send(Message::binary(CONNECT[5..].to_vec()))
        .await
        .expect("send");
    let mut got = Vec::new();
    // Two PINGREQs packed into one frame.
    let mut two = PINGREQ.to_vec();
    two.extend_from_slice(&PINGREQ);
    ws.send(Message::binary(two)).await.expect("send");
    while got.len() < 8 {
        match tokio::time::timeout(WITHIN, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, [0x20, 2, 0, 0, 0xD0, 0, 0xD0, 0]);

    // Another path is not an MQTT endpoint.
    let err = tokio_tungstenite::connect_async(format!("ws://{addr}/other"))
        .await
        .expect_err("404");
    assert!(err.to_string().contains("404"), "{err}");
    broker.shutdown().await;
}

#[tokio::test]
async fn listener_max_connections() {
    let broker = broker(Seen::default()).await;
    let mut config = ListenerConfig::new("127.0.0.1:0", Protocol::Mqtt);
    config.max_connections = Some(1);
    let (addr, listener) = listen(&broker, config).await;
    tokio::spawn(listener.run());
    let mut first = TcpStream::connect(addr).await.expect("connect");
    mqtt_hello(&mut first).await.expect("CONNACK");
    let mut second = TcpStream::connect(addr).await.expect("connect");
    assert!(
        mqtt_hello(&mut second).await.is_err(),
        "over the listener's limit"
    );
    drop(first);
    // Its place is freed once the first connection's task ends.
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut again = TcpStream::connect(addr).await.expect("connect");
        if mqtt_hello(&mut again).await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "the freed place is reused");
    broker.shutdown().await;
}

/// Read one MQTT packet: its first byte and its body.
async fn read_packet<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    let first = s.read_u8().await?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok((first, body))
}

/// A burst larger than the socket buffers, to a TLS subscriber that reads
/// only once it is all sent: what TLS buffered when the socket was full
/// must still go out when no more traffic follows (the connection writer
/// flushes before it waits).
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_to_a_slow_tls_reader_arrives_whole() {
    // 40 MB: more than loopback's socket buffers hold.
    const MESSAGES: usize = 20_000;
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca("test CA");
    let (cert, key) = leaf(&ca, "server", false);
    let mut config = ListenerConfig::new("127.0.0.1:0", Protocol::Mqtts);
    config.cert = Some(write(dir.path(), "cert.pem", &cert));
    config.key = Some(write(dir.path(), "key.pem", &key));
    let storage = Storage::from_backend(Arc::new(storage_memory::MemoryStore::new()));
    let broker = Broker::builder()
        .storage(storage)
        .config(broker_core::config::BrokerConfig {
            // Every message in flight at once: nothing waits for acknowledgements.
            max_inflight: usize::from(u16::MAX),
            max_queued_bytes: 256 << 20,
            ..broker_core::config::BrokerConfig::default()
        })
        .start()
        .await
        .expect("broker starts");
    let (addr, listener) = listen(&broker, config).await;
    tokio::spawn(listener.run());

    let mut s = tls_connect(addr, client_config(&ca, None))
        .await
        .expect("TLS");
    assert_eq!(mqtt_hello(&mut s).await.expect("CONNACK"), [0x20, 2, 0, 0]);
    // SUBSCRIBE packet id 1, "t" at QoS 1.
    s.write_all(&[0x82, 6, 0, 1, 0, 1, b't', 1])
        .await
        .expect("SUBSCRIBE");
    s.flush().await.expect("flush");
    let (kind, _) = tokio::time::timeout(WITHIN, read_packet(&mut s))
        .await
        .expect("SUBACK in time")
        .expect("SUBACK");
    assert_eq!(kind, 0x90);

    let body = vec![b'x'; 2048];
    for _ in 0..MESSAGES {
        broker
            .publish(broker_core::message::Message::new(
                "t",
                body.clone(),
                broker_core::message::QoS::AtLeastOnce,
                false,
            ))
            .await
            .expect("publish");
    }
    // Let the broker's writes fill the socket and the TLS buffer behind it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut got = 0;
    while got < MESSAGES {
        match tokio::time::timeout(Duration::from_secs(10), read_packet(&mut s)).await {
            Ok(Ok((kind, _))) if kind & 0xF0 == 0x30 => got += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed after {got} messages: {e}"),
            Err(_) => panic!("{got} of {MESSAGES} messages arrived; the rest stayed in the broker"),
        }
    }
    broker.shutdown().await;
}
