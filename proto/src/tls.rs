//! TLS on the cluster's own links (control: worker ↔ master; RPC: connector ↔ chat server), with rustls.
//!
//! The master keeps a cluster CA in `.pomelo/tls/` (`ca.pem`, `ca.key`, 0600, made on first start) and issues
//! each server a certificate at every spawn, for its host (and the loopback names for a local one), which
//! reaches the worker in its environment ([`TLS_ENV`]) beside its server key. Both ends of a link present
//! a certificate of this CA and check the other's: a listener requires a client certificate, a dialler
//! checks the server's against the address it dialled. The HMAC challenge of `auth` still runs inside, so
//! identity is proven by the key and the channel by TLS.
//!
//! [`Stream`] is either side of a TLS session or a plain socket, so the link code is the same either way.

use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::files::{self, Mode};

/// The environment variable a worker reads its [`Material`] from (JSON).
pub const TLS_ENV: &str = "POMELO_TLS";

/// The CA's subject; the issuer of every server certificate.
const CA_NAME: &str = "pomelo-rs cluster CA";

/// What one process needs for TLS on cluster links: the CA (PEM) and its own certificate and key (PEM).
#[derive(Clone, Serialize, Deserialize)]
pub struct Material {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Material { .. }")
    }
}

fn bad(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Material {
    /// This worker's material, if the master gave it one (on stdin, see [`give_worker_material`], or
    /// in [`TLS_ENV`]).
    pub fn from_env() -> io::Result<Option<Material>> {
        if let Some(json) = GIVEN.get() {
            return serde_json::from_str(json).map(Some).map_err(|e| bad(format!("TLS material: {e}")));
        }
        match std::env::var(TLS_ENV) {
            Ok(json) => serde_json::from_str(&json).map(Some).map_err(|e| bad(format!("{TLS_ENV}: {e}"))),
            Err(_) => Ok(None),
        }
    }

    fn roots(&self) -> io::Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca.as_bytes()) {
            roots.add(c.map_err(bad)?).map_err(bad)?;
        }
        Ok(roots)
    }

    fn chain(&self) -> io::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let certs = CertificateDer::pem_slice_iter(self.cert.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(bad)?;
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes()).map_err(bad)?;
        Ok((certs, key))
    }

    /// For a listener: presents this certificate, requires one of the CA from every peer.
    pub fn acceptor(&self) -> io::Result<TlsAcceptor> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider())
            .build()
            .map_err(bad)?;
        let (certs, key) = self.chain()?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(bad)?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// For a dialler: presents this certificate, accepts only a server certificate of the CA for the
    /// address dialled.
    pub fn connector(&self) -> io::Result<TlsConnector> {
        let (certs, key) = self.chain()?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(certs, key)
            .map_err(bad)?;
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

type Ends = (TlsAcceptor, TlsConnector);

/// Material handed to this process other than by its environment (a worker started over ssh reads it
/// from stdin); set before the first link.
static GIVEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes `json` this worker's TLS material (instead of [`TLS_ENV`]); only the first call counts.
pub fn give_worker_material(json: String) {
    let _ = GIVEN.set(json);
}

/// This worker's TLS ends, from [`TLS_ENV`], read once: `Ok(None)` when the cluster runs without TLS.
/// A value that does not parse refuses every link rather than fall back to plain text.
fn worker_ends() -> Result<Option<&'static Ends>, io::Error> {
    static ENDS: std::sync::OnceLock<Result<Option<Ends>, String>> = std::sync::OnceLock::new();
    let ends = ENDS.get_or_init(|| {
        let m = Material::from_env().map_err(|e| e.to_string())?;
        m.map(|m| Ok((m.acceptor().map_err(|e| e.to_string())?, m.connector().map_err(|e| e.to_string())?))).transpose()
    });
    ends.as_ref().map(Option::as_ref).map_err(|e| bad(format!("{TLS_ENV} is unusable: {e}")))
}

/// A worker's listener side of a cluster link (TLS if the master gave it material).
pub async fn worker_accept(tcp: TcpStream) -> io::Result<Stream> {
    accept(worker_ends()?.map(|e| &e.0), tcp).await
}

/// A worker's dialling side of a link to `name` (an IP address or a DNS name the certificate must carry).
pub async fn worker_connect_to(tcp: TcpStream, name: &str) -> io::Result<Stream> {
    match worker_ends()? {
        Some((_, c)) => {
            let server = ServerName::try_from(name.to_string()).map_err(|e| bad(format!("`{name}`: {e}")))?;
            Ok(Stream::Client(Box::new(c.connect(server, tcp).await?)))
        }
        None => Ok(Stream::Plain(tcp)),
    }
}

/// For a client port (`ssl` in servers.yaml): the operator's certificate chain and key (PEM files), no
/// client certificates, TLS 1.2 and 1.3 (as browsers and game clients speak).
pub fn client_port_acceptor(cert: &Path, key: &Path) -> io::Result<TlsAcceptor> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())));
    let certs = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(bad(format!("{}: no certificate in it", cert.display())));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| bad(format!("{}: {e}", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(bad)?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| bad(format!("{} and {}: {e}", cert.display(), key.display())))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A cluster link's byte stream: plain, or either side of TLS.
pub enum Stream {
    Plain(TcpStream),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether the bytes are encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }
}

/// The listener's side: TLS when `tls` is set (the handshake bounded by the caller's timeout).
pub async fn accept(tls: Option<&TlsAcceptor>, tcp: TcpStream) -> io::Result<Stream> {
    match tls {
        Some(a) => Ok(Stream::Server(Box::new(a.accept(tcp).await?))),
        None => Ok(Stream::Plain(tcp)),
    }
}

/// The dialler's side: TLS when `tls` is set, checking the server's certificate against `ip`.
pub async fn connect(tls: Option<&TlsConnector>, tcp: TcpStream, ip: IpAddr) -> io::Result<Stream> {
    match tls {
        Some(c) => Ok(Stream::Client(Box::new(c.connect(ServerName::IpAddress(ip.into()), tcp).await?))),
        None => Ok(Stream::Plain(tcp)),
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Client(s) => s.is_write_vectored(),
            Stream::Server(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Where the master gets each process's certificate: the cluster CA it keeps, or the operator's files.
pub struct Authority {
    source: Source,
    pem: String,
}

enum Source {
    /// The master's own CA: it issues a fresh certificate at every spawn.
    Own(Box<rcgen::Issuer<'static, rcgen::KeyPair>>),
    /// The operator's: `<id>.pem` and `<id>.key` in this directory, the CA's key elsewhere.
    Provided(std::path::PathBuf),
}

fn ca_params() -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, CA_NAME);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    p
}

fn write_private(path: &Path, text: &str) -> io::Result<()> {
    io::Write::write_all(&mut files::open(path, Mode::Truncate)?, text.as_bytes())
}

impl Authority {
    /// The CA in `dir` (`ca.pem`, `ca.key`), created (0700 dir, 0600 files) if it is not there. An
    /// operator may put their own CA's certificate and key there instead.
    pub fn load_or_create(dir: &Path) -> io::Result<Authority> {
        files::private_dir(dir)?;
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        if key_path.exists() && cert_path.exists() {
            let key = rcgen::KeyPair::from_pem(&files::read_to_string(&key_path, 1 << 20)?).map_err(bad)?;
            let pem = files::read_to_string(&cert_path, 1 << 20)?;
            return Ok(Authority { source: Source::Own(Box::new(rcgen::Issuer::new(ca_params(), key))), pem });
        }
        let key = rcgen::KeyPair::generate().map_err(bad)?;
        let cert = ca_params().self_signed(&key).map_err(bad)?;
        write_private(&key_path, &key.serialize_pem())?;
        write_private(&cert_path, &cert.pem())?;
        Ok(Authority { source: Source::Own(Box::new(rcgen::Issuer::new(ca_params(), key))), pem: cert.pem() })
    }

    /// The operator's certificates: `ca` (PEM) is the CA every link trusts, and `certs` holds `<id>.pem` and
    /// `<id>.key` for each server (`master.pem`, `master.key` for the master), each naming the server's
    /// `host`. The CA's key is never needed here. Fails if `ca` holds no certificate.
    pub fn provided(ca: &Path, certs: &Path) -> io::Result<Authority> {
        let pem = files::read_to_string(ca, 1 << 20)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", ca.display())))?;
        if CertificateDer::pem_slice_iter(pem.as_bytes()).next().is_none() {
            return Err(bad(format!("{}: no certificate in it", ca.display())));
        }
        if !certs.is_dir() {
            return Err(bad(format!("{} is not a directory", certs.display())));
        }
        Ok(Authority { source: Source::Provided(certs.to_path_buf()), pem })
    }

    /// A certificate and fresh key for server (or master) `id` on `host`: its names are `host` and, for a
    /// local host, `localhost`, 127.0.0.1 and ::1.
    pub fn issue(&self, id: &str, host: &str) -> io::Result<Material> {
        self.issue_with(id, host, &[])
    }

    /// [`issue`](Self::issue) with more names: the master's also carries the address its control port is
    /// bound to, so workers that dial that address (not `host`'s DNS name) can check it.
    pub fn issue_with(&self, id: &str, host: &str, also: &[IpAddr]) -> io::Result<Material> {
        let issuer = match &self.source {
            Source::Own(issuer) => issuer,
            Source::Provided(dir) => return self.provided_material(dir, id),
        };
        let mut names: Vec<String> = vec![host.to_string()];
        names.extend(also.iter().map(|ip| ip.to_string()));
        if crate::config::is_local_host(host) {
            names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
        }
        names.retain(|n| !matches!(n.as_str(), "0.0.0.0" | "::"));
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        let mut params = rcgen::CertificateParams::new(names).map_err(bad)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, crate::link::printable(id).into_owned());
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().map_err(bad)?;
        let cert = params.signed_by(&key, issuer.as_ref()).map_err(bad)?;
        Ok(Material { ca: self.pem.clone(), cert: cert.pem(), key: key.serialize_pem() })
    }

    /// `id`'s files from the operator's directory, checked to parse (as a listener and as a dialler).
    fn provided_material(&self, dir: &Path, id: &str) -> io::Result<Material> {
        if !crate::auth::valid_id(id) {
            return Err(bad(format!("`{}` is not a server id", crate::link::printable(id))));
        }
        let read = |ext: &str| {
            let path = dir.join(format!("{id}.{ext}"));
            files::read_to_string(&path, 1 << 20)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        };
        let m = Material { ca: self.pem.clone(), cert: read("pem")?, key: read("key")? };
        m.acceptor()
            .and_then(|_| m.connector())
            .map_err(|e| bad(format!("{id}'s certificate in {}: {e}", dir.display())))?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(server: &Material, client: &Material) -> (io::Result<Stream>, io::Result<Stream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = server.acceptor().expect("acceptor");
        let connector = client.connector().expect("connector");
        let accepting = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut s = accept(Some(&acceptor), tcp).await?;
            // Reading proves the client finished its side (TLS 1.3 checks its certificate after).
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await?;
            s.write_all(&b).await?;
            Ok::<_, io::Error>(s)
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let client = async {
            let mut s = connect(Some(&connector), tcp, addr.ip()).await?;
            s.write_all(b"hello").await?;
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await?;
            Ok(s)
        };
        let c = client.await;
        (accepting.await.expect("join"), c)
    }

    #[tokio::test]
    async fn certificates_of_the_cluster_ca_connect_and_others_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Authority::load_or_create(&dir.path().join("tls")).expect("ca");
        let master = ca.issue("master", "127.0.0.1").expect("issue");
        let worker = ca.issue("chat-1", "127.0.0.1").expect("issue");
        let (s, c) = pair(&master, &worker).await;
        assert!(s.expect("server side").is_tls() && c.expect("client side").is_tls());

        // The CA is kept: a second load issues certificates the first one's holders accept.
        let again = Authority::load_or_create(&dir.path().join("tls")).expect("reload");
        let later = again.issue("chat-2", "localhost").expect("issue");
        let (s, c) = pair(&master, &later).await;
        assert!(s.is_ok() && c.is_ok(), "{:?} {:?}", s.err(), c.err());

        // Another CA's certificate is refused on both sides.
        let other = Authority::load_or_create(&dir.path().join("other")).expect("other ca");
        let stranger = other.issue("chat-1", "127.0.0.1").expect("issue");
        let (s, _) = pair(&master, &stranger).await;
        assert!(s.is_err(), "a client of another CA was accepted");
        let (_, c) = pair(&stranger, &worker).await;
        assert!(c.is_err(), "a server of another CA was trusted");

        // A certificate for another host is refused by the dialler.
        let elsewhere = ca.issue("chat-3", "10.1.2.3").expect("issue");
        let (_, c) = pair(&elsewhere, &worker).await;
        assert!(c.is_err(), "a certificate for 10.1.2.3 passed for 127.0.0.1");
        let mode = std::fs::metadata(dir.path().join("tls/ca.key")).expect("meta");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }
}
