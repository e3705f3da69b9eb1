package gossip

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"

	"github.com/overlaynet/overlay/overlay"
)

// metaVersion is the version of the metadata encoding written by this
// package. Metadata of any other version is rejected.
const metaVersion = 1

// macLen is the length of an EUI-48 MAC address, the only kind a VXLAN
// device has.
const macLen = 6

// errBadMeta is wrapped by every error about a member's metadata that
// cannot be decoded or fails validation. Such errors are only logged.
var errBadMeta = errors.New("gossip: bad metadata")

// wireMeta is the JSON form of a member's metadata, for example
//
//	{"v":1,"h":"host-a","u":"198.18.0.1","m":"02:00:00:00:00:01","b":{"default":["198.19.0.0/26"]}}
//
// The field names are one letter because the whole encoding must fit in
// memberlist.MetaMaxSize bytes.
type wireMeta struct {
	// V is the encoding version, metaVersion.
	V int `json:"v"`
	// H is the host ID; it must equal the memberlist node name.
	H string `json:"h"`
	// U is the underlay address.
	U string `json:"u"`
	// M is the VTEP MAC address.
	M string `json:"m"`
	// B are the claimed blocks by network name, each list sorted.
	B map[string][]string `json:"b,omitempty"`
}

// encodeMeta returns the metadata encoding of m. It does not check the
// size limit. Networks without blocks are left out.
func encodeMeta(m overlay.Member) ([]byte, error) {
	w := wireMeta{
		V: metaVersion,
		H: string(m.Host),
		U: m.Underlay.String(),
		M: m.VTEPMAC.String(),
	}
	for name, blocks := range m.Blocks {
		if len(blocks) == 0 {
			continue
		}
		if w.B == nil {
			w.B = make(map[string][]string, len(m.Blocks))
		}
		s := make([]string, len(blocks))
		for i, b := range blocks {
			s[i] = b.String()
		}
		w.B[name] = s
	}
	b, err := json.Marshal(w)
	if err != nil {
		return nil, fmt.Errorf("gossip: encode metadata: %w", err)
	}
	return b, nil
}

// decodeMeta decodes and validates metadata written by encodeMeta. It
// rejects an unknown version, unknown fields, trailing data, an empty host
// ID, an invalid underlay address, a MAC address that is not EUI-48, an
// empty network name, and a prefix that is invalid, has host bits set or
// appears twice in one network. Errors wrap errBadMeta. The returned
// member shares no memory with b; its blocks are sorted and a network
// without blocks is left out.
func decodeMeta(b []byte) (overlay.Member, error) {
	// Look at the version alone first: another version may have other
	// fields, which the strict decoding below would report less clearly.
	var ver struct {
		V *int `json:"v"`
	}
	if err := json.Unmarshal(b, &ver); err != nil {
		return overlay.Member{}, fmt.Errorf("%w: %w", errBadMeta, err)
	}
	if ver.V == nil {
		return overlay.Member{}, fmt.Errorf("%w: no version", errBadMeta)
	}
	if *ver.V != metaVersion {
		return overlay.Member{}, fmt.Errorf("%w: unsupported version %d (want %d)", errBadMeta, *ver.V, metaVersion)
	}

	var w wireMeta
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&w); err != nil {
		return overlay.Member{}, fmt.Errorf("%w: %w", errBadMeta, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return overlay.Member{}, fmt.Errorf("%w: trailing data after the object", errBadMeta)
	}

	if w.H == "" {
		return overlay.Member{}, fmt.Errorf("%w: empty host ID", errBadMeta)
	}
	m := overlay.Member{Host: overlay.HostID(w.H)}
	u, err := netip.ParseAddr(w.U)
	if err != nil {
		return overlay.Member{}, fmt.Errorf("%w: underlay address: %w", errBadMeta, err)
	}
	if !u.Is4() {
		// The VXLAN underlay is IPv4 (an IPv4-mapped IPv6 form is not
		// accepted either: one address, one spelling).
		return overlay.Member{}, fmt.Errorf("%w: underlay address %q is not IPv4", errBadMeta, w.U)
	}
	m.Underlay = u
	mac, err := net.ParseMAC(w.M)
	if err != nil {
		return overlay.Member{}, fmt.Errorf("%w: VTEP MAC: %w", errBadMeta, err)
	}
	if len(mac) != macLen {
		return overlay.Member{}, fmt.Errorf("%w: VTEP MAC %q is not a %d-byte MAC address", errBadMeta, w.M, macLen)
	}
	m.VTEPMAC = mac
	for name, list := range w.B {
		if name == "" {
			return overlay.Member{}, fmt.Errorf("%w: empty network name", errBadMeta)
		}
		if len(list) == 0 {
			continue
		}
		blocks := make([]netip.Prefix, 0, len(list))
		for _, s := range list {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return overlay.Member{}, fmt.Errorf("%w: network %q: block: %w", errBadMeta, name, err)
			}
			if p != p.Masked() {
				return overlay.Member{}, fmt.Errorf("%w: network %q: block %s has host bits set", errBadMeta, name, s)
			}
			blocks = append(blocks, p)
		}
		slices.SortFunc(blocks, comparePrefix)
		if i := duplicate(blocks); i >= 0 {
			return overlay.Member{}, fmt.Errorf("%w: network %q: block %s appears twice", errBadMeta, name, blocks[i])
		}
		if m.Blocks == nil {
			m.Blocks = make(map[string][]netip.Prefix, len(w.B))
		}
		m.Blocks[name] = blocks
	}
	return m, nil
}

// comparePrefix orders prefixes by address, then by length.
func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// duplicate returns the index of the first element of the sorted slice s
// that equals its predecessor, or -1.
func duplicate(s []netip.Prefix) int {
	for i := 1; i < len(s); i++ {
		if s[i] == s[i-1] {
			return i
		}
	}
	return -1
}

// cloneMember returns a deep copy of m, so that callers cannot change the
// package's state through the returned slices and map.
func cloneMember(m overlay.Member) overlay.Member {
	m.VTEPMAC = slices.Clone(m.VTEPMAC)
	if m.Blocks != nil {
		blocks := make(map[string][]netip.Prefix, len(m.Blocks))
		for name, b := range m.Blocks {
			blocks[name] = slices.Clone(b)
		}
		m.Blocks = blocks
	}
	return m
}
