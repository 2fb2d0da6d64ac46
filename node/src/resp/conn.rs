//! One client connection: read, answer every complete command, write the replies at once.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use super::{
    Shared,
    commands::{Flow, Session},
    parse::parse,
    reply::Out,
};

/// How long a closing connection may take to deliver its last replies (QUIT's `+OK`, a protocol error).
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);

/// Most GETs of a pipeline loaded together.
const MAX_GET_RUN: usize = 1024;

/// Whether a parsed command is `GET key`.
fn is_get(frame: &[u8], args: &[std::ops::Range<usize>]) -> bool {
    args.len() == 2 && frame[args[0].clone()].eq_ignore_ascii_case(b"GET")
}

/// The key of a GET that must load (`first`) and of the GETs right behind it in `buf` (from `*len`, which
/// advances past them), as ranges of `buf`.
fn gets_behind(
    buf: &[u8],
    first: std::ops::Range<usize>,
    len: &mut usize,
    args: &mut Vec<std::ops::Range<usize>>,
    max_request: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut keys = vec![first];
    while keys.len() < MAX_GET_RUN {
        let at = *len;
        match parse(&buf[at..], args, max_request) {
            Ok(Some(next)) if is_get(&buf[at..at + next], args) => {
                keys.push(args[1].start + at..args[1].end + at);
                *len += next;
            }
            _ => break,
        }
    }
    keys
}

/// What woke the connection.
enum Wake {
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    Stop,
    Idle,
}

/// Serves one connection until the client leaves, misbehaves or the node stops.
#[allow(
    clippy::too_many_lines,
    reason = "the connection's loop reads top to bottom: wait, parse, answer, write"
)]
pub(super) async fn serve(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    // Replies go out as soon as they are written (one write per batch of commands).
    let _ = stream.set_nodelay(true);
    let mut session = Session::new(shared);
    let mut rbuf = BytesMut::with_capacity(16 << 10);
    let mut out = Out::new();
    let mut args = Vec::with_capacity(8);
    let mut more = Vec::with_capacity(8);
    let stop = shutdown.cancelled_owned();
    tokio::pin!(stop);
    let reason = 'conn: loop {
        if rbuf.capacity() - rbuf.len() < 4096 {
            rbuf.reserve(16 << 10);
        }
        let idle = async {
            match shared.idle_timeout {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let wake = if out.backlog() == 0 {
            tokio::select! {
                biased;
                r = stream.read_buf(&mut rbuf) => Wake::Read(r),
                () = &mut stop => Wake::Stop,
                () = idle => Wake::Idle,
            }
        } else {
            // Replies are waiting for a slow reader: keep reading (so its backlog is measured), and write.
            let (mut rh, mut wh) = stream.split();
            let reading = rbuf.len() < shared.max_request;
            tokio::select! {
                biased;
                w = wh.write(out.pending()) => Wake::Wrote(w),
                r = rh.read_buf(&mut rbuf), if reading => Wake::Read(r),
                () = &mut stop => Wake::Stop,
                () = idle => Wake::Idle,
            }
        };
        match wake {
            // The client finished sending (`printf 'GET k\r\n' | nc …`): what it was sent still goes out.
            Wake::Read(Ok(0)) => {
                flush(&mut stream, &mut out).await;
                break None;
            }
            Wake::Read(Err(_)) | Wake::Wrote(Ok(0) | Err(_)) | Wake::Stop => break None,
            Wake::Idle => break Some("idle"),
            Wake::Wrote(Ok(n)) => {
                out.advance(n);
                continue;
            }
            Wake::Read(Ok(_)) => {}
        }
        // Every complete command in the buffer, in order.
        loop {
            let mut len = match parse(&rbuf, &mut args, shared.max_request) {
                Ok(Some(len)) => len,
                Ok(None) if rbuf.len() <= shared.max_request => break,
                Ok(None) => {
                    out.error("ERR Protocol error: request larger than resp.maxRequestBytes");
                    flush(&mut stream, &mut out).await;
                    break 'conn Some("protocol_error");
                }
                Err(e) => {
                    out.error(&format!("ERR Protocol error: {}", e.0));
                    tracing::debug!(%peer, error = %e.0, "RESP protocol error; closing the connection");
                    flush(&mut stream, &mut out).await;
                    break 'conn Some("protocol_error");
                }
            };
            let flow = if args.is_empty() {
                Flow::Continue
            } else {
                let frame = &rbuf[..len];
                match session.run_sync(frame, &args, &mut out) {
                    Some(flow) => flow,
                    None if is_get(frame, &args) => {
                        // A GET that must load: it and the GETs right behind it in the buffer load together (one
                        // batch per keyspace, one peer call per owner), instead of one cold key after the other.
                        let keys =
                            gets_behind(&rbuf, args[1].clone(), &mut len, &mut more, shared.max_request);
                        session.get_run(&rbuf, &keys, &mut out).await;
                        Flow::Continue
                    }
                    None => session.run_async(frame, &args, &mut out).await,
                }
            };
            rbuf.advance(len);
            if flow == Flow::Close {
                flush(&mut stream, &mut out).await;
                break 'conn None;
            }
            if out.backlog() > shared.max_output {
                write_now(&stream, &mut out);
                if out.backlog() > shared.max_output {
                    tracing::info!(%peer, backlog = out.backlog(), limit = shared.max_output,
                        "RESP client does not read its replies; disconnecting it (resp.maxOutputBytes)");
                    break 'conn Some("output_limit");
                }
            }
        }
        write_now(&stream, &mut out);
    };
    if let Some(reason) = reason {
        shared.engine.metrics().resp_disconnect(reason);
    }
}

/// Writes as much of the backlog as the socket takes without waiting.
fn write_now(stream: &TcpStream, out: &mut Out) {
    while out.backlog() > 0 {
        match stream.try_write(out.pending()) {
            Ok(0) | Err(_) => return,
            Ok(n) => out.advance(n),
        }
    }
}

/// Writes the backlog before closing, for at most [`FLUSH_ON_CLOSE`].
async fn flush(stream: &mut TcpStream, out: &mut Out) {
    let pending = out.pending().to_vec();
    let _ = tokio::time::timeout(FLUSH_ON_CLOSE, stream.write_all(&pending)).await;
    out.advance(pending.len());
}
