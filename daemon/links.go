package daemon

import "github.com/overlaynet/overlay/overlay/hostlink"

// HostLinks are the host-side veths of containers, by name: the seam the
// CNI handler uses, implemented by hostlink.Links. Its methods are safe
// for concurrent use and block on the kernel.
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
