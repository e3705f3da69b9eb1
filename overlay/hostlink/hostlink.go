// Package hostlink handles containers' veths: creating a pair in one
// netlink request (AddVeth), and, by name on one netlink handle, their
// host ends' state, detaching them, deleting them and deleting stale
// ones. A link that does not exist, or vanishes while it is handled
// (destroying a namespace takes the pair with it), is what detaching and
// deleting want anyway, so neither calls that an error.
package hostlink

import (
	"errors"
	"fmt"
	"net"
	"syscall"

	"github.com/vishvananda/netlink"
)

// State is what the host says of a container's host veth.
type State int

// The states of a host veth.
const (
	// Gone means there is no such link: nothing can hold the attachment's
	// address.
	Gone State = iota
	// Attached means the link is on a bridge or up: in use.
	Attached
	// Detached means the link is down and off any bridge, as a DEL leaves
	// it until it is deleted: a pending deletion.
	Detached
)

// Links handles host links on a netlink handle. It is safe for concurrent
// use as far as the handle is; its methods block on the kernel.
type Links struct{ h *netlink.Handle }

// New returns Links on h.
func New(h *netlink.Handle) Links { return Links{h: h} }

// Vanished reports whether err says the link no longer exists.
func Vanished(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, syscall.ENODEV) || errors.Is(err, syscall.ENOENT)
}

// find returns the link, or nil when it does not exist.
func (l Links) find(name string) (netlink.Link, error) {
	link, err := l.h.LinkByName(name)
	if Vanished(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("find link %s: %w", name, err)
	}
	return link, nil
}

// State reports the state of the link.
func (l Links) State(name string) (State, error) {
	link, err := l.find(name)
	switch {
	case err != nil:
		return Gone, err
	case link == nil:
		return Gone, nil
	case link.Attrs().MasterIndex == 0 && link.Attrs().Flags&net.FlagUp == 0:
		return Detached, nil
	}
	return Attached, nil
}

// MTU returns the MTU of the link, or 0 when it does not exist.
func (l Links) MTU(name string) (int, error) {
	link, err := l.find(name)
	if err != nil || link == nil {
		return 0, err
	}
	return link.Attrs().MTU, nil
}

// Detach sets the link down and takes it off its bridge: its traffic
// stops at once.
func (l Links) Detach(name string) error {
	link, err := l.find(name)
	if err != nil || link == nil {
		return err
	}
	if err := l.h.LinkSetDown(link); err != nil && !Vanished(err) {
		return fmt.Errorf("set %s down: %w", name, err)
	}
	if err := l.h.LinkSetNoMaster(link); err != nil && !Vanished(err) {
		return fmt.Errorf("take %s off its bridge: %w", name, err)
	}
	return nil
}

// Delete deletes the link, and with a veth its peer.
func (l Links) Delete(name string) error {
	link, err := l.find(name)
	if err != nil || link == nil {
		return err
	}
	return l.DeleteLink(link)
}

// DeleteLink deletes a link already looked up.
func (l Links) DeleteLink(link netlink.Link) error {
	if err := l.h.LinkDel(link); err != nil && !Vanished(err) {
		return fmt.Errorf("delete link %s: %w", link.Attrs().Name, err)
	}
	return nil
}
