package overlay

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"time"
)

// Sentinel errors shared by the implementations of the seams.
var (
	// ErrNotFound is returned when an allocation, block or network does
	// not exist.
	ErrNotFound = errors.New("overlay: not found")
	// ErrPoolExhausted is returned when no block or no address is free.
	ErrPoolExhausted = errors.New("overlay: address pool exhausted")
	// ErrConflict is returned when stored state disagrees with what the
	// caller expected, for example a network definition that differs.
	ErrConflict = errors.New("overlay: conflict")
	// ErrBlockLost is returned when a block this host held is now another
	// host's, or was deleted.
	ErrBlockLost = errors.New("overlay: block lost")
)

// Peer is another host as the dataplane programs it: where to send
// VXLAN packets for which blocks.
type Peer struct {
	// Host is the peer's host ID.
	Host HostID
	// Underlay is the peer's underlay address, the VXLAN destination.
	Underlay netip.Addr
	// VTEPMAC is the MAC address of the peer's VXLAN device.
	VTEPMAC net.HardwareAddr
	// Blocks are the peer's blocks of this network, sorted.
	Blocks []netip.Prefix
}

// DataplaneConfig is the whole desired state of one network's dataplane
// on this host.
type DataplaneConfig struct {
	// Network is the network being programmed.
	Network Network
	// Underlay is the local underlay address the VXLAN device binds to.
	Underlay netip.Addr
	// UnderlayLink is the name of the underlay interface, or "" to let
	// the kernel route VXLAN packets by destination.
	UnderlayLink string
	// MTU is the MTU of the VXLAN device, the bridge and the veths.
	MTU int
	// VTEPMAC is the MAC address of the local VXLAN device.
	VTEPMAC net.HardwareAddr
	// BridgeMAC is the MAC address of the bridge, the containers'
	// gateway. It is fixed so that attaching or detaching a container
	// never changes it (a bridge without one takes the lowest MAC of its
	// ports); nil leaves the bridge's address alone.
	BridgeMAC net.HardwareAddr
	// Blocks are this host's blocks; their gateways go on the bridge.
	Blocks []netip.Prefix
	// Peers are the other hosts, sorted by host ID.
	Peers []Peer
}

// Dataplane converges the kernel to a desired state. Implementations are
// safe for concurrent use; calls block while they talk to the kernel.
type Dataplane interface {
	// Set converges the network's devices, routes, neighbour and FDB
	// entries to cfg: it adds what is missing, replaces what differs,
	// removes what is stale and recreates devices that were deleted.
	// Calling it again with the same cfg changes nothing. A failure on
	// one entry does not stop the others: the error joins them all.
	Set(ctx context.Context, cfg DataplaneConfig) error
	// Delete removes the network's devices and every entry on them. A
	// network that has no devices is not an error.
	Delete(ctx context.Context, n Network) error
}

// Difference is one way a network's dataplane in the kernel differs from
// the state it should have (DataplaneChecker).
type Difference struct {
	// Kind is what differs: "device", "gateway", "fdb", "neighbour" or
	// "route".
	Kind string `json:"kind"`
	// Want is the entry the desired state holds; "" when the kernel's
	// entry is stale.
	Want string `json:"want,omitempty"`
	// Have is the kernel's entry; "" when it is missing.
	Have string `json:"have,omitempty"`
}

// String says what differs, for a person.
func (d Difference) String() string {
	switch {
	case d.Have == "":
		return d.Kind + " missing: " + d.Want
	case d.Want == "":
		return d.Kind + " stale: " + d.Have
	}
	return d.Kind + " differs: have " + d.Have + ", want " + d.Want
}

// DataplaneChecker reads a network's dataplane back from the kernel.
type DataplaneChecker interface {
	// Check returns how the kernel's state of cfg.Network differs from
	// cfg, changing nothing. The error reports what could not be read;
	// the differences found in the rest are still returned.
	Check(ctx context.Context, cfg DataplaneConfig) ([]Difference, error)
}

// BlockOwners reports who owns the blocks of one network.
type BlockOwners interface {
	// Owners returns the owner of every claimed block. It blocks on the
	// store and fails when the store cannot be read.
	Owners(ctx context.Context) (map[netip.Prefix]HostID, error)
}

// HostInfo is what the store knows of a host: where the dataplane sends
// its traffic. It is the only source of a peer's underlay address and VTEP
// MAC; gossip is never trusted for them.
type HostInfo struct {
	// Host is the host's ID.
	Host HostID
	// Underlay is the host's underlay address, the VXLAN destination.
	Underlay netip.Addr
	// VTEPMAC is the MAC address of the host's VXLAN devices.
	VTEPMAC net.HardwareAddr
	// Registered is when the host last registered. Of two hosts that
	// claim one underlay address (a machine reinstalled with a new host
	// ID, or an address moved to another machine), the later wins.
	Registered time.Time
}

// HostDirectory reports the hosts registered in the store.
type HostDirectory interface {
	// Hosts returns every registered host. It blocks on the store and
	// fails only when the store cannot be read: a record that cannot be
	// decoded is left out (and reported by the implementation), so that
	// one bad record does not stop every other host being programmed.
	Hosts(ctx context.Context) ([]HostInfo, error)
}

// AttachmentKey identifies one container interface: the key of an
// address allocation.
type AttachmentKey struct {
	// ContainerID is the runtime's container ID (CNI_CONTAINERID).
	ContainerID string `json:"containerID"`
	// IfName is the interface name inside the container (CNI_IFNAME).
	IfName string `json:"ifName"`
}

// String returns "containerID/ifName".
func (k AttachmentKey) String() string { return k.ContainerID + "/" + k.IfName }

// Allocation is an address held by one container interface.
type Allocation struct {
	// Key is the container interface holding the address.
	Key AttachmentKey `json:"key"`
	// Addr is the address with the prefix length of its block.
	Addr netip.Prefix `json:"addr"`
	// Host is the host whose block the address belongs to.
	Host HostID `json:"host"`
	// Endpoint is the interface's MAC address and labels, decided with
	// the address.
	Endpoint Endpoint `json:"-"`
	// New is true when this call allocated the address, false when the
	// key already held it.
	New bool `json:"-"`
}

// Allocator hands out addresses of one network from this host's blocks.
// Implementations are safe for concurrent use. Allocate, AllocateAddr and
// Release decide at once, and every later call sees the decision; Flush
// makes the decisions made before it durable. Nobody is to be told of a
// decision before a Flush after it has returned.
type Allocator interface {
	// Allocate returns the address of key, allocating a free one, with
	// endpoint ep, when key holds none; a key that holds one keeps it and
	// its endpoint. It fails with ErrPoolExhausted when none is free.
	Allocate(ctx context.Context, key AttachmentKey, ep Endpoint) (Allocation, error)
	// AllocateAddr gives key the address a, with endpoint ep, which must
	// be a free container address of this host's blocks; a key that holds
	// a already gets it again, with its endpoint. Anything else is an
	// error wrapping ErrConflict.
	AllocateAddr(ctx context.Context, key AttachmentKey, a netip.Addr, ep Endpoint) (Allocation, error)
	// Release frees the address of key. Releasing a key that holds no
	// address is not an error.
	Release(ctx context.Context, key AttachmentKey) error
	// Flush returns once every decision made before it is durable.
	Flush(ctx context.Context) error
	// Lookup returns the allocation of key, or ErrNotFound.
	Lookup(ctx context.Context, key AttachmentKey) (Allocation, error)
	// List returns every allocation on this host.
	List(ctx context.Context) ([]Allocation, error)
}

// Member is what a host says about itself over gossip. Only its presence
// is trusted (the host is alive); the rest is checked against the store.
type Member struct {
	// Host is the member's host ID.
	Host HostID
	// Underlay is the member's underlay address.
	Underlay netip.Addr
	// VTEPMAC is the MAC address of the member's VXLAN devices.
	VTEPMAC net.HardwareAddr
}

// Membership is the set of live hosts learned over gossip.
type Membership interface {
	// Members returns the other live hosts. It does not block.
	Members() []Member
}
