// Package overlay holds the types shared by every part of the overlay and
// the small interfaces (seams) between them: the dataplane, the block
// leaser, the address allocator and the membership. It imports neither
// netlink nor etcd, so the reconcile logic and the in-memory fakes in
// overlaytest depend on nothing else.
package overlay

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
)

// HostID identifies one host for its whole life. It is generated once and
// kept in the host's data directory; it is never derived from an address.
type HostID string

// Defaults for a network definition.
const (
	// DefaultBlockBits is the prefix length of the blocks a network's
	// CIDR is cut into: a /26 holds 64 addresses.
	DefaultBlockBits = 26
	// DefaultVNI is the VXLAN network identifier of the default network.
	// It differs from flannel's (1) and Calico's (4096) defaults, so the
	// overlay can share a host with either on the same UDP port.
	DefaultVNI = 7100
	// DefaultPort is the IANA-assigned VXLAN UDP port.
	DefaultPort = 4789
	// MaxNameLen bounds a network name so that the device names derived
	// from it fit the kernel's 15-byte interface name limit.
	MaxNameLen = 10
	// minBlockBits is the smallest useful block: network address,
	// gateway, one container, broadcast.
	minBlockBits = 30
	// MaxVNI is the largest 24-bit VXLAN network identifier.
	MaxVNI = 1<<24 - 1
	// maxBlocks bounds the blocks of one network: enough for 65536 hosts,
	// and few enough that listing the free ones stays cheap.
	maxBlocks = 1 << 16
)

// ErrInvalidNetwork is wrapped by every validation error of a Network.
var ErrInvalidNetwork = errors.New("overlay: invalid network")

// validName reports whether s is lower-case letters, digits and '-', not
// starting or ending with '-'. It is a loop rather than a regexp: the CNI
// plugin links this package, and compiling a regexp at start would cost
// every plugin exec.
func validName(s string) bool {
	if s == "" || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
			return false
		}
	}
	return true
}

// Network is the definition of one overlay network. It is stored in etcd
// and is the same on every host.
type Network struct {
	// Name identifies the network in etcd keys, device names and CNI
	// configuration. Lower-case letters, digits and '-', at most
	// MaxNameLen bytes.
	Name string `json:"name"`
	// CIDR is the address space of the whole network.
	CIDR netip.Prefix `json:"cidr"`
	// BlockBits is the prefix length of the blocks that hosts lease.
	BlockBits int `json:"blockBits"`
	// VNI is the VXLAN network identifier.
	VNI uint32 `json:"vni"`
	// Port is the VXLAN UDP destination port.
	Port uint16 `json:"port"`
	// ID identifies this network for its whole life, across a deletion
	// and a re-creation under the same name (CNM's network ID): 32
	// lower-case hex digits, given when the network is created. A network
	// created before IDs existed has none.
	ID string `json:"id,omitempty"`
	// MTU, when not 0, is the MTU of the network's devices and container
	// interfaces; 0 derives it on each host from the underlay's MTU less
	// the VXLAN overhead. A host whose underlay cannot carry it uses what
	// it can, and says so.
	MTU int `json:"mtu,omitempty"`
	// Labels are the operator's key/value pairs on the network (CNM's
	// network labels). The overlay does not interpret them.
	Labels map[string]string `json:"labels,omitempty"`
	// Masquerade, when not nil and false, turns off the masquerade of the
	// network's egress: containers then reach addresses outside the
	// overlay with their own address. Nil (the default) is on.
	Masquerade *bool `json:"masquerade,omitempty"`
}

// MasqueradeOn reports whether the network's egress is masqueraded to
// the host's address.
func (n Network) MasqueradeOn() bool { return n.Masquerade == nil || *n.Masquerade }

// Limits on a network's optional fields.
const (
	// MinMTU is the smallest MTU override: IPv4's minimum datagram size.
	MinMTU = 576
	// MaxMTU is the largest MTU override: a jumbo frame.
	MaxMTU = 9000
	// MaxLabels bounds the labels of one network or endpoint.
	MaxLabels = 64
	// MaxLabelKeyLen and MaxLabelValueLen bound one label.
	MaxLabelKeyLen   = 128
	MaxLabelValueLen = 1024
)

// Validate reports whether the definition can be used, naming the field
// that is wrong.
func (n Network) Validate() error {
	if err := ValidateName(n.Name); err != nil {
		return err
	}
	if !n.CIDR.IsValid() || !n.CIDR.Addr().Is4() {
		return fmt.Errorf("%w: cidr %q: want an IPv4 prefix such as 198.19.0.0/16", ErrInvalidNetwork, n.CIDR)
	}
	if n.CIDR != n.CIDR.Masked() {
		return fmt.Errorf("%w: cidr %s has host bits set (did you mean %s?)", ErrInvalidNetwork, n.CIDR, n.CIDR.Masked())
	}
	if n.BlockBits > minBlockBits {
		return fmt.Errorf("%w: blockBits %d: a block must be /%d or larger", ErrInvalidNetwork, n.BlockBits, minBlockBits)
	}
	if n.BlockBits < n.CIDR.Bits() {
		return fmt.Errorf("%w: cidr %s is too small for blocks of /%d: use a larger cidr or a smaller block (larger blockBits)", ErrInvalidNetwork, n.CIDR, n.BlockBits)
	}
	if n.BlockBits-n.CIDR.Bits() > 16 {
		return fmt.Errorf("%w: cidr %s holds more than %d blocks of /%d: use larger blocks (smaller blockBits)", ErrInvalidNetwork, n.CIDR, maxBlocks, n.BlockBits)
	}
	if n.VNI == 0 || n.VNI > MaxVNI {
		return fmt.Errorf("%w: vni %d: want 1 to %d", ErrInvalidNetwork, n.VNI, MaxVNI)
	}
	if n.Port == 0 {
		return fmt.Errorf("%w: port must not be 0", ErrInvalidNetwork)
	}
	if n.ID != "" && !validID(n.ID) {
		return fmt.Errorf("%w: id %q: want %d lower-case hex digits", ErrInvalidNetwork, n.ID, IDLen)
	}
	if n.MTU != 0 && (n.MTU < MinMTU || n.MTU > MaxMTU) {
		return fmt.Errorf("%w: mtu %d: want %d to %d, or 0 to derive it from the underlay", ErrInvalidNetwork, n.MTU, MinMTU, MaxMTU)
	}
	if err := ValidateLabels(n.Labels); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidNetwork, err)
	}
	return nil
}

// ValidateName returns an error, wrapping ErrInvalidNetwork, unless name
// can name a network.
func ValidateName(name string) error {
	if len(name) == 0 || len(name) > MaxNameLen || !validName(name) {
		return fmt.Errorf("%w: name %q: want 1 to %d lower-case letters, digits or '-'", ErrInvalidNetwork, name, MaxNameLen)
	}
	return nil
}

// IDLen is the length of a network ID in hex digits.
const IDLen = 32

func validID(s string) bool {
	if len(s) != IDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// ValidateLabels checks a set of labels: at most MaxLabels, each key 1 to
// MaxLabelKeyLen printable bytes without '=' or white space, each value at
// most MaxLabelValueLen bytes without control characters.
func ValidateLabels(labels map[string]string) error {
	if len(labels) > MaxLabels {
		return fmt.Errorf("%d labels: want at most %d", len(labels), MaxLabels)
	}
	for k, v := range labels {
		if k == "" || len(k) > MaxLabelKeyLen {
			return fmt.Errorf("label key %q: want 1 to %d bytes", k, MaxLabelKeyLen)
		}
		for i := 0; i < len(k); i++ {
			if c := k[i]; c <= ' ' || c == '=' || c == 0x7f {
				return fmt.Errorf("label key %q: want no '=', white space or control characters", k)
			}
		}
		if len(v) > MaxLabelValueLen {
			return fmt.Errorf("label %q: value of %d bytes: want at most %d", k, len(v), MaxLabelValueLen)
		}
		for i := 0; i < len(v); i++ {
			if c := v[i]; c < ' ' || c == 0x7f {
				return fmt.Errorf("label %q: value has a control character", k)
			}
		}
	}
	return nil
}

// Diff returns the name of the first field of the address space and the
// encapsulation (name, cidr, blockBits, vni, port) in which n and o
// differ, or "" when they are the same. ID, MTU and labels are not
// compared: a start-up flag that makes sure a network exists does not
// give them.
func (n Network) Diff(o Network) string {
	switch {
	case n.Name != o.Name:
		return "name"
	case n.CIDR != o.CIDR:
		return "cidr"
	case n.BlockBits != o.BlockBits:
		return "blockBits"
	case n.VNI != o.VNI:
		return "vni"
	case n.Port != o.Port:
		return "port"
	}
	return ""
}

// NumBlocks returns how many blocks the network's CIDR holds.
func (n Network) NumBlocks() int {
	return 1 << (n.BlockBits - n.CIDR.Bits())
}

// Block returns the i-th block of the network, 0 <= i < NumBlocks().
func (n Network) Block(i int) netip.Prefix {
	v := addrToUint(n.CIDR.Addr()) + uint32(i)<<(32-n.BlockBits)
	return netip.PrefixFrom(uintToAddr(v), n.BlockBits)
}

// BlockIndex returns the index of block b in the network, or -1 when b is
// not one of its blocks.
func (n Network) BlockIndex(b netip.Prefix) int {
	if b.Bits() != n.BlockBits || !n.CIDR.Contains(b.Addr()) || b.Masked() != b {
		return -1
	}
	off := addrToUint(b.Addr()) - addrToUint(n.CIDR.Addr())
	return int(off >> (32 - n.BlockBits))
}

// BlockCapacity returns how many containers one block of the network
// holds: all its addresses but the network, gateway and broadcast
// addresses.
func (n Network) BlockCapacity() int { return 1<<(32-n.BlockBits) - 3 }

// Prefixes of the names of a network's devices, followed by its name.
const (
	BridgePrefix = "ovbr-"
	VXLANPrefix  = "ovvx-"
)

// BridgeName returns the name of the bridge that holds the network's
// gateway addresses and the host ends of its containers' veths.
func (n Network) BridgeName() string { return BridgePrefix + n.Name }

// VXLANName returns the name of the network's VXLAN device.
func (n Network) VXLANName() string { return VXLANPrefix + n.Name }

// Gateway returns the gateway address of a block: its first host address.
// It sits on the bridge and is the containers' next hop.
func Gateway(block netip.Prefix) netip.Addr {
	return block.Masked().Addr().Next()
}

// Broadcast returns the last address of a block.
func Broadcast(block netip.Prefix) netip.Addr {
	v := addrToUint(block.Masked().Addr()) | (1<<(32-block.Bits()) - 1)
	return uintToAddr(v)
}

func addrToUint(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func uintToAddr(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// HostVethPrefix starts the name of every host end of a container's veth.
const HostVethPrefix = "ovl"

// maxIfNameLen is the kernel's limit on an interface name, in bytes
// (IFNAMSIZ less the terminating NUL).
const maxIfNameLen = 15

// HostVethName derives the name of the host end of an attachment's veth
// from what identifies it, so that DEL, GC and overlayd find it without
// any stored state. It fits the kernel's 15-byte limit.
func HostVethName(network string, key AttachmentKey) string {
	sum := sha256.Sum256([]byte(network + "/" + key.ContainerID + "/" + key.IfName))
	return HostVethPrefix + hex.EncodeToString(sum[:])[:maxIfNameLen-len(HostVethPrefix)]
}
