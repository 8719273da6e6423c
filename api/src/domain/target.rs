//! Which network addresses a webhook may be sent to: the SSRF rule, checked when a batch names a
//! target (for IP literals) and again at send time for every address a name resolves to.
use std::net::IpAddr;

/// Why an IPv4 target is refused (never sent to).
fn refuse_v4(v4: std::net::Ipv4Addr) -> Option<&'static str> {
    let o = v4.octets();
    if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_private() {
        Some("private")
    } else if v4.is_link_local() {
        Some("link-local")
    } else if v4.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if v4.is_multicast() || v4.is_broadcast() || o[0] >= 240 {
        Some("multicast or reserved")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared address space")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments")
    } else {
        None
    }
}

/// Why a target is refused (never sent to). IPv6 forms that carry an IPv4 address (mapped,
/// compatible, NAT64, 6to4, Teredo) are judged by the address they carry.
pub fn refuse_reason(ip: IpAddr) -> Option<&'static str> {
    let v6 = match ip {
        IpAddr::V4(v4) => return refuse_v4(v4),
        IpAddr::V6(v6) => v6,
    };
    let seg = v6.segments();
    let tail_v4 =
        |hi: u16, lo: u16| std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if let Some(v4) = v6.to_ipv4_mapped() {
        return refuse_v4(v4).map(|_| "IPv4-mapped form of a refused address");
    }
    if v6.is_loopback() {
        Some("loopback")
    } else if v6.is_unspecified() {
        Some("unspecified")
    } else if seg[..6] == [0; 6] {
        // ::a.b.c.d, deprecated: nothing legitimate is reached that way.
        Some("IPv4-compatible")
    } else if v6.is_multicast() {
        Some("multicast")
    } else if (seg[0] & 0xfe00) == 0xfc00 {
        Some("unique-local")
    } else if (seg[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if (seg[0] & 0xffc0) == 0xfec0 {
        Some("site-local")
    } else if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64 (RFC 6052 well-known prefix): the last 32 bits are the IPv4 target.
        refuse_v4(tail_v4(seg[6], seg[7])).map(|_| "NAT64 form of a refused address")
    } else if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
        // 64:ff9b:1::/48: local-use NAT64 (RFC 8215), translating into the local network.
        Some("local-use NAT64")
    } else if seg[0] == 0x2002 {
        // 6to4: bits 16..48 are the IPv4 address of the relay that will carry it.
        refuse_v4(tail_v4(seg[1], seg[2])).map(|_| "6to4 form of a refused address")
    } else if seg[0] == 0x2001 && seg[1] == 0 {
        // Teredo: the server's IPv4 in bits 32..64, the client's (inverted) in the last 32.
        let server = tail_v4(seg[2], seg[3]);
        let client = tail_v4(!seg[6], !seg[7]);
        refuse_v4(server)
            .or(refuse_v4(client))
            .map(|_| "Teredo form of a refused address")
    } else {
        None
    }
}
