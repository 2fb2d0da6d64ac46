//! A small JSON validator (RFC 8259), so `requireJson` costs no serde in the component.

/// Nesting deeper than this is refused (bounds the validator's recursion).
const MAX_DEPTH: usize = 128;

/// Whether `bytes` is one complete JSON value, optionally surrounded by whitespace.
pub fn is_valid(bytes: &[u8]) -> bool {
    if std::str::from_utf8(bytes).is_err() {
        return false;
    }
    let mut parser = Parser { bytes, pos: 0 };
    parser.whitespace();
    if !parser.value(0) {
        return false;
    }
    parser.whitespace();
    parser.pos == bytes.len()
}

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        if self.bytes[self.pos..].starts_with(word) {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> bool {
        match self.peek() {
            Some(b'{') => depth < MAX_DEPTH && self.object(depth + 1),
            Some(b'[') => depth < MAX_DEPTH && self.array(depth + 1),
            Some(b'"') => self.string(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => false,
        }
    }

    fn object(&mut self, depth: usize) -> bool {
        self.pos += 1; // '{'
        self.whitespace();
        if self.eat(b'}') {
            return true;
        }
        loop {
            self.whitespace();
            if !self.string() {
                return false;
            }
            self.whitespace();
            if !self.eat(b':') {
                return false;
            }
            self.whitespace();
            if !self.value(depth) {
                return false;
            }
            self.whitespace();
            if self.eat(b'}') {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
        }
    }

    fn array(&mut self, depth: usize) -> bool {
        self.pos += 1; // '['
        self.whitespace();
        if self.eat(b']') {
            return true;
        }
        loop {
            self.whitespace();
            if !self.value(depth) {
                return false;
            }
            self.whitespace();
            if self.eat(b']') {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
        }
    }

    fn string(&mut self) -> bool {
        if !self.eat(b'"') {
            return false;
        }
        loop {
            match self.peek() {
                None | Some(0x00..=0x1f) => return false,
                Some(b'"') => {
                    self.pos += 1;
                    return true;
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 1,
                        Some(b'u') => {
                            self.pos += 1;
                            for _ in 0..4 {
                                if !self.peek().is_some_and(|b| b.is_ascii_hexdigit()) {
                                    return false;
                                }
                                self.pos += 1;
                            }
                        }
                        _ => return false,
                    }
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    fn digits(&mut self) -> bool {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        self.pos > start
    }

    fn number(&mut self) -> bool {
        self.eat(b'-');
        if !self.eat(b'0') && !self.digits() {
            return false;
        }
        if self.eat(b'.') && !self.digits() {
            return false;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if !self.digits() {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::is_valid;

    #[test]
    fn valid() {
        for text in [
            "{}",
            "[]",
            " {\"id\": 1, \"name\": \"Ada\\n\\u00e9\", \"tags\": [true, false, null], \"x\": -0.5e+3} ",
            "\"just a string\"",
            "0",
            "[[[]]]",
            "{\"é\":\"ü\"}",
        ] {
            assert!(is_valid(text.as_bytes()), "{text:?} is JSON");
        }
    }

    #[test]
    fn invalid() {
        for text in [
            "",
            "{",
            "{\"a\"}",
            "{\"a\":1,}",
            "[1,]",
            "01",
            "1.",
            "-",
            "tru",
            "\"\\x\"",
            "\"a\nb\"",
            "{} {}",
            "<html>",
            "[1 2]",
            "{a:1}",
        ] {
            assert!(!is_valid(text.as_bytes()), "{text:?} is not JSON");
        }
        assert!(!is_valid(&[b'"', 0xff, b'"']));
        assert!(!is_valid("[".repeat(1000).as_bytes()));
        assert!(is_valid(format!("{}{}", "[".repeat(128), "]".repeat(128)).as_bytes()));
    }
}
