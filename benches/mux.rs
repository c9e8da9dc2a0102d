//! Multiplexer comparison: HTTP/2 (h2, as skiff's TLS links use it) versus yamux, moving bulk
//! data over one loopback TCP connection, with 1 and 8 concurrent streams.
//!
//! This is the measurement behind the choice recorded in docs/design.md. It runs plain TCP (no
//! TLS) so that only the multiplexers differ. Run: `cargo bench --bench mux`.

use std::future::poll_fn;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{AsyncReadExt, AsyncWriteExt};
use skiff_router::link::tls::{ClientHalf, ServerHalf, TlsTransport};
use skiff_router::link::transport::{RecvStream, SendStream, Transport};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

const TOTAL: usize = 512 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (a, b) = (a.unwrap(), b.unwrap().0);
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}

async fn h2(streams: usize) -> f64 {
    let (fwd_a, fwd_b) = tcp_pair().await;
    let (rev_a, rev_b) = tcp_pair().await;
    let (dead_a, dead_b) = (CancellationToken::new(), CancellationToken::new());
    let (ca, sb, cb, sa) = tokio::join!(
        ClientHalf::start(fwd_a, dead_a.clone()),
        ServerHalf::start(fwd_b, 1000, dead_b.clone()),
        ClientHalf::start(rev_b, dead_b.clone()),
        ServerHalf::start(rev_a, 1000, dead_a.clone()),
    );
    let a = TlsTransport::new(ca.unwrap(), sa.unwrap(), dead_a);
    let b = std::sync::Arc::new(TlsTransport::new(cb.unwrap(), sb.unwrap(), dead_b));
    let per_stream = TOTAL / streams;
    let start = Instant::now();
    let receiver = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut readers = Vec::new();
            for _ in 0..streams {
                let (_send, mut recv) = b.accept().await.unwrap();
                readers.push(tokio::spawn(async move {
                    let mut n = 0;
                    while let Some(chunk) = recv.recv().await.unwrap() {
                        n += chunk.len();
                    }
                    n
                }));
            }
            let mut total = 0;
            for r in readers {
                total += r.await.unwrap();
            }
            total
        })
    };
    let mut writers = Vec::new();
    for _ in 0..streams {
        let (mut send, recv) = a.open().await.unwrap();
        writers.push(tokio::spawn(async move {
            let chunk = Bytes::from(vec![7u8; CHUNK]);
            let mut sent = 0;
            while sent < per_stream {
                send.send(chunk.clone()).await.unwrap();
                sent += CHUNK;
            }
            send.finish().unwrap();
            (send, recv)
        }));
    }
    let mut keep = Vec::new();
    for w in writers {
        keep.push(w.await.unwrap());
    }
    let received = receiver.await.unwrap();
    gbits(received, start.elapsed())
}

async fn yamux(streams: usize) -> f64 {
    let (a, b) = tcp_pair().await;
    let mut config = yamux::Config::default();
    config.set_max_num_streams(128);
    config.set_max_connection_receive_window(Some(64 * 1024 * 1024));
    let mut client = yamux::Connection::new(a.compat(), config.clone(), yamux::Mode::Client);
    let mut server = yamux::Connection::new(b.compat(), config, yamux::Mode::Server);
    let per_stream = TOTAL / streams;
    let start = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut readers = Vec::new();
        loop {
            match poll_fn(|cx| server.poll_next_inbound(cx)).await {
                Some(Ok(mut stream)) => readers.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; CHUNK];
                    let mut n = 0;
                    loop {
                        let k = stream.read(&mut buf).await.unwrap();
                        if k == 0 {
                            break n;
                        }
                        n += k;
                    }
                })),
                _ => break,
            }
            if readers.len() == streams {
                break;
            }
        }
        // Keep driving the connection while the readers drain their streams.
        let drive = tokio::spawn(async move {
            while let Some(Ok(_)) = poll_fn(|cx| server.poll_next_inbound(cx)).await {}
        });
        let mut total = 0;
        for r in readers {
            total += r.await.unwrap();
        }
        drive.abort();
        total
    });
    let mut outbound = Vec::new();
    for _ in 0..streams {
        outbound.push(poll_fn(|cx| client.poll_new_outbound(cx)).await.unwrap());
    }
    let driver = tokio::spawn(async move {
        while let Some(Ok(_)) = poll_fn(|cx| client.poll_next_inbound(cx)).await {}
    });
    let mut writers = Vec::new();
    for mut stream in outbound {
        writers.push(tokio::spawn(async move {
            let chunk = vec![7u8; CHUNK];
            let mut sent = 0;
            while sent < per_stream {
                stream.write_all(&chunk).await.unwrap();
                sent += CHUNK;
            }
            stream.close().await.unwrap();
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let received = receiver.await.unwrap();
    driver.abort();
    gbits(received, start.elapsed())
}

fn gbits(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench` absent: skip the slow run then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "multiplexer throughput over loopback TCP, {} MiB per run",
        TOTAL >> 20
    );
    println!("{:<8} {:>8} {:>12}", "mux", "streams", "Gbit/s");
    for streams in [1, 8] {
        let h = runtime.block_on(h2(streams));
        let y = runtime.block_on(yamux(streams));
        println!("{:<8} {:>8} {:>12.2}", "h2", streams, h);
        println!("{:<8} {:>8} {:>12.2}", "yamux", streams, y);
    }
}
