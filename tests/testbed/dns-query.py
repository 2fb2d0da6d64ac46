#!/usr/bin/env python3
"""dns-query.py SERVER NAME [TYPE]

Asks SERVER (port 53, UDP) for NAME's records of TYPE (A, SRV; default A) and prints the answers, one per line.
Exits 0 when there is at least one answer, 1 on NXDOMAIN, no answer or a timeout, 2 on bad arguments. The bed
has no dig; this is enough to check its cluster DNS.
"""
import random, socket, struct, sys

TYPES = {"A": 1, "SRV": 33}


def read_name(msg, pos):
    labels = []
    while True:
        length = msg[pos]
        if length & 0xC0 == 0xC0:
            pointer = struct.unpack("!H", msg[pos:pos + 2])[0] & 0x3FFF
            labels.append(read_name(msg, pointer)[0])
            return ".".join(l for l in labels if l), pos + 2
        pos += 1
        if length == 0:
            return ".".join(labels), pos
        labels.append(msg[pos:pos + length].decode())
        pos += length


def main(argv):
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] not in TYPES):
        print(__doc__, file=sys.stderr)
        return 2
    server, name = argv[0], argv[1].rstrip(".")
    qtype = TYPES[argv[2] if len(argv) == 3 else "A"]
    ident = random.randrange(1 << 16)
    query = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    query += struct.pack("!HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(query, (server, 53))
        try:
            msg = sock.recv(4096)
        except socket.timeout:
            print(f"no answer from {server} within 2 s", file=sys.stderr)
            return 1
    _, flags, _, answers, _, _ = struct.unpack("!HHHHHH", msg[:12])
    if flags & 0xF:
        print(f"rcode {flags & 0xF} for {name}", file=sys.stderr)
        return 1
    pos = len(query)
    for _ in range(answers):
        _, pos = read_name(msg, pos)
        rtype, _, ttl, length = struct.unpack("!HHIH", msg[pos:pos + 10])
        pos += 10
        data = msg[pos:pos + length]
        if rtype == 1:
            print(socket.inet_ntoa(data))
        elif rtype == 33:
            priority, weight, port = struct.unpack("!HHH", data[:6])
            print(priority, weight, port, read_name(msg, pos + 6)[0])
        pos += length
    return 0 if answers else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
