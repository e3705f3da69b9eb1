// Package attach is the attachment service of overlayd: it gives a
// container interface an address on a network and wires its host end,
// takes it back, checks it, collects what runtimes no longer use, and says
// whether a network can serve. It speaks no protocol: the CNI socket
// (daemon) adapts it, and so will the Docker driver. Its errors are
// *Error values whose Kind a front end maps to its own codes.
package attach

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/hostlink"
)

// Kind says what kind of failure an Error is: what a front end answers.
type Kind int

const (
	// Internal is a failure that retrying will not fix.
	Internal Kind = iota
	// UnknownNetwork: no such network exists.
	UnknownNetwork
	// Starting: the network, or overlayd, is not serving yet; try again
	// in a moment.
	Starting
	// Unavailable: the allocation store failed or could not be asked;
	// try again later.
	Unavailable
	// NoAddress: the network has no free address for this host.
	NoAddress
	// NotFound: the container interface holds no address.
	NotFound
	// Invalid: the request itself is wrong (a MAC address or a label);
	// the message says which part.
	Invalid
)

// Error is a failure of the service: a Kind, a message for a person, and
// the error underneath, if any.
type Error struct {
	Kind Kind
	Msg  string
	Err  error
}

// Error returns the message and the error underneath.
func (e *Error) Error() string {
	if e.Err == nil {
		return e.Msg
	}
	return e.Msg + ": " + e.Err.Error()
}

// Unwrap returns the error underneath.
func (e *Error) Unwrap() error { return e.Err }

func errorf(kind Kind, err error, format string, args ...any) *Error {
	return &Error{Kind: kind, Msg: fmt.Sprintf(format, args...), Err: err}
}

// KindOf returns the Kind of err: that of the *Error it wraps, or
// Internal.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return Internal
}

// Request names one container interface on one network.
type Request struct {
	// Network is the network's name.
	Network string
	// Key is the container interface.
	Key overlay.AttachmentKey
	// IP, when valid, is the address asked for: Allocate gives exactly it
	// or fails.
	IP netip.Addr
	// Endpoint is the MAC address the interface will have (nil: unknown,
	// the kernel picks it) and the endpoint's labels. Allocate records
	// them with a new address; an interface that holds one keeps the
	// endpoint it was given then, and the front end gives it that MAC.
	Endpoint overlay.Endpoint
}

// Attachment is what a container interface gets: its address and how to
// wire it.
type Attachment struct {
	// Network is the network's name.
	Network string
	// Addr is the address with its block's prefix length.
	Addr netip.Prefix
	// Gateway is the block's gateway on the host's bridge.
	Gateway netip.Addr
	// Subnet is the network's whole address space.
	Subnet netip.Prefix
	// MTU is the MTU for the veth pair.
	MTU int
	// Bridge is the host bridge the veth's host end joins.
	Bridge string
	// MAC is the container interface's MAC address, or nil when the
	// allocation predates recorded MAC addresses.
	MAC net.HardwareAddr
	// Labels are the endpoint's labels.
	Labels map[string]string
	// New is true when this request allocated the address.
	New bool
}

// Status is the health of one network on this host.
type Status struct {
	// Network is the network's name.
	Network string
	// Ready is true when an address can be allocated.
	Ready bool
	// Degraded is true when addresses can be allocated but existing
	// containers may have lost connectivity.
	Degraded bool
	// Reason says why not ready, or why degraded.
	Reason string
	// FreeAddresses counts the addresses still free in this host's blocks.
	FreeAddresses int
	// Peers counts the other hosts programmed in the dataplane.
	Peers int
}

// Pool is what a network's attachments need of its addresses: this
// host's blocks and its allocator (ipam.Pool).
type Pool interface {
	overlay.Allocator
	// Held returns the blocks addresses are allocated from.
	Held() []netip.Prefix
	// Headroom returns how many addresses are free and, when none is and
	// no block can be claimed, an error that says why.
	Headroom() (int, error)
}

// HostLinks are the host ends of containers' veths, by name: implemented
// by hostlink.Links. Its methods are safe for concurrent use and block on
// the kernel.
type HostLinks interface {
	// State reports the state of the link.
	State(name string) (hostlink.State, error)
	// MTU returns the MTU of the link, the same at both its ends when the
	// plugin made it, or 0 when it does not exist.
	MTU(name string) (int, error)
	// Detach sets the link down and takes it off its bridge: traffic
	// stops at once. A link that does not exist is not an error.
	Detach(name string) error
	// Delete deletes the link, and with it the container's end. A link
	// that does not exist is not an error.
	Delete(name string) error
}

var _ HostLinks = hostlink.Links{}

// Attacher is the service's operations on one network, as a front end
// sees them: Network implements it, and so does the answer of a network
// that is starting.
type Attacher interface {
	// Allocate gives the container interface an address, or returns the
	// one it holds. The allocation is decided, not yet durable: nobody is
	// to be told of it before Flush returns.
	Allocate(ctx context.Context, r Request) (Attachment, error)
	// Flush returns once every allocation and release decided so far is
	// durable.
	Flush(ctx context.Context) error
	// Detach takes the container interface off the network and releases
	// its address. One that holds none is not an error.
	Detach(ctx context.Context, r Request) error
	// Check returns the container interface's attachment.
	Check(ctx context.Context, r Request) (Attachment, error)
	// Status reports whether the network can allocate.
	Status(ctx context.Context) (Status, error)
	// GC releases every address of the network on this host that none of
	// valid holds, and returns those it released.
	GC(ctx context.Context, valid []overlay.AttachmentKey) ([]overlay.AttachmentKey, error)
	// Holder returns the allocation of this host that holds address a,
	// or an error of Kind NotFound.
	Holder(ctx context.Context, a netip.Addr) (overlay.Allocation, error)
	// Release releases address a of this host whoever holds it (see
	// Network.Release).
	Release(ctx context.Context, a netip.Addr, force bool) (overlay.AttachmentKey, bool, error)
	// Allocations returns this host's allocations of the network.
	Allocations(ctx context.Context) ([]overlay.Allocation, error)
}
