//! Reply encoding into the connection's output buffer, in RESP2 or (after `HELLO 3`) RESP3. Replies are appended
//! to one buffer and written together, so a pipeline of hits costs one `write`.

/// The output buffer of a connection and the protocol version it speaks.
pub struct Out {
    /// Encoded replies not yet written.
    pub buf: Vec<u8>,
    /// How much of `buf` was written already.
    pub written: usize,
    /// 2 or 3.
    pub proto: u8,
}

impl Out {
    /// An empty buffer speaking RESP2 (every connection starts so).
    pub fn new() -> Self {
        Self { buf: Vec::with_capacity(16 << 10), written: 0, proto: 2 }
    }

    /// Bytes encoded and not yet written.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.written..]
    }

    /// Marks `n` more bytes as written; an empty buffer starts over (its capacity is kept).
    pub fn advance(&mut self, n: usize) {
        self.written += n;
        if self.written >= self.buf.len() {
            self.buf.clear();
            self.written = 0;
        } else if self.written > (1 << 20) && self.written * 2 > self.buf.len() {
            // A slow reader: drop what was written so the buffer does not grow with it.
            self.buf.drain(..self.written);
            self.written = 0;
        }
    }

    /// Bytes waiting to be written.
    pub fn backlog(&self) -> usize {
        self.buf.len() - self.written
    }

    fn int_raw(&mut self, n: i64) {
        let mut b = itoa::Buffer::new();
        self.buf.extend_from_slice(b.format(n).as_bytes());
    }

    fn usize_raw(&mut self, n: usize) {
        let mut b = itoa::Buffer::new();
        self.buf.extend_from_slice(b.format(n).as_bytes());
    }

    /// `+OK`.
    pub fn ok(&mut self) {
        self.buf.extend_from_slice(b"+OK\r\n");
    }

    /// A simple string (no CR or LF inside).
    pub fn simple(&mut self, s: &str) {
        self.buf.push(b'+');
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.extend_from_slice(b"\r\n");
    }

    /// An error: `message` starts with its code (`ERR`, `NOAUTH`, …). Line breaks in it become spaces.
    pub fn error(&mut self, message: &str) {
        self.buf.push(b'-');
        self.buf.extend(message.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
        self.buf.extend_from_slice(b"\r\n");
    }

    /// An integer.
    pub fn int(&mut self, n: i64) {
        self.buf.push(b':');
        self.int_raw(n);
        self.buf.extend_from_slice(b"\r\n");
    }

    /// A bulk string.
    pub fn bulk(&mut self, bytes: &[u8]) {
        self.buf.reserve(bytes.len() + 16);
        self.buf.push(b'$');
        self.usize_raw(bytes.len());
        self.buf.extend_from_slice(b"\r\n");
        self.buf.extend_from_slice(bytes);
        self.buf.extend_from_slice(b"\r\n");
    }

    /// The null reply (RESP2: the null bulk string).
    pub fn null(&mut self) {
        if self.proto == 3 {
            self.buf.extend_from_slice(b"_\r\n");
        } else {
            self.buf.extend_from_slice(b"$-1\r\n");
        }
    }

    /// The header of an array of `n` elements.
    pub fn array(&mut self, n: usize) {
        self.buf.push(b'*');
        self.usize_raw(n);
        self.buf.extend_from_slice(b"\r\n");
    }

    /// The header of a map of `n` pairs (RESP2: an array of 2n elements).
    pub fn map(&mut self, n: usize) {
        if self.proto == 3 {
            self.buf.push(b'%');
            self.usize_raw(n);
            self.buf.extend_from_slice(b"\r\n");
        } else {
            self.array(n * 2);
        }
    }

    /// The header of a set of `n` elements (RESP2: an array).
    pub fn set(&mut self, n: usize) {
        if self.proto == 3 {
            self.buf.push(b'~');
            self.usize_raw(n);
            self.buf.extend_from_slice(b"\r\n");
        } else {
            self.array(n);
        }
    }

    /// Text: a verbatim string in RESP3 (as Redis answers INFO), a bulk string in RESP2.
    pub fn text(&mut self, text: &str) {
        if self.proto == 3 {
            self.buf.push(b'=');
            self.usize_raw(text.len() + 4);
            self.buf.extend_from_slice(b"\r\ntxt:");
            self.buf.extend_from_slice(text.as_bytes());
            self.buf.extend_from_slice(b"\r\n");
        } else {
            self.bulk(text.as_bytes());
        }
    }
}

impl Default for Out {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_encoded_per_protocol_version() {
        let mut out = Out::new();
        out.ok();
        out.int(-2);
        out.bulk(b"v");
        out.null();
        out.map(1);
        out.error("ERR a\r\nb");
        assert_eq!(out.pending(), b"+OK\r\n:-2\r\n$1\r\nv\r\n$-1\r\n*2\r\n-ERR a  b\r\n");
        out.advance(out.backlog());
        assert!(out.pending().is_empty());
        out.proto = 3;
        out.null();
        out.map(2);
        out.text("a:1");
        assert_eq!(out.pending(), b"_\r\n%2\r\n=7\r\ntxt:a:1\r\n");
    }
}
