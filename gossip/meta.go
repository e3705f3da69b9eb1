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
// package. Metadata of any other version is rejected. It stayed 1 when the
// blocks were taken out of the metadata, so that hosts of the previous
// release and this one decode each other's during a rolling upgrade: the
// old encoding differs only by its "b" field (see wireMeta), and the old
// decoder takes a missing "b" for no blocks.
const metaVersion = 1

// macLen is the length of an EUI-48 MAC address, the only kind a VXLAN
// device has.
const macLen = 6

// errBadMeta is wrapped by every error about a member's metadata that
// cannot be decoded or fails validation. Such errors are only logged.
var errBadMeta = errors.New("gossip: bad metadata")

// wireMeta is the JSON form of a member's metadata, for example
//
//	{"v":1,"h":"host-a","u":"198.18.0.1","m":"02:00:00:00:00:01"}
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
	// B is never written. Hosts of the previous release, which speak the
	// same version, write their claimed blocks here by network name; block
	// ownership now comes from etcd alone, so B is accepted from them
	// during a rolling upgrade and ignored entirely. Its contents are not
	// validated beyond being JSON: rejecting the metadata over a field
	// nothing reads would make a live old host look absent, and liveness
	// is the only thing gossip is trusted for.
	B json.RawMessage `json:"b,omitempty"`
}

// encodeMeta returns the metadata encoding of m. It does not check the
// size limit.
func encodeMeta(m overlay.Member) ([]byte, error) {
	w := wireMeta{
		V: metaVersion,
		H: string(m.Host),
		U: m.Underlay.String(),
		M: m.VTEPMAC.String(),
	}
	b, err := json.Marshal(w)
	if err != nil {
		return nil, fmt.Errorf("gossip: encode metadata: %w", err)
	}
	return b, nil
}

// decodeMeta decodes and validates metadata written by encodeMeta, or by
// a host of the previous release. It rejects an unknown version, unknown
// fields, trailing data, an empty host ID, an invalid underlay address and
// a MAC address that is not EUI-48. A "b" field, the blocks the previous
// release gossiped, is accepted whatever JSON it holds and ignored (see
// wireMeta). Errors wrap errBadMeta. The returned member shares no memory
// with b.
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
	// w.B is deliberately not looked at.
	return m, nil
}

// cloneMember returns a deep copy of m, so that callers cannot change the
// package's state through the returned MAC address.
func cloneMember(m overlay.Member) overlay.Member {
	m.VTEPMAC = slices.Clone(m.VTEPMAC)
	return m
}
